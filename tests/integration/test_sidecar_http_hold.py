"""A refusal decided from a request's head that may wait (a write over its cluster's rate
quota: ``Request.hold``, meshxl/statesync/http/admission.py) is answered that much later,
the same answer, unless something follows it on its connection: a request pipelined
behind it or arriving while it is held makes it go at once, before that request's own
answer; a client that half-closes gets it at once, one that closes leaves nothing
behind, and the server's shutdown does not wait for it."""

from __future__ import annotations

import asyncio
import json

from meshxl.local.wait import wait_until
from meshxl.statesync import http as srv
from meshxl.statesync.http import Request, Response, Router
from meshxl.statesync.http.admission import MAX_HOLD, Hold
from meshxl.statesync.http.connection import Slot
from tests.harness.clock import scaled
from tests.integration.test_sidecar_http import _router, answers, exchange, put, run, serving
from tests.integration.test_sidecar_http import loop as loop  # the fixture: asyncio and uvloop

HOLD = 0.4
"""Seconds the refused route's answer is held."""
SOON = 0.8 * MAX_HOLD
"""Answered sooner than this: not held (a hold of 5 s is held MAX_HOLD)."""


def _held_router(hold: float = HOLD) -> Router:
    r = _router()

    async def never(request: Request) -> Response:
        raise AssertionError("a refused request's handler ran")

    def refuse(request: Request) -> Response | None:
        request.hold = hold
        return srv.error(429, "over the rate", [("Retry-After", "1")], retry_after=1)

    r.add("PUT", "/held/{session_id}", never, max_body=1024, refuse=refuse, access="write",
          key="session_id")
    return r


async def _read(reader: asyncio.StreamReader, count: int, within: float) -> bytes:
    """``count`` whole answers (or what came within ``within`` seconds)."""
    raw = b""
    async with asyncio.timeout(within):
        while len(answers(raw)) < count:
            chunk = await reader.read(65536)
            if not chunk:
                break
            raw += chunk
    return raw


def test_a_held_refusal_is_answered_later_and_the_same(loop: str) -> None:
    async def main() -> None:
        async with serving(_held_router()) as (_, port), \
                serving(_held_router(0.0)) as (_, at_once):
            clock = asyncio.get_running_loop().time
            started = clock()
            held = await exchange(port, put("/held/a", b"{}"), until_close=False)
            waited = clock() - started
            now = await exchange(at_once, put("/held/a", b"{}"), until_close=False)
            assert HOLD * 0.9 <= waited < HOLD + scaled(1.0)
            (status, headers, body), = answers(held)
            assert (status, headers["retry-after"]) == (429, "1")
            assert json.loads(body) == json.loads(answers(now)[0][2])
            assert headers.keys() == answers(now)[0][1].keys()

    run(loop, main)


def test_a_request_behind_a_held_refusal_sends_it_at_once_in_order(loop: str) -> None:
    async def main() -> None:
        async with serving(_held_router(5.0)) as (server, port):
            clock = asyncio.get_running_loop().time
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            # Pipelined behind it: neither answer waits.
            started = clock()
            writer.write(put("/held/a", b"{}") + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            got = answers(await _read(reader, 2, 3.0))
            assert [s for s, _, _ in got] == [429, 200]
            assert clock() - started < SOON
            # Arriving while it is held: the held answer goes, then the new one's.
            writer.write(put("/held/b", b"{}"))
            await wait_until(lambda: [c for c in server.connections
                                      if c.holding is not None],  # type: ignore[attr-defined]
                             what="the request held")
            started = clock()
            writer.write(put("/v1/sessions/a", b"one"))
            got = answers(await _read(reader, 2, 3.0))
            assert [s for s, _, _ in got] == [429, 200]
            assert json.loads(got[1][2])["body"] == "one"
            assert clock() - started < SOON
            writer.close()

    run(loop, main)


def test_a_held_refusal_ends_with_its_connection(loop: str) -> None:
    async def main() -> None:
        async with serving(_held_router(5.0)) as (server, port):
            clock = asyncio.get_running_loop().time
            # The client closes while it is held: nothing is left behind.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(put("/held/a", b"{}"))
            await wait_until(lambda: [c for c in server.connections
                                      if c.holding is not None],  # type: ignore[attr-defined]
                             what="the request held")
            (conn,) = server.connections
            assert conn.holding is not None  # type: ignore[attr-defined]
            timer = conn.holding.timer  # type: ignore[attr-defined]
            writer.close()
            await wait_until(lambda: not server.connections, timeout=2.0, interval=0.01,
                             what="the connection gone")
            assert conn.holding is None and timer.cancelled()  # type: ignore[attr-defined]
            # The client half-closes: the answer goes at once.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            started = clock()
            writer.write(put("/held/a", b"{}"))
            await wait_until(lambda: [c for c in server.connections
                                      if c.holding is not None],  # type: ignore[attr-defined]
                             what="the request held")
            writer.write_eof()
            async with asyncio.timeout(2.0):
                raw = await reader.read()
            assert answers(raw)[0][0] == 429 and clock() - started < SOON
            writer.close()
            # The server shuts down: the held answer goes, then the connection closes.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(put("/held/a", b"{}"))
            await wait_until(lambda: [c for c in server.connections
                                      if c.holding is not None],  # type: ignore[attr-defined]
                             what="the request held")
            started = clock()
            await server.close(grace=3.0)
            assert clock() - started < SOON
            async with asyncio.timeout(2.0):
                raw = await reader.read()
            (status, headers, _), = answers(raw)
            assert status == 429 and headers["connection"] == "close"
            writer.close()

    run(loop, main)


def test_a_hold_is_one_timer_and_bounded() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        request = Request("PUT", "/held/a", "", "1.1", {}, True)
        request.refusal = srv.error(429, "over the rate")
        fired: list[bool] = []
        slot = Slot(request, None)
        hold = Hold(loop, slot, 3600.0, lambda: fired.append(True))
        assert hold.timer.when() - loop.time() <= MAX_HOLD
        assert hold.answer() is request.refusal and slot.response is request.refusal
        assert hold.timer.cancelled() and not fired

    asyncio.run(main())
