"""The xDS control plane driven by etcd, against real etcd and Envoy processes.

Model changes, member registrations and admin state written to etcd must reach Envoy
(checked through its admin API and with traffic); NACKs are recorded and not resent;
Envoys keep serving while the control plane is dead; replicas agree; the control plane
survives the loss of one etcd member; a bad model in etcd keeps the last good snapshot.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import aetcd
import pytest

from meshxl.etcd.keys import Keys
from meshxl.local.ports import free_ports
from meshxl.local.procs import run
from meshxl.local.wait import wait_until
from meshxl.operator.actions import apply_model, set_member_admin, set_site_admin
from meshxl.xds.app import ControlPlane
from tests.harness import Backend, EnvoyFixture, Host, drive, failures

pytestmark = pytest.mark.integration

KEYS = Keys()
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"


def ha_model(members: Sequence[tuple[Backend, str]], lport: int, *, cluster: str = "c",
             extra: str = "") -> str:
    """An HA cluster over sites dc1, dc2 with ``members`` (backend, site) in order."""
    lines = "\n".join(
        f"  - {{name: {b.name}, address: 127.0.0.1, port: {b.endpoint[1]}, site: {site}}}"
        for b, site in members
    )
    return f"""\
clusters:
- name: {cluster}
  mode: high-availability
  stickiness: {{header: x-session-id}}
  sites: [{{name: dc1}}, {{name: dc2}}]
  members:
{lines}
  listener: {{address: 127.0.0.1, port: {lport}}}
{extra}"""


async def store(client: aetcd.Client, text: str) -> int:
    return (await apply_model(client, KEYS, text, "test")).revision


async def served_by(lport: int, sessions: int = 10, per_session: int = 3) -> set[str | None]:
    """Drive bounded traffic; assert no failures; return the members that answered."""
    outcomes = await drive(f"http://127.0.0.1:{lport}/", sessions, per_session,
                           max_seconds=10)
    bad = failures(outcomes)
    assert not bad, f"{len(bad)} failed requests, first: {bad[0]}"
    return {o.member for o in outcomes}


def by_port(hosts: list[Host], backend: Backend) -> Host:
    (found,) = [h for h in hosts if h.port == backend.endpoint[1]]
    return found


def acked_all(status: dict[str, Any], node: str, versions: dict[str, str]) -> bool:
    """Node ``node`` has ACKed exactly ``versions`` for every type."""
    types = status.get(node, {}).get("types", {})
    return bool(versions) and all(
        types.get(t, {}).get("acked_version") == v for t, v in versions.items())


async def wait_in_sync(plane: ControlPlane, node: str, revision: int, runs_before: int) -> None:
    """Wait until the plane has seen etcd ``revision``, rebuilt, and ``node`` ACKed it all."""

    def check() -> bool:
        snapshot = plane.cache.snapshot
        return (plane.mesh is not None and plane.mesh.revision >= revision
                and plane.rebuilder.runs > runs_before and snapshot is not None
                and acked_all(plane.ads.node_status(), node, snapshot.versions))

    await wait_until(check, timeout=10, what=f"{node} in sync with etcd revision {revision}")


# -- 1. model and admin changes through etcd ------------------------------------------


async def test_model_member_and_site_changes_in_etcd_reach_envoy(
    start_control_plane: Any, start_envoy: Any, start_backends: Any, etcd: Any,
    etcd_client: aetcd.Client, harness: Any,
) -> None:
    a, b, c = await start_backends(3)
    (lport,) = free_ports(1)
    await store(etcd_client, ha_model([(a, "dc1"), (b, "dc1")], lport))
    plane = await start_control_plane(etcd=etcd.url)
    envoy: EnvoyFixture = await start_envoy("n1", plane.port)
    await envoy.wait_ready()
    await envoy.wait_hosts("c", lambda hs: len(hs) == 2 and all(h.healthy for h in hs))
    assert await served_by(lport) == {a.name}

    # (a) `meshxl apply` of a model with a third member (in dc2).
    path = harness.root / "three.yaml"
    path.write_text(ha_model([(a, "dc1"), (b, "dc1"), (c, "dc2")], lport))
    code, out, err = await run(
        [sys.executable, "-m", "meshxl.cli", "apply", str(path), "--etcd", etcd.url], timeout=30)
    assert code == 0, err
    assert "stored" in out
    hosts = await envoy.wait_hosts(
        "c", lambda hs: len(hs) == 3 and all(h.healthy for h in hs), what="third member")
    assert by_port(hosts, c).zone == "dc2"

    # (b) member down: a drains (EDS DRAINING), traffic moves to b; member up restores it.
    await set_member_admin(etcd_client, KEYS, "c", a.name, down=True, reason="test")
    hosts = await envoy.wait_hosts(
        "c", lambda hs: by_port(hs, a).eds_health_status == "DRAINING", what="a draining")
    assert not by_port(hosts, a).healthy
    assert by_port(hosts, b).healthy and by_port(hosts, c).healthy
    assert await served_by(lport) == {b.name}
    await set_member_admin(etcd_client, KEYS, "c", a.name, down=False)
    await envoy.wait_hosts("c", lambda hs: all(h.healthy for h in hs), what="a back")
    assert await served_by(lport) == {a.name}

    # (c) site offline: every dc1 host drains, traffic goes to dc2.
    await set_site_admin(etcd_client, KEYS, "dc1", offline=True, reason="test")
    hosts = await envoy.wait_hosts(
        "c", lambda hs: all(by_port(hs, x).eds_health_status == "DRAINING" for x in (a, b)),
        what="dc1 draining")
    assert by_port(hosts, c).healthy
    assert await served_by(lport) == {c.name}
    await set_site_admin(etcd_client, KEYS, "dc1", offline=False)
    await envoy.wait_hosts("c", lambda hs: all(h.healthy for h in hs), what="dc1 back")
    assert await served_by(lport) == {a.name}


# -- 2. registered membership ---------------------------------------------------------------


async def test_registered_membership_follows_leased_registrations(
    start_control_plane: Any, start_envoy: Any, start_backends: Any, etcd: Any,
    etcd_client: aetcd.Client,
) -> None:
    (a,) = await start_backends(1)
    (lport,) = free_ports(1)
    await store(etcd_client, f"""\
clusters:
- name: r
  membership: registered
  members:
  - {{name: {a.name}, address: 127.0.0.1, port: 1}}
  listener: {{address: 127.0.0.1, port: {lport}}}
  # One member: by default a problem would keep it serving (no other member can, see
  # test_problems_fallback.py); this test watches the withdrawal itself.
  failover: {{all_withdrawn: withdraw}}
""")
    plane: ControlPlane = await start_control_plane(etcd=etcd.url)
    envoy = await start_envoy("n1", plane.port)
    await envoy.wait_ready()
    assert await envoy.hosts("r") == []  # listed but not registered: not advertised

    key = KEYS.member("r", a.name).encode()
    lease = await etcd_client.lease(10)

    async def register(**fields: Any) -> tuple[int, int]:
        runs = plane.rebuilder.runs
        value = {"address": "127.0.0.1", "port": a.endpoint[1], "ready": True,
                 "problems": [], **fields}
        put = await etcd_client.put(key, json.dumps(value).encode(), lease=lease)
        return runs, put.header.revision

    runs, revision = await register(ready=False)
    await wait_in_sync(plane, "n1", revision, runs)
    assert await envoy.hosts("r") == [], "a registration that is not ready is advertised"

    await register(ready=True)
    hosts = await envoy.wait_hosts("r", lambda hs: len(hs) == 1 and hs[0].healthy,
                                   what="ready registration")
    assert hosts[0].port == a.endpoint[1]  # the registration's port, not the listed one
    # A host added to a running cluster takes traffic after its first health check
    # result passes Envoy's update_merge_window (1 s default): wait for the first success.
    await wait_until(_answers(lport), timeout=10,
                     what="first request through the registered member")
    assert await served_by(lport, 4, 2) == {a.name}

    await register(problems=["db"])
    await wait_until(_empty(envoy, "r"), timeout=10, what="registration with problems withdrawn")

    await register()
    await envoy.wait_hosts("r", lambda hs: len(hs) == 1, what="registration back")
    await lease.revoke()
    await wait_until(_empty(envoy, "r"), timeout=10, what="registration removed with its lease")
    assert await etcd_client.get(key) is None


def _answers(lport: int) -> Any:
    async def check() -> bool:
        return not failures(await drive(f"http://127.0.0.1:{lport}/", 1, 1))

    return check


def _empty(envoy: EnvoyFixture, cluster: str) -> Any:
    async def check() -> bool:
        return cluster in await envoy.clusters() and await envoy.hosts(cluster) == []

    return check


# -- 3. NACK ----------------------------------------------------------------------------------


async def test_nack_is_recorded_not_resent_and_fixed_by_a_corrected_model(
    start_control_plane: Any, start_envoy: Any, start_backends: Any, etcd: Any,
    etcd_client: aetcd.Client,
) -> None:
    a, b = await start_backends(2)
    (lport,) = free_ports(1)
    members = [(a, "dc1"), (b, "dc1")]
    await store(etcd_client, ha_model(members, lport))
    plane: ControlPlane = await start_control_plane(etcd=etcd.url)
    envoy = await start_envoy("n1", plane.port)
    await envoy.wait_ready()
    await envoy.wait_hosts("c", lambda hs: all(h.healthy for h in hs))
    good_cds = plane.cache.snapshot.versions[CDS]
    await wait_until(lambda: acked_all(plane.ads.node_status(), "n1",
                                     plane.cache.snapshot.versions), timeout=10, what="first ACK")

    # meshxl accepts this override (a duration, not negative); Envoy's validation of
    # connect_timeout (gt 0) rejects it.
    await store(etcd_client, ha_model(members, lport, extra=(
        '  overrides: {cluster: {"connectTimeout": "0s"}}\n')))

    def nacked() -> dict[str, Any] | None:
        return plane.ads.node_status().get("n1", {}).get("last_nack")

    nack = await wait_until(nacked, timeout=10, what="NACK recorded")
    bad_cds = plane.cache.snapshot.versions[CDS]
    assert bad_cds != good_cds
    assert nack["type_url"] == CDS
    assert "connect_timeout" in nack["error"].lower() or "duration" in nack["error"].lower(), \
        nack["error"]
    assert plane.ads.nacks >= 1

    # Not resent in a loop: the CDS response count stays put while Envoy is connected.
    def cds_responses() -> int:
        return int(plane.ads.node_status()["n1"]["types"][CDS]["responses"])

    def connection() -> tuple[int, Any]:
        node = plane.ads.node_status()["n1"]
        return node["streams"], node["connected_at"]

    async def quiet_window() -> bool:
        """CDS responses constant over 1 s on one connected stream; False if the stream
        was replaced meanwhile (see test_ads_stream_stays_up_while_idle)."""
        stream, before = connection(), cds_responses()
        if stream[0] != 1:
            return False
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            if connection() != stream:
                return False
            assert cds_responses() == before, "the NACKed version is being resent"
        return True

    await wait_until(quiet_window, timeout=10, what="a 1 s window on one ADS stream")
    status = plane.ads.node_status()["n1"]
    assert status["types"][CDS]["acked_version"] == good_cds

    # Envoy keeps the previous config and keeps serving.
    assert (await envoy.dynamic_clusters())["c"]["version_info"] == good_cds
    assert await served_by(lport) == {a.name}

    # The NACK is published to etcd too.
    async def nack_in_etcd() -> dict[str, Any] | None:
        got = await etcd_client.get(KEYS.node("n1").encode())
        data = json.loads(got.value) if got is not None else {}
        return data if data.get("last_nack") else None

    published = await wait_until(nack_in_etcd, timeout=10, what="node status with the NACK in etcd")
    assert published["last_nack"]["type_url"] == CDS
    assert published["last_nack"]["error"] == nack["error"]

    # A corrected model is sent, ACKed and takes effect.
    await store(etcd_client, ha_model(members, lport, extra=(
        '  overrides: {cluster: {"connectTimeout": "3s"}}\n')))
    await wait_until(lambda: plane.cache.snapshot.versions[CDS] not in (good_cds, bad_cds),
                     timeout=10, what="corrected snapshot")
    await wait_until(lambda: acked_all(plane.ads.node_status(), "n1",
                                     plane.cache.snapshot.versions),
                     timeout=20, what="corrected ACK")

    async def applied() -> bool:
        return (await envoy.dynamic_clusters())["c"].get("connect_timeout") == "3s"

    await envoy.wait_until(applied, timeout=20, what="connect_timeout 3s")
    assert await served_by(lport) == {a.name}


# -- 4. control plane killed and restarted ---------------------------------------------------


async def test_envoys_serve_while_control_plane_is_down_and_resync_after_restart(
    control_plane_process: Any, start_envoy: Any, start_backends: Any, etcd: Any,
    etcd_client: aetcd.Client,
) -> None:
    a, b, c = await start_backends(3)
    (lport,) = free_ports(1)
    await store(etcd_client, ha_model([(a, "dc1"), (b, "dc1")], lport))
    proc = await control_plane_process(etcd=etcd.url, name="xds").start()
    e1, e2 = await asyncio.gather(start_envoy("n1", proc.port), start_envoy("n2", proc.port))
    await asyncio.gather(e1.wait_ready(), e2.wait_ready())

    async def converged() -> dict[str, str] | None:
        status = await proc.status()
        versions = status["versions"]
        ok = all(acked_all(status["nodes"], n, versions) for n in ("n1", "n2"))
        return versions if ok else None

    versions = await wait_until(converged, timeout=15, what="both Envoys ACK the snapshot")
    assert set(versions) >= {CDS}
    for envoy in (e1, e2):
        await envoy.wait_hosts("c", lambda hs: len(hs) == 2 and all(h.healthy for h in hs))

    await proc.kill()
    assert not proc.process.running
    # A model change while the control plane is down.
    await store(etcd_client, ha_model([(a, "dc1"), (b, "dc1"), (c, "dc2")], lport))
    # Both Envoys bind the listener port with SO_REUSEPORT: the kernel spreads connections.
    outcomes = await drive(f"http://127.0.0.1:{lport}/", 20, 5, concurrency=16,
                           max_seconds=10)
    assert len(outcomes) == 100 and not failures(outcomes), failures(outcomes)[:3]
    for envoy in (e1, e2):
        assert await envoy.server_state() == "LIVE"
        assert len(await envoy.hosts("c")) == 2  # nothing new without a control plane

    await proc.start()
    new_versions = await wait_until(converged, timeout=20, what="both Envoys re-sync after restart")
    assert new_versions != versions
    for envoy in (e1, e2):
        await envoy.wait_hosts("c", lambda hs: len(hs) == 3 and all(h.healthy for h in hs),
                               timeout=20, what="change made while the plane was down")


# -- 5. replicas --------------------------------------------------------------------------------


async def test_two_replicas_on_one_etcd_serve_identical_versions(
    control_plane_process: Any, start_backends: Any, etcd: Any, etcd_client: aetcd.Client,
) -> None:
    a, b = await start_backends(2)
    (lport,) = free_ports(1)
    await store(etcd_client, ha_model([(a, "dc1")], lport))
    r1 = control_plane_process(etcd=etcd.url, name="xds-1")
    r2 = control_plane_process(etcd=etcd.url, name="xds-2")
    await asyncio.gather(r1.start(), r2.start())
    s1, s2 = await r1.status(), await r2.status()
    assert s1["versions"] and s1["versions"] == s2["versions"]
    assert s1["replica"] == "xds-1" and s2["replica"] == "xds-2"

    await store(etcd_client, ha_model([(a, "dc1"), (b, "dc2")], lport))

    async def agree() -> bool:
        v1, v2 = (await r1.status())["versions"], (await r2.status())["versions"]
        return v1 == v2 and v1 != s1["versions"]

    await wait_until(agree, timeout=10, what="both replicas on the new identical versions")


# -- 6. etcd member loss --------------------------------------------------------------------


async def test_control_plane_survives_loss_of_one_etcd_member(
    start_control_plane: Any, start_envoy: Any, start_backends: Any, etcd_cluster: Any,
) -> None:
    a, b = await start_backends(2)
    (lport,) = free_ports(1)
    async with etcd_cluster.client(timeout=1) as client:
        await store(client, ha_model([(a, "dc1"), (b, "dc1")], lport))
    plane = await start_control_plane(etcd=",".join(etcd_cluster.urls))
    envoy = await start_envoy("n1", plane.port)
    await envoy.wait_ready()
    await envoy.wait_hosts("c", lambda hs: len(hs) == 2 and all(h.healthy for h in hs))

    await etcd_cluster.kill(0)  # the first listed member: the one the plane likely uses
    async with etcd_cluster.client(timeout=1) as client:  # survivors only

        async def member_down() -> bool:
            try:
                await set_member_admin(client, KEYS, "c", a.name, down=True, reason="test")
            except Exception:  # in-flight request to a member mid-election: retry
                return False
            return True

        await wait_until(member_down, timeout=15,
                         what="member down written through a surviving member")
    hosts = await envoy.wait_hosts(
        "c", lambda hs: by_port(hs, a).eds_health_status == "DRAINING", timeout=20,
        what="member down after losing an etcd member")
    assert by_port(hosts, b).healthy
    assert await served_by(lport) == {b.name}


# -- 7. bad model in etcd -------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [
    pytest.param("clusters: [ {name: c, members: [", id="invalid-yaml"),
    pytest.param("clusters:\n- name: c\n  members:\n"
                 "  - {name: x, address: 127.0.0.1, port: 70000}\n", id="invalid-field"),
])
async def test_bad_model_in_etcd_keeps_last_good_snapshot(
    bad: str, start_control_plane: Any, start_envoy: Any, start_backends: Any, etcd: Any,
    etcd_client: aetcd.Client,
) -> None:
    a, b = await start_backends(2)
    (lport,) = free_ports(1)
    await store(etcd_client, ha_model([(a, "dc1"), (b, "dc1")], lport))
    plane: ControlPlane = await start_control_plane(etcd=etcd.url)
    envoy = await start_envoy("n1", plane.port)
    await envoy.wait_ready()
    await envoy.wait_hosts("c", lambda hs: len(hs) == 2 and all(h.healthy for h in hs))
    versions = dict(plane.cache.snapshot.versions)

    # Written directly: `meshxl apply` would refuse it.
    await etcd_client.put(KEYS.model.encode(), bad.encode())
    error = await wait_until(lambda: plane.status()["model_error"], timeout=10, what="model_error")
    if "70000" in bad:
        assert "70000" in error and "port" in error, error
    assert plane.cache.snapshot.versions == versions
    assert await served_by(lport) == {a.name}

    fixed = ha_model([(a, "dc1"), (b, "dc1")], lport, extra="  connect_timeout: 1s\n")
    await store(etcd_client, fixed)
    await wait_until(lambda: plane.status()["model_error"] is None, timeout=10,
                     what="model_error cleared")
    await wait_until(lambda: plane.cache.snapshot.versions != versions, timeout=10,
                     what="new snapshot")

    async def applied() -> bool:
        return (await envoy.dynamic_clusters())["c"].get("connect_timeout") == "1s"

    await envoy.wait_until(applied, timeout=20, what="fixed model applied")


# -- ADS stream behaviour --------------------------------------------------------


async def test_ads_stream_stays_up_while_idle(
    start_control_plane: Any, start_envoy: Any, start_backends: Any, etcd: Any,
    etcd_client: aetcd.Client,
) -> None:
    (a,) = await start_backends(1)
    (lport,) = free_ports(1)
    await store(etcd_client, ha_model([(a, "dc1")], lport))
    plane: ControlPlane = await start_control_plane(etcd=etcd.url)
    envoy = await start_envoy("n1", plane.port)
    await envoy.wait_ready()
    connected_at = plane.ads.node_status()["n1"]["connected_at"]
    deadline = time.monotonic() + 6.0
    while time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        node = plane.ads.node_status()["n1"]
        assert node["streams"] == 1 and node["connected_at"] == connected_at, \
            "the ADS stream of an idle Envoy was dropped and re-opened"


async def test_cluster_only_change_applies_without_a_new_stream(
    start_control_plane: Any, start_envoy: Any, start_backends: Any, etcd: Any,
    etcd_client: aetcd.Client,
) -> None:
    a, b = await start_backends(2)
    (lport,) = free_ports(1)
    members = [(a, "dc1"), (b, "dc1")]
    await store(etcd_client, ha_model(members, lport))
    plane: ControlPlane = await start_control_plane(etcd=etcd.url)
    envoy = await start_envoy("n1", plane.port)
    await envoy.wait_ready()
    await envoy.wait_hosts("c", lambda hs: len(hs) == 2 and all(h.healthy for h in hs))
    connected_at = plane.ads.node_status()["n1"]["connected_at"]
    await store(etcd_client, ha_model(members, lport, extra="  connect_timeout: 2s\n"))

    async def applied() -> bool:
        return (await envoy.dynamic_clusters())["c"].get("connect_timeout") == "2s"

    # Warming needs only the EDS answer and a health-check round: well under 3 s.
    await envoy.wait_until(applied, timeout=3, what="cluster change applied")
    assert plane.ads.node_status()["n1"]["connected_at"] == connected_at, \
        "applied only because the ADS stream was re-opened"
