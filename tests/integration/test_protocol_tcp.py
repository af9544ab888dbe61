"""Plain TCP through the real Envoy's TCP proxy: the demo's line-protocol counter on
three members (a and b share site dc1's tier, c is the second site), load sharing,
each member with its statesync sidecar.

Connections are hashed on the client's source address (clients bind real loopback
addresses, 127.0.0.10 on), each address always to one member; a whole site taken
offline has its connections closed after the drain window and re-placed on the next
site; after a kill -9 the clients reconnect through Envoy to a member that holds their
state. One deployment for the module.
"""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from meshxl.local import counter
from meshxl.local.deployment import DemoDeployment
from meshxl.local.report import busiest_member
from meshxl.local.streams import StreamTraffic, source_address
from meshxl.proxy.admin import EnvoyAdmin
from tests.harness.protocols import (
    deployment,
    no_loss,
    restart,
    site_offline,
    traffic_around,
)

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

DRAIN_WINDOW = 1.5
ENVOY_DRAIN = 1.0  # the local Envoy's --drain-time-s
MEMBERS = (("a", "dc1"), ("b", "dc1"), ("c", "dc2"))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def tcp_deployment(tmp_path_factory: pytest.TempPathFactory,
                         ) -> AsyncIterator[DemoDeployment]:
    async with deployment(tmp_path_factory.mktemp("tcp"), "tcp", mode="load-sharing",
                          members=MEMBERS, drain_window=DRAIN_WINDOW) as d:
        yield d


async def _served_from(d: DemoDeployment, source: str, session: str) -> str:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(
        "127.0.0.1", d.listen_port, local_addr=(source, 0)), 5)
    try:
        writer.write(counter.tcp_request("INC", session))
        await writer.drain()
        member, _, _ = counter.parse_tcp_answer(await asyncio.wait_for(reader.readline(), 5))
        return member
    finally:
        writer.close()


async def test_connections_are_hashed_on_the_clients_source_address(
        tcp_deployment: DemoDeployment) -> None:
    d = tcp_deployment
    async with EnvoyAdmin(d.admin_url) as admin:
        cluster = (await admin.dynamic_clusters())["demo"]
    assert cluster["lb_policy"] == "MAGLEV" and "tcp_health_check" in cluster["health_checks"][0]
    seen: dict[str, set[str]] = defaultdict(set)
    for k in range(16):
        source = source_address(k)
        for attempt in range(3):  # new connections, new source ports
            seen[source].add(await _served_from(d, source, f"hash-{k}-{attempt}"))
    assert all(len(members) == 1 for members in seen.values()), dict(seen)
    placed = Counter(next(iter(m)) for m in seen.values())
    # The first site's two members share the addresses; c (second site) takes none.
    assert set(placed) == {"a", "b"}, placed


async def test_a_site_offline_closes_its_connections_after_the_drain_window(
        tcp_deployment: DemoDeployment) -> None:
    d = tcp_deployment
    traffic, _, down_at = await traffic_around(
        d, "tcp", 10, before=1.0, after=DRAIN_WINDOW + ENVOY_DRAIN + 10,
        action=lambda _: site_offline(d, "dc1"),
        done=lambda t: len({r.session for r in t.reconnects}) == 10)
    try:
        assert not traffic.failures
        for r in traffic.reconnects:
            assert down_at + DRAIN_WINDOW - 0.05 <= r.broken, (r, down_at)
            assert r.broken <= down_at + DRAIN_WINDOW + ENVOY_DRAIN + 2.0, (r, down_at)
            assert r.member_before in ("a", "b") and r.member_after == "c", r
            assert r.seq_before is not None and r.seq_after is not None
            assert r.seq_after > r.seq_before
        await no_loss(d, "tcp", traffic)
    finally:
        await site_offline(d, "dc1", offline=False)


async def test_kill_9_of_a_member_clients_reconnect_with_their_state(
        tcp_deployment: DemoDeployment) -> None:
    d = tcp_deployment
    killed: dict[str, str] = {}

    async def kill_busiest(t: StreamTraffic) -> float:
        killed["member"] = busiest_member(t.records) or "a"
        return await d.kill_member(killed["member"])

    traffic, kill, _ = await traffic_around(
        d, "tcp", 16, before=1.5, after=20, action=kill_busiest,
        done=lambda t: {r.session for r in t.records if r.ok and r.member == killed["member"]}
        <= {r.session for r in t.reconnects})
    victim = killed["member"]
    try:
        assert traffic.failures == 0
        moved = [r for r in traffic.reconnects if r.member_before == victim]
        assert moved
        for r in moved:
            assert r.member_after not in (None, victim)
            assert r.seq_before is not None and r.seq_after is not None
            assert r.seq_after > r.seq_before
        await no_loss(d, "tcp", traffic)
        print(f"TCP: kill -> first answer on the new connection, ms: "
              f"{sorted(round((r.answered - kill) * 1000) for r in moved)}")
    finally:
        await restart(d, victim)


async def test_no_connection_runs_out_of_connect_attempts_while_a_member_is_up(
        tcp_deployment: DemoDeployment) -> None:
    """Many clients of the killed member reconnect at once. Envoy hashes each new
    connection to the dead member until its ejection reaches the workers: no connection
    may spend all its connect attempts there and be closed (Envoy's
    ``upstream_cx_connect_attempts_exceeded``) while the other members are up, and
    every client is answered on its first new connection."""
    d = tcp_deployment
    killed: dict[str, str] = {}
    exceeded = "cluster.demo.upstream_cx_connect_attempts_exceeded"
    async with EnvoyAdmin(d.admin_url) as admin:
        before = await admin.stat(exceeded) or 0

    async def kill_busiest(t: StreamTraffic) -> float:
        killed["member"] = busiest_member(t.records) or "a"
        return await d.kill_member(killed["member"])

    # A request every 20 ms: the clients see the break and reconnect together.
    traffic, _, _ = await traffic_around(
        d, "tcp", 48, before=1.5, after=20, action=kill_busiest, interval=0.02,
        prefix="race", done=lambda t: {r.session for r in t.records if r.ok and r.member
                                       == killed["member"]}
        <= {r.session for r in t.reconnects})
    victim = killed["member"]
    try:
        async with EnvoyAdmin(d.admin_url) as admin:
            after = await admin.stat(exceeded) or 0
        moved = [r for r in traffic.reconnects if r.member_before == victim]
        assert len(moved) >= 8, traffic.reconnects
        assert after - before == 0, f"{after - before} connections closed by Envoy"
        assert [r for r in moved if r.attempts > 1] == []
        assert traffic.failures == 0
    finally:
        await restart(d, victim)
