"""gRPC, WebSockets and plain TCP through the real Envoy: the demo's counter (three
members, each with its statesync sidecar), one deployment per protocol.

* gRPC (high availability; meshxl's gRPC session interceptor): Envoy speaks HTTP/2 to
  the members and checks them with grpc.health.v1; a drained member's streams close
  once the drain window has passed, and not before.
* WebSockets (load sharing; ``/counter/ws``): the upgrade passes Envoy's listener, a
  WebSocket lands on the member its session's HTTP requests land on (the same hash
  key) and continues their count; a drained member's WebSockets close after the drain
  window; a client hears of its member's death at once.
* TCP (load sharing, a and b on site dc1's tier, c on dc2; the line-protocol counter):
  connections are hashed on the client's source address (clients bind real loopback
  addresses, 127.0.0.10 on); a site taken offline has its connections closed after the
  drain window and re-placed on the next site; many clients reconnecting at once never
  run out of connect attempts.
* Every protocol: after a kill -9 of a member under traffic, its clients reconnect
  through Envoy to a member that already holds their state, none failing, no
  acknowledged write lost (one test, parametrised).

A heavy module: its tests run in the one worker that runs heavy tests, one after the
other, so each deployment starts once.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import grpc
import pytest
import pytest_asyncio

from meshxl import headers as hdr
from meshxl.local import counter
from meshxl.local.deployment import CLUSTER, DemoDeployment
from meshxl.local.report import busiest_member
from meshxl.local.streams import StreamTraffic, source_address
from meshxl.proxy.admin import EnvoyAdmin
from tests.harness.clock import scaled, window
from tests.harness.protocols import (
    deployment,
    member_down,
    no_loss,
    restart,
    site_offline,
    traffic_around,
)

pytestmark = [pytest.mark.integration, pytest.mark.heavy, pytest.mark.asyncio(loop_scope="module")]

DRAIN_WINDOW = 1.5
ENVOY_DRAIN = 1.0  # the local Envoy's --drain-time-s
TCP_MEMBERS = (("a", "dc1"), ("b", "dc1"), ("c", "dc2"))
DEPLOYMENTS: dict[str, dict[str, Any]] = {
    "grpc": {},
    "websocket": {"mode": "load-sharing"},
    "tcp": {"mode": "load-sharing", "members": TCP_MEMBERS},
}
STREAMS = {"grpc": "grpc-stream", "websocket": "websocket", "tcp": "tcp"}
"""The long-lived traffic of each protocol: gRPC server streams, WebSockets, TCP."""


def on(*protocols: str) -> pytest.MarkDecorator:
    """The test runs against the deployment of each of ``protocols``."""
    return pytest.mark.parametrize("d", list(protocols), indirect=True)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def d(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
            ) -> AsyncIterator[DemoDeployment]:
    protocol: str = request.param
    async with deployment(tmp_path_factory.mktemp(protocol), protocol,
                          drain_window=DRAIN_WINDOW, **DEPLOYMENTS[protocol]) as started:
        yield started


def _on(traffic: StreamTraffic, member: str) -> set[str]:
    """Sessions that were answered by ``member``."""
    return {r.session for r in traffic.records if r.ok and r.member == member}


def _after_the_drain_window(traffic: StreamTraffic, down_at: float) -> None:
    """Not before the window (DRAINING alone keeps a connection where it is), and within
    Envoy's drain time after it."""
    for r in traffic.reconnects:
        assert down_at + DRAIN_WINDOW - 0.05 <= r.broken, (r, down_at)
        assert r.broken <= down_at + DRAIN_WINDOW + ENVOY_DRAIN + scaled(2.0), (r, down_at)
        assert r.seq_before is not None and r.seq_after is not None
        assert r.seq_after > r.seq_before


# -- gRPC -----------------------------------------------------------------------------------


@on("grpc")
async def test_envoy_speaks_http2_and_grpc_health_checks_to_the_members(
        d: DemoDeployment) -> None:
    async with EnvoyAdmin(d.admin_url) as admin:
        cluster = (await admin.dynamic_clusters())[CLUSTER]
    options = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in options["explicit_http_config"]
    assert "grpc_health_check" in cluster["health_checks"][0]
    # Every member passed its grpc.health.v1 check (SERVING while its sidecar is ready).
    await d.wait_all_healthy()
    async with grpc.aio.insecure_channel(d.target) as channel:
        increment = channel.unary_unary(
            counter.INCREMENT, request_serializer=counter.CounterRequest.SerializeToString,
            response_deserializer=counter.CounterReply.FromString)
        first = await increment(counter.CounterRequest(), timeout=5,
                                metadata=(("x-session-id", "hello"),))
        second = await increment(counter.CounterRequest(), timeout=5,
                                 metadata=(("x-session-id", "hello"),))
    assert (first.member, first.seq, second.seq) == ("a", first.seq, first.seq + 1)


@on("grpc")
async def test_a_drained_members_streams_close_after_the_drain_window(
        d: DemoDeployment) -> None:
    traffic, _, down_at = await traffic_around(
        d, "grpc-stream", 6, before=1.0, after=DRAIN_WINDOW + ENVOY_DRAIN + 10,
        action=lambda _: member_down(d, "a"),
        done=lambda t: len({r.session for r in t.reconnects}) == 6)
    try:
        assert not traffic.failures
        _after_the_drain_window(traffic, down_at)
        assert all((r.member_before, r.member_after) == ("a", "b")
                   for r in traffic.reconnects), traffic.reconnects
        await no_loss(d, "grpc-stream", traffic)
    finally:
        await member_down(d, "a", down=False)


# -- WebSockets -----------------------------------------------------------------------------


@on("websocket")
async def test_a_websocket_follows_its_sessions_hash_and_state(d: DemoDeployment) -> None:
    placed: Counter[str] = Counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        for i in range(24):
            session = f"sticky-{i}"
            async with http.post(f"{d.url}/counter", headers={hdr.SESSION: session}) as resp:
                assert resp.status == 200, await resp.text()
                by_http = await resp.json()
            async with http.ws_connect(f"{d.url}/counter/ws",
                                       headers={hdr.SESSION: session}) as ws:
                await ws.send_str("inc")
                by_ws = await ws.receive_json()
            assert by_ws["member"] == by_http["member"], session
            assert by_ws["seq"] == by_http["seq"] + 1
            placed[by_ws["member"]] += 1
    # The hash spreads sessions over the load-sharing members.
    assert len(placed) >= 2, placed


@on("websocket")
async def test_a_drained_members_websockets_close_after_the_drain_window(
        d: DemoDeployment) -> None:
    drained: dict[str, str] = {}

    async def drain_busiest(t: StreamTraffic) -> None:
        # The member holding the most WebSockets, so the drain always has some to close
        # (which members the 12 sessions hash to is Maglev's choice).
        drained["member"] = busiest_member(t.records) or "a"
        await member_down(d, drained["member"])

    traffic, _, down_at = await traffic_around(
        d, "websocket", 12, before=1.0, after=DRAIN_WINDOW + ENVOY_DRAIN + 10,
        action=drain_busiest,
        done=lambda t: len({r.session for r in t.reconnects}) == 12)
    victim = drained["member"]
    try:
        assert not traffic.failures
        assert {r.member_before for r in traffic.reconnects} >= {victim}
        assert all(r.member_after != victim for r in traffic.reconnects)
        _after_the_drain_window(traffic, down_at)
        # The whole listener drains, so the other members' WebSockets reconnect too.
        # Where they land is Maglev's choice over the two members left: with three
        # members becoming two its table reshuffles a large share of the others' keys
        # (one CI run saw 3 of 7 stay), so no share is asserted; every reconnect above
        # already landed on a live member with its count intact.
        await no_loss(d, "websocket", traffic)
    finally:
        await member_down(d, victim, down=False)


@on("websocket")
async def test_a_websocket_client_hears_of_its_members_death_at_once(
        d: DemoDeployment) -> None:
    """When the member dies, Envoy closes the client's side as soon as it sees the
    member's side go: no grace waited out in silence (Envoy's delayed close: at least
    100 ms before, whatever the load) before the client can reconnect."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        sockets: dict[str, list[aiohttp.ClientWebSocketResponse]] = {}
        try:
            for i in range(24):
                ws = await http.ws_connect(f"{d.url}/counter/ws",
                                           headers={hdr.SESSION: f"notice-{i}"})
                await ws.send_str("inc")
                sockets.setdefault((await ws.receive_json())["member"], []).append(ws)
            victim = max(sockets, key=lambda m: len(sockets[m]))
            mine = sockets[victim]

            async def closed(ws: aiohttp.ClientWebSocketResponse) -> float:
                message = await ws.receive()
                assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                        aiohttp.WSMsgType.ERROR), message
                return time.time()

            waiting = [asyncio.create_task(closed(ws)) for ws in mine]
            await window(0.2, "every receive is pending")
            kill = await d.kill_member(victim)
            async with asyncio.timeout(scaled(10)):
                closed_at = await asyncio.gather(*waiting)
            seen = [(t - kill) * 1000 for t in closed_at]
        finally:
            for group in sockets.values():
                for ws in group:
                    await ws.close()
    try:
        print(f"WebSocket: kill -> close seen by the client, ms: {sorted(round(x) for x in seen)}")
        assert len(seen) >= 4, sockets
        # At once, not after a grace period (the figures: docs/model.md, "Protocols").
        assert statistics.median(seen) < scaled(1000), sorted(seen)
    finally:
        await restart(d, victim)


# -- TCP ------------------------------------------------------------------------------------


async def _served_from(d: DemoDeployment, source: str, session: str) -> str:
    async with asyncio.timeout(scaled(5)):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", d.listen_port, local_addr=(source, 0))
    try:
        writer.write(counter.tcp_request("INC", session))
        await writer.drain()
        async with asyncio.timeout(scaled(5)):
            member, _, _ = counter.parse_tcp_answer(await reader.readline())
        return member
    finally:
        writer.close()


@on("tcp")
async def test_connections_are_hashed_on_the_clients_source_address(
        d: DemoDeployment) -> None:
    # The members' hash shares follow their weights: none may be ramping up (the last to
    # register, or one restarted by an earlier test, starts at a tenth of its weight).
    await d.wait_steady()
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


@on("tcp")
async def test_a_site_offline_closes_its_connections_after_the_drain_window(
        d: DemoDeployment) -> None:
    traffic, _, down_at = await traffic_around(
        d, "tcp", 10, before=1.0, after=DRAIN_WINDOW + ENVOY_DRAIN + 10,
        action=lambda _: site_offline(d, "dc1"),
        done=lambda t: len({r.session for r in t.reconnects}) == 10)
    try:
        assert not traffic.failures
        assert all(r.member_before in ("a", "b") and r.member_after == "c"
                   for r in traffic.reconnects), traffic.reconnects
        _after_the_drain_window(traffic, down_at)
        await no_loss(d, "tcp", traffic)
    finally:
        await site_offline(d, "dc1", offline=False)


@on("tcp")
async def test_no_connection_runs_out_of_connect_attempts_while_a_member_is_up(
        d: DemoDeployment) -> None:
    """Many clients of the killed member reconnect at once. Envoy hashes each new
    connection to the dead member until its ejection reaches the workers: no connection
    may spend all its connect attempts there and be closed (Envoy's
    ``upstream_cx_connect_attempts_exceeded``) while the other members are up, and
    every client is answered on its first new connection."""
    killed: dict[str, str] = {}
    exceeded = "cluster.demo.upstream_cx_connect_attempts_exceeded"
    # The cluster's connection counters, so a connection closed without an answer
    # says how (no healthy member, a failed connect, a timeout, a close by either side).
    counters = r"^cluster\.demo\.upstream_cx_"
    async with EnvoyAdmin(d.admin_url) as admin:
        before = await admin.stat(exceeded) or 0
        cx_before = await admin.stats(counters)

    async def kill_busiest(t: StreamTraffic) -> float:
        killed["member"] = busiest_member(t.records) or "a"
        return await d.kill_member(killed["member"])

    on_victim: Callable[[StreamTraffic], bool] = lambda t: _on(  # noqa: E731
        t, killed["member"]) <= {r.session for r in t.reconnects}
    # A request every 20 ms: the clients see the break and reconnect together.
    traffic, _, _ = await traffic_around(
        d, "tcp", 48, before=1.5, after=20, action=kill_busiest, interval=0.02,
        prefix="race", done=on_victim)
    victim = killed["member"]
    try:
        async with EnvoyAdmin(d.admin_url) as admin:
            after = await admin.stat(exceeded) or 0
            cx = ", ".join(f"{k.removeprefix('cluster.demo.')} {v - cx_before.get(k, 0):+d}"
                           for k, v in sorted((await admin.stats(counters)).items())
                           if v != cx_before.get(k, 0))
        moved = [r for r in traffic.reconnects if r.member_before == victim]
        assert len(moved) >= 8, traffic.reconnects
        assert after - before == 0, f"{after - before} connections closed by Envoy; {cx}"
        assert [r for r in moved if r.attempts > 1] == [], cx
        assert traffic.failures == 0
    finally:
        await restart(d, victim)


# -- every protocol (last: a member that comes back waits behind those that serve) ---------


@on("grpc", "websocket", "tcp")
async def test_kill_9_of_a_member_its_clients_reconnect_to_a_member_holding_their_state(
        d: DemoDeployment) -> None:
    """The member holding most of the sessions is killed -9 under traffic (gRPC: with
    100 unary calls in flight beside the streams, more retries at once than the retry
    budget's floor of 64 allows unless every call in flight may be retried). Every
    client of it reconnects through Envoy to a live member whose count goes on from
    where it was; nothing fails, no acknowledged write is lost, and no connection broke
    before the kill (one that lived past the retry policy's 2 s per-try timeout is not
    cut by it)."""
    kind = STREAMS[d.protocol]
    killed: dict[str, Any] = {}

    async def kill_busiest(t: StreamTraffic) -> float:
        killed["member"] = busiest_member(t.records) or "a"
        if d.protocol != "grpc":
            return await d.kill_member(killed["member"])
        unary, at, _ = await traffic_around(
            d, "grpc", 100, before=0.5, after=3.0,
            action=lambda _: d.kill_member(killed["member"]), prefix="u")
        killed["unary"] = unary
        return at

    traffic, kill, _ = await traffic_around(
        d, kind, 16, before=2.5, after=20, action=kill_busiest,
        done=lambda t: _on(t, killed["member"]) <= {r.session for r in t.reconnects})
    victim = killed["member"]
    try:
        assert traffic.failures == 0, [(r.session, round(r.sent - kill, 3), r.error)
                                       for r in traffic.records if not r.ok][:5]
        started = min(r.sent for r in traffic.records)
        early = [(round(r.broken - kill, 3), r.member_before, r.member_after, r.error)
                 for r in traffic.reconnects if r.broken < kill]
        assert kill - started > 2.0 and not early, early
        moved = [r for r in traffic.reconnects if r.member_before == victim]
        assert moved
        for r in moved:
            assert r.member_after not in (None, victim), r
            assert r.seq_before is not None and r.seq_after is not None
            assert r.seq_after > r.seq_before  # the new owner already holds the state
        await no_loss(d, kind, traffic)
        if "unary" in killed:
            unary: StreamTraffic = killed["unary"]
            assert unary.failures == 0, [(round(r.sent - kill, 3), r.error)
                                         for r in unary.records if not r.ok][:5]
            after = {r.member for r in unary.records if r.ok and r.sent > kill + 1.0}
            assert victim not in after and after, after
            await no_loss(d, "grpc", unary)
        print(f"{kind}: kill -> first answer on the new connection, ms: "
              f"{sorted(round((r.answered - kill) * 1000) for r in moved)}")
    finally:
        await restart(d, victim)
