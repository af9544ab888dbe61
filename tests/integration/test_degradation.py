"""Sick members through a real Envoy and a real etcd: a member whose answers become ten
times slower (its health check still passing) is judged DEGRADED from the requests the
Envoy logged, and sessions move from it: in load sharing its share steps down, in high
availability the standby is probed and takes the active role (predictive failover).
Everyone equally slow moves nothing; a member well again gets its share back."""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aetcd
import aiohttp
import pytest
from rich.console import Console

from meshxl import headers as hdr
from meshxl.etcd.keys import Keys
from meshxl.local.ports import free_ports
from meshxl.local.wait import wait_until
from meshxl.operator.actions import apply_model
from meshxl.operator.tables import render_status
from meshxl.operator.views.read import read_mesh
from meshxl.operator.views.status import status_report
from meshxl.xds.app import ControlPlane
from tests.harness import Backend, EnvoyFixture
from tests.harness.clock import scaled, window
from tests.harness.load import under_way

pytestmark = [pytest.mark.integration, pytest.mark.heavy]

KEYS = Keys()
LOOPBACK = "127.0.0.1"
SESSIONS = 60
CONCURRENCY = 6
RECOVER = scaled(4.0)
"""A judgement's ``recover``: a member that no request reaches shows no worse window,
so this long after its last one its judgement ends; the test's windows on a member at
its last step (scaled) must end first."""
SLOW = 0.1  # seconds: ten times and more the loopback echo's few milliseconds
PAUSE = 0.003
"""Each worker's pause between requests: ~1,000 requests/s in all, plenty for the judge,
and the test's own loop (which also runs the control plane) is not saturated."""


def model(mode: str, backends: list[Backend], port: int, route: str = "",
          recover: float = RECOVER) -> str:
    members = "".join(f"\n  - {{name: {b.name}, address: {LOOPBACK}, port: {b.port}}}"
                      for b in backends)
    return f"""
clusters:
- name: web
  mode: {mode}
  stickiness: {{header: {hdr.SESSION}}}
  warmup: 2s
  outlier_detection: {{enabled: false}}
  degradation: {{detect: 1s, recover: {recover:g}s, min_requests: 10}}
  listener: {{address: {LOOPBACK}, port: {port}}}{route}
  members:{members}
"""


@dataclass
class Load:
    """Sticky sessions, one request at a time each, round robin over CONCURRENCY workers."""

    port: int
    answers: list[tuple[float, str, int]] = field(default_factory=list)
    """(send time, member, status) of every request."""

    def since(self, t: float) -> list[tuple[float, str, int]]:
        return [a for a in self.answers if a[0] >= t]

    def share(self, member: str, since: float) -> float:
        got = self.since(since)
        assert got, f"no request sent since {since:.3f} was answered"  # never a vacuous 0
        return sum(1 for a in got if a[1] == member) / len(got)

    async def answered(self, since: float, count: int = 10) -> None:
        """Until ``count`` requests sent since ``since`` have their answers (a share is
        judged on answers, however slowly a busy machine gives them)."""
        await under_way(lambda: self.since(since), count, timeout=10,
                        what=f"the requests sent since {since:.3f}")


@contextlib.asynccontextmanager
async def load(port: int, seconds: float = 60.0,
               concurrency: int = CONCURRENCY) -> AsyncIterator[Load]:
    state = Load(port)
    stop = asyncio.Event()
    deadline = time.monotonic() + scaled(seconds)

    async def worker(http: aiohttp.ClientSession, n: int) -> None:
        i = n
        while not stop.is_set() and time.monotonic() < deadline and len(state.answers) < 200_000:
            session = f"s{i % SESSIONS}"
            i += concurrency
            sent = time.time()
            try:
                async with http.get(f"http://{LOOPBACK}:{port}/",
                                    headers={hdr.SESSION: session}) as resp:
                    await resp.read()
                    state.answers.append((sent, resp.headers.get(hdr.MEMBER, "?"), resp.status))
            except aiohttp.ClientError:
                state.answers.append((sent, "?", 0))
            await asyncio.sleep(PAUSE)

    async with aiohttp.ClientSession() as http:
        tasks = [asyncio.create_task(worker(http, n)) for n in range(concurrency)]
        try:
            yield state
        finally:
            stop.set()
            await asyncio.gather(*tasks)


async def requests_per_member(envoy: EnvoyFixture) -> dict[str, int]:
    """Per member of ``web``: the requests Envoy sent it."""
    return {h.hostname: h.stats.get("rq_total", 0) for h in await envoy.hosts("web")}


async def fault(backend: Backend, **fault: float | bool) -> None:
    async with aiohttp.ClientSession() as http, http.post(
            f"{backend.url}/admin/fault", json=fault) as resp:
        assert resp.status == 200, await resp.text()


async def setup(mode: str, start_control_plane: Any, start_envoy: Any, start_backends: Any,
                etcd: Any, etcd_client: aetcd.Client, route: str = "",
                recover: float = RECOVER
                ) -> tuple[ControlPlane, EnvoyFixture, list[Backend], int]:
    backends = await start_backends(3)
    (port,) = free_ports(1)
    await apply_model(etcd_client, KEYS, model(mode, backends, port, route, recover), "test")
    plane: ControlPlane = await start_control_plane(etcd=etcd.url)
    envoy = await start_envoy("edge", plane.port)
    await envoy.wait_ready()
    await envoy.wait_hosts("web", lambda hs: len(hs) == 3 and all(h.healthy for h in hs),
                           what="three healthy members")
    return plane, envoy, backends, port


def degraded(plane: ControlPlane) -> dict[str, Any]:
    return dict(plane.status()["degraded"].get("web", {}))


def judged_from(plane: ControlPlane, backends: list[Backend]) -> str:
    """What the judge reads, for a failure's message: each member's last windows
    (requests, failed, p90 ms)."""
    now = time.time()
    windows = plane.upstream.windows("web", now - 4.0, now)
    names = {f"{LOOPBACK}:{b.port}": b.name for b in backends}
    return "; ".join(
        f"{names.get(host, host)}: " + " ".join(
            f"{w.requests}/{w.errors}/{'-' if w.p90 is None else round(w.p90 * 1000)}"
            for w in ws) for host, ws in sorted(windows.items()))


async def test_load_sharing_a_slow_member_is_degraded_and_gets_its_share_back(
        start_control_plane: Any, start_envoy: Any, start_backends: Any, etcd: Any,
        etcd_client: aetcd.Client) -> None:
    plane, envoy, backends, port = await setup("load-sharing", start_control_plane,
                                               start_envoy, start_backends, etcd, etcd_client)
    sick = backends[2].name
    async with load(port) as traffic:
        await window(2.5, "every member's normal (the judge's history)")
        # Everyone equally slow (a shared dependency): nothing moves.
        for b in backends:
            await fault(b, delay=SLOW)
        await window(3.0, "everyone slow for longer than detect (1 s): nobody judged")
        assert degraded(plane) == {}
        for b in backends:
            await fault(b)
        await window(2.5, "every member's normal again")
        # One member ten times slower: degraded within seconds, its share steps down.
        started = time.time()
        await fault(backends[2], delay=SLOW)
        await wait_until(lambda: sick in degraded(plane), timeout=30,
                         what="the slow member degraded",
                         explain=lambda: judged_from(plane, backends))
        detected = time.time() - started
        record = degraded(plane)[sick]
        assert record["kind"] == "degraded" and "against its peers'" in record["reason"]
        stored = (await etcd_client.get(KEYS.member_health("web", sick).encode()))
        assert stored is not None and b'"degraded"' in stored.value
        await wait_until(lambda: degraded(plane)[sick].get("share", 1) <= 0.125, timeout=30,
                         what="its share stepped down")
        def stepped(hosts: list[Any]) -> bool:
            weights = {h.hostname: h.weight for h in hosts}
            return weights[sick] * 4 < min(w for m, w in weights.items() if m != sick)
        await envoy.wait_hosts("web", stepped, what="its EDS weight a quarter of its peers'")
        stepped = time.time()
        await window(2.0, "the share it gets at its step, measured")
        await traffic.answered(stepped)
        share = traffic.share(sick, stepped)
        assert share < 0.15, share  # a third before
        report = status_report(await read_mesh(etcd_client, KEYS))
        row = {m["name"]: m for m in report["clusters"][0]["members"]}[sick]
        assert row["state"] == "degraded", row
        assert row["degraded"]["share"] <= 0.125 and row["share"] < 0.1, row
        assert row["last_change"]["reason"].startswith("degraded: p90"), row
        console = Console(width=200, file=io.StringIO())
        render_status(report, console)
        assert "degraded (" in console.file.getvalue()  # type: ignore[attr-defined]
        # Well again: after `recover` the judgement ends and the warm-up ramp gives its
        # share back.
        await fault(backends[2])
        await wait_until(lambda: sick not in degraded(plane), timeout=30,
                         what="the member judged well again")
        gone = await etcd_client.get(KEYS.member_health("web", sick).encode())
        assert gone is None or not gone.value
    failed = [a for a in traffic.answers if a[2] != 200]
    # How fast: bench/grayfailure.py measures detection; here the wait's deadline bounds it.
    print(f"\ndetected in {detected:.2f} s; {len(traffic.answers)} requests, "
          f"{len(failed)} failed; share after the steps {share:.3f}")
    assert not failed, failed[:5]
    assert plane.metrics.registry.get_sample_value(
        "meshxl_xds_failovers_total", {"cluster": "web", "cause": "degraded"}) == 1


async def test_high_availability_a_slow_active_hands_its_role_to_the_standby(
        start_control_plane: Any, start_envoy: Any, start_backends: Any, etcd: Any,
        etcd_client: aetcd.Client) -> None:
    plane, envoy, backends, port = await setup("high-availability", start_control_plane,
                                               start_envoy, start_backends, etcd, etcd_client)
    active, standby = backends[0].name, backends[1].name
    async with load(port) as traffic:
        await window(4.0, "the active's normal (the judge compares with 3 s of it)")
        normal = time.time() - scaled(3.0)
        await traffic.answered(normal)
        assert traffic.share(active, normal) == 1.0
        started = time.time()
        await fault(backends[0], delay=SLOW)
        await wait_until(lambda: degraded(plane).get(active, {}).get("kind") == "degraded",
                         timeout=30, what="the slow active degraded",
                         explain=lambda: judged_from(plane, backends))
        record = degraded(plane)[active]
        assert f"predictive failover to {standby}" in record["reason"], record
        # The probe sent the standby some of the active's sessions before the move (its
        # judgement's own time; the judge runs on this host's clock).
        moved = float(record["since"])
        assert any(a[1] == standby for a in traffic.since(started) if a[0] < moved)
        # The judgement is in etcd; Envoy has it once the push is ACKed.
        await envoy.wait_hosts(
            "web", lambda hs: {h.hostname: h.priority for h in hs}.get(standby) == 0
            and {h.hostname: h.priority for h in hs}.get(active) == 1,
            what="the standby at priority 0, the degraded active behind it")
        # Every request sent once Envoy's workers have the push (an instant after its
        # admin shows it) goes to the standby; judged on answers, however slow they come.
        settled = time.time() + scaled(0.5)
        await window(1.5, "the standby's share after the move, measured")
        await traffic.answered(settled)
        assert traffic.share(standby, settled) == 1.0, traffic.since(settled)[:5]
    failed = [a for a in traffic.answers if a[2] != 200]
    print(f"\npredictive failover {moved - started:.2f} s after the slowdown; "
          f"{len(traffic.answers)} requests, {len(failed)} failed")
    assert not failed, failed[:5]
    assert plane.metrics.registry.get_sample_value(
        "meshxl_xds_failovers_total", {"cluster": "web", "cause": "degraded"}) == 1


async def test_a_member_that_accepts_requests_and_never_answers_is_sick(
        start_control_plane: Any, start_envoy: Any, start_backends: Any, etcd: Any,
        etcd_client: aetcd.Client) -> None:
    """Its health check passes and it takes connections, but no request gets an answer
    before the route's timeout: Envoy's upstream log has each such attempt sent, with no
    response and the time it waited, which counts as that slow an answer, so the member
    is judged sick (a member that answers nothing, refused or reset, is down and passed
    over instead), and its sessions move off it."""
    # Its judgement must outlast the test's window on it: at its last step no request
    # reaches it, so ``recover`` after the last one it would end (a loaded machine
    # stretched the waits before that window past RECOVER, and requests went to it).
    plane, envoy, backends, port = await setup(
        "load-sharing", start_control_plane, start_envoy, start_backends, etcd,
        etcd_client, route="\n  route: {timeout: 500ms}", recover=scaled(30.0))
    sick = backends[2].name
    async with load(port) as traffic:
        await window(2.5, "every member's normal (the judge's history)")
        started = time.time()
        await fault(backends[2], hang=True)
        await wait_until(lambda: sick in degraded(plane), timeout=30,
                         what="the hanging member degraded",
                         explain=lambda: judged_from(plane, backends))
        detected = time.time() - started
        assert "p90" in degraded(plane)[sick]["reason"], degraded(plane)
        await wait_until(lambda: degraded(plane)[sick].get("share") == 0.0, timeout=30,
                         what="its share at its last step")
        await envoy.wait_hosts("web", lambda hs: {h.hostname: h.weight for h in hs}[sick] == 1,
                               what="Envoy at its last step (weight 1)")
        settled = time.time() + 0.7  # the last requests sent there time out (500 ms)
        await asyncio.sleep(settled - time.time())
        before = await requests_per_member(envoy)
        await window(2.0, "no request may go to it any more")
        await traffic.answered(settled)
        after = await requests_per_member(envoy)
        assert degraded(plane)[sick].get("share") == 0.0, degraded(plane)  # still judged
        # Envoy's own count of what it sent where: the hanging member never answers, so
        # the answers cannot say whether a request still went to it.
        assert after[sick] == before[sick], (before, after)
        late = [a for a in traffic.since(settled) if a[2] != 200]
        assert not late, late[:5]
    hosts = await envoy.hosts("web")
    assert all(h.healthy for h in hosts), hosts  # its health check passed throughout
    timed_out = [a for a in traffic.answers if a[2] == 504]
    print(f"\nhanging member judged in {detected:.2f} s; {len(timed_out)} requests timed "
          f"out on it before its sessions moved")
    # How fast: bench/grayfailure.py measures detection; here the wait's deadline bounds it.
