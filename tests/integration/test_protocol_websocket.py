"""WebSockets through the real Envoy: the demo's HTTP counter app (``/counter/ws``)
on three load-sharing members, each with its statesync sidecar.

The upgrade passes Envoy's listener; a WebSocket lands on the member the session's HTTP
requests land on (the same hash key), and continues their count; a drained member's
WebSockets are closed once the drain window has passed; after a kill -9 the clients'
reconnects land on other members with the state intact. One deployment for the module.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio

from meshxl import headers as hdr
from meshxl.local.deployment import DemoDeployment
from meshxl.local.report import busiest_member
from meshxl.local.streams import StreamTraffic
from tests.harness.protocols import (
    deployment,
    member_down,
    no_loss,
    restart,
    traffic_around,
)

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

DRAIN_WINDOW = 1.5
ENVOY_DRAIN = 1.0  # the local Envoy's --drain-time-s


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def ws_deployment(tmp_path_factory: pytest.TempPathFactory,
                        ) -> AsyncIterator[DemoDeployment]:
    async with deployment(tmp_path_factory.mktemp("ws"), "websocket", mode="load-sharing",
                          drain_window=DRAIN_WINDOW) as d:
        yield d


async def test_a_websocket_follows_its_sessions_hash_and_state(
        ws_deployment: DemoDeployment) -> None:
    d = ws_deployment
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


async def test_a_drained_members_websockets_close_after_the_drain_window(
        ws_deployment: DemoDeployment) -> None:
    d = ws_deployment
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
        for r in traffic.reconnects:
            assert down_at + DRAIN_WINDOW - 0.05 <= r.broken, (r, down_at)
            assert r.broken <= down_at + DRAIN_WINDOW + ENVOY_DRAIN + 2.0, (r, down_at)
            assert r.member_after != victim
            assert r.seq_before is not None and r.seq_after is not None
            assert r.seq_after > r.seq_before
        # The whole listener drains, so the other members' WebSockets reconnect too.
        # Where they land is Maglev's choice over the two members left: with three
        # members becoming two its table reshuffles a large share of the others' keys
        # (one CI run saw 3 of 7 stay), so no share is asserted; every reconnect above
        # already landed on a live member with its count intact.
        await no_loss(d, "websocket", traffic)
    finally:
        await member_down(d, victim, down=False)


async def test_kill_9_of_a_member_websockets_reconnect_to_the_new_owner(
        ws_deployment: DemoDeployment) -> None:
    d = ws_deployment
    killed: dict[str, str] = {}

    async def kill_busiest(t: StreamTraffic) -> float:
        killed["member"] = busiest_member(t.records) or "a"
        return await d.kill_member(killed["member"])

    traffic, kill, _ = await traffic_around(
        d, "websocket", 16, before=1.5, after=20, action=kill_busiest,
        done=lambda t: _on(t, killed["member"]) <= {r.session for r in t.reconnects})
    victim = killed["member"]
    try:
        assert traffic.failures == 0
        moved = [r for r in traffic.reconnects if r.member_before == victim]
        assert moved
        for r in moved:
            assert r.member_after not in (None, victim)
            assert r.seq_before is not None and r.seq_after is not None
            assert r.seq_after > r.seq_before
        await no_loss(d, "websocket", traffic)
        print(f"WebSocket: kill -> first answer on the new connection, ms: "
              f"{sorted(round((r.answered - kill) * 1000) for r in moved)}")
    finally:
        await restart(d, victim)


async def test_a_websocket_client_hears_of_its_members_death_at_once(
        ws_deployment: DemoDeployment) -> None:
    """When the member dies, Envoy closes the client's side as soon as it sees the
    member's side go: no grace waited out in silence (Envoy's delayed close: at least
    100 ms before, whatever the load) before the client can reconnect."""
    d = ws_deployment
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
            await asyncio.sleep(0.2)  # every receive is pending
            kill = await d.kill_member(victim)
            seen = [(t - kill) * 1000 for t in await asyncio.wait_for(
                asyncio.gather(*waiting), 10)]
        finally:
            for group in sockets.values():
                for ws in group:
                    await ws.close()
    try:
        print(f"WebSocket: kill -> close seen by the client, ms: {sorted(round(x) for x in seen)}")
        assert len(seen) >= 4, sockets
        assert statistics.median(seen) < 50, sorted(seen)
    finally:
        await restart(d, victim)


def _on(traffic: StreamTraffic, member: str) -> set[str]:
    """Sessions that were answered by ``member``."""
    return {r.session for r in traffic.records if r.ok and r.member == member}
