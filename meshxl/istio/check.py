"""``meshxl istio check``: what would make meshxl's Istio objects ineffective (pure).

In the spirit of ``istioctl analyze``: it reads a namespace's objects (files or
``kubectl get ... -o yaml`` output: multi-document YAML and ``List`` kinds) and the
model, renders what ``meshxl istio render`` would, and reports:

* another DestinationRule for a cluster's host (Istio keeps one traffic policy per
  host: meshxl's may be the one dropped);
* a Service port the EnvoyFilter does not match (the patches then apply to nothing);
* a meshxl DestinationRule without outlier detection (Istio ignores the failover
  order without it);
* an Istio too old for the objects (DestinationRule v1 needs 1.22, ``retryBudget``
  1.27: render for an older one with ``--istio-version``), from ``--istio-version`` or
  the istiod Deployment's image tag;
* high-availability member pods without role labels (``meshxl istio label`` not
  running: every member would share one priority), unless the applied EnvoyFilter takes
  the endpoints from meshxl (``render --endpoints meshxl``: no label, no outlier
  detection needed for the failover order);
* VirtualService retries that disagree with ``retries.previous_hosts``;
* EnvoyFilters in the root namespace without a workload selector;
* client pods an EnvoyFilter of ``render --xds-tls`` patches whose annotations do not
  give their sidecar the certificate files (:mod:`.tlscheck`);
* a Service port that does not declare the cluster's protocol (``protocol: grpc`` needs
  a ``grpc-...`` port name or ``appProtocol: grpc``; a TCP cluster ``tcp``): declaring
  another one is an error, declaring none a warning (:mod:`meshxl.istio.protocols`);
* pinned sessions (``stickiness.pin``): Istio's own persistent-session labels on the
  cluster's Service (or on a Service of a cluster without a pin), an applied EnvoyFilter
  that does not pin (rendered before the model had a pin), an istiod whose draining
  label is not the one ``meshxl istio label`` writes, and VirtualService routes that
  send a strictly pinned host's traffic to another destination;
* pools and virtual systems: what breaks their placement (:mod:`.poolcheck`).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from meshxl.errors import InputError
from meshxl.model import ModelSpec

from .labels import (
    DRAINING_LABEL,
    ISTIO_SESSION_LABELS,
    ROLE_LABEL,
    SERVING_LABEL,
    istio_session_labels,
    session_label_problem,
    sick_entry,
)
from .poolcheck import check_pools
from .protocols import port_problem, service_port
from .render import (
    IstioOptions,
    IstioRenderError,
    pin_filter_name,
    render_cluster,
    service_ports,
)
from .tlscheck import unready_client_pods
from .versions import MIN_ISTIO, RETRY_BUDGET_ISTIO

__all__ = ["CheckInputError", "Finding", "MIN_ISTIO", "check", "istio_version_of",
           "istiod_env", "load_objects"]

_MAX_INPUT = 32 * 1024 * 1024
_VERSION = re.compile(r"^v?(\d+)\.(\d+)(?:\.\d+)?")


class CheckInputError(InputError):
    """Objects that cannot be read (the message names the file)."""


@dataclass(frozen=True)
class Finding:
    level: Literal["error", "warning"]
    cluster: str
    object: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def load_objects(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Kubernetes objects from YAML files ('-': stdin), ``List`` kinds flattened."""
    out: list[dict[str, Any]] = []
    for path in paths:
        try:
            if str(path) == "-":
                text = sys.stdin.read(_MAX_INPUT + 1)
            else:
                with open(path, encoding="utf-8") as fh:
                    text = fh.read(_MAX_INPUT + 1)
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckInputError(f"{path}: {exc}") from None
        if len(text) > _MAX_INPUT:
            raise CheckInputError(f"{path}: larger than {_MAX_INPUT // (1024 * 1024)} MiB")
        try:
            docs = list(yaml.safe_load_all(text))
        except yaml.YAMLError as exc:
            raise CheckInputError(f"{path}: not YAML: {exc}".splitlines()[0]) from None
        for doc in docs:
            out += _flatten(doc, str(path))
    return out


def _flatten(doc: Any, where: str) -> list[dict[str, Any]]:
    if doc is None:
        return []
    if not isinstance(doc, dict) or not isinstance(doc.get("kind"), str):
        raise CheckInputError(f"{where}: a document is not a Kubernetes object (no kind)")
    if doc["kind"] == "List" or doc["kind"].endswith("List") and "items" in doc:
        items = doc.get("items") or []
        if not isinstance(items, list):
            raise CheckInputError(f"{where}: {doc['kind']} items is not a list")
        return [o for item in items for o in _flatten(item, where)]
    meta = doc.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
        raise CheckInputError(f"{where}: a {doc['kind']} has no metadata.name")
    if not isinstance(meta.get("namespace", ""), str) or \
            not isinstance(meta.get("labels", {}), dict):
        raise CheckInputError(f"{where}: {doc['kind']} {meta['name']}: metadata.namespace "
                              "must be a string and metadata.labels a mapping")
    return [doc]


def istio_version_of(objects: Iterable[Mapping[str, Any]]) -> tuple[int, int] | None:
    """The Istio minor version from the istiod Deployment's image tag, if present."""
    for obj in objects:
        if obj.get("kind") != "Deployment":
            continue
        if not str(obj["metadata"]["name"]).startswith("istiod"):
            continue
        template = _map(_map(obj.get("spec")).get("template"))
        for container in _list(_map(template.get("spec")).get("containers")):
            image = str(container.get("image", "")) if isinstance(container, dict) else ""
            tag = image.rsplit("/", 1)[-1].partition(":")[2].partition("@")[0]
            version = parse_version(tag)
            if version is not None:
                return version
    return None


def istiod_env(objects: Iterable[Mapping[str, Any]]) -> dict[str, str] | None:
    """The literal environment of the istiod Deployment's containers (its feature
    flags), or None when no istiod Deployment is among the objects."""
    found = None
    for obj in objects:
        if obj.get("kind") != "Deployment" or \
                not str(obj["metadata"]["name"]).startswith("istiod"):
            continue
        found = found or {}
        template = _map(_map(obj.get("spec")).get("template"))
        for container in _list(_map(template.get("spec")).get("containers")):
            for var in _list(_map(container).get("env")):
                var = _map(var)
                if isinstance(var.get("name"), str) and isinstance(var.get("value"), str):
                    found[var["name"]] = var["value"]
    return found


def parse_version(text: str) -> tuple[int, int] | None:
    match = _VERSION.match(text.strip())
    return (int(match[1]), int(match[2])) if match else None


def _map(value: Any) -> Mapping[str, Any]:
    """A mapping field of an object, or empty when it is missing or malformed."""
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _ref(obj: Mapping[str, Any]) -> str:
    meta = obj["metadata"]
    ns = meta.get("namespace")
    return f"{obj['kind']} {f'{ns}/' if ns else ''}{meta['name']}"


def _host_matches(host: str, name: str, options: IstioOptions,
                  namespace: str | None = None) -> bool:
    """Whether a DestinationRule/VirtualService host names the cluster's Service. A
    short name is resolved in the object's own ``namespace``, as Istio does."""
    ns = options.namespace
    fqdn = f"{name}.{ns}.svc.{options.cluster_domain}"
    if host == name:
        return (namespace or ns) == ns
    if host in (f"{name}.{ns}", f"{name}.{ns}.svc", fqdn):
        return True
    if host.startswith("*"):
        return fqdn.endswith(host[1:])
    return False


def eds_from_meshxl(filters: Iterable[Mapping[str, Any]], name: str) -> bool:
    """Whether the applied EnvoyFilter ``name`` takes its cluster's endpoints from
    meshxl's xDS server (``render --endpoints meshxl``: its CLUSTER patch sets
    ``eds_cluster_config``)."""
    for obj in filters:
        if obj["metadata"].get("name") != name:
            continue
        for patch in _list(_map(obj.get("spec")).get("configPatches")):
            value = _map(_map(_map(patch).get("patch")).get("value"))
            if _map(patch).get("applyTo") == "CLUSTER" and "eds_cluster_config" in value:
                return True
    return False


def check(model: ModelSpec, objects: list[dict[str, Any]], options: IstioOptions, *,
          istio_version: tuple[int, int] | None = None) -> list[Finding]:
    findings: list[Finding] = []
    ns = options.namespace

    def add(level: Literal["error", "warning"], cluster: str, obj: str, msg: str) -> None:
        findings.append(Finding(level, cluster, obj, msg))

    def in_ns(obj: Mapping[str, Any]) -> bool:
        return (obj["metadata"].get("namespace") or ns) == ns

    def labels_of(obj: Mapping[str, Any]) -> Mapping[str, Any]:
        return _map(obj["metadata"].get("labels"))

    by_kind: dict[str, list[dict[str, Any]]] = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], []).append(obj)
    version = istio_version or istio_version_of(objects)
    # What meshxl renders for that Istio (meshxl istio render --istio-version).
    render_for = version if version is not None and version >= MIN_ISTIO \
        else options.istio_version
    uses_budget = False  # a DestinationRule of ours in the namespace has a retryBudget
    env = istiod_env(objects)
    # istiod's own persistent-session Service labels (its env can rename or disable them).
    session_labels = tuple(
        (env or {}).get(var, default) for var, default in zip(
            ("PILOT_PERSISTENT_SESSION_LABEL", "PILOT_PERSISTENT_SESSION_HEADER_LABEL"),
            ISTIO_SESSION_LABELS, strict=True))
    draining_label = (env or {}).get("PILOT_DRAINING_LABEL", DRAINING_LABEL)

    for spec in model.clusters:
        name = spec.name
        services = [s for s in by_kind.get("Service", [])
                    if s["metadata"]["name"] == name and in_ns(s)]
        try:
            rendered = render_cluster(spec, IstioOptions(**{
                **options.__dict__, "services": {name: services[0]} if services else {},
                "istio_version": render_for}))
        except IstioRenderError as exc:
            add("error", name, f"Service {ns}/{name}", str(exc))
            continue
        dr, ef = rendered.objects
        from_meshxl = eds_from_meshxl(by_kind.get("EnvoyFilter", []), ef["metadata"]["name"])
        pin = spec.stickiness.pin if spec.stickiness is not None else None
        if not services:
            add("error", name, f"Service {ns}/{name}",
                "no Service of the cluster's name: Istio's host for the cluster does not "
                "exist, the DestinationRule and EnvoyFilter apply to nothing")
        else:
            problem = session_label_problem(
                spec, istio_session_labels(services[0], session_labels))
            if problem is not None:
                add("error" if pin is not None else "warning", name, _ref(services[0]),
                    problem)
            # The Service port must declare what the cluster speaks (Istio reads it).
            port = next(p["match"]["cluster"]["portNumber"] for p in ef["spec"]["configPatches"]
                        if p["applyTo"] == "CLUSTER")
            entry = service_port(services[0], port)
            found = port_problem(spec, entry) if entry is not None else None
            if found is not None:
                add(found[0], name, _ref(services[0]), found[1])
        if pin is not None and draining_label != DRAINING_LABEL:
            add("error", name, "istiod",
                f"istiod's PILOT_DRAINING_LABEL is {draining_label!r}, meshxl istio label "
                f"marks drained members {DRAINING_LABEL}: the pinned sessions of a drained "
                "member (member down, site offline) stay on it")

        # DestinationRules: ours, others for the same host.
        ours_name = dr["metadata"]["name"]
        ours = None
        for other in by_kind.get("DestinationRule", []):
            host = str(_map(other.get("spec")).get("host", ""))
            other_ns = other["metadata"].get("namespace")
            if not _host_matches(host, name, options,
                                 other_ns if isinstance(other_ns, str) else None):
                continue
            if other["metadata"]["name"] == ours_name and in_ns(other):
                ours = other
                continue
            add("error", name, _ref(other),
                f"another DestinationRule for host {host}: Istio keeps one traffic policy "
                "per host (the oldest rule wins; rules in one namespace are merged "
                f"without overriding), so {ours_name}'s load balancing and failover may "
                "be dropped; delete it or move its settings into the model")
        if ours is not None:
            uses_budget |= "retryBudget" in _map(_map(ours.get("spec")).get("trafficPolicy"))
        if ours is None:
            add("warning", name, f"DestinationRule {ns}/{ours_name}",
                "not applied (meshxl istio render | kubectl apply -f -)")
        elif not from_meshxl:
            policy = _map(_map(ours.get("spec")).get("trafficPolicy"))
            if "outlierDetection" not in policy:
                add("error", name, _ref(ours),
                    "no outlierDetection: Istio ignores failoverPriority and failover "
                    "without it, so every tier shares the traffic")
            chain = _map(_map(policy.get("loadBalancer")).get("localityLbSetting")).get(
                "failoverPriority")
            sick = sick_entry(spec) if name not in model.virtual_names else []
            if sick and (not isinstance(chain, list) or chain[:1] != sick):
                add("warning", name, _ref(ours),
                    f"failoverPriority does not start with {sick[0]}: a degraded member "
                    "keeps its sessions (rendered before degradation.action: move?); "
                    "apply meshxl istio render's output again")

        # EnvoyFilters: ours matches the Service port; none is mesh-wide unselected.
        ef_name = ef["metadata"]["name"]
        for other in by_kind.get("EnvoyFilter", []):
            if other["metadata"]["name"] != ef_name:
                continue
            other_spec = _map(other.get("spec"))
            pins: list[str] = []
            numbers = [p for p, _ in service_ports(services[0])] if services else []
            wrong: list[Any] = []
            for patch in _list(other_spec.get("configPatches")):
                match = _map(_map(patch).get("match"))
                for matched in (match.get("cluster"), match.get("listener")):
                    applied = _map(matched).get("portNumber")
                    if applied is not None and numbers and applied not in numbers \
                            and applied not in wrong:
                        wrong.append(applied)
                        add("error", name, _ref(other),
                            f"matches port {applied}, the Service's ports are "
                            f"{', '.join(map(str, numbers))}: the patches apply to nothing "
                            "(render with --services or --port SERVICE_PORT)")
                if _map(patch).get("applyTo") == "HTTP_FILTER":
                    value = _map(_map(_map(patch).get("patch")).get("value"))
                    pins.append(str(value.get("name", "")))
            if (other["metadata"].get("namespace") or ns) == (options.filter_namespace or ns):
                if pin is not None and pin_filter_name(spec, options) not in pins:
                    add("error", name, _ref(other),
                        "does not pin sessions (no stateful session filter): rendered "
                        "before the model had stickiness.pin? Apply meshxl istio render's "
                        "output again")
                elif pin is None and pins:
                    add("warning", name, _ref(other),
                        "pins sessions, the model has no stickiness.pin: apply meshxl "
                        "istio render's output again")
            if other["metadata"].get("namespace") == options.root_namespace \
                    and not other_spec.get("workloadSelector"):
                add("warning", name, _ref(other),
                    "in the root namespace without a workloadSelector: every sidecar of "
                    "the mesh health-checks the cluster's members")
            # --xds-tls: the sidecars it patches must have the certificate files.
            patched_ns = other["metadata"].get("namespace") or ns
            unready = unready_client_pods(other, [
                p for p in by_kind.get("Pod", []) if patched_ns == options.root_namespace
                or (p["metadata"].get("namespace") or ns) == patched_ns])
            if unready:
                more = f" and {len(unready) - 3} more" if len(unready) > 3 else ""
                add("error", name, _ref(other),
                    "its EDS source reads the sidecar's Istio certificate as files, which "
                    f"pod {', '.join(n for n, _ in unready[:3])}{more} lacks "
                    f"({unready[0][1]}): Envoy refuses the cluster there; give the pods "
                    "the annotations meshxl istio render --xds-tls prints")

        # HA: the role labels must be on the member pods.
        pods = [p for p in by_kind.get("Pod", []) if in_ns(p)
                and labels_of(p).get("meshxl.io/cluster") == name]
        # (Endpoints from meshxl: its EDS carries the failover order, not the labels.)
        if spec.high_availability and not from_meshxl:
            if pods and not any(labels_of(p).get(ROLE_LABEL) == "active" for p in pods):
                add("error", name, f"Pod {ns}/{pods[0]['metadata']['name']}",
                    f"no member pod is labelled {ROLE_LABEL}=active: is meshxl istio "
                    "label running? Without the role labels every member shares one "
                    "priority (load sharing)")

        elif sick_entry(spec) and name not in model.virtual_names and not from_meshxl:
            if pods and not any(labels_of(p).get(SERVING_LABEL) == "true" for p in pods):
                add("warning", name, f"Pod {ns}/{pods[0]['metadata']['name']}",
                    f"no member pod is labelled {SERVING_LABEL}=true: is meshxl istio "
                    "label running? Without the label every member shares one priority "
                    "and a degraded member keeps its sessions")

        # VirtualService retries against the model's previous_hosts.
        for vs in by_kind.get("VirtualService", []):
            vs_spec = _map(vs.get("spec"))
            vs_ns = vs["metadata"].get("namespace")
            if not any(_host_matches(str(h), name, options,
                                     vs_ns if isinstance(vs_ns, str) else None)
                       for h in _list(vs_spec.get("hosts"))):
                continue
            for route in _list(vs_spec.get("http")):
                if pin is not None and pin.strict:
                    elsewhere = []
                    for dest in (_map(_map(d).get("destination"))
                                 for d in _list(_map(route).get("route"))):
                        host, subset = str(dest.get("host", "")), dest.get("subset")
                        if subset:
                            elsewhere.append(f"{host} (subset {subset})")
                        elif not _host_matches(host, name, options,
                                               vs_ns if isinstance(vs_ns, str) else None):
                            elsewhere.append(host)
                    if elsewhere:
                        add("warning", name, _ref(vs),
                            f"a route of host {name} also goes to {', '.join(elsewhere)} "
                            "(another host or a subset): the pin configuration is on the "
                            "route, and in strict mode a pin naming a member that "
                            "destination lacks is answered 503")
                retries = route.get("retries") if isinstance(route, dict) else None
                if not isinstance(retries, dict):
                    continue
                ignore = retries.get("retryIgnorePreviousHosts")
                if spec.retries.previous_hosts and ignore is not True:
                    add("warning", name, _ref(vs),
                        "retries without retryIgnorePreviousHosts: true: a retry under "
                        "consistent hashing goes back to the member that failed")
                elif not spec.retries.previous_hosts and ignore is True:
                    add("warning", name, _ref(vs),
                        "retryIgnorePreviousHosts: true, the model says previous_hosts: "
                        "false")

    check_pools(model, by_kind, ns, options.cluster_domain, options.site_label, add)
    if version is None:
        add("warning", "", "istiod", "Istio version unknown (give --istio-version or "
            "include the istiod Deployment): needs >= 1.22, >= 1.27 for retryBudget")
    elif version < MIN_ISTIO:
        add("error", "", "istiod", f"Istio {version[0]}.{version[1]} is too old: "
            "DestinationRule networking.istio.io/v1 needs 1.22")
    elif uses_budget and version < RETRY_BUDGET_ISTIO:
        add("error", "", "istiod", f"Istio {version[0]}.{version[1]} does not know "
            "trafficPolicy.retryBudget (1.27): the API server rejects the DestinationRule; "
            f"render it with meshxl istio render --istio-version {version[0]}.{version[1]}")
    return findings
