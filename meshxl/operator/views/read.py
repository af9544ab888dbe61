"""The operator views' one read of etcd, and what every view needs of it.

:func:`read_mesh` is the only I/O against etcd; the reports (``status``, ``failovers``,
``sync``, ``verify``) are pure functions of what it read, so the commands, their tests
and other tools (the DR drill, the live view) agree on every number. Records written
by other processes are read, not trusted: :func:`number`, :func:`text` and
:func:`count` keep what has the expected type.
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aetcd

from meshxl.etcd.keys import MEMBERS, Keys
from meshxl.etcd.mesh import runtime_from_values
from meshxl.model import ModelError, ModelSpec, RuntimeState, cluster_view, parse_model
from meshxl.model.load import model_warnings as judged
from meshxl.model.vsls import placed, site_rule_warnings
from meshxl.xds.dns import hostnames, resolve_names
from meshxl.xds.warmup import WARMS, fraction, ramps

__all__ = ["MeshRead", "clusters_of", "count", "epoch", "load_record", "model_warnings",
           "number", "read_mesh", "text", "warming_of"]


@dataclass
class MeshRead:
    """Everything meshxl keeps in etcd, read once."""

    revision: int
    model: ModelSpec | None
    model_error: str | None
    model_source: str
    runtime: RuntimeState
    registrations: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    states: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    resolved: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Member addresses that are host names, resolved as the control plane does."""
    sync: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    failovers: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    """The latest failover of each member (trace context and timeline), kept for
    a few minutes by the control-plane replica that followed it."""


def load_record(raw: bytes) -> dict[str, Any] | None:
    """A JSON object stored by another process, or None (not JSON, or not an object)."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


async def read_mesh(client: aetcd.Client, keys: Keys, model_text: str | None = None,
                    model_source: str | None = None) -> MeshRead:
    """Read the model (or use ``model_text``, the file the control plane serves), the
    runtime state, node status, member history, sidecar statistics and failovers."""
    mesh, nodes, states, sync, failovers = await asyncio.gather(
        client.get_prefix(keys.mesh_prefix.encode()),
        client.get_prefix(keys.nodes_prefix.encode()),
        client.get_prefix(keys.states_prefix.encode()),
        client.get_prefix(keys.sync_prefix.encode()),
        client.get_prefix(keys.all_failovers_prefix.encode()),
    )
    values = {kv.key.decode(): kv.value for kv in mesh}
    model, error, source = None, None, model_source or keys.model
    if model_text is None:
        raw = values.get(keys.model)
        model_text = raw.decode("utf-8", "replace") if raw is not None else None
    if model_text is not None:
        try:
            model = parse_model(model_text, source=source)
        except ModelError as exc:
            error = str(exc)
    runtime = runtime_from_values(keys, values, {kv.key.decode() for kv in mesh if not kv.lease})
    if model is not None:
        model = placed(model, runtime)  # virtual systems: roles for the runtime state
    resolved = await resolve_names(hostnames(model, runtime)) if model is not None else {}
    read = MeshRead(revision=max(r.header.revision
                                 for r in (mesh, nodes, states, sync, failovers)),
                    model=model, model_error=error, model_source=source,
                    runtime=runtime, resolved=resolved)
    for key, raw in values.items():
        parsed = keys.parse_cluster_key(key)
        data = load_record(raw)
        if parsed is not None and parsed[1] == MEMBERS and data is not None:
            read.registrations[(parsed[0], parsed[2])] = data
    for kv in nodes:
        node = keys.parse_node_key(kv.key.decode())
        data = load_record(kv.value)
        if node is not None and data is not None:
            read.nodes[node] = data
    for target, result, prefix in ((read.states, states, keys.states_prefix),
                                   (read.sync, sync, keys.sync_prefix),
                                   (read.failovers, failovers, keys.all_failovers_prefix)):
        for kv in result:
            pair = keys.parse_pair_key(prefix, kv.key.decode())
            data = load_record(kv.value)
            if pair is not None and data is not None:
                target[pair] = data
    return read


def clusters_of(read: MeshRead, only: str | None) -> list[Any]:
    """The model's clusters (only the one named ``only``, when given)."""
    if read.model is None:
        return []
    specs = list(read.model.clusters)
    if only is not None:
        specs = [s for s in specs if s.name == only]
    return specs


def model_warnings(read: MeshRead) -> list[str]:
    """Members registered by sidecars that the model does not know: a cluster that is
    not in the model, or a site its cluster does not list (their traffic is not what
    the operator expects); and the model's warnings judged against the live members
    (a Maglev table too small for them, high availability on one site), as the control
    plane judges them."""
    if read.model is None:
        return []
    specs = {c.name: c for c in read.model.clusters}
    out = [str(p) for p in judged(read.model, read.runtime)]
    out += site_rule_warnings(read.model, read.runtime)  # operators' VS priority lists
    for (cluster, member), registration in sorted(read.registrations.items()):
        spec = specs.get(cluster)
        if spec is None:
            out.append(f"member {member} is registered for cluster {cluster!r}, which is not "
                       f"in the model (clusters: {', '.join(sorted(specs)) or 'none'})")
            continue
        site = registration.get("site")
        sites = spec.site_names()
        if site and sites and site not in sites:
            out.append(f"member {cluster}/{member} is registered on site {site!r}, which "
                       f"cluster {cluster} does not list (sites: {', '.join(sites)})")
    return out


def number(value: Any) -> float | None:
    """A finite number from a record, or None (records are read, not trusted)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def text(value: Any) -> str | None:
    """A string from a record, or None."""
    return value if isinstance(value, str) else None


def count(value: Any) -> int:
    """A non-negative whole number from a record (0 when it is not one)."""
    found = number(value)
    return int(found) if found is not None and found >= 0 else 0


def epoch(value: Any) -> float | None:
    """Epoch seconds of a history time (ISO text) or number."""
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()
    return number(value)


_WARM_STATES = frozenset(str(s) for s in WARMS)


def warming_of(read: MeshRead, now: float) -> dict[str, dict[str, dict[str, Any]]]:
    """Per cluster, the members still in their warm-up ramp at ``now``, as the control
    plane ramps them (:mod:`meshxl.xds.warmup`): the member history says since when
    they take new sessions again (the change from a state in which they took none),
    and another member took them before (with nobody serving, nobody ramps)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    if read.model is None:
        return out
    for spec in read.model.clusters:
        if not ramps(spec):
            continue
        since = {m.name: _serving_since(read, spec.name, m)
                 for m in cluster_view(spec, read.runtime).members if m.state in WARMS}
        for name, started in since.items():
            if started in (-math.inf, math.inf):
                continue
            if not any(other < started for n, other in since.items() if n != name):
                continue  # it joined where nobody served: no ramp
            share = fraction(spec.warmup, started, now)
            if share < 1.0:
                out.setdefault(spec.name, {})[name] = {
                    "fraction": share, "since": read.states[(spec.name, name)].get("at"),
                    "window": spec.warmup}
    return out


def _serving_since(read: MeshRead, cluster: str, member: Any) -> float:
    """When a member that takes new sessions started to (its history's change from a
    state in which it took none); -inf: long ago, +inf: a change not recorded yet."""
    history = read.states.get((cluster, member.name))
    if not history:
        return -math.inf
    if history.get("state") != str(member.state):
        return math.inf
    if history.get("from") in _WARM_STATES:
        return -math.inf
    at = epoch(history.get("at"))
    return -math.inf if at is None else at
