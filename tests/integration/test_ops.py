"""The operator commands against a running deployment: real etcd, control plane(s),
three members (counter app + statesync sidecar) and Envoy, all on loopback.

Every command runs as a separate ``meshxl`` process with ``--output json`` and its
output is checked against the real state (Envoy's admin API, the traffic itself).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from meshxl.local.deployment import CLUSTER, DemoDeployment, demo_model, envoy_hosts
from meshxl.local.procs import Owner
from meshxl.local.report import lost_writes
from meshxl.local.traffic import Record, Traffic, read_back
from meshxl.local.wait import wait_until
from tests.harness.cli import meshxl, meshxl_json
from tests.harness.clock import LONG_DRAIN_WINDOW, window
from tests.harness.load import under_way

pytestmark = [pytest.mark.integration, pytest.mark.heavy]


@pytest.fixture
async def deployment(harness: Owner, tmp_path: Path) -> AsyncIterator[DemoDeployment]:
    async with DemoDeployment(tmp_path / "work", drain_window=LONG_DRAIN_WINDOW) as d:
        harness.own(d.owner)  # its processes' logs in a failure report
        yield d


def etcd_args(d: DemoDeployment) -> list[str]:
    return ["--etcd", d.etcd_url, "--etcd-prefix", d.keys.root]


async def status(d: DemoDeployment) -> dict[str, Any]:
    return await meshxl_json("status", *etcd_args(d))  # type: ignore[no-any-return]


def members(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    [cluster] = report["clusters"]
    return {m["name"]: m for m in cluster["members"]}


def served_by(records: list[Record], since: float, until: float | None = None) -> Counter[str]:
    return Counter(r.member for r in records
                   if r.ok and r.member and r.sent >= since
                   and (until is None or r.sent < until))


def steady_traffic(d: DemoDeployment, sessions: int = 20) -> Traffic:
    """Session traffic until :func:`finish` (at most 60 s and a bounded request count)."""
    return Traffic(f"{d.url}/counter", sessions, time.time() + 60.0,
                   max_requests=sessions * 60 * 12)


async def finish(traffic: Traffic, load: asyncio.Task[None], after: float = 1.5) -> None:
    """Let the traffic run ``after`` more seconds, then stop it and wait for it."""
    await window(after, "traffic after the change, judged by the test")
    traffic.until = time.time()
    await load


async def check_no_loss(d: DemoDeployment, traffic: Traffic) -> None:
    assert traffic.failures == 0, [r for r in traffic.records if not r.ok][:5]
    final, readback = await read_back(f"{d.url}/counter", traffic.sessions)
    assert all(r.ok for r in readback), [r for r in readback if not r.ok][:5]
    assert lost_writes(traffic.records, final) == {}


async def scrape(url: str) -> dict[str, float]:
    """A Prometheus text page as {sample with labels: value}."""
    import aiohttp
    from prometheus_client.parser import text_string_to_metric_families

    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 200
        text = await resp.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


# -- member down / up: a drain under load -------------------------------------------------


async def test_member_down_drains_under_load_and_status_and_sync_show_it(
        deployment: DemoDeployment) -> None:
    d = deployment
    before = await status(d)
    assert {n: (m["role"], m["state"], m["share"]) for n, m in members(before).items()} == {
        "a": ("active", "ready", 1.0), "b": ("standby", "ready", 0.0),
        "c": ("backup", "ready", 0.0)}
    [node] = before["nodes"]
    assert node["node"] == "meshxl-demo" and node["replica"] == "xds-0"

    traffic = steady_traffic(d)
    load = asyncio.create_task(traffic.run())
    await under_way(lambda: traffic.records, 40)
    down_at = time.time()
    done = await meshxl_json("member", "down", CLUSTER, "a", "--reason", "kernel patch",
                             "--wait", "10", *etcd_args(d))
    converged_at = time.time()
    assert done["converged"] is True and done["mismatches"] == []
    await window(2.0, "traffic runs with the member down: none of it may reach it")
    up_at = time.time()
    await meshxl_json("member", "up", CLUSTER, "a", "--wait", "10", *etcd_args(d))
    back_at = time.time()
    await finish(traffic, load)

    # Zero failed requests, zero lost writes: the drain moved sessions with their state.
    await check_no_loss(d, traffic)
    assert set(served_by(traffic.records, 0, down_at)) == {"a"}
    assert set(served_by(traffic.records, converged_at + 0.2, up_at)) == {"b"}
    assert set(served_by(traffic.records, back_at + 0.2)) == {"a"}

    after = await status(d)
    a = members(after)["a"]
    assert a["state"] == "ready" and a["role"] == "active"
    # The drain is in the history: one failover, recorded while the member was down.
    assert a["failovers"] == 1, a
    assert a["last_failover"]["reason"].startswith("member down by ")
    assert a["last_failover"]["reason"].endswith(": kernel patch")

    sync = await meshxl_json("sync", *etcd_args(d))
    rows = {r["member"]: r for r in sync["sidecars"]}

    async def published() -> bool:
        nonlocal rows
        report = await meshxl_json("sync", *etcd_args(d))
        rows = {r["member"]: r for r in report["sidecars"]}
        return bool(rows.get("b", {}).get("takeovers")) and set(rows) == {"a", "b", "c"}

    await wait_until(published, timeout=10, what="sync statistics with b's takeovers")
    assert rows["b"]["takeovers"] >= 1  # b took the drained sessions over
    assert rows["a"]["ready"] and rows["a"]["cached_sessions"] == len(traffic.sessions)
    assert all(r["errors"] == 0 and r["write_conflicts"] == 0 for r in rows.values()), rows
    code, out, _ = await meshxl("sync", *etcd_args(d))
    assert code == 0 and "state synchronization" in out

    # The same story in Prometheus metrics, on the control plane and the sidecars.
    xds = await scrape(f"{d.replicas[0].admin_url}/metrics")
    assert xds['meshxl_xds_failovers_total{cause="admin_down",cluster="demo"}'] == 1
    assert xds['meshxl_xds_connected_streams{protocol="sotw"}'] == 1
    assert xds["meshxl_xds_convergence_seconds_count"] >= 2  # down, up
    assert xds['meshxl_xds_pushes_total{protocol="sotw",type="ClusterLoadAssignment"}'] >= 3
    assert xds['meshxl_xds_rebuilds_total{result="published"}'] >= 3
    assert xds["meshxl_xds_debounce_pending_changes"] == 0
    b = await scrape(f"{d.member('b').sidecar_url}/metrics")
    assert b["meshxl_statesync_takeovers_total"] == rows["b"]["takeovers"]
    assert b['meshxl_statesync_writes_total{op="put",result="ok"}'] > 0
    assert b["meshxl_statesync_replication_lag_seconds_count"] > 0


async def test_member_down_with_delayed_sync_moves_young_sessions_with_their_state(
        harness: Owner, tmp_path: Path) -> None:
    """With ``sync_delay`` the sessions a member wrote in its last seconds live on it
    only: a drain replicates them before Envoy moves them (meshxl.model.moves), so every
    one is read on the standby with its count, long before the delay would have; so
    does a site taken offline, its sessions read on the other site's member."""
    async with DemoDeployment(tmp_path / "work",
                              fields={"sessions": "{ttl: 5m, sync_delay: 30s}"}) as d:
        harness.own(d.owner)
        sessions = [f"young{i}" for i in range(12)]
        await _count_twice(d, sessions, "a")
        before = await _sidecar_status(d, "a")
        assert before["local_sessions"] == len(sessions)  # young, on a only
        assert before["planned_moves"] == {"moves": [], "acknowledged": {}}

        done = await meshxl_json("member", "down", CLUSTER, "a", "--wait", "10",
                                 *etcd_args(d))
        assert done["converged"] is True
        final, readback = await read_back(f"{d.url}/counter", sessions)
        assert {r.member for r in readback} == {"b"}, readback
        assert final == dict.fromkeys(sessions, 2), final  # GET reads the count: none lost
        flushed = await scrape(f"{d.member('a').sidecar_url}/metrics")
        # Replicated by the drain, not by the periodic flush 30 s on.
        assert flushed["meshxl_statesync_planned_flushed_sessions_total"] == len(sessions)
        planned = (await _sidecar_status(d, "a"))["planned_moves"]
        assert len(planned["moves"]) == 1 and planned["moves"][0].startswith("down@"), planned
        assert list(planned["acknowledged"]) == planned["moves"], planned

        # The site offline (b's, dc1): sessions b began since, young on b, go to c with
        # it, every count whole.
        fresh = [f"fresh{i}" for i in range(8)]
        await _count_twice(d, fresh, "b")
        done = await meshxl_json("site", "offline", "dc1", "--wait", "10", *etcd_args(d))
        assert done["converged"] is True
        final, readback = await read_back(f"{d.url}/counter", fresh)
        assert {r.member for r in readback} == {"c"}, readback
        assert final == dict.fromkeys(fresh, 2), final
        flushed = await scrape(f"{d.member('b').sidecar_url}/metrics")
        assert flushed["meshxl_statesync_planned_flushed_sessions_total"] == len(fresh)


async def _count_twice(d: DemoDeployment, sessions: list[str], member: str) -> None:
    """Two counts of every session through Envoy, each answered by ``member``."""
    import aiohttp

    from meshxl.local.traffic import request

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5.0)) as http:
        for _ in range(2):
            wrote = await asyncio.gather(*(request(http, f"{d.url}/counter", s, "POST")
                                           for s in sessions))
            assert all(r.ok and r.member == member for r in wrote), wrote


async def _sidecar_status(d: DemoDeployment, member: str) -> Any:
    import aiohttp

    async with aiohttp.ClientSession() as http, \
            http.get(f"{d.member(member).sidecar_url}/v1/status") as resp:
        return await resp.json()


async def test_member_down_is_shown_with_who_why_and_when(
        deployment: DemoDeployment) -> None:
    d = deployment
    await meshxl_json("member", "down", CLUSTER, "b", "--reason", "disk swap", *etcd_args(d))
    report = await status(d)
    b = members(report)["b"]
    assert b["state"] == "admin-down" and b["admin"]["reason"] == "disk swap"
    assert "@" in b["admin"]["by"] and b["admin"]["at"]
    # b was the standby: c (the other site) is next in line now.
    assert members(report)["c"]["role"] == "standby"

    async def recorded() -> bool:
        last = members(await status(d))["b"]["last_change"]
        return last["state"] == "admin-down" and "disk swap" in (last["reason"] or "")

    await wait_until(recorded, timeout=10, what="the state change in the member history")
    code, out, err = await meshxl("status", *etcd_args(d))
    assert code == 0, err
    assert "admin-down" in out and "disk swap" in out

    code, _, err = await meshxl("member", "down", CLUSTER, "nobody", *etcd_args(d))
    assert code == 1 and "unknown member 'nobody'" in err


# -- site offline / online ------------------------------------------------------------------


async def test_site_offline_moves_traffic_and_online_brings_it_back(
        deployment: DemoDeployment) -> None:
    d = deployment
    traffic = steady_traffic(d, sessions=10)
    load = asyncio.create_task(traffic.run())
    await under_way(lambda: traffic.records, 30)
    done = await meshxl_json("site", "offline", "dc1", "--reason", "dr drill", "--wait", "10",
                             *etcd_args(d))
    moved_at = time.time()
    assert done["converged"] is True
    report = await status(d)
    assert {n: m["state"] for n, m in members(report).items()} == {
        "a": "site-offline", "b": "site-offline", "c": "ready"}
    assert report["sites_offline"]["dc1"]["reason"] == "dr drill"
    hosts = await envoy_hosts(d.admin_url)
    draining = {h.port for h in hosts if h.eds_health_status == "DRAINING"}
    assert draining == {d.member("a").app_port, d.member("b").app_port}
    await window(1.5, "traffic runs with the site offline: none of it may reach it")
    online_at = time.time()
    await meshxl_json("site", "online", "dc1", "--wait", "10", *etcd_args(d))
    back_at = time.time()
    await finish(traffic, load)
    await check_no_loss(d, traffic)
    assert set(served_by(traffic.records, moved_at + 0.2, online_at)) == {"c"}
    assert set(served_by(traffic.records, back_at + 0.2)) == {"a"}
    assert (await meshxl_json("verify", "--envoy-admin", d.admin_url, *etcd_args(d)))["ok"]

    code, _, err = await meshxl("site", "offline", "mars", *etcd_args(d))
    assert code == 1 and "unknown site 'mars'" in err


# -- verify ---------------------------------------------------------------------------------


async def test_verify_names_the_envoy_whose_control_plane_stopped_before_a_change(
        deployment: DemoDeployment) -> None:
    d = deployment
    ok = await meshxl_json("verify", "--envoy-admin", d.admin_url, *etcd_args(d))
    assert ok["ok"] and ok["mismatches"] == []
    assert [n["node"] for n in ok["nodes"]] == ["meshxl-demo"]

    # No weight still changing by itself: a member that registered after another ramps
    # up (warmup 5 s), and a ramp the control plane no longer pushes differs from the one
    # verify expects at that time (a loaded machine's start spreads the registrations).
    await d.wait_steady()

    # The only control plane dies; then an operator drains b. Envoy cannot know.
    await d.kill_replica(0)
    await meshxl_json("member", "down", CLUSTER, "b", *etcd_args(d))
    bad = await meshxl_json("verify", "--envoy-admin", d.admin_url, "--settle", "0",
                            *etcd_args(d), expect=1)
    assert not bad["ok"]
    kinds = {m["kind"] for m in bad["mismatches"]}
    # Its last status (until the dead replica's lease ends) says it ACKed an old EDS;
    # afterwards it is connected to no replica. Either way its live endpoints are wrong.
    assert kinds & {"version", "disconnected"}, bad["mismatches"]
    endpoint = [m for m in bad["mismatches"] if m["kind"] == "endpoint"]
    assert [(m["member"], m["field"]) for m in endpoint] == [("b", "draining")], endpoint
    code, out, _ = await meshxl("verify", "--envoy-admin", d.admin_url, "--settle", "0",
                                *etcd_args(d))
    assert code == 1 and "mismatch" in out and "draining" in out

    # The control plane comes back: Envoy catches up and verification passes.
    await d.start_replica(d.replicas[0])
    fixed = await meshxl_json("verify", "--envoy-admin", d.admin_url, "--settle", "15",
                              *etcd_args(d))
    assert fixed["ok"], fixed["mismatches"]


# -- status: a problem and a NACK -----------------------------------------------------------


async def test_status_shows_a_problem_and_a_nack(deployment: DemoDeployment) -> None:
    import aiohttp

    d = deployment
    async with aiohttp.ClientSession() as http:
        url = f"{d.member('c').sidecar_url}/v1/problems/database"
        async with http.put(url, json={"detail": "connection refused"}) as resp:
            assert resp.status in (200, 201), await resp.text()

    async def problem_shown() -> bool:
        c = members(await status(d))["c"]
        return c["state"] == "problem" and c["problems"] == ["database"]

    await wait_until(problem_shown, timeout=10, what="the problem in meshxl status")
    c = members(await status(d))["c"]
    assert c["problem_details"]["database"]["detail"] == "connection refused"

    # A model Envoy rejects (meshxl accepts the override; Envoy's validation does not).
    text = demo_model(d.mode, d.listen_port, [(m.name, m.site) for m in d.members])
    bad = text.replace("    sessions: {ttl: 5m}\n", "    sessions: {ttl: 5m}\n"
                       '    overrides: {cluster: {"connectTimeout": "0s"}}\n')
    path = d.work_dir / "bad-model.yaml"
    path.write_text(bad)
    code, _, err = await meshxl("apply", str(path), *etcd_args(d))
    assert code == 0, err

    async def nack_shown() -> bool:
        [node] = (await status(d))["nodes"]
        return bool(node["last_nack"]) and node["last_nack"]["type"] == "CDS"

    await wait_until(nack_shown, timeout=10, what="the NACK in meshxl status")
    [node] = (await status(d))["nodes"]
    assert node["nacks"] >= 1 and "duration" in node["last_nack"]["error"].lower() or \
        "timeout" in node["last_nack"]["error"].lower(), node
    code, out, _ = await meshxl("status", *etcd_args(d))
    assert code == 0 and "problem (database)" in out and "CDS" in out
    # verify agrees: the Envoy runs the previous clusters, not what the model says.
    report = await meshxl_json("verify", "--settle", "0", *etcd_args(d), expect=1)
    assert {m["kind"] for m in report["mismatches"]} >= {"nack", "version"}
