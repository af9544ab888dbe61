"""What ``meshxl status``, ``meshxl sync`` and ``meshxl verify`` report, read from etcd
(and, for verify, from Envoy admin APIs).

:func:`read_mesh` is the only I/O against etcd; the reports are pure functions of what
it read, so the commands, their tests and other tools (the DR drill) agree on every
number. Every report is a JSON-able ``dict``; :mod:`meshxl.tables` renders them.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aetcd
import aiohttp

from meshxl.etcdkeys import MEMBERS, Keys
from meshxl.meshstate import runtime_from_values
from meshxl.model import ModelError, ModelSpec, RuntimeState, cluster_view, parse_model
from meshxl.model.runtime import MemberState, MemberView
from meshxl.proxy.admin import EnvoyAdmin
from meshxl.xds.cache import Snapshot
from meshxl.xds.dns import hostnames, resolve_names
from meshxl.xds.history import reason
from meshxl.xds.metrics import type_label
from meshxl.xds.resources import CompileError, compile_resources
from meshxl.xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE

__all__ = [
    "EnvoyLive",
    "MeshRead",
    "failover_report",
    "fetch_envoy",
    "live_report",
    "model_warnings",
    "read_mesh",
    "status_report",
    "sync_report",
    "verify_report",
]

_DRAINING = 3  # envoy.config.core.v3.HealthStatus.DRAINING
_SHORT = {CLUSTER: "CDS", ENDPOINT: "EDS", LISTENER: "LDS", ROUTE: "RDS"}


def short_type(type_url: str) -> str:
    return _SHORT.get(type_url, type_label(type_url))


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


def _load(raw: bytes) -> dict[str, Any] | None:
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
    runtime = runtime_from_values(keys, values)
    resolved = await resolve_names(hostnames(model, runtime)) if model is not None else {}
    read = MeshRead(revision=max(r.header.revision
                                 for r in (mesh, nodes, states, sync, failovers)),
                    model=model, model_error=error, model_source=source,
                    runtime=runtime, resolved=resolved)
    for key, raw in values.items():
        parsed = keys.parse_cluster_key(key)
        data = _load(raw)
        if parsed is not None and parsed[1] == MEMBERS and data is not None:
            read.registrations[(parsed[0], parsed[2])] = data
    for kv in nodes:
        node = keys.parse_node_key(kv.key.decode())
        data = _load(kv.value)
        if node is not None and data is not None:
            read.nodes[node] = data
    for target, result, prefix in ((read.states, states, keys.states_prefix),
                                   (read.sync, sync, keys.sync_prefix),
                                   (read.failovers, failovers, keys.all_failovers_prefix)):
        for kv in result:
            pair = keys.parse_pair_key(prefix, kv.key.decode())
            data = _load(kv.value)
            if pair is not None and data is not None:
                target[pair] = data
    return read


def _clusters(read: MeshRead, only: str | None) -> list[Any]:
    if read.model is None:
        return []
    specs = list(read.model.clusters)
    if only is not None:
        specs = [s for s in specs if s.name == only]
    return specs


def _shares(members: Iterable[MemberView]) -> dict[str, float]:
    """Fraction of new sessions each member gets now: the lowest tier with a ready
    member takes them, split by EDS weight (overloaded members only when no member is
    ready: Envoy gives degraded hosts new sessions only then)."""
    members = list(members)
    ready = ([m for m in members if m.state == MemberState.READY]
             or [m for m in members if m.state == MemberState.OVERLOADED])
    if not ready:
        return {}
    tier = min(m.priority for m in ready)
    serving = [m for m in ready if m.priority == tier]
    total = sum(m.lb_weight for m in serving) or 1
    return {m.name: m.lb_weight / total for m in serving}


# -- status ---------------------------------------------------------------------------


DEPARTED_SECONDS = 300.0
"""How long a member whose registration ended stays listed as lost (``departed``)."""


def _epoch(value: Any) -> float | None:
    """Epoch seconds of a history time (ISO text) or number."""
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()
    return _number(value)


def _departed(read: MeshRead, cluster: str, present: set[str], now: float) -> list[dict[str, Any]]:
    """Members that left ``cluster`` within :data:`DEPARTED_SECONDS`: their registration
    ended (a crash, a partition, a scale-in), so the cluster's view no longer lists
    them; the member history says when and why."""
    out = []
    for (c, member), history in sorted(read.states.items()):
        if c != cluster or member in present or history.get("state") != str(MemberState.LOST):
            continue
        at = _epoch(history.get("at"))
        if at is None or now - at > DEPARTED_SECONDS:
            continue
        out.append({"name": member, "state": str(MemberState.LOST),
                    "last_change": {"state": history.get("state"),
                                    "reason": history.get("reason"), "at": history.get("at")},
                    "failovers": _count(history.get("failovers")),
                    "last_failover": history.get("last_failover")})
    return out


def status_report(read: MeshRead, cluster: str | None = None,
                  now: float | None = None) -> dict[str, Any]:
    """``meshxl status``: clusters with their members (and those that left in the last
    minutes), the Envoy nodes and the recent failovers."""
    now = time.time() if now is None else now
    clusters = []
    for spec in _clusters(read, cluster):
        view = cluster_view(spec, read.runtime)
        shares = _shares(view.members)
        members = []
        for m in view.members:
            key = (spec.name, m.name)
            history = read.states.get(key, {})
            registration = read.registrations.get(key, {})
            admin = read.runtime.members_down_of(spec.name).get(m.name)
            site_admin = read.runtime.sites_offline.get(m.site)
            last = ({"state": history.get("state"), "reason": history.get("reason"),
                     "at": history.get("at")} if history.get("state") == str(m.state)
                    else {"state": str(m.state), "reason": reason(m, spec.name, read.runtime),
                          "at": registration.get("since") or None})
            members.append({
                "name": m.name, "site": m.site, "address": f"{m.address}:{m.port}",
                "priority": m.priority if m.advertised else None,
                "role": str(m.role), "share": round(shares.get(m.name, 0.0), 4),
                "weight": m.weight, "state": str(m.state), "problems": list(m.problems),
                "problem_details": registration.get("problem_details", {}),
                "admin": None if admin is None else vars(admin),
                "site_admin": None if site_admin is None else vars(site_admin),
                "last_change": last,
                "failovers": int(history.get("failovers", 0) or 0),
                "last_failover": history.get("last_failover"),
                "sidecar": registration.get("sidecar"),
            })
        clusters.append({
            "name": spec.name, "mode": spec.mode, "membership": spec.membership,
            "stickiness": _stickiness(spec), "sites": spec.site_names(),
            "members": members,
            "departed": _departed(read, spec.name, {m["name"] for m in members}, now),
        })
    nodes = []
    for node_id in sorted(read.nodes):
        n = read.nodes[node_id]
        nack = n.get("last_nack")
        nack = nack if isinstance(nack, dict) else None
        types = n.get("types")
        types = types if isinstance(types, dict) else {}
        nodes.append({
            "node": node_id, "cluster": n.get("cluster"), "replica": n.get("replica"),
            "streams": n.get("streams", 0), "connected_at": n.get("connected_at"),
            "acked": {short_type(str(t)): s.get("acked_version")
                      for t, s in sorted(types.items()) if isinstance(s, dict)},
            "nacks": n.get("nacks", 0),
            "last_nack": None if not nack else {
                **nack, "type": short_type(str(nack.get("type_url")))},
        })
    offline = {site: vars(action) for site, action in read.runtime.sites_offline.items()}
    return {"revision": read.revision, "model": read.model_source,
            "model_found": read.model is not None or read.model_error is not None,
            "model_error": read.model_error, "clusters": clusters,
            "sites_offline": offline, "nodes": nodes,
            "failovers": failover_report(read, cluster), "warnings": model_warnings(read)}


# -- failovers ------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    """A finite number from a record, or None (records are read, not trusted)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _count(value: Any) -> int:
    number = _number(value)
    return int(number) if number is not None and number >= 0 else 0


def _takeovers(read: MeshRead, cluster: str, failover: str | None) -> list[dict[str, Any]]:
    """What each sidecar of ``cluster`` published about the takeovers it joined to the
    failover with id ``failover``."""
    out: list[dict[str, Any]] = []
    if not failover:
        return out
    for (c, member), stats in sorted(read.sync.items()):
        entries = stats.get("failover_takeovers")
        if c != cluster or not isinstance(entries, list):
            continue
        for entry in entries:
            if not isinstance(entry, dict) or entry.get("failover") != failover:
                continue
            times = entry.get("times")
            pairs = [[_number(p[0]), _number(p[1])] for p in times
                     if isinstance(p, list) and len(p) == 2] if isinstance(times, list) else []
            out.append({"member": member, "count": _count(entry.get("count")),
                        "first": _number(entry.get("first")),
                        "last": _number(entry.get("last")),
                        "times": [p for p in pairs if None not in p]})
    return out


def failover_report(read: MeshRead, cluster: str | None = None) -> list[dict[str, Any]]:
    """The recent failovers, newest first: each one's timeline as the control plane
    followed it (loss seen, rebuild, push, every Envoy's answer with NACK texts) and
    the session takeovers the new owners' sidecars joined to it."""
    out = []
    for (c, member), record in read.failovers.items():
        if cluster is not None and c != cluster:
            continue
        detected = _number(record.get("detected")) or _number(record.get("at"))
        ended = _number(record.get("ended"))
        rows = record.get("nodes")
        nodes = []
        for row in rows if isinstance(rows, list) else []:
            if isinstance(row, dict) and _text(row.get("node")) is not None:
                nodes.append({"node": row["node"], "pushed": _number(row.get("pushed")),
                              "sent": _number(row.get("sent")),
                              "answered": _number(row.get("answered")),
                              "nack": _text(row.get("nack"))})
        takeovers = _takeovers(read, c, _text(record.get("id"))
                               or _text(record.get("traceparent")))
        outcome = _text(record.get("outcome")) or "open"
        out.append({
            "cluster": c, "member": member, "cause": _text(record.get("cause")),
            "from_state": _text(record.get("from_state")),
            "to_state": _text(record.get("to_state")),
            "replica": _text(record.get("replica")), "version": _text(record.get("version")),
            "revision": _number(record.get("revision")), "detected": detected,
            "rebuild": _number(record.get("rebuild")), "built": _number(record.get("built")),
            "ended": ended, "outcome": outcome,
            "converged_ms": None if ended is None or detected is None
            else round((ended - detected) * 1000, 1),
            "nodes_total": _count(record.get("nodes_total")),
            "acked": _count(record.get("acked")), "nacked": _count(record.get("nacked")),
            "nodes": nodes, "takeovers": takeovers,
            "takeover_count": sum(t["count"] for t in takeovers),
        })
    out.sort(key=lambda f: (-(f["detected"] or 0.0), f["cluster"], f["member"]))
    return out


def live_report(read: MeshRead, now: float | None = None) -> dict[str, Any]:
    """What the control plane's live view shows: ``meshxl status`` and ``meshxl sync``
    of one read."""
    now = time.time() if now is None else now
    return {"status": status_report(read, now=now), "sync": sync_report(read, now=now)}


def model_warnings(read: MeshRead) -> list[str]:
    """Members registered by sidecars that the model does not know: a cluster that is
    not in the model, or a site its cluster does not list (their traffic is not what
    the operator expects)."""
    if read.model is None:
        return []
    specs = {c.name: c for c in read.model.clusters}
    out = []
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


def _stickiness(spec: Any) -> dict[str, Any] | None:
    s = spec.stickiness
    if s is None:
        return None
    on = s.header if s.header else s.cookie.name if s.cookie else "source address"
    return {"algorithm": s.algorithm, "key": s.key, "on": on}


# -- sync -----------------------------------------------------------------------------


STALE_INTERVALS = 3
"""Statistics older than this many publication intervals are flagged stale: the
sidecar publishes every interval (docs/operations.md), so its process, its etcd
connection or its lease is in trouble."""

DEFAULT_PUBLISH_INTERVAL = 2.0


def sync_report(read: MeshRead, cluster: str | None = None,
                now: float | None = None) -> dict[str, Any]:
    """``meshxl sync``: every sidecar's view of state synchronization."""
    now = time.time() if now is None else now
    known = {s.name for s in _clusters(read, cluster)} if read.model else set()
    rows = []
    for (c, member), stats in sorted(read.sync.items()):
        if cluster is not None and c != cluster:
            continue
        published = stats.get("published")
        if not isinstance(published, int | float) or isinstance(published, bool):
            published = None
        interval = stats.get("publish_interval")
        if not isinstance(interval, int | float) or isinstance(interval, bool) \
                or not 0 < interval < 3600:
            interval = DEFAULT_PUBLISH_INTERVAL
        age = None if published is None else round(max(0.0, now - published), 3)
        rows.append({
            "cluster": c, "member": member, "in_model": c in known,
            "ready": stats.get("ready"), "reasons": stats.get("reasons", []),
            "revision": stats.get("revision"),
            "lag_seconds": stats.get("lag_seconds"),
            "cached_sessions": stats.get("cached_sessions"),
            "owned_sessions": stats.get("owned_sessions"),
            "local_sessions": stats.get("local_sessions"),
            "takeovers": stats.get("takeovers"),
            "last_full_sync": stats.get("last_full_sync"),
            "full_syncs": stats.get("full_syncs"),
            "write_conflicts": stats.get("write_conflicts"),
            "undecodable_sessions": stats.get("undecodable_sessions"),
            "errors": stats.get("errors"), "last_error": stats.get("last_error"),
            "lease_losses": stats.get("lease_losses"),
            "age_seconds": age, "publish_interval": interval,
            "stale": age is None or age > STALE_INTERVALS * interval,
        })
    missing = []
    for spec in _clusters(read, cluster):
        for m in cluster_view(spec, read.runtime).members:
            registered = (spec.name, m.name) in read.registrations
            if registered and (spec.name, m.name) not in read.sync:
                missing.append({"cluster": spec.name, "member": m.name})
    warnings = [f"{r['cluster']}/{r['member']}: statistics are {r['age_seconds']} s old "
                f"(published every {r['publish_interval']} s): the sidecar is not publishing"
                for r in rows if r["stale"] and r["age_seconds"] is not None]
    return {"revision": read.revision, "sidecars": rows, "without_statistics": missing,
            "warnings": warnings + model_warnings(read)}


# -- verify ---------------------------------------------------------------------------


@dataclass
class EnvoyLive:
    """What one Envoy's admin API says: its node id and live cluster endpoints."""

    url: str
    node_id: str | None = None
    clusters: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    error: str | None = None
    connected: bool | None = None
    """Envoy's own ``control_plane.connected_state`` (None: not reported)."""


async def fetch_envoy(url: str, timeout: float = 5.0) -> EnvoyLive:
    """GET ``/server_info`` and ``/clusters?format=json`` from an Envoy admin URL."""
    live = EnvoyLive(url=url)
    try:
        async with EnvoyAdmin(url, timeout=timeout) as admin:
            info = await admin.server_info()
            clusters = await admin.clusters()
            connected = await admin.stat("control_plane.connected_state")
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        live.error = f"{type(exc).__name__}: {exc}".rstrip(": ")
        return live
    live.node_id = info.node_id
    if connected is not None:
        live.connected = bool(connected)
    for name, hosts in clusters.items():
        live.clusters[name] = sorted(
            ({"address": h.endpoint, "priority": h.priority, "weight": h.weight,
              "draining": h.draining} for h in hosts),
            key=lambda x: x["address"])
    return live


def expected_versions(read: MeshRead) -> dict[str, str]:
    """The versions a control plane serves for this model and runtime now (versions
    are content hashes, so every replica computes the same ones)."""
    if read.model is None:
        return {}
    resources = compile_resources(read.model, read.runtime, read.resolved)
    return Snapshot.build(resources.by_type()).versions


def expected_endpoints(read: MeshRead) -> dict[str, list[dict[str, Any]]]:
    """Per cluster, the hosts its compiled EDS resource lists (a member named by host
    name has one per resolved address)."""
    out: dict[str, list[dict[str, Any]]] = {}
    if read.model is None:
        return out
    resources = compile_resources(read.model, read.runtime, read.resolved)
    for name, cla in resources.endpoints.items():
        hosts = []
        for group in cla.endpoints:
            for ep in group.lb_endpoints:
                sock = ep.endpoint.address.socket_address
                hosts.append({"address": f"{sock.address}:{sock.port_value}",
                              "priority": group.priority,
                              "weight": ep.load_balancing_weight.value,
                              "draining": ep.health_status == _DRAINING,
                              "member": ep.endpoint.hostname})
        out[name] = sorted(hosts, key=lambda x: x["address"])
    return out


def verify_report(read: MeshRead, envoys: Iterable[EnvoyLive] = ()) -> dict[str, Any]:
    """``meshxl verify``: every mismatch between what the model says now and what each
    Envoy acknowledged (and, with admin URLs, what it actually runs)."""
    problems: list[dict[str, Any]] = []

    def problem(node: str | None, kind: str, message: str, **extra: Any) -> None:
        problems.append({"node": node, "kind": kind, "message": message, **extra})

    if read.model is None:
        problem(None, "model", read.model_error or f"no model at {read.model_source}")
        return {"ok": False, "revision": read.revision, "expected": {}, "nodes": [],
                "envoys": [], "mismatches": problems, "warnings": []}
    try:
        expected = expected_versions(read)
    except CompileError as exc:
        problem(None, "model", f"the model does not compile: {exc}")
        expected = {}
    nodes = []
    for node_id in sorted(read.nodes):
        status = read.nodes[node_id]
        types = status.get("types")
        types = types if isinstance(types, dict) else {}
        checked = {}
        for type_url, want in expected.items():
            if not isinstance(types.get(type_url), dict):
                continue  # this Envoy does not subscribe to the type
            got = types[type_url].get("acked_version")
            checked[short_type(type_url)] = {"expected": want, "acked": got}
            if got != want:
                problem(node_id, "version", f"{node_id}: {short_type(type_url)} acked "
                        f"{got or 'nothing'}, the model says {want}",
                        type=short_type(type_url), expected=want, acked=got,
                        replica=status.get("replica"))
        nack = status.get("last_nack")
        if isinstance(nack, dict) and nack.get("version") in (
                expected.get(str(nack.get("type_url"))), None):
            nack_type = short_type(str(nack.get("type_url")))
            problem(node_id, "nack", f"{node_id}: rejected {nack_type} "
                    f"version {nack.get('version')}: {nack.get('error')}", type=nack_type)
        nodes.append({"node": node_id, "replica": status.get("replica"), "types": checked})
    endpoints = expected_endpoints(read)
    envoy_rows = []
    for live in envoys:
        row: dict[str, Any] = {"url": live.url, "node": live.node_id, "error": live.error}
        envoy_rows.append(row)
        if live.error is not None:
            problem(None, "envoy", f"{live.url}: admin API unreachable: {live.error}")
            continue
        if live.connected is False:
            problem(live.node_id, "disconnected", f"{live.node_id} ({live.url}) has no "
                    "control-plane connection (control_plane.connected_state 0)")
        elif live.node_id not in read.nodes:
            problem(live.node_id, "disconnected", f"{live.node_id} ({live.url}) is connected "
                    "to no control-plane replica")
        for name, wanted_hosts in endpoints.items():
            live_hosts = live.clusters.get(name)
            if live_hosts is None:
                problem(live.node_id, "cluster", f"{live.node_id}: cluster {name} missing",
                        cluster=name)
                continue
            _compare_hosts(live.node_id, name, wanted_hosts, live_hosts, problem)
    return {"ok": not problems, "revision": read.revision,
            "expected": {short_type(t): v for t, v in expected.items()},
            "nodes": nodes, "envoys": envoy_rows, "mismatches": problems,
            "warnings": model_warnings(read)}


def _compare_hosts(node: str | None, cluster: str, want: list[dict[str, Any]],
                   got: list[dict[str, Any]], problem: Any) -> None:
    have = {h["address"]: h for h in got}
    wanted = {h["address"]: h for h in want}
    for address, w in wanted.items():
        h = have.get(address)
        if h is None:
            problem(node, "endpoint", f"{node}: {cluster} lacks {w['member']} ({address})",
                    cluster=cluster, member=w["member"])
            continue
        for attr in ("priority", "weight", "draining"):
            if h[attr] != w[attr]:
                problem(node, "endpoint", f"{node}: {cluster} {w['member']} ({address}) "
                        f"{attr} is {h[attr]}, the model says {w[attr]}",
                        cluster=cluster, member=w["member"], field=attr)
    for address in have.keys() - wanted.keys():
        problem(node, "endpoint", f"{node}: {cluster} still sends to {address}, which the "
                "model no longer advertises", cluster=cluster)


async def verify(client: aetcd.Client, keys: Keys, envoy_urls: Iterable[str] = (),
                 model_text: str | None = None, model_source: str | None = None,
                 settle: float = 0.0, interval: float = 0.25) -> dict[str, Any]:
    """Read and verify until nothing mismatches or ``settle`` seconds pass: a change
    made a moment ago is still being pushed, which is not a mismatch."""
    urls = list(envoy_urls)
    deadline = time.monotonic() + settle
    while True:
        read = await read_mesh(client, keys, model_text, model_source)
        envoys = await asyncio.gather(*(fetch_envoy(u) for u in urls))
        report = verify_report(read, envoys)
        if report["ok"] or time.monotonic() >= deadline:
            return report
        await asyncio.sleep(interval)
