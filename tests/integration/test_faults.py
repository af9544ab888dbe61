"""Faults under session traffic, against real processes: etcd (one member, and a
3-member cluster), the control plane, three members (the counter app and its statesync
sidecar each) and Envoy, all on loopback (``DemoDeployment``).

What is checked (the claims of docs/faults.md):

* etcd: one member of three killed -9 and restarted under load, then a full outage: no
  acknowledged write is lost; during the outage writes fail fast with 503 and a JSON
  message (never a 2xx), cached sessions stay readable, the control plane and Envoy
  keep the last configuration (Envoy also while the control plane is down too), and
  everything recovers by itself when etcd is back.
* The control plane, a sidecar, and Envoy each killed -9 and restarted under load: no
  acknowledged write is lost, the sidecar's sessions are served by the next member
  meanwhile and it catches up before it is ready again, and clients recover.
* Partition: the owner frozen (SIGSTOP) until its lease ended and another member took
  its sessions over: its stale writes get 409 and never reach etcd.

The counter app reads a session and writes it back incremented, so every write in a
session's etcd history must carry the previous one's ``seq`` + 1: a stale write merged
anywhere would break that chain.
"""

from __future__ import annotations

import asyncio
import json
import math
import signal
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from meshxl import etcd as meshxl_etcd
from meshxl.etcd.keys import DEFAULT_ROOT, Keys
from meshxl.local.deployment import (
    CLUSTER,
    DemoDeployment,
    demo_model,
    envoy_hosts,
    healthy_host,
)
from meshxl.local.ports import free_port
from meshxl.local.procs import Owner
from meshxl.local.report import lost_writes
from meshxl.local.traffic import Record, Traffic, read_back, request
from meshxl.local.wait import wait_until
from meshxl.statesync.record import SessionRecord
from tests.harness import EtcdCluster, EtcdServer
from tests.harness.clock import scaled
from tests.harness.sidecar import Reply, SidecarProcess

pytestmark = [pytest.mark.integration, pytest.mark.heavy]

SESSIONS = 16
LEASE_TTL = 2.0
"""The sidecars' registration lease (DemoDeployment's default ``--lease-ttl``)."""
CLIENT_TIMEOUT = 5.0
"""The load generator's (and the app's) request timeout: a "fast" failure is well below."""
FAST = scaled(4.0)
"""Upper bound for a failure to count as fast: well below CLIENT_TIMEOUT, what a write
that waited for etcd would take (a failure through Envoy after its 2 s per-try timeout
would be a 504, which the status checks catch)."""
STALE_SEQ = 10**9


# -- helpers ------------------------------------------------------------------------------


@pytest.fixture
async def deployment(harness: Owner, tmp_path: Path) -> AsyncIterator[DemoDeployment]:
    # A member back after a fault waits behind the one that took over (failback); a
    # short wait keeps these tests quick (test_failback.py tests the hold itself).
    async with DemoDeployment(tmp_path / "work", lease_ttl=LEASE_TTL,
                              failover="{failback_delay: 2s}") as d:
        harness.own(d.owner)  # its processes' logs in a failure report
        yield d


class Load:
    """The demo's session traffic through Envoy in the background, stopped by
    :meth:`stop` (and bounded anyway: ``limit`` seconds, 12 requests/s per session;
    a test that fails before stopping it has it cancelled at teardown)."""

    running: list[Load] = []

    def __init__(self, d: DemoDeployment, sessions: int = SESSIONS, limit: float = 60.0):
        self.traffic = Traffic(f"{d.url}/counter", sessions, time.time() + limit,
                               max_requests=int(sessions * limit * 12))
        self.task = asyncio.create_task(self.traffic.run())
        Load.running.append(self)

    @property
    def sessions(self) -> list[str]:
        return self.traffic.sessions

    @property
    def records(self) -> list[Record]:
        return self.traffic.records

    def acked(self, since: float, member: str | None = None) -> set[str]:
        """Sessions with a write acknowledged after ``since`` (by ``member``)."""
        if self.task.done():
            self.task.result()  # raises what stopped the load early
            raise AssertionError("the load stopped early")
        return {r.session for r in self.records
                if r.ok and r.ended > since and (member is None or r.member == member)}

    async def all_acked(self, since: float, what: str, *, member: str | None = None,
                        timeout: float = 20.0) -> None:
        """Wait until every session had a write acknowledged after ``since``."""
        await wait_until(lambda: self.acked(since, member) == set(self.sessions), timeout=timeout,
                         what=f"every session acknowledged {what}")

    def failed(self, since: float = 0.0, until: float = math.inf) -> list[Record]:
        """Failed requests sent from ``since`` on that ended before ``until``."""
        return [r for r in self.records if not r.ok and since <= r.sent and r.ended < until]

    async def stop(self) -> list[Record]:
        self.traffic.until = time.time()
        async with asyncio.timeout(CLIENT_TIMEOUT + 10):
            await self.task
        return self.records


@pytest.fixture(autouse=True)
async def _cancel_loads() -> AsyncIterator[None]:
    yield
    loads, Load.running[:] = list(Load.running), []
    for load in loads:
        load.task.cancel()
    await asyncio.gather(*(load.task for load in loads), return_exceptions=True)


async def check_no_loss(d: DemoDeployment, sessions: list[str],
                        records: Iterable[Record]) -> dict[str, int | None]:
    """Read every session back through Envoy: each shows its last acknowledged seq."""
    final, readback = await read_back(f"{d.url}/counter", sessions)
    assert all(r.ok for r in readback), [r for r in readback if not r.ok][:5]
    assert lost_writes(list(records), final) == {}, "acknowledged writes were lost"
    return final


async def envoy_stats(d: DemoDeployment) -> dict[str, int]:
    from meshxl.proxy.admin import EnvoyAdmin

    async with EnvoyAdmin(d.admin_url, timeout=2) as admin:
        return await admin.stats()


async def get_json(url: str) -> tuple[int, Any]:
    async with (aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http,
                http.get(url) as resp):
        return resp.status, await resp.json(content_type=None)


async def healthy_members(d: DemoDeployment) -> int:
    return sum(1 for h in await envoy_hosts(d.admin_url) if healthy_host(h))


def member_pids(d: DemoDeployment) -> dict[str, int]:
    """The members' processes (apps and sidecars) by name."""
    procs = [p for m in d.members for p in (m.app, m.sidecar)]
    return {p.name: p.pid for p in procs if p is not None and p.pid is not None}


def all_running(d: DemoDeployment) -> bool:
    procs = [r.process for r in d.replicas] + [p for m in d.members for p in (m.app, m.sidecar)]
    return all(p is not None and p.running for p in procs)


def assert_json_error(status: int, body: bytes, expected: int, *, mentions: str = "") -> Any:
    assert status == expected, (status, body[:300])
    doc = json.loads(body)
    assert isinstance(doc, dict) and doc.get("status") == expected, doc
    assert isinstance(doc.get("error"), str) and mentions in doc["error"], doc
    return doc


async def session_history(d: DemoDeployment, since_revision: int
                          ) -> dict[str, list[SessionRecord]]:
    """Every PUT of every session from ``since_revision`` on, from etcd's history."""
    prefix = d.keys.sessions_prefix(CLUSTER).encode()
    history: dict[str, list[SessionRecord]] = defaultdict(list)
    async with meshxl_etcd.client(d.etcd_url, timeout=5) as client:
        # Until each session's latest write went by (a batch shares one revision).
        pending = {kv.key: kv.mod_revision for kv in (await client.get_prefix(prefix)).kvs
                   if kv.mod_revision >= since_revision}
        watch = await client.watch_prefix(prefix, start_revision=since_revision)
        try:
            async with asyncio.timeout(15):
                async for event in watch:
                    key = event.kv.key
                    if event.kind == "PUT":
                        history[key[len(prefix):].decode()].append(
                            SessionRecord.decode(event.kv.value))
                    if pending.get(key) == event.kv.mod_revision:
                        del pending[key]
                    if not pending:
                        break
        finally:
            await watch.cancel()
    return history


def seq_of(record: SessionRecord) -> int:
    return int(json.loads(record.data)["seq"])


def assert_unbroken_chains(history: dict[str, list[SessionRecord]]) -> None:
    """Each write continues the one before it: nothing stale was ever merged."""
    for session, records in sorted(history.items()):
        seqs = [seq_of(r) for r in records]
        assert STALE_SEQ not in seqs, f"{session}: a fenced stale write reached etcd: {seqs}"
        breaks = [(a, b) for a, b in zip(seqs, seqs[1:], strict=False) if b != a + 1]
        assert not breaks, f"{session}: writes that do not continue the previous one: " \
                           f"{breaks} in {[(r.owner, seq_of(r), r.updated) for r in records]}"


async def etcd_revision(d: DemoDeployment) -> int:
    async with meshxl_etcd.client(d.etcd_url, timeout=5) as client:
        return int((await client.get_prefix(d.keys.sessions_prefix(CLUSTER).encode())
                    ).header.revision)


async def registration(d: DemoDeployment, member: str) -> bytes | None:
    async with meshxl_etcd.client(d.etcd_url, timeout=2) as client:
        got = await client.get(d.keys.member(CLUSTER, member).encode())
    return None if got is None else bytes(got.value)


# -- 1. the sidecar through a full etcd outage ------------------------------------------------


async def test_sidecar_in_a_full_etcd_outage_fails_writes_fast_and_serves_cached_reads(
    etcd: EtcdServer, start_sidecar: Any,
) -> None:
    # A 10 s session TTL: a new session-lease bucket every second, so writes during the
    # outage also need a lease etcd cannot grant.
    options = {"lease_ttl": LEASE_TTL, "session_ttl": 10}
    # The model names the sidecars' cluster, as in any deployment (a sidecar warns while
    # it is missing, and this test asserts that no warning is left after the outage).
    model = demo_model("high-availability", free_port(), [("a", "dc1"), ("b", "dc1")])
    async with meshxl_etcd.client(etcd.url, timeout=5) as client:
        await client.put(Keys(DEFAULT_ROOT).model.encode(), model.encode())
    a, b = await asyncio.gather(*(
        start_sidecar(cluster=CLUSTER, member=m, etcd=etcd.url, app_port=free_port(),
                      **options) for m in ("a", "b")))
    acked: dict[str, Reply] = {}
    for i in range(8):
        reply = await a.put(f"s{i}", {"seq": i})
        assert reply.status == 201, reply
        acked[f"s{i}"] = reply

    async def b_caches_all() -> bool:
        return (await b.status())["cached_sessions"] == len(acked)

    await wait_until(b_caches_all, timeout=10, what="b caches a's sessions")

    await etcd.kill()
    down = time.monotonic()
    writes: list[Reply] = []
    while time.monotonic() - down < LEASE_TTL + 1.5:  # past the lease and a lease bucket
        for sidecar in (a, b):
            for session in ("s0", "s7", f"new-{len(writes)}"):
                sent = time.monotonic()
                reply = await sidecar.put(session, {"seq": STALE_SEQ})
                assert time.monotonic() - sent < FAST, "a write during the outage was slow"
                writes.append(reply)
            got = await sidecar.get("s3")
            assert got.status == 200 and got.source == "cache-unverified", got
            assert got.json() == {"seq": 3} and got.etag == acked["s3"].etag, got
        await asyncio.sleep(0.1)  # pacing of the probe loop, not a wait for a condition
    assert len(writes) >= 12
    for reply in writes:  # never a false acknowledgement, always a JSON message
        assert_json_error(reply.status, reply.body, 503, mentions="etcd unavailable")
    missing = await a.get("never-written")
    assert_json_error(missing.status, missing.body, 503, mentions="etcd unavailable")

    # Both stay ready (an outage fails no member) and say what is degraded.
    for sidecar in (a, b):
        ready = await sidecar.readyz()
        assert ready.status == 200, ready
        assert any("etcd unreachable" in w for w in ready.json()["warnings"]), ready.json()
        status = await sidecar.status()
        assert status["ready"] and status["etcd_unreachable_for"] >= LEASE_TTL, status

    # etcd back, same processes: writes succeed, nothing written during the outage applied.
    pid_a, pid_b = a.process.pid, b.process.pid
    await etcd.start()

    async def writes_again() -> bool:
        return (await b.put("s7", {"seq": 8})).status == 200

    await wait_until(writes_again, timeout=15, what="b writes again after etcd returned")
    for sidecar in (a, b):

        async def recovered(sidecar: SidecarProcess = sidecar) -> bool:
            status = await sidecar.status()
            return (status["ready"] and status["registered"] and not status["warnings"]
                    and status["etcd_unreachable_for"] is None)

        await wait_until(recovered, timeout=10,
                         what=f"{sidecar.member} registered again, no warnings")
    assert (a.process.pid, b.process.pid) == (pid_a, pid_b)
    for i in range(7):
        got = await a.get(f"s{i}")
        assert got.status == 200 and got.json() == {"seq": i}, got
        assert got.source in ("cache", "etcd") and got.etag == acked[f"s{i}"].etag, got
    assert (await a.get("new-0")).status == 404
    after = await a.get("s7")
    assert after.status == 200 and after.json() == {"seq": 8} and after.owner == "b", after


# -- 2. etcd: a member killed and restarted under load, then a full outage ----------------------


async def test_etcd_member_loss_and_full_outage_under_load(
    harness: Owner, etcd_cluster: EtcdCluster, tmp_path: Path,
) -> None:
    async with DemoDeployment(tmp_path / "work", etcd_url=",".join(etcd_cluster.urls),
                              lease_ttl=LEASE_TTL) as d:
        harness.own(d.owner)
        started_pids = member_pids(d)
        load = Load(d)
        await load.all_acked(0, "before the fault")

        # One member of three (the leader) killed -9, then restarted, under load.
        leader = await etcd_cluster.leader()
        killed = time.time()
        await leader.kill()
        await load.all_acked(killed, "with one etcd member dead")
        await leader.start()
        restarted = time.time()
        await load.all_acked(restarted, "after the etcd member returned")
        records = await load.stop()
        assert not load.failed(until=killed), load.failed()[:5]
        for r in load.failed():  # only while raft re-elected: 503s with a message
            assert r.status == 503 and r.error, r
        final = await check_no_loss(d, load.sessions, records)

        # Full outage: every etcd member killed -9, once no weight changes by itself (a
        # member that registered after another ramps up, a new EDS each step).
        await d.wait_steady()
        replica = d.replicas[0].admin_url
        versions = (await get_json(f"{replica}/v1/status"))[1]["versions"]
        await asyncio.gather(*(m.kill() for m in etcd_cluster.members))
        down = time.time()
        async with aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)) as http:
            # Reads through Envoy go on from the members' caches, past the leases' end.
            async def read_all() -> list[Record]:
                return await asyncio.gather(*(request(http, f"{d.url}/counter", s, "GET")
                                              for s in load.sessions))

            reads: list[Record] = []
            while time.time() - down < LEASE_TTL + 1.0:
                reads += await read_all()
                await asyncio.sleep(0.05)  # pacing of the reader
            assert reads and all(r.ok for r in reads), [r for r in reads if not r.ok][:5]
            assert {r.session: r.seq for r in reads} == final

            # Envoy routes with the last configuration: the same members, healthy, still
            # connected to the control plane, which still serves the same versions.
            hosts = await envoy_hosts(d.admin_url)
            assert len(hosts) == 3 and all(healthy_host(h) for h in hosts), hosts
            assert (await envoy_stats(d))["control_plane.connected_state"] == 1
            assert (await get_json(f"{replica}/v1/status"))[1]["versions"] == versions
            for m in d.members:
                status, ready = await get_json(f"{m.sidecar_url}/readyz")
                assert status == 200 and ready.get("warnings"), (m.name, ready)

            # The control plane down as well: killed -9 and started again, it waits for
            # etcd without serving; Envoy keeps routing with the configuration it has.
            await d.kill_replica(0)
            await d.start_replica(d.replicas[0], wait=False)
            await wait_until(partial(_disconnected, d), timeout=10,
                             what="Envoy to lose the control plane")
            reads = await read_all()
            assert all(r.ok for r in reads) and {r.session: r.seq for r in reads} == final
            assert await healthy_members(d) == 3

            # Writes fail fast with 503, never acknowledged.
            writes = []
            for session in load.sessions:
                sent = time.time()
                async with http.post(f"{d.url}/counter",
                                     headers={"x-session-id": session}) as resp:
                    writes.append((resp.status, await resp.read(), time.time() - sent))
            assert all(status == 503 and body for status, body, _ in writes), writes[:3]
            assert max(took for _, _, took in writes) < FAST, writes
            # The first answer comes from the app, with the sidecar's reason.
            assert_json_error(writes[0][0], writes[0][1], 503, mentions="etcd unavailable")

        # etcd back: everything recovers by itself, no member restarted; the control
        # plane reads etcd and serves again, and Envoy reconnects to it.
        for member in etcd_cluster.members:
            await member.start(wait=False)
        await asyncio.gather(*(m.wait_healthy(20) for m in etcd_cluster.members))
        returned = time.time()
        load = Load(d)
        await load.all_acked(returned, "after etcd returned", timeout=30)
        await wait_until(partial(_connected, d), timeout=20, what="Envoy back on the control plane")
        # The same versions as before the outage: nothing for Envoy to re-apply.
        # /v1/status answers before the replica has rebuilt from etcd (versions empty):
        # wait for its snapshot, then compare.

        async def rebuilt() -> dict[str, Any] | None:
            _, body = await get_json(f"{replica}/v1/status")
            return body if body.get("versions") else None

        status = await wait_until(rebuilt, timeout=10,
                                  what="the control plane's snapshot after etcd returned")
        assert status["versions"] == versions
        records += await load.stop()
        assert member_pids(d) == started_pids and all_running(d)
        for name in (m.name for m in d.members):
            await wait_until(partial(_registered_without_warnings, d, name), timeout=10,
                             what=f"{name} registered again, no warnings")
        await check_no_loss(d, load.sessions, records)


async def test_reads_through_envoy_survive_write_load_during_an_etcd_outage(
    deployment: DemoDeployment,
) -> None:
    d = deployment
    load = Load(d)
    await load.all_acked(0, "before the outage")
    records = await load.stop()
    final = await check_no_loss(d, load.sessions, records)
    etcd = next(p for p in d.owner.processes if p.name == "etcd")
    await etcd.kill()
    down = time.time()
    reads: list[Record] = []
    writes: list[tuple[int, bytes]] = []
    async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)) as http:

        async def write(session: str) -> tuple[int, bytes]:
            async with http.post(f"{d.url}/counter",
                                 headers={"x-session-id": session}) as resp:
                return resp.status, await resp.read()

        while time.time() - down < LEASE_TTL + 2.0:  # past the leases' end
            writes += await asyncio.gather(*(write(s) for s in load.sessions))
            reads += await asyncio.gather(*(request(http, f"{d.url}/counter", s, "GET")
                                            for s in load.sessions))
            await asyncio.sleep(0.1)  # pacing of the probe loop
    not_json = []
    for status, body in writes:
        try:
            assert_json_error(status, body, 503, mentions="etcd unavailable")
        except (AssertionError, ValueError):
            not_json.append((status, body[:100]))
    failed_reads = [r for r in reads if not r.ok]
    assert not not_json and not failed_reads, (
        f"{len(not_json)} of {len(writes)} writes without the app's JSON 503 "
        f"({not_json[:2]}); {len(failed_reads)} of {len(reads)} reads failed "
        f"({[(r.status, r.error) for r in failed_reads[:2]]})")
    assert {r.session: r.seq for r in reads} == final


# -- 3. control plane, sidecar and Envoy killed -9 and restarted under load --------------------


FLAP_STATS = ("cluster_manager.cluster_added", "cluster_manager.cluster_modified",
              "cluster_manager.cluster_removed", "listener_manager.listener_added",
              "listener_manager.listener_modified", "listener_manager.listener_removed")


async def test_control_plane_sidecar_and_envoy_restarts_lose_no_write(
    deployment: DemoDeployment,
) -> None:
    d = deployment
    a, b = d.member("a"), d.member("b")
    load = Load(d, limit=90.0)
    await load.all_acked(0, "before the faults")

    # The only control-plane replica killed -9: Envoy keeps the configuration it has.
    before = await envoy_stats(d)
    await d.kill_replica(0)
    await wait_until(lambda: _disconnected(d), timeout=10,
                     what="Envoy to notice the control plane gone")
    await load.all_acked(time.time(), "while the control plane is down")
    hosts = await envoy_hosts(d.admin_url)
    assert len(hosts) == 3 and all(healthy_host(h) for h in hosts), hosts
    await d.start_replica(d.replicas[0])
    await wait_until(lambda: _connected(d), timeout=15,
                     what="Envoy reconnected to the control plane")
    cp_back = time.time()
    after = await envoy_stats(d)
    assert {s: after[s] for s in FLAP_STATS} == {s: before[s] for s in FLAP_STATS}
    await load.all_acked(cp_back, "after the control plane returned")
    assert not load.failed(), load.failed()[:5]

    # The active member's sidecar killed -9: its app fails its health check, b serves
    # a's sessions from its own copy meanwhile.
    assert a.sidecar is not None
    await a.sidecar.kill()
    sc_killed = time.time()
    await load.all_acked(sc_killed + 1.0, "by b while a's sidecar is dead", member="b")
    assert not load.failed(), load.failed()[:5]
    _, b_status = await get_json(f"{b.sidecar_url}/v1/status")
    a.sidecar.start()
    await wait_until(lambda: _ready(a.sidecar_url), timeout=20, what="a's restarted sidecar ready")
    _, a_status = await get_json(f"{a.sidecar_url}/v1/status")
    assert a_status["cached_sessions"] == SESSIONS, a_status  # caught up before ready
    assert a_status["revision"] >= b_status["revision"], (a_status, b_status)
    assert a_status["full_syncs"] == 1
    sc_back = time.time()
    await load.all_acked(sc_back, "by a again, the active member", member="a", timeout=25)
    assert not load.failed(), load.failed()[:5]

    # Envoy killed -9 and started again: clients fail while it is gone, then recover.
    assert d.envoy is not None
    envoy_killed = time.time()
    await d.envoy.kill()
    d.envoy = None
    await d.start_envoy(None)
    envoy_back = time.time()
    await load.all_acked(envoy_back, "through the restarted Envoy")
    records = await load.stop()
    assert not load.failed(until=envoy_killed), load.failed()[:5]
    late = load.failed(since=envoy_back + 1.0)
    assert not late, f"requests still failing after Envoy was back: {late[:5]}"
    await check_no_loss(d, load.sessions, records)


async def _registered_without_warnings(d: DemoDeployment, member: str) -> bool:
    status, ready = await get_json(f"{d.member(member).sidecar_url}/readyz")
    return (status == 200 and "warnings" not in ready
            and await registration(d, member) is not None)


async def _connected(d: DemoDeployment) -> bool:
    return (await envoy_stats(d)).get("control_plane.connected_state") == 1


async def _disconnected(d: DemoDeployment) -> bool:
    return (await envoy_stats(d)).get("control_plane.connected_state") == 0


async def _ready(url: str) -> bool:
    return (await get_json(f"{url}/readyz"))[0] == 200


# -- 4. partition: the former owner frozen until another member took over -------------------


def _signal_member(d: DemoDeployment, name: str, sig: signal.Signals) -> None:
    m = d.member(name)
    for proc in (m.app, m.sidecar):
        if proc is not None and proc.running:
            proc.signal(sig)


async def test_isolated_former_owner_is_fenced_and_its_writes_never_merged(
    deployment: DemoDeployment,
) -> None:
    d = deployment
    a = d.member("a")
    load = Load(d)
    await load.all_acked(0, "by the active member a", member="a")
    start_revision = await etcd_revision(d)
    # Sessions outside the load, written only here: nothing but the stale writes below
    # reaches a for them, whatever order a works through its backlog in after SIGCONT.
    quiet = [f"q{i}" for i in range(8)]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:

        async def post(session: str) -> Record:
            return await request(http, f"{d.url}/counter", session, "POST")

        before = await asyncio.gather(*(post(s) for s in quiet))
        assert all(r.ok and r.member == "a" and r.seq == 1 for r in before), before

        # What a resumed member's backlog does to newer requests, on purpose: requests
        # for one session overlap on one member. Each increment is a compare-and-set:
        # no two succeed with the same value, none is lost.
        app = f"http://127.0.0.1:{a.app_port}/counter"
        racing = await asyncio.gather(*(request(http, app, "race", "POST") for _ in range(6)))
        won = sorted(r.seq for r in racing if r.ok and r.seq is not None)
        assert all(r.ok or r.status == 409 for r in racing), racing
        assert won == list(range(1, len(won) + 1)), racing
        assert (await request(http, app, "race", "GET")).seq == len(won)

        async def stale_write(session: str) -> tuple[int, bytes]:
            async with http.put(f"{a.sidecar_url}/v1/sessions/{session}",
                                json={"seq": STALE_SEQ, "member": "a"}) as resp:
                return resp.status, await resp.read()

        _signal_member(d, "a", signal.SIGSTOP)
        paused = time.time()
        try:
            # a's writes issued while it is cut off: they wait in its socket.
            stale = [asyncio.create_task(stale_write(s)) for s in quiet]
            await wait_until(lambda: _no_registration(d, "a"), timeout=LEASE_TTL + 10,
                             what="a's lease to end")
            await wait_until(lambda: _hosts(d, 2), timeout=10,
                             what="the control plane to withdraw a")
            took = await asyncio.gather(*(post(s) for s in quiet))
            assert all(r.ok and r.member == "b" and r.seq == 2 for r in took), took
            await load.all_acked(paused, "by b, which took a's sessions over", member="b")
        finally:
            _signal_member(d, "a", signal.SIGCONT)
        resumed = time.time()
        async with asyncio.timeout(20):
            results = await asyncio.gather(*stale)

        for status, body in results:  # fenced: a lost the sessions while it was away
            doc = assert_json_error(status, body, 409, mentions="ownership lost")
            assert doc["owner"] == "b", doc
        _, a_status = await get_json(f"{a.sidecar_url}/v1/status")
        assert a_status["write_conflicts"] >= len(quiet), a_status

        # a registers again and, as the active member, takes the sessions back with
        # fresh reads (the session moving back, not a merge).
        await wait_until(lambda: _hosts(d, 3), timeout=20, what="a back in Envoy")
        await load.all_acked(resumed, "by a again", member="a", timeout=25)
        records = await load.stop()
        back = await asyncio.gather(*(post(s) for s in quiet))
        assert all(r.ok and r.member == "a" and r.seq == 3 for r in back), back

    await check_no_loss(d, load.sessions + quiet, [*records, *before, *took, *back])
    history = await session_history(d, start_revision)
    assert set(history) == {*load.sessions, *quiet, "race"}
    assert_unbroken_chains(history)
    for session in quiet:  # a, the takeover by b, a again: nothing of a's in between
        assert [(w.owner, seq_of(w)) for w in history[session]] == [
            ("a", 1), ("b", 2), ("a", 3)], session
    for session in load.sessions:
        owners = [w.owner for w in history[session]]
        assert "b" in owners and owners[-1] == "a", (session, owners)


async def _no_registration(d: DemoDeployment, member: str) -> bool:
    return await registration(d, member) is None


async def _hosts(d: DemoDeployment, count: int) -> bool:
    hosts = await envoy_hosts(d.admin_url)
    return len(hosts) == count and all(healthy_host(h) for h in hosts)
