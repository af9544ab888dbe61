"""Failback through real sidecars, etcd and Envoy: a flapping member moves sessions at
most once per flap (``failover.failback: automatic`` with ``failback_delay``), and
with ``failback: manual`` (ClusterXL's Active Up) a member that comes back stays
behind the member that took over until an operator moves the active role.

Without the hold, every flap of the active member moved every session twice (away and
back): ``bench/flap.py`` measures both, docs/operations.md has the numbers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from meshxl import etcd
from meshxl.local.deployment import CLUSTER, DemoDeployment, demo_model
from meshxl.local.flap import every_session_answered, flap, served_since, session_moves
from meshxl.local.procs import Owner
from meshxl.local.traffic import Traffic
from meshxl.local.wait import wait_until
from meshxl.operator.actions import apply_model, set_member_admin
from tests.harness.clock import scaled
from tests.integration.test_problems_fallback import member_states

pytestmark = [pytest.mark.integration, pytest.mark.heavy]

FLAPS = 3
DELAY = scaled(5.0)
"""The failback delay: longer than a flap takes (a flap waits for every session to be
answered twice, which a busy machine takes longer to do)."""


@pytest.fixture
async def deployment(harness: Owner, tmp_path: Path) -> AsyncIterator[DemoDeployment]:
    async with DemoDeployment(tmp_path / "work", failover=f"{{failback_delay: {DELAY}s}}"
                              ) as d:
        harness.own(d.owner)
        yield d


async def test_a_flapping_member_moves_sessions_at_most_once_per_flap(
        deployment: DemoDeployment) -> None:
    d = deployment
    traffic = Traffic(f"{d.url}/counter", 12, time.time() + 60, max_requests=12 * 10 * 60)
    load = asyncio.create_task(traffic.run())
    try:
        start = time.time()
        await every_session_answered(traffic, start)
        assert set().union(*served_since(traffic, start).values()) == {"a"}

        # Automatic failback: the sessions leave a at its first fall, and come back
        # once, after it has stayed well for the delay.
        flapping = time.time()
        await flap(d, "a", FLAPS, traffic)
        assert (await member_states(d))["a"] == "returning"
        await wait_until(lambda: _all_on(traffic, "a"), timeout=DELAY + 10,
                         what="the sessions back on a after the failback delay")
        moves = session_moves(traffic.records, since=flapping)
        assert set(moves) == set(traffic.sessions)
        # Without the hold each session moved 2 x FLAPS times.
        assert all(1 <= n <= 2 for n in moves.values()), moves

        # Manual failback: a comes back behind b and stays there ...
        await _failover(d, "{failback: manual}")
        flapped = time.time()
        await flap(d, "a", 1, traffic)
        behind = time.time()  # a is back, behind b, and nothing was in flight to it
        assert (await member_states(d))["a"] == "returning"
        for _ in range(3):
            await every_session_answered(traffic, time.time())
        assert set().union(*served_since(traffic, flapped + 0.001).values()) >= {"b"}
        assert not _on(traffic, "a", since=behind)
        # ... until the operator moves the active role: member down on b (a takes over,
        # and holds no more), then member up (b comes back behind a).
        async with etcd.client(d.etcd_url) as client:
            await set_member_admin(client, d.keys, CLUSTER, "b", down=True, reason="failback")
            await wait_until(lambda: _all_on(traffic, "a"), timeout=15, what="sessions on a")
            await wait_until(lambda: _state_is(d, "a", "ready"), timeout=10,
                             what="a no longer held")
            await set_member_admin(client, d.keys, CLUSTER, "b", down=False)
        await wait_until(lambda: _state_is(d, "b", "ready"), timeout=10, what="b back")
        back = time.time()
        await every_session_answered(traffic, back, times=3)
        assert set().union(*served_since(traffic, back).values()) == {"a"}
    finally:
        traffic.until = time.time()
        await load
    assert traffic.failures == 0, [r for r in traffic.records if not r.ok][:5]


async def _failover(d: DemoDeployment, failover: str) -> None:
    async with etcd.client(d.etcd_url) as client:
        await apply_model(client, d.keys, demo_model(
            d.mode, d.listen_port, [(m.name, m.site) for m in d.members],
            failover=failover), "test")


def _on(traffic: Traffic, member: str, since: float) -> bool:
    return any(member in members for members in served_since(traffic, since).values())


async def _all_on(traffic: Traffic, member: str) -> bool:
    since = time.time()
    await every_session_answered(traffic, since)
    return set().union(*served_since(traffic, since).values()) == {member}


async def _state_is(d: DemoDeployment, member: str, state: str) -> bool:
    return (await member_states(d))[member] == state
