"""Warm-up of hashed clusters through a real Envoy: a member that comes back gets its
share of new sessions over the cluster's ``warmup`` window, following the ramp, for
ring hash and maglev alike, while the members already serving keep theirs.

The member's share is measured as the fraction of many distinct hash keys Envoy sends
to it, in batches that fall inside one step of the ramp (a batch that straddles a step
is dropped), and compared with the share its ramped EDS weight should give it."""

from __future__ import annotations

import asyncio
import io
import json
import time
from typing import Any

import aetcd
import aiohttp
import pytest
from rich.console import Console

from meshxl.etcd.keys import Keys
from meshxl.local.ports import free_ports
from meshxl.local.wait import wait_until
from meshxl.operator.actions import apply_model
from meshxl.operator.tables import render_status
from meshxl.operator.views.read import read_mesh
from meshxl.operator.views.status import status_report
from meshxl.xds.app import ControlPlane
from meshxl.xds.warmup import fraction, steps
from tests.harness import Backend, EnvoyFixture
from tests.integration.test_pinned_sessions import Browser

pytestmark = [pytest.mark.integration, pytest.mark.heavy]

KEYS = Keys()
HEADER = "x-session-id"
WINDOW = 6.0        # seconds at least: six steps of one second (longer on a slow machine:
#                     each step must hold STEP_KEYS keys, so the window is sized from how
#                     fast this machine answers a batch: window_for)
KEYS_PER_BATCH = 400
STEP_KEYS = 2000     # a step is judged on at least this many keys (one sd: 1 %)
SETTLED_KEYS = 2000  # at full weight: a third of them, give or take 1 % (one sd)
STEP_FULL = STEP_KEYS + KEYS_PER_BATCH  # a step with these many keys gets no more
CONCURRENCY = 24
TOLERANCE = 0.10    # the target: the share within 10 % of the ramp's
LOOPBACK = "127.0.0.1"
RING = 16384        # a ring of 1,024 entries (the default) gives a member at a tenth of
#                     its weight about 50 of them: its share is then off by ~15 %


def model(backends: list[Backend], ports: dict[str, int], window: float = WINDOW) -> str:
    members = "".join(f"\n  - {{name: {b.name}, address: {LOOPBACK}, port: {b.endpoint[1]}}}"
                      for b in backends)
    return "".join(f"""
- name: {name}
  mode: load-sharing
  membership: registered
  warmup: {window:g}s
  stickiness: {{header: {HEADER}, algorithm: {name}, ring_minimum_size: {RING}}}
  outlier_detection: {{enabled: false}}
  degradation: {{action: "off"}}
  members:{members}
  listener: {{address: {LOOPBACK}, port: {port}}}""" for name, port in ports.items())


async def register(client: aetcd.Client, cluster: str, backend: Backend,
                   lease: Any = None) -> None:
    value = {"address": LOOPBACK, "port": backend.endpoint[1], "ready": True, "problems": []}
    await client.put(KEYS.member(cluster, backend.name).encode(), json.dumps(value).encode(),
                     lease=lease)


async def shares(http: aiohttp.ClientSession, port: int, keys: list[str]) -> dict[str, int]:
    """Which member answers each key (bounded: one request per key)."""
    counts: dict[str, int] = {}
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(key: str) -> None:
        async with gate, http.get(f"http://{LOOPBACK}:{port}/",
                                  headers={HEADER: key}) as resp:
            assert resp.status == 200, await resp.text()
            member = resp.headers["x-meshxl-member"]
            counts[member] = counts.get(member, 0) + 1

    await asyncio.gather(*(one(k) for k in keys))
    return counts


def published(plane: ControlPlane) -> float:
    return plane.metrics.registry.get_sample_value(
        "meshxl_xds_rebuilds_total", {"result": "published"}) or 0.0


async def weights(envoy: EnvoyFixture, cluster: str) -> dict[str, int]:
    return {h.hostname: h.weight for h in await envoy.hosts(cluster) if h.healthy}


async def window_for(port: int, batches: int = 3) -> float:
    """The warm-up window this machine needs: each of its six steps must see STEP_KEYS
    keys in whole batches (and a batch straddling two steps is dropped), so a step lasts
    at least (STEP_KEYS / KEYS_PER_BATCH + 2) batches at the pace measured now, with a
    margin; never under WINDOW. A machine hogged by other work gets a longer ramp, not a
    failed test."""
    async with aiohttp.ClientSession() as http:
        started = time.monotonic()
        for b in range(batches):
            await shares(http, port, [f"pace-{b}-{i}" for i in range(KEYS_PER_BATCH)])
        per_batch = (time.monotonic() - started) / batches
    # A margin of 2.5: the pace measured now halved during a ramp while the suite's
    # other lanes started their own installations (a step of 1,600 keys, seen at 1.5).
    step = (STEP_KEYS / KEYS_PER_BATCH + 2) * per_batch * 2.5
    return max(WINDOW, round(6 * step, 1))


async def measure_ramp(plane: ControlPlane, envoy: EnvoyFixture, http: aiohttp.ClientSession,
                       cluster: str, port: int, member: str,
                       others: list[str], window: float) -> list[dict[str, float]]:
    """Batches of fresh keys until the member is back at full weight: per batch inside
    one step, the ramp's fraction, the share it should give and the share measured.

    A step judged on enough keys (:data:`STEP_FULL`) gets no more: the rest of it is
    spent waiting for Envoy's next weights, not sending keys nobody counts (the window
    is sized with a margin for a slow machine, which a fast one would otherwise fill
    with two and a half times the keys a step needs)."""
    samples: list[dict[str, float]] = []
    deadline = time.monotonic() + window + 10
    batch = 0
    while time.monotonic() < deadline:
        started = plane.warming.starts.get(cluster, {}).get(member)
        before = await weights(envoy, cluster)
        if started is not None and step_full(samples, before, member, others[0]):
            async def stepped(seen: dict[str, int] = before) -> bool:
                return await weights(envoy, cluster) != seen

            await wait_until(stepped, timeout=window + 10,
                             what=f"the next step of {member}'s ramp in {cluster}")
            continue
        t0 = time.time()
        keys = [f"{cluster}-{batch}-{i}" for i in range(KEYS_PER_BATCH)]
        batch += 1
        counts = await shares(http, port, keys)
        t1 = time.time()
        after = await weights(envoy, cluster)
        if started is None and member in before and before == after and \
                before[member] == before[others[0]]:
            return samples  # the ramp is over: the member has its full weight
        if started is None or member not in before or before != after:
            continue  # before the control plane saw it, not healthy yet, or a step passed
        ramp = fraction(window, started, t0)
        if ramp != fraction(window, started, t1):
            continue
        full = before[others[0]]
        assert before[member] == max(1, round(full * ramp)), (before, ramp)
        assert all(before[o] == full for o in others), before  # the others keep theirs
        expected = ramp / (ramp + len(others))
        samples.append({"t": round(t0 - started, 2), "ramp": ramp, "expected": expected,
                        "measured": counts.get(member, 0) / KEYS_PER_BATCH})
    raise AssertionError(f"{member} not back at full weight in {cluster}: {samples}")


async def bring_back(algorithm: str, start_control_plane: Any, start_envoy: Any,
                     start_backends: Any, etcd: Any, etcd_client: aetcd.Client,
                     pin: bool = False, before: Any = None,
                     ) -> tuple[ControlPlane, EnvoyFixture, int, list[Backend], float, float]:
    """Three members serving one cluster; the third is lost and registers again (its
    ramp has started when this returns), the snapshots published before it came back,
    and the warm-up window (:func:`window_for`). ``before(port)`` runs while it is
    away."""
    backends = await start_backends(3)
    (port,) = free_ports(1)
    text = model(backends, {algorithm: port})
    if pin:
        text = text.replace(f"algorithm: {algorithm},", f"algorithm: {algorithm}, pin: {{}},")
    await apply_model(etcd_client, KEYS, "clusters:" + text, "test")
    lease = await etcd_client.lease(30)
    for b in backends:
        await register(etcd_client, algorithm, b, lease if b is backends[2] else None)
    plane: ControlPlane = await start_control_plane(etcd=etcd.url)
    envoy = await start_envoy("edge", plane.port)
    await envoy.wait_ready()
    await envoy.wait_hosts(algorithm, lambda hs: len(hs) == 3 and all(h.healthy for h in hs),
                           what="three healthy members")
    # Registered before the control plane started: nobody ramps (a restart re-ramps nobody).
    assert plane.warming.fractions == {}
    assert len(set((await weights(envoy, algorithm)).values())) == 1
    window = await window_for(port)
    if window != WINDOW:  # the same model with this machine's window (nobody ramps)
        await apply_model(etcd_client, KEYS, "clusters:" + model(
            backends, {algorithm: port}, window).replace(
                f"algorithm: {algorithm},",
                f"algorithm: {algorithm}, pin: {{}}," if pin else f"algorithm: {algorithm},"),
            "test")
        def on_window() -> bool:
            model = plane.model
            return model is not None and any(c.name == algorithm and c.warmup == window
                                             for c in model.clusters)

        await wait_until(on_window, timeout=10,
                         what="the control plane on the machine's warm-up window")

    member = backends[2].name
    await lease.revoke()  # the member is lost ...
    await envoy.wait_hosts(algorithm, lambda hs: len(hs) == 2, what="the member gone")
    if before is not None:
        await before(port)
    before_return = published(plane)
    await register(etcd_client, algorithm, backends[2])  # ... and comes back
    await wait_until(lambda: member in plane.warming.fractions.get(algorithm, {}),
                     timeout=5, what="the member's ramp started")
    return plane, envoy, port, backends, before_return, window


@pytest.mark.parametrize("algorithm", ["ring_hash", "maglev"])
async def test_a_returning_members_share_follows_the_ramp(
        algorithm: str, start_control_plane: Any, start_envoy: Any, start_backends: Any,
        etcd: Any, etcd_client: aetcd.Client) -> None:
    plane, envoy, port, backends, before_return, window = await bring_back(
        algorithm, start_control_plane, start_envoy, start_backends, etcd, etcd_client)
    member, others = backends[2].name, [b.name for b in backends[:2]]
    async with aiohttp.ClientSession() as http:
        samples = await measure_ramp(plane, envoy, http, algorithm, port, member, others,
                                     window)
        # Full weight again: a third of the keys.
        settled = await shares(http, port, [f"after-{i}" for i in range(SETTLED_KEYS)])
    by_step = per_step(samples)
    print(f"\n{algorithm}: ramp keys expected measured error")
    for ramp, (keys, expected, measured) in by_step.items():
        print(f"{algorithm}: {ramp:.2f} {keys} {expected:.4f} {measured:.4f} "
              f"{(measured - expected) / expected:+.1%}")
    assert sum(keys >= STEP_KEYS for keys, _, _ in by_step.values()) >= 3, by_step
    assert min(by_step) <= 0.34, samples  # from a small weight up
    full = 1 / 3  # the member's share at full weight
    for ramp, (keys, expected, measured) in by_step.items():
        if keys >= STEP_KEYS:  # each step within 10 % of the member's share
            assert abs(measured - expected) <= TOLERANCE * full, (ramp, by_step)
    # Over the whole ramp: the sessions it got within 10 % of what the ramp gives it.
    got = sum(keys * measured for keys, _, measured in by_step.values())
    due = sum(keys * expected for keys, expected, _ in by_step.values())
    print(f"{algorithm}: over the ramp {got:.0f} keys, the ramp's {due:.0f} "
          f"({(got - due) / due:+.1%})")
    assert abs(got - due) <= TOLERANCE * due, by_step
    assert abs(settled.get(member, 0) / SETTLED_KEYS - full) <= TOLERANCE * full, settled
    assert plane.warming.fractions == {}  # the ramp is over, its state forgotten
    # xDS cost: the return itself, then one EDS snapshot per step, no more.
    pushes = published(plane) - before_return
    print(f"{algorithm}: snapshots published from the return to the end of the ramp: "
          f"{pushes:.0f}")
    assert pushes <= steps(window) + 1, pushes


def step_full(samples: list[dict[str, float]], weights: dict[str, int], member: str,
              other: str) -> bool:
    """Whether Envoy still has the step of the last sample (``weights``) and that step
    has :data:`STEP_FULL` keys already."""
    if not samples or member not in weights:
        return False
    ramp = samples[-1]["ramp"]
    return weights[member] == max(1, round(weights[other] * ramp)) and \
        per_step(samples)[ramp][0] >= STEP_FULL


def per_step(samples: list[dict[str, float]]) -> dict[float, tuple[int, float, float]]:
    """Per step of the ramp: keys sent, the share expected, the share measured."""
    out: dict[float, tuple[int, float, float]] = {}
    for s in samples:
        keys, expected, hits = out.get(s["ramp"], (0, s["expected"], 0.0))
        out[s["ramp"]] = (keys + KEYS_PER_BATCH, expected, hits + s["measured"] * KEYS_PER_BATCH)
    return {ramp: (keys, expected, hits / keys)
            for ramp, (keys, expected, hits) in sorted(out.items())}


async def test_pinned_sessions_stay_put_while_a_member_warms_up(
        start_control_plane: Any, start_envoy: Any, start_backends: Any, etcd: Any,
        etcd_client: aetcd.Client) -> None:
    """Pins hold through the ramp: sessions pinned while the member was away stay on
    the others, and sessions placed on it early in the ramp stay on it, while the hash
    moves its share of fresh keys from a tenth of its weight to all of it."""
    browser: Browser | None = None
    old = [f"old-{i}" for i in range(150)]

    async def pin_while_away(port: int) -> None:
        nonlocal browser
        browser = Browser(f"http://{LOOPBACK}:{port}/")
        await browser.visit(old)

    plane, envoy, port, backends, _, window = await bring_back(
        "maglev", start_control_plane, start_envoy, start_backends, etcd, etcd_client,
        pin=True, before=pin_while_away)
    assert browser is not None
    member = backends[2].name
    await envoy.wait_hosts("maglev", lambda hs: any(h.hostname == member and h.healthy
                                                    for h in hs), what="the member healthy")
    new = [f"new-{i}" for i in range(300)]
    placed = {**await browser.visit(old), **await browser.visit(new)}
    early = plane.warming.fractions.get("maglev", {}).get(member)
    assert early is not None and early < 1.0, "the ramp ended before the sessions came"
    on_member = {s for s, m in placed.items() if m == member}
    assert on_member and on_member <= set(new), placed  # new sessions only, a few
    assert len(on_member) < len(new) * 0.3, len(on_member)
    # meshxl status (and its table) shows the member warming up, with its ramped share.
    async def warming_in_status() -> dict[str, Any] | None:
        report = status_report(await read_mesh(etcd_client, KEYS))
        row = {m["name"]: m for m in report["clusters"][0]["members"]}[member]
        return report if row["warmup"] is not None else None

    report = await wait_until(warming_in_status, timeout=3, what="status shows the ramp")
    row = {m["name"]: m for m in report["clusters"][0]["members"]}[member]
    assert 0.1 <= row["warmup"]["fraction"] < 1 and row["share"] < 1 / 3, row
    console = Console(width=200, file=io.StringIO())
    render_status(report, console)
    assert "warming up:" in console.file.getvalue()
    deadline = time.monotonic() + window + 10
    rounds = 0
    while plane.warming.fractions and time.monotonic() < deadline:
        rounds += 1
        assert await browser.visit(old + new) == placed  # no pinned session moved
        await asyncio.sleep(0.3)
    assert not plane.warming.fractions and rounds >= 3, rounds
    after = status_report(await read_mesh(etcd_client, KEYS))["clusters"][0]["members"]
    assert all(m["warmup"] is None for m in after), after
    assert await browser.visit(old + new) == placed
    # Without pins the same hash now sends a third of fresh keys to the member.
    fresh = Browser(f"http://{LOOPBACK}:{port}/")
    at_full = await fresh.visit([f"fresh-{i}" for i in range(300)])
    share = sum(m == member for m in at_full.values()) / len(at_full)
    assert abs(share - 1 / 3) <= TOLERANCE, share
