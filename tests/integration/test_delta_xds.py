"""Incremental (delta) ADS with a real Envoy: the SotW scenarios over a delta bootstrap.

Each test writes a model file, starts the in-process control plane on it, real Envoys
(``api_type: DELTA_GRPC``) and echo backends on loopback, then checks Envoy's admin API
and where real requests land. The last tests put a SotW and a delta Envoy on one control
plane and require identical configuration, and move a delta Envoy to another replica.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshxl.local.ports import free_ports
from meshxl.local.wait import wait_until
from meshxl.xds.app import ControlPlane
from tests.harness import Backend, EnvoyFixture, Host, drive, failures, members_seen
from tests.harness.clock import scaled, window

pytestmark = pytest.mark.integration

LOOPBACK = "127.0.0.1"
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"


# -- helpers ------------------------------------------------------------------------------


def member(backend: Backend, **fields: Any) -> dict[str, Any]:
    return {"name": backend.name, "address": LOOPBACK, "port": backend.port, **fields}


def cluster(name: str, mode: str, members: Sequence[dict[str, Any]], port: int,
            **fields: Any) -> dict[str, Any]:
    """A model cluster exposed on ``127.0.0.1:port``, sticky on ``x-session-id``."""
    return {"name": name, "mode": mode, "members": list(members),
            "listener": {"address": LOOPBACK, "port": port},
            "stickiness": {"header": "x-session-id"}, **fields}


def write_model(path: Path, *clusters: dict[str, Any]) -> Path:
    """Write (atomically replace) the model file the control plane watches."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump({"clusters": list(clusters)}, sort_keys=False))
    os.replace(tmp, path)
    return path


async def start_stack(tmp_path: Path, start_control_plane: Any, start_envoy: Any,
                      *clusters: dict[str, Any]) -> tuple[Path, ControlPlane, EnvoyFixture]:
    """Model file -> control plane -> delta Envoy; returns once every member is healthy."""
    model = write_model(tmp_path / "model.yaml", *clusters)
    plane = await start_control_plane(config_path=model)
    envoy = await start_envoy("delta", plane.port, delta=True)
    await envoy.wait_ready()
    for spec in clusters:
        count = len(spec["members"])
        await envoy.wait_hosts(spec["name"],
                               lambda hs, n=count: len(hs) == n and all(h.healthy for h in hs),
                               what=f"all {count} members of {spec['name']} healthy")
    return model, plane, envoy


def versions(plane: ControlPlane) -> dict[str, str]:
    """The snapshot versions the plane serves now."""
    snapshot = plane.cache.snapshot
    assert snapshot is not None
    return snapshot.versions


def in_sync(plane: ControlPlane, node: str) -> bool:
    """``node`` has ACKed the current snapshot version of every type (delta or SotW)."""
    snapshot = plane.cache.snapshot
    types = plane.ads.node_status().get(node, {}).get("types", {})
    return snapshot is not None and all(
        types.get(t, {}).get("acked_version") == v for t, v in snapshot.versions.items())


async def served(port: int, sessions: int = 20, per_session: int = 2) -> set[str | None]:
    """Members answering bounded traffic (no request may fail)."""
    outcomes = await drive(f"http://{LOOPBACK}:{port}/", sessions, per_session, max_seconds=10)
    assert not failures(outcomes), failures(outcomes)[:3]
    return {o.member for o in outcomes}


def by_port(hosts: list[Host], backend: Backend) -> Host:
    (found,) = [h for h in hosts if h.port == backend.port]
    return found


# -- 1. sticky routing ----------------------------------------------------------------------


async def test_sticky_sessions_over_delta_xds(
    tmp_path: Path, start_control_plane: Any, start_envoy: Any, start_backends: Any,
) -> None:
    backends = await start_backends(3)
    (lport,) = free_ports(1)
    spec = cluster("web", "load-sharing", [member(b) for b in backends], lport)
    _, plane, envoy = await start_stack(tmp_path, start_control_plane, start_envoy, spec)

    # The node status of a delta stream reads like a SotW one: every type ACKed at the
    # snapshot's version, over one stream.
    await wait_until(lambda: in_sync(plane, "delta"), timeout=10, what="delta node in sync")
    assert plane.ads.node_status()["delta"]["streams"] == 1

    outcomes = await drive(f"http://{LOOPBACK}:{lport}/", 60, 5, concurrency=8, max_seconds=20)
    assert len(outcomes) == 300 and not failures(outcomes), failures(outcomes)[:3]
    seen = members_seen(outcomes)
    moved = {s: m for s, m in seen.items() if len(set(m)) != 1}
    assert not moved, f"sessions changed member: {list(moved.items())[:3]}"
    assert {m[0] for m in seen.values()} == {b.name for b in backends}


# -- 2. failover ------------------------------------------------------------------------------


@pytest.mark.heavy
async def test_active_member_killed_traffic_moves_to_standby(
    tmp_path: Path, start_control_plane: Any, start_envoy: Any, start_backends: Any,
) -> None:
    active, standby = await start_backends(["active", "standby"])
    (lport,) = free_ports(1)
    spec = cluster("ledger", "high-availability", [member(active), member(standby)], lport)
    _, _, envoy = await start_stack(tmp_path, start_control_plane, start_envoy, spec)
    url = f"http://{LOOPBACK}:{lport}/"
    assert await served(lport) == {active.name}

    started = time.monotonic()  # the outcomes' times count from here too (origin)
    load = asyncio.create_task(drive(url, 30, 200, concurrency=6, max_seconds=scaled(3.0),
                                     origin=started))
    await window(0.5, "the load before the kill")
    await active.kill9()
    killed_at = time.monotonic() - started
    outcomes = await load

    assert not failures(outcomes), f"{len(failures(outcomes))} failed: {failures(outcomes)[:3]}"
    after = [o for o in outcomes if o.started > killed_at]
    assert len(after) > 20, f"only {len(after)} requests after the kill"
    assert {o.member for o in after} == {standby.name}
    await envoy.wait_hosts("ledger", lambda hs: not by_port(hs, active).healthy,
                           what="the killed member unhealthy")


# -- 3. member and cluster removal --------------------------------------------------------------


async def test_member_and_cluster_removal_over_delta_xds(
    tmp_path: Path, start_control_plane: Any, start_envoy: Any, start_backends: Any,
) -> None:
    a, b, c = await start_backends(3)
    web_port, api_port = free_ports(2)
    web = cluster("web", "load-sharing", [member(a), member(b), member(c)], web_port)
    api = cluster("api", "high-availability", [member(a), member(b)], api_port)
    model, plane, envoy = await start_stack(tmp_path, start_control_plane, start_envoy, web, api)
    assert await served(api_port) == {a.name}
    connected_at = plane.ads.node_status()["delta"]["connected_at"]

    # Endpoints shrink: c leaves web, the active member a leaves api (its standby takes over).
    write_model(model, cluster("web", "load-sharing", [member(a), member(b)], web_port),
                cluster("api", "high-availability", [member(b)], api_port))
    await envoy.wait_hosts("web", lambda hs: {h.port for h in hs} == {a.port, b.port},
                           what="c removed from web")
    await envoy.wait_hosts("api", lambda hs: [h.port for h in hs] == [b.port],
                           what="a removed from api")
    assert await served(api_port) == {b.name}
    assert await served(web_port) <= {a.name, b.name}

    # A whole cluster (and its listener and routes) goes; a cluster-only change to web
    # applies at once: Envoy re-warms web and gets its unchanged endpoints again.
    write_model(model, cluster("web", "load-sharing", [member(a), member(b)], web_port,
                               connect_timeout="2s"))

    async def api_gone() -> bool:
        listeners = await envoy.listeners()
        return "api" not in await envoy.clusters() and all(
            port != api_port for _, port in listeners.values())

    await envoy.wait_until(api_gone, timeout=10, what="cluster api and its listener removed")

    async def applied() -> bool:
        return (await envoy.dynamic_clusters())["web"].get("connect_timeout") == "2s"

    await envoy.wait_until(applied, timeout=3,
                           what="cluster change applied without a warming stall")
    dump = await envoy.config_dump("dynamic_warming_clusters")
    assert not dump.get("configs"), dump
    assert await served(web_port) <= {a.name, b.name}
    await wait_until(lambda: in_sync(plane, "delta"), timeout=10, what="delta node in sync")
    assert plane.ads.node_status()["delta"]["connected_at"] == connected_at, \
        "applied only because the ADS stream was re-opened"


# -- 4. NACK --------------------------------------------------------------------------------------


async def test_nack_over_delta_is_recorded_not_resent_and_fixed(
    tmp_path: Path, start_control_plane: Any, start_envoy: Any, start_backends: Any,
) -> None:
    a, b = await start_backends(2)
    (lport,) = free_ports(1)
    members = [member(a), member(b)]
    model, plane, envoy = await start_stack(
        tmp_path, start_control_plane, start_envoy,
        cluster("c", "high-availability", members, lport))
    await wait_until(lambda: in_sync(plane, "delta"), timeout=10, what="first ACK")
    good_cds = versions(plane)[CDS]

    # meshxl accepts this override; Envoy's validation (Duration gt 0) rejects it.
    write_model(model, cluster("c", "high-availability", members, lport,
                               overrides={"cluster": {"connectTimeout": "0s"}}))

    def nacked() -> dict[str, Any] | None:
        found: dict[str, Any] | None = plane.ads.node_status()["delta"]["last_nack"]
        return found

    nack = await wait_until(nacked, timeout=10, what="NACK recorded")
    assert nack is not None
    bad_cds = versions(plane)[CDS]
    assert bad_cds != good_cds
    assert (nack["type_url"], nack["version"]) == (CDS, bad_cds)
    assert "duration" in nack["error"].lower() or "timeout" in nack["error"].lower(), nack

    # Not resent in a loop: CDS responses constant over 1 s on one stream.
    async def quiet_window() -> bool:
        before = plane.ads.node_status()["delta"]
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            now = plane.ads.node_status()["delta"]
            if now["connected_at"] != before["connected_at"]:
                return False  # another stream: observe a whole window on it
            assert now["types"][CDS]["responses"] == before["types"][CDS]["responses"], \
                "the NACKed cluster is being resent"
        return True

    await wait_until(quiet_window, timeout=10, what="a 1 s window without CDS responses")
    assert plane.ads.node_status()["delta"]["types"][CDS]["acked_version"] == good_cds
    assert plane.ads.nacks == 1

    # Envoy keeps the previous cluster and keeps serving.
    assert (await envoy.dynamic_clusters())["c"]["connect_timeout"] == "0.250s"
    assert await served(lport) == {a.name}

    # A corrected model is sent, ACKed and takes effect.
    write_model(model, cluster("c", "high-availability", members, lport,
                               overrides={"cluster": {"connectTimeout": "3s"}}))

    async def applied() -> bool:
        return (await envoy.dynamic_clusters())["c"].get("connect_timeout") == "3s"

    await envoy.wait_until(applied, timeout=10, what="corrected cluster applied")
    await wait_until(lambda: in_sync(plane, "delta"), timeout=10, what="corrected version ACKed")
    assert await served(lport) == {a.name}


# -- 5. SotW and delta agree ------------------------------------------------------------------


def _resources(dump: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Dynamic resources of a full ``/config_dump`` by kind and name, without versions
    and timestamps (SotW and delta version resources differently)."""
    out: dict[str, dict[str, Any]] = {"clusters": {}, "warming": {}, "listeners": {},
                                      "routes": {}, "endpoints": {}}
    for section in dump["configs"]:
        kind = section["@type"].rsplit(".", 1)[-1]
        if kind == "ClustersConfigDump":
            for item in section.get("dynamic_active_clusters", []):
                out["clusters"][item["cluster"]["name"]] = item["cluster"]
            for item in section.get("dynamic_warming_clusters", []):
                out["warming"][item["cluster"]["name"]] = item["cluster"]
        elif kind == "ListenersConfigDump":
            for item in section.get("dynamic_listeners", []):
                state = item.get("active_state") or item.get("warming_state") or {}
                out["listeners"][item["name"]] = state.get("listener")
        elif kind == "RoutesConfigDump":
            for item in section.get("dynamic_route_configs", []):
                out["routes"][item["route_config"]["name"]] = item["route_config"]
        elif kind == "EndpointsConfigDump":
            for item in section.get("dynamic_endpoint_configs", []):
                config = item["endpoint_config"]
                out["endpoints"][config["cluster_name"]] = config
    return out


async def _view(envoy: EnvoyFixture) -> tuple[dict[str, Any], dict[str, Any]]:
    resources = _resources(await envoy.config_dump(include_eds=True))
    hosts = {name: sorted((h.address, h.port, h.priority, h.weight, h.zone,
                           h.eds_health_status, h.hostname) for h in found)
             for name, found in (await envoy.clusters()).items()}
    return resources, hosts


async def _agree(plane: ControlPlane, sotw: EnvoyFixture, delta: EnvoyFixture) -> Any:
    """Wait until both Envoys ACKed the snapshot and show the same configuration."""

    async def same() -> Any:
        if not (in_sync(plane, sotw.node_id) and in_sync(plane, delta.node_id)):
            return None
        left, right = await _view(sotw), await _view(delta)
        return left if left == right and not left[0]["warming"] else None

    return await wait_until(same, timeout=15,
                            what="SotW and delta Envoys with identical configuration")


async def test_sotw_and_delta_envoys_end_with_identical_configuration(
    tmp_path: Path, start_control_plane: Any, start_envoy: Any, start_backends: Any,
) -> None:
    a, b, c = await start_backends(3)
    shared_port, ha_port = free_ports(2)
    shared = cluster("shared", "load-sharing",
                     [member(a, weight=100), member(b, weight=300)], shared_port,
                     route={"domains": ["shared.local"]})
    cart = cluster("cart", "load-sharing", [member(a), member(c)], shared_port,
                   route={"domains": ["cart.local"]},
                   stickiness={"algorithm": "ring_hash",
                               "cookie": {"name": "cart-session", "ttl": "1h"}})
    ha = cluster("ha", "high-availability",
                 [member(a, site="dc1"), member(b, site="dc1"), member(c, site="dc2")], ha_port,
                 sites=[{"name": "dc1"}, {"name": "dc2"}])
    model = write_model(tmp_path / "model.yaml", shared, cart, ha)
    plane = await start_control_plane(config_path=model)
    sotw, delta = await asyncio.gather(start_envoy("sotw", plane.port),
                                       start_envoy("delta", plane.port, delta=True))
    await asyncio.gather(sotw.wait_ready(), delta.wait_ready())
    resources, hosts = await _agree(plane, sotw, delta)
    # Each cluster (WebSockets allowed by default) and its WebSockets' twin.
    assert set(resources["clusters"]) == {"shared", "cart", "ha", "shared~ws", "cart~ws",
                                          "ha~ws"}
    assert set(resources["endpoints"]) == {"shared", "cart", "ha"}
    tiers = {port: (p, zone) for _, port, p, _, zone, _, _ in hosts["ha"]}
    assert tiers == {a.port: (0, "dc1"), b.port: (1, "dc1"), c.port: (2, "dc2")}

    # Changes of every kind: a weight, a member out, a cluster out, a cluster in.
    extra = cluster("extra", "load-sharing", [member(b)], ha_port,
                    route={"domains": ["extra.local"]})
    ha = cluster("ha", "high-availability", [member(b, site="dc1"), member(c, site="dc2")],
                 ha_port, sites=[{"name": "dc1"}, {"name": "dc2"}],
                 route={"domains": ["ha.local"]})
    shared = cluster("shared", "load-sharing",
                     [member(a, weight=200), member(b, weight=300)], shared_port,
                     route={"domains": ["shared.local"]})
    before = versions(plane)
    write_model(model, shared, ha, extra)
    await wait_until(lambda: versions(plane) != before, timeout=10, what="the new snapshot")
    resources, hosts = await _agree(plane, sotw, delta)
    assert set(resources["clusters"]) == {"shared", "ha", "extra", "shared~ws", "ha~ws",
                                          "extra~ws"}
    assert set(resources["endpoints"]) == {"shared", "ha", "extra"}
    assert "cart" not in hosts
    assert {port: p for _, port, p, _, _, _, _ in hosts["ha"]} == {b.port: 0, c.port: 1}
    weights = {port: w for _, port, _, w, _, _, _ in hosts["shared"]}
    assert 2 * weights[b.port] == 3 * weights[a.port]


# -- 6. another replica -------------------------------------------------------------------------


async def test_reconnect_to_another_replica_resends_nothing(
    tmp_path: Path, start_control_plane: Any, start_envoy: Any, start_backends: Any,
) -> None:
    """Envoy tells the replica it moves to what it holds (``initial_resource_versions``);
    both replicas version resources alike, so nothing is sent again."""
    a, b = await start_backends(2)
    (lport,) = free_ports(1)
    model = write_model(tmp_path / "model.yaml",
                        cluster("c", "load-sharing", [member(a), member(b)], lport))
    first = await start_control_plane(config_path=model)
    second = await start_control_plane(config_path=model)
    assert versions(first) == versions(second)
    envoy = await start_envoy("delta", [first.port, second.port], delta=True)
    await envoy.wait_ready()
    await envoy.wait_hosts("c", lambda hs: len(hs) == 2 and all(h.healthy for h in hs))
    await wait_until(lambda: in_sync(first, "delta"), timeout=10,
                     what="in sync with the first replica")
    updates = await envoy.stat("cluster.c.update_success")  # EDS updates of cluster c
    modified = await envoy.stat("cluster_manager.cluster_modified")

    await first.stop()
    await wait_until(lambda: in_sync(second, "delta"), timeout=20,
                     what="in sync with the second replica")
    assert await served(lport) <= {a.name, b.name}
    assert await envoy.stat("cluster.c.update_success") == updates, "endpoints sent again"
    assert await envoy.stat("cluster_manager.cluster_modified") == modified
    assert second.ads.responses_sent == {t: 1 for t in versions(second)}
