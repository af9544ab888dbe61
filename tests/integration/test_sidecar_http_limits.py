"""Every connection-level resource of the sidecar's HTTP server is bounded and timed, and
each limit hit is counted (the ``on_limit`` hook: a metric) and logged: a head has its
time from its first byte whatever came before it on the connection, a client that does
not read its answers is cut off, and the connection cap makes room by closing the
connection stuck longest in an incomplete request (a slow head or a slow body), else the
longest idle, so a flood of idle or slow connections cannot keep the probes and the
application out. HTTP conformance at the edges of RFC 9112
(versions, HTTP/1.0 with a transfer coding, HEAD) is here too."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from meshxl.local.wait import wait_until
from meshxl.statesync import http as srv
from meshxl.statesync.http import Request, Response, Router
from meshxl.statesync.http import site as srv_site
from meshxl.statesync.http.connection import MAX_PIPELINED
from meshxl.statesync.http.site import HEAD
from tests.harness.clock import scaled, window
from tests.integration.test_sidecar_http import _router, exchange, run, serving
from tests.integration.test_sidecar_http import loop as loop  # the fixture: asyncio and uvloop


def _big_router() -> Router:
    r = _router()

    async def big(request: Request) -> Response:
        return Response(200, b"x" * (1 << 20))

    r.add("GET", "/big/{n}", big)
    return r


async def _closed(reader: asyncio.StreamReader, within: float) -> bytes:
    """What the server sends until it closes (TimeoutError if it does not in time)."""
    got = b""
    async with asyncio.timeout(within):
        while chunk := await reader.read(65536):
            got += chunk
    return got


def test_a_head_has_its_timeout_from_its_first_byte_after_a_request(loop: str) -> None:
    """One full request and one byte of the next head, then silence: the connection
    used to stay open for ever (its deadline was armed only from idle)."""
    async def main() -> None:
        hits: list[str] = []
        async with serving(_router(), header_timeout=1.0, on_limit=hits.append) as (
                server, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nG")
            await writer.drain()
            got = await _closed(reader, within=4.0)
            assert got.startswith(b"HTTP/1.1 200 ")
            assert hits == ["header_timeout"] and server.site.hits["header_timeout"] == 1
            writer.close()

    run(loop, main)


def test_an_idle_connection_is_closed_and_counted(loop: str) -> None:
    async def main() -> None:
        hits: list[str] = []
        async with serving(_router(), header_timeout=1.0, on_limit=hits.append) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await _closed(reader, within=4.0) == b""
            assert hits == ["idle_timeout"]
            writer.close()

    run(loop, main)


def test_a_client_that_does_not_read_its_answers_is_cut_off(loop: str) -> None:
    """64 pipelined GETs of 1 MiB never read: the connection held their answers with no
    bound in time; now it is aborted after the write timeout, its buffers dropped."""
    async def main() -> None:
        hits: list[str] = []
        async with serving(_big_router(), write_timeout=1.0, on_limit=hits.append) as (
                server, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 16)
            transport = writer.transport
            transport.pause_reading()  # the client reads nothing
            writer.write(b"".join(b"GET /big/%d HTTP/1.1\r\nHost: x\r\n\r\n" % i
                                  for i in range(64)))
            await writer.drain()
            await wait_until(lambda: not server.connections, timeout=10,
                             what="the connection closed: the write timeout, swept each second")
            assert "write_timeout" in hits
            writer.close()

    run(loop, main)


def test_answers_unsent_are_bounded_by_the_budget_not_by_the_requests(loop: str) -> None:
    """A client pipelines GETs of many sessions, each answered with 512 KiB, and reads
    nothing: the server writes about one budget of answers into the transport, holds
    the rest unwritten (they are the stored sessions, not copies), stops taking requests
    up and stops reading; once the client reads, every answer comes, in order."""
    body = b"s" * (512 * 1024)
    count = 96

    async def main() -> None:
        r = _router()

        async def session(request: Request) -> Response:
            await asyncio.sleep(0)
            return Response(200, body, [("X-Session", request.params["session_id"])])

        r.add("GET", "/shared/{session_id}", session, access=srv.READ, key="session_id")
        async with serving(r) as (server, port):
            budget = 1 << 20  # the default answer budget, checked below
            reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                           limit=1 << 20)
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET,
                                                       socket.SO_RCVBUF, 16 * 1024)
            writer.write(b"".join(b"GET /shared/s%d HTTP/1.1\r\nHost: x\r\n\r\n" % i
                                  for i in range(count)))
            await writer.drain()
            await wait_until(lambda: server.connections, timeout=5.0, what="connected")
            (conn,) = server.connections

            def settled() -> bool:
                """Nothing running, and either reading paused with requests waiting or
                more than twice the budget in the transport (then the test fails)."""
                return not conn.active and (conn.paused_reading and bool(conn.queue) or
                                            conn.transport.get_write_buffer_size() > 2 * budget)

            await wait_until(settled, timeout=5.0, what="answers held back, or sent")
            buffered = conn.transport.get_write_buffer_size()
            assert buffered <= budget + len(body) + 4096, buffered
            assert len(conn.slots) <= MAX_PIPELINED and conn.queue and conn.paused_reading
            # Answered but not sent: held as they are (the route's one body object).
            assert all(slot.response.body is body for slot in conn.slots if slot.response)

            heads = []
            for _ in range(count):
                async with asyncio.timeout(10):
                    head = await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(len(body))
                heads.append(head)
            assert [h.split(b"X-Session: ")[1].split(b"\r\n")[0] for h in heads] == [
                b"s%d" % i for i in range(count)]
            assert server.site.answer_budget == budget
            writer.close()

    run(loop, main)


def test_at_the_cap_the_longest_idle_connection_makes_room(loop: str) -> None:
    async def main() -> None:
        hits: list[str] = []
        async with serving(_router(), max_connections=16, on_limit=hits.append) as (
                server, port):
            idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(16)]
            await wait_until(lambda: len(server.connections) == 16, what="16 connections")
            # A slow head is the first to go, before any idle connection.
            slow_reader, slow_writer = idle[7]
            slow_writer.write(b"GET /healthz HTTP/1.1\r\nHo")
            await slow_writer.drain()
            await wait_until(lambda: [c for c in server.connections if c.state == HEAD],
                             what="the slow head read")
            answer = await exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
                                          b"Connection: close\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
            assert await _closed(slow_reader, within=2.0) == b""
            # Then the oldest idle one (the cap reached again by a new idle connection).
            idle.append(await asyncio.open_connection("127.0.0.1", port))
            await window(0.1, "the new idle connection is accepted first (accepts are FIFO)")
            assert len(server.connections) == 16
            answer = await exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
                                          b"Connection: close\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 200 ")
            assert await _closed(idle[0][0], within=2.0) == b""
            assert hits == ["connections", "connections"]
            assert len(server.connections) <= 16
            for _, w in idle:
                w.close()

    run(loop, main)


def test_at_the_cap_full_of_slow_bodies_the_longest_stuck_makes_room(loop: str) -> None:
    """Slow bodies (a head, then a trickle of the body it announced) fill the cap: a probe
    is still answered at once, the connection stuck longest in its request closed for
    it, and the other slow bodies keep their place."""
    async def main() -> None:
        hits: list[str] = []
        async with serving(_router(), max_connections=16, on_limit=hits.append) as (
                server, port):
            slow = []
            for i in range(16):
                r, w = await asyncio.open_connection("127.0.0.1", port)
                w.write(b"PUT /v1/sessions/s%d HTTP/1.1\r\nHost: x\r\n"
                        b"Content-Length: 1000\r\n\r\n" % i + b"x" * 10)
                await w.drain()
                slow.append((r, w))
                await wait_until(lambda n=i + 1: len(server.connections) == n and all(
                    c.state == srv_site.BODY for c in server.connections),
                    timeout=5.0, interval=0.01, what=f"{i + 1} slow bodies")
            # The oldest slow body keeps trickling: it has been stuck longest all the same.
            slow[0][1].write(b"x" * 10)
            await slow[0][1].drain()
            loop_time = asyncio.get_running_loop().time
            started = loop_time()
            answer = await exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
                                          b"Connection: close\r\n\r\n", timeout=5.0)
            assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
            assert loop_time() - started < scaled(10.0)  # not the body timeout (30 s)
            assert await _closed(slow[0][0], within=2.0) == b""
            assert hits == ["connections"]
            # The others are still there, and one completing its body is answered.
            for r, _ in slow[1:]:
                assert not r.at_eof()
            r, w = slow[1]
            w.write(b"y" * 990)
            async with asyncio.timeout(5):
                head = await r.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ")
            for _, w in slow:
                w.close()

    run(loop, main)


def test_at_the_cap_with_every_connection_busy_a_new_one_gets_503(loop: str) -> None:
    async def main() -> None:
        async with serving(_router(), max_connections=16) as (server, port):
            busy = []
            for _ in range(16):
                r, w = await asyncio.open_connection("127.0.0.1", port)
                w.write(b"GET /slow/1.5 HTTP/1.1\r\nHost: x\r\n\r\n")
                busy.append((r, w))
            await wait_until(lambda: len(server.connections) == 16, what="16 connections")
            refused = await exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert refused.startswith(b"HTTP/1.1 503 "), refused[:200]
            assert "too many connections" in json.loads(refused.partition(b"\r\n\r\n")[2])[
                "error"]
            assert server.site.hits["connections"] == 1
            for r, w in busy:  # the busy ones are answered all the same
                async with asyncio.timeout(5):
                    head = await r.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200 ")
                w.close()

    run(loop, main)


def test_oversized_heads_and_bodies_are_counted(loop: str) -> None:
    async def main() -> None:
        hits: list[str] = []
        async with serving(_router(), on_limit=hits.append) as (_, port):
            await exchange(port, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n")
            await exchange(port, b"PUT /v1/sessions/a HTTP/1.1\r\nHost: x\r\n"
                                 b"Content-Length: 5000\r\nConnection: close\r\n\r\n"
                           + b"x" * 5000)
            assert hits == ["head_size", "body_size"]

    run(loop, main)


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"GET /healthz HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    (b"GET /healthz HTTP/1.2\r\nHost: x\r\n\r\n", 400),  # llhttp: not a version
    (b"GET /healthz HTTP/0.9\r\nHost: x\r\n\r\n", 505),
    # RFC 9112 section 6.1: a transfer coding in HTTP/1.0 means faulty framing: refused
    # and closed, even with keep-alive asked for.
    (b"PUT /v1/sessions/a HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", 400),
])
def test_versions_and_framings_a_strict_server_refuses(loop: str, request_bytes: bytes,
                                                       status: int) -> None:
    async def main() -> None:
        async with serving(_router()) as (_, port):
            raw = await exchange(port, request_bytes)  # until the server closes
            assert raw.startswith(b"HTTP/1.1 %d " % status), raw[:200]
            assert b"Connection: close" in raw.partition(b"\r\n\r\n")[0]

    run(loop, main)


def test_head_is_gets_answer_without_its_body(loop: str) -> None:
    async def main() -> None:
        async with serving(_router()) as (_, port):
            got = await exchange(port, b"HEAD /v1/sessions/a HTTP/1.1\r\nHost: x\r\n"
                                       b"Connection: close\r\n\r\n")
            head, _, body = got.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ") and body == b""
            assert b"Content-Length: " in head  # the length GET's body would have

    run(loop, main)


def test_the_default_cap_stays_below_the_open_file_limit() -> None:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    cap = srv.default_max_connections()
    assert 16 <= cap <= srv.MAX_CONNECTIONS
    if soft != resource.RLIM_INFINITY:
        assert cap <= max(16, soft - 128)
