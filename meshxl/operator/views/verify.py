"""``meshxl verify``: every mismatch between what the model says now and what each
Envoy acknowledged (and, given admin URLs, what it actually runs).

The expected versions and endpoints come from the control plane's own compiler and
snapshot versions, so verify can never disagree with what the control plane serves.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aetcd
import aiohttp

from meshxl.etcd.keys import Keys
from meshxl.operator.views.read import MeshRead, model_warnings, read_mesh, warming_of
from meshxl.proxy.admin import EnvoyAdmin
from meshxl.xds.cache import Snapshot
from meshxl.xds.compiler import compile_resources
from meshxl.xds.drains import expired_drains
from meshxl.xds.resources import CompileError
from meshxl.xds.stepdown import cut, released, shares
from meshxl.xds.types import short_type
from meshxl.xds.upgrades import model_cluster

__all__ = ["EnvoyLive", "expected_endpoints", "expected_snapshot", "expected_versions",
           "fetch_envoy", "verify", "verify_report"]

_DRAINING = 3  # envoy.config.core.v3.HealthStatus.DRAINING


@dataclass
class EnvoyLive:
    """What one Envoy's admin API says: its node id and live cluster endpoints."""

    url: str
    node_id: str | None = None
    clusters: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    error: str | None = None
    zone: str = ""
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
    live.node_id, live.zone = info.node_id, info.zone
    if connected is not None:
        live.connected = bool(connected)
    for name, hosts in clusters.items():
        live.clusters[name] = sorted(
            ({"address": h.endpoint, "priority": h.priority, "weight": h.weight,
              "draining": h.draining} for h in hosts),
            key=lambda x: x["address"])
    return live


def expected_snapshot(read: MeshRead) -> Snapshot | None:
    """The snapshot a control plane serves for this model and runtime now (versions
    are content hashes, so every replica computes the same ones)."""
    if read.model is None:
        return None
    # The listeners depend on which drain windows have passed, as in the control plane.
    now = time.time()
    drained = expired_drains(read.model, read.runtime, now).expired
    resources = compile_resources(read.model, read.runtime, read.resolved, drained,
                                  *_steered(read, now))
    return Snapshot.build(resources.by_type(), zones=resources.by_zone())


def _steered(read: MeshRead, now: float) -> tuple[Mapping[str, Mapping[str, float]],
                                                   dict[str, frozenset[str]]]:
    """What the control plane applies to EDS at ``now`` beside the model: per cluster,
    the fraction of their weight members get (a warm-up ramp under way, a degraded
    member's step, a probed standby's share: :mod:`meshxl.xds.stepdown`), and the
    members whose pins Envoy no longer honours. A ``shares: load`` cluster's
    load-based shares live in each replica's memory (:mod:`meshxl.xds.loadshares`):
    not here, so its weights can differ while they steer."""
    assert read.model is not None
    ramps = {cluster: {m: w["fraction"] for m, w in members.items()}
             for cluster, members in warming_of(read, now).items()}
    judged, _ = shares(read.model, read.runtime, now)
    return cut(ramps, judged), released(read.model, read.runtime, now)


def expected_versions(read: MeshRead, zone: str = "") -> dict[str, str]:
    """The versions served to an Envoy in ``zone`` (its node locality)."""
    snapshot = expected_snapshot(read)
    return {} if snapshot is None else snapshot.versions_for(zone)


def expected_endpoints(read: MeshRead, zone: str = "") -> dict[str, list[dict[str, Any]]]:
    """Per Envoy cluster, the hosts its compiled EDS resource lists for an Envoy in
    ``zone`` (a member named by host name has one per resolved address)."""
    out: dict[str, list[dict[str, Any]]] = {}
    if read.model is None:
        return out
    resources = compile_resources(read.model, read.runtime, read.resolved, frozenset(),
                                  *_steered(read, time.time()))
    for name, cla in {**resources.endpoints, **resources.zones.get(zone, {})}.items():
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
    # An Envoy cluster that reads another's EDS resource (a cluster's upgrades twin,
    # meshxl.xds.upgrades) must run the same hosts.
    for name, cluster in resources.clusters.items():
        service = cluster.eds_cluster_config.service_name
        if service and service != name and service in out:
            out[name] = out[service]
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
        snapshot = expected_snapshot(read)
    except CompileError as exc:
        problem(None, "model", f"the model does not compile: {exc}")
        snapshot = None
    expected = snapshot.versions if snapshot is not None else {}
    nodes = []
    for node_id in sorted(read.nodes):
        status = read.nodes[node_id]
        types = status.get("types")
        types = types if isinstance(types, dict) else {}
        checked = {}
        zone = str(status.get("zone") or "")
        wanted = snapshot.versions_for(zone) if snapshot is not None else {}
        for type_url, want in wanted.items():
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
                wanted.get(str(nack.get("type_url"))), None):
            nack_type = short_type(str(nack.get("type_url")))
            problem(node_id, "nack", f"{node_id}: rejected {nack_type} "
                    f"version {nack.get('version')}: {nack.get('error')}", type=nack_type)
        nodes.append({"node": node_id, "replica": status.get("replica"), "types": checked})
    endpoints_of: dict[str, dict[str, list[dict[str, Any]]]] = {}
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
        if live.zone not in endpoints_of:
            endpoints_of[live.zone] = expected_endpoints(read, live.zone)
        for name, wanted_hosts in endpoints_of[live.zone].items():
            live_hosts = live.clusters.get(name)
            if live_hosts is None:
                problem(live.node_id, "cluster", f"{live.node_id}: cluster {name} missing",
                        cluster=name)
                continue
            cluster = model_cluster(name)
            if cluster != name and _by_address(live_hosts) == _by_address(
                    live.clusters.get(cluster) or []):
                continue  # a twin running its cluster's hosts: that one's findings say all
            _compare_hosts(live.node_id, name, wanted_hosts, live_hosts, problem)
    return {"ok": not problems, "revision": read.revision,
            "expected": {short_type(t): v for t, v in expected.items()},
            "nodes": nodes, "envoys": envoy_rows, "mismatches": problems,
            "warnings": model_warnings(read)}


def _by_address(hosts: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {h["address"]: h for h in hosts}


def _compare_hosts(node: str | None, cluster: str, want: list[dict[str, Any]],
                   got: list[dict[str, Any]], problem: Any) -> None:
    have = _by_address(got)
    wanted = _by_address(want)
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
