"""One statesync sidecar per pool member serving every virtual system of the pool
(``meshxl serve statesync --pool web``), through real etcd, the control plane and
Envoy, with the demo counter app beside each sidecar taking each request's VS from its
Host.

Counters are written in VS A (active on w0) and VS B (active on w1). kill -9 of w0 (its
app and its sidecar): A's sessions go on on A's standby, w1, each from the value last
acknowledged (its sidecar took them over, state and all), no request failing, while B,
on w1 throughout, answers every request. The shared sidecar's API addresses each VS by
its path."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import aetcd
import aiohttp
import pytest

from meshxl.etcd.keys import Keys
from meshxl.local import commands
from meshxl.local.ports import free_ports
from meshxl.local.procs import Owner
from meshxl.local.wait import wait_until
from meshxl.model import parse_model
from meshxl.model.vsls import placement_of
from meshxl.operator.actions import apply_model
from tests.harness.cli import meshxl
from tests.harness.clock import scaled

pytestmark = pytest.mark.integration

KEYS = Keys()
LOOPBACK = "127.0.0.1"
TENANTS = ["t1", "t2", "t3", "t4"]
SESSIONS = [f"s{i}" for i in range(4)]
ROUNDS_AFTER_KILL = 5  # every session of A and B asked this many times after the kill
STOP_WITHIN = 5.0  # seconds a SIGTERM'd sidecar of five VSs takes to end, at most


def model_text(apps: dict[str, int], port: int, sessions: str = "") -> str:
    members = "".join(f"\n      - {{name: {name}, address: {LOOPBACK}, port: {app}, "
                      f"site: {'ab'[i % 2]}}}" for i, (name, app) in enumerate(apps.items()))
    return f"""
pools:
  - name: web
    listener: {{address: {LOOPBACK}, port: {port}}}
    sites: [{{name: a}}, {{name: b}}]
    members:{members}
virtual_systems:
  - names: [{", ".join(TENANTS)}]
    pool: web
    stickiness: {{header: x-session-id}}
    health_check: {{}}
""".replace("    health_check: {}\n", sessions and f"    sessions: {sessions}\n")


async def count(http: aiohttp.ClientSession, port: int, vs: str,
                session: str) -> tuple[int, dict[str, Any]]:
    """POST /counter of ``session`` in ``vs`` through Envoy: (status, answer)."""
    async with http.post(f"http://{LOOPBACK}:{port}/counter", headers={
            "Host": f"{vs}.tenants.example", "x-session-id": session}) as resp:
        if resp.content_type != "application/json":  # Envoy's own answer
            return resp.status, {"error": (await resp.text())[:200]}
        return resp.status, await resp.json()


async def _bed(harness: Owner, start_control_plane: Any, start_envoy: Any,
               start_sidecar: Any, etcd: Any, etcd_client: aetcd.Client,
               sessions: str = "") -> tuple[str, int, Any, list[Any], list[Any]]:
    """Two pool members (a sidecar serving every VS and the demo app each), the control
    plane and Envoy, every VS's members healthy in it: the model's text, the pool's
    port, the placement's roles, the sidecars and the apps."""
    names = ["w0", "w1"]
    app_ports = dict(zip(names, free_ports(2), strict=True))
    (port,) = free_ports(1)
    text = model_text(app_ports, port, sessions)
    roles = placement_of(parse_model(text), parse_model(text).pools[0]).roles
    await apply_model(etcd_client, KEYS, text, "test")

    sidecars = await asyncio.gather(*(
        start_sidecar(cluster=None, pool="web", member=name, etcd=etcd.url,
                      app_port=app_ports[name], site="ab"[i % 2])
        for i, name in enumerate(names)))
    apps = []
    for name, sidecar in zip(names, sidecars, strict=True):
        app = harness.process(f"app-{name}", commands.app(
            name, cluster=None, listen=f"{LOOPBACK}:{app_ports[name]}", sidecar=sidecar.url,
            clusters_by_host=True))
        app.start()
        apps.append(app)
    async with aiohttp.ClientSession() as http:
        for port_of_app in app_ports.values():
            async def healthy(url: str = f"http://{LOOPBACK}:{port_of_app}/healthz") -> bool:
                async with http.get(url) as resp:
                    return resp.status == 200

            await wait_until(healthy, timeout=20, what="the apps healthy (sidecars ready)")
    plane = await start_control_plane(etcd=etcd.url)
    envoy = await start_envoy("edge", plane.port)
    await envoy.wait_ready()
    for vs in TENANTS:
        await envoy.wait_hosts(vs, lambda hs: len(hs) == 2 and all(h.healthy for h in hs),
                               what=f"{vs}: both members healthy", timeout=20)
    return text, port, roles, sidecars, apps


async def test_a_pool_sidecar_serves_every_vs_and_the_standby_takes_a_lost_actives_over(
        harness: Owner, start_control_plane: Any, start_envoy: Any, start_sidecar: Any,
        etcd: Any, etcd_client: aetcd.Client) -> None:
    text, port, roles, sidecars, apps = await _bed(
        harness, start_control_plane, start_envoy, start_sidecar, etcd, etcd_client)
    a = next(vs for vs in TENANTS if roles[vs].active == "w0")
    b = next(vs for vs in TENANTS if roles[vs].active == "w1")
    assert roles[a].standby == "w1"

    # One sidecar per member serves every VS of the pool, each under its own path.
    w0 = sidecars[0]
    clusters = (await w0.request("GET", "/v1/clusters")).json()["clusters"]
    assert [c["name"] for c in clusters] == sorted(TENANTS) and all(c["ready"] for c in clusters)
    unknown = await w0.request("GET", "/v1/clusters/nope/sessions/s0")
    assert unknown.status == 404 and "'nope' is not served" in unknown.json()["error"]
    unnamed = await w0.request("GET", "/v1/sessions/s0")
    assert unnamed.status == 400 and "name the cluster" in unnamed.json()["error"]

    async with aiohttp.ClientSession() as http:
        seq: dict[tuple[str, str], int] = {}
        for _ in range(3):
            for vs in (a, b):
                for session in SESSIONS:
                    status, body = await count(http, port, vs, session)
                    assert status == 200 and body["member"] == roles[vs].active, body
                    seq[vs, session] = body["seq"]
        assert set(seq.values()) == {3}
        # The counters live in each VS's own cluster: A's s0 is not B's s0.
        got = await w0.request("GET", f"/v1/clusters/{a}/sessions/s0")
        assert got.status == 200 and got.json()["seq"] == 3
        assert (await w0.request("GET", f"/v1/clusters/{b}/sessions/s9")).status == 404

        await apps[0].kill()
        await w0.kill9()

        # Every request answered from the kill on: a refused connect to w0 is retried
        # on A's standby tier at once.
        failed_a, answers_b = 0, []
        for _ in range(ROUNDS_AFTER_KILL):
            for session in SESSIONS:
                answers_b.append(await count(http, port, b, session))
                status, body = await count(http, port, a, session)
                if status != 200:
                    failed_a += 1
                    continue
                assert body["member"] == "w1", body
                # Taken over with its state: the next value after the last acknowledged.
                assert body["seq"] == seq[a, session] + 1, (session, body, seq[a, session])
                seq[a, session] = body["seq"]
        assert failed_a == 0, failed_a
        assert all(status == 200 and body["member"] == "w1" for status, body in answers_b), \
            answers_b
        assert [body["seq"] for _, body in answers_b[-len(SESSIONS):]] == \
            [3 + ROUNDS_AFTER_KILL] * len(SESSIONS)

    status = (await sidecars[1].request("GET", f"/v1/clusters/{a}/status")).json()
    assert status["takeovers"] >= len(SESSIONS), status
    # The process's status and metrics hold every cluster's, by name.
    whole = (await sidecars[1].request("GET", "/v1/status")).json()
    assert sorted(whole["clusters"]) == sorted(TENANTS) and whole["pool"] == "web"
    assert whole["clusters"][a]["takeovers"] == status["takeovers"]
    metrics = (await sidecars[1].request("GET", "/metrics")).body.decode()
    for vs in (a, b):
        assert f'meshxl_statesync_writes_total{{cluster="{vs}",op="put",result="ok"}}' \
            in metrics, vs
    assert metrics.count("# TYPE meshxl_statesync_writes_total counter") == 1
    print(f"\nkill -9 of w0 (app and sidecar): VS {a} on its standby w1, every session "
          f"from its last value ({failed_a} of {ROUNDS_AFTER_KILL * len(SESSIONS)} requests "
          f"failed, {status['takeovers']} takeovers); VS {b}: 0 of {len(answers_b)} failed")

    # The pool's sidecar follows the model: a VS added is served, one removed is not.
    w1 = sidecars[1]
    await apply_model(etcd_client, KEYS, text.replace("t4]", "t4, t5]"), "test")

    async def served() -> list[str]:
        listed = (await w1.request("GET", "/v1/clusters")).json()["clusters"]
        return [c["name"] for c in listed if c["ready"]]

    await wait_until(lambda: _has(served, "t5"), timeout=10, what="t5 served by w1")
    put = await w1.request("PUT", "/v1/clusters/t5/sessions/s0", data=b"{}",
                           headers={"Content-Type": "application/json"})
    assert put.status == 201, put
    await apply_model(etcd_client, KEYS, text.replace("t1, ", ""), "test")

    async def only_the_models() -> bool:  # each VS removed stops on its own
        return await served() == ["t2", "t3", "t4"]

    await wait_until(only_the_models, timeout=10,
                     what="w1 serving t2, t3, t4 only (t1 and t5 removed)", explain=served)
    gone = await w1.request("GET", "/v1/clusters/t1/sessions/s0")
    assert gone.status == 404 and "'t1' is not served" in gone.json()["error"]

    # SIGTERM: it ends at once, every VS's registration withdrawn.
    assert await etcd_client.get(KEYS.member("t2", "w1").encode()) is not None
    w1.process.signal(signal.SIGTERM)
    assert await w1.process.wait_exit(STOP_WITHIN) is not None
    for vs in ("t2", "t3", "t4", "t5"):
        assert await etcd_client.get(KEYS.member(vs, "w1").encode()) is None, vs


async def test_vs_move_under_delayed_sync_takes_young_sessions_with_their_state(
        harness: Owner, start_control_plane: Any, start_envoy: Any, start_sidecar: Any,
        etcd: Any, etcd_client: aetcd.Client) -> None:
    """With ``sync_delay`` a VS's young sessions live on its active's pool sidecar only;
    ``meshxl vs move`` to the standby waits until that sidecar replicated them, so each
    counter goes on from its last value on the new member, long before the delay."""
    _, port, roles, sidecars, _ = await _bed(
        harness, start_control_plane, start_envoy, start_sidecar, etcd, etcd_client,
        sessions="{ttl: 5m, sync_delay: 30s}")
    a = next(vs for vs in TENANTS if roles[vs].active == "w0")
    w0 = sidecars[0]
    async with aiohttp.ClientSession() as http:
        seq = {}
        for _ in range(2):
            for session in SESSIONS:
                status, body = await count(http, port, a, session)
                assert status == 200 and body["member"] == "w0", body
                seq[session] = body["seq"]
        kept = (await w0.request("GET", f"/v1/clusters/{a}/status")).json()
        assert kept["local_sessions"] == len(SESSIONS), kept  # young: on w0 only

        code, _, err = await meshxl("vs", "move", a, "w1", "--etcd", etcd.url)
        assert code == 0, err
        # Until Envoy has the move, w0 answers (writing through); every answer, on
        # either member, is the next value after the last one.
        on_w1: set[str] = set()
        deadline = asyncio.get_running_loop().time() + scaled(10)
        while len(on_w1) < len(SESSIONS) and asyncio.get_running_loop().time() < deadline:
            for session in SESSIONS:
                status, body = await count(http, port, a, session)
                assert status == 200 and body["seq"] == seq[session] + 1, (session, body)
                seq[session] = body["seq"]
                if body["member"] == "w1":
                    on_w1.add(session)
            await asyncio.sleep(0.05)
        assert on_w1 == set(SESSIONS), on_w1
    planned = (await w0.request("GET", f"/v1/clusters/{a}/status")).json()["planned_moves"]
    assert planned["moves"] and list(planned["acknowledged"]) == planned["moves"], planned


async def test_narrow_replication_each_vs_standby_holds_its_sessions_and_no_other(
        harness: Owner, start_control_plane: Any, start_envoy: Any, start_sidecar: Any,
        etcd: Any, etcd_client: aetcd.Client) -> None:
    """With ``replication: narrow`` a pool sidecar holds every session of the VSs it is
    the standby of, placed as the control plane places them, and only what it uses of
    the others: a VS's writes reach its active and its standby, not the whole pool.
    kill -9 of an active: its VSs go on on their standbys from the last value."""
    _, port, roles, sidecars, apps = await _bed(
        harness, start_control_plane, start_envoy, start_sidecar, etcd, etcd_client,
        sessions="{replication: narrow}")
    a = next(vs for vs in TENANTS if roles[vs].active == "w0")
    b = next(vs for vs in TENANTS if roles[vs].active == "w1")
    w0, w1 = sidecars

    async def status(sidecar: Any, vs: str) -> dict[str, Any]:
        return (await sidecar.request("GET", f"/v1/clusters/{vs}/status")).json()

    async def placed() -> bool:
        seen = [await status(w, vs) for w in sidecars for vs in TENANTS]
        return all(s["role"] in ("active", "standby") for s in seen)

    await wait_until(placed, timeout=10, what="every VS's role known to its sidecars")
    for vs in TENANTS:
        for name, sidecar in (("w0", w0), ("w1", w1)):
            got = await status(sidecar, vs)
            standby = roles[vs].standby == name
            assert got["role"] == ("standby" if standby else "active"), (vs, name, got)
            assert got["holds_all_sessions"] is standby, (vs, name, got)

    async with aiohttp.ClientSession() as http:
        seq: dict[str, int] = {}
        for _ in range(2):
            for session in SESSIONS:
                status_code, body = await count(http, port, a, session)
                assert status_code == 200 and body["member"] == "w0", body
                seq[session] = body["seq"]

        async def replicated() -> bool:
            return (await status(w1, a))["cached_sessions"] == len(SESSIONS)

        await wait_until(replicated, timeout=10, what=f"{a}'s sessions on its standby")
        assert (await status(w0, b))["cached_sessions"] == 0  # w0 serves nothing of b

        # The roles follow the placement: b moved to w0 makes w1 its standby.
        code, _, err = await meshxl("vs", "move", b, "w0", "--etcd", etcd.url)
        assert code == 0, err

        async def moved() -> bool:
            theirs, ours = await status(w0, b), await status(w1, b)
            return (theirs["role"], theirs["holds_all_sessions"], ours["role"],
                    ours["holds_all_sessions"]) == ("active", False, "standby", True)

        await wait_until(moved, timeout=10, what=f"{b}'s roles swapped in its sidecars")

        await apps[0].kill()
        await w0.kill9()
        for session in SESSIONS:
            status_code, body = await count(http, port, a, session)
            assert status_code == 200 and body["member"] == "w1", body
            assert body["seq"] == seq[session] + 1, (session, body, seq[session])
    after = await status(w1, a)
    assert after["takeovers"] >= len(SESSIONS), after
    # A static pool: Envoy's health checks moved the VS, its placement stays (w0 is
    # not admin down), so w1 is still its standby and goes on holding all of it.
    assert after["role"] == "standby" and after["holds_all_sessions"], after


async def test_a_write_over_its_quota_is_its_actives_429_not_a_retry_elsewhere(
        harness: Owner, start_control_plane: Any, start_envoy: Any, start_sidecar: Any,
        etcd: Any, etcd_client: aetcd.Client) -> None:
    """A VS's write past its ``writes_per_second`` reaches the client as the active's
    429 with ``Retry-After``. Answered as a 503, Envoy would retry it on the VS's
    standby, whose sidecar has a bucket of its own: the write would pass the quota and
    the session would leave its active."""
    _, port, roles, _, _ = await _bed(
        harness, start_control_plane, start_envoy, start_sidecar, etcd, etcd_client,
        sessions="{quota: {writes_per_second: 1, writes_burst: 1}}")
    vs = TENANTS[0]
    active = roles[vs].active
    async with aiohttp.ClientSession() as http:
        code, body = await count(http, port, vs, "q1")
        assert (code, body["member"], body["seq"]) == (200, active, 1), body
        async with http.post(f"http://{LOOPBACK}:{port}/counter", headers={
                "Host": f"{vs}.tenants.example", "x-session-id": "q1"}) as resp:
            refused, retry_after = await resp.json(), resp.headers.get("Retry-After")
            assert resp.status == 429, (resp.status, refused)
        assert refused["member"] == active and refused["quota"] == "writes_per_second"
        assert retry_after is not None and int(retry_after) >= 1, retry_after
        async with http.get(f"http://{LOOPBACK}:{port}/counter", headers={
                "Host": f"{vs}.tenants.example", "x-session-id": "q1"}) as resp:
            current = await resp.json()
        assert (resp.status, current["seq"], current["member"]) == (200, 1, active), current


async def _has(names: Any, name: str, present: bool = True) -> bool:
    return (name in await names()) == present
