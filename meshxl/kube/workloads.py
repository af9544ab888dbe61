"""``meshxl inject``: injection applied offline to the pod templates of workloads.

Like ``istioctl kube-inject``: every Pod, and the pod template of every Deployment,
StatefulSet, DaemonSet, ReplicaSet, Job and CronJob in a multi-document YAML stream
gets the sidecars (unless it opted out or already has them); other documents pass
through unchanged. Pure: YAML text in, YAML text out.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from .inject import InjectConfig, InjectError, decide, mutate_pod

__all__ = ["MAX_INJECT_BYTES", "MAX_INJECT_DEPTH", "MAX_INJECT_VALUES", "InjectReport",
           "inject_documents", "inject_object", "inject_yaml"]

MAX_INJECT_BYTES = 16 * 1024 * 1024
"""Largest input of ``meshxl inject`` (the API server takes objects of up to 1.5 MiB)."""
MAX_INJECT_DEPTH = 100
"""Deepest nesting of mappings and lists (a pod template needs about 15)."""
MAX_INJECT_VALUES = 2_000_000
"""Most values the input may expand to, YAML aliases counted at every use."""

#: Where each workload kind keeps its pod template.
_TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}


@dataclass(frozen=True)
class InjectReport:
    """One document's outcome, for the summary on stderr."""

    kind: str
    name: str
    injected: bool
    reason: str

    def __str__(self) -> str:
        what = "injected" if self.injected else "skipped"
        return f"{self.kind}/{self.name}: {what} ({self.reason})"


def _name(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return str(meta.get("name") or meta.get("generateName") or "<unnamed>")


def _template(obj: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    node: Any = obj
    for key in path:
        if not isinstance(node, dict) or not isinstance(node.get(key), dict):
            raise InjectError(f"{obj.get('kind')}/{_name(obj)}: no {'.'.join(path)}")
        node = node[key]
    return node  # type: ignore[no-any-return]


def inject_object(obj: Any, config: InjectConfig) -> tuple[Any, list[InjectReport]]:
    """Inject one document; a ``List`` is handled item by item."""
    if not isinstance(obj, dict):
        return obj, []
    kind = obj.get("kind")
    if kind == "List" and isinstance(obj.get("items"), list):
        out = dict(obj)
        reports: list[InjectReport] = []
        items = []
        for item in obj["items"]:
            new, item_reports = inject_object(item, config)
            items.append(new)
            reports += item_reports
        out["items"] = items
        return out, reports
    if not isinstance(kind, str) or (kind != "Pod" and kind not in _TEMPLATE_PATHS):
        return obj, []
    name = _name(obj)
    try:
        pod = obj if kind == "Pod" else _template(obj, _TEMPLATE_PATHS[kind])
        decision = decide(pod, namespace_enabled=True)
        if not decision.inject:
            return obj, [InjectReport(kind, name, False, decision.reason)]
        mutated = mutate_pod(pod, config)
    except InjectError as exc:
        raise InjectError(f"{kind}/{name}: {exc}") from None
    if kind == "Pod":
        return mutated, [InjectReport(kind, name, True, decision.reason)]
    out = dict(obj)
    parent = out
    path = _TEMPLATE_PATHS[kind]
    for key in path[:-1]:
        parent[key] = dict(parent[key])
        parent = parent[key]
    parent[path[-1]] = mutated
    return out, [InjectReport(kind, name, True, decision.reason)]


def inject_documents(docs: list[Any], config: InjectConfig
                     ) -> tuple[list[Any], list[InjectReport]]:
    out, reports = [], []
    for doc in docs:
        new, doc_reports = inject_object(doc, config)
        out.append(new)
        reports += doc_reports
    return out, reports


def _load_all(text: str, source: str) -> Iterator[Any]:
    try:
        yield from yaml.safe_load_all(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        reason = getattr(exc, "problem", None) or str(exc)
        raise InjectError(f"{where}: YAML syntax error: {reason}") from None


def inject_yaml(text: str, config: InjectConfig, source: str = "<input>"
                ) -> tuple[str, list[InjectReport]]:
    """Inject a multi-document YAML stream; empty documents are dropped."""
    docs = [d for d in _load_all(text, source) if d is not None]
    for doc in docs:
        if not isinstance(doc, dict):
            raise InjectError(f"{source}: every document must be a Kubernetes object "
                              f"(a mapping), got {type(doc).__name__}")
    out, reports = inject_documents(docs, config)
    rendered = yaml.safe_dump_all(out, sort_keys=False, default_flow_style=False)
    return rendered, reports
