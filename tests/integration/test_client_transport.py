"""meshxl.client.transport against small HTTP servers written here, in this process, on
both event loops (asyncio's default and uvloop): keep-alive reuse, the connection
limit, idle expiry, the answer framings (Content-Length, chunked, read until close),
``Connection: close`` and HTTP/1.0, the keep-alive race (retried only when the request
was provably not read), timeouts, refusals, size bounds, a Unix socket, cancellation
and ``close()``; and a property test of the parser against generated answers.
"""

from __future__ import annotations

import asyncio
import select
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httptools
import pytest
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st

from meshxl.client import AsyncClient, Backoff, BadRequest, ClientSettings, Unreachable
from meshxl.client.connection import MAX_HEAD, Connection
from meshxl.client.framing import HEAD_SLICE
from meshxl.client.plans import Answer, Unanswered
from meshxl.client.transport import Pool
from meshxl.errors import InputError
from meshxl.local.ports import free_port
from meshxl.local.wait import wait_until
from tests.harness.clock import scaled, window

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
QUICK = ClientSettings(timeout=scaled(10.0), connect_timeout=scaled(5.0))
"""For requests that are answered (the tests of timeouts set their own): the timeout only
bounds a test gone wrong. At 2 s, a worker starved on two busy cores once failed a
request before it was sent."""


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Callable[[Callable[[], Awaitable[Any]]], Any]:
    """``run(main)``: ``await main()`` in a new event loop of the parametrized kind,
    bounded to 30 s."""
    factory = LOOPS[request.param]

    def run(main: Callable[[], Awaitable[Any]]) -> Any:
        async def bounded() -> Any:
            loop = asyncio.get_running_loop()
            assert isinstance(loop, uvloop.Loop) == (factory is uvloop.new_event_loop)
            async with asyncio.timeout(30):
                return await main()

        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(bounded())

    return run


# -- a small server ----------------------------------------------------------------------------


@dataclass
class Seen:
    """A request as the server parsed it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    peer: Peer


def answer(status: int = 200, body: bytes = b"ok", *, version: str = "1.1",
           **headers: str) -> bytes:
    lines = [f"HTTP/{version} {status} X"] + [f"{k.replace('_', '-')}: {v}"
                                              for k, v in headers.items()]
    if "content_length" not in headers and "transfer_encoding" not in headers:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def chunked(body: bytes, size: int) -> bytes:
    out = b"".join(f"{len(body[i:i + size]):x}\r\n".encode() + body[i:i + size] + b"\r\n"
                   for i in range(0, len(body), size))
    return out + b"0\r\n\r\n"


Handler = Callable[["Peer", Seen], None]


def echo(peer: Peer, seen: Seen) -> None:
    peer.write(answer(200, seen.body or seen.path.encode(), x_request=str(len(peer.seen))))


class Peer(asyncio.Protocol):
    """One server-side connection: parses requests, hands each to the server's handler."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.seen: list[Seen] = []
        self.closed = asyncio.get_running_loop().create_future()
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.peers.append(self)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode().lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        seen = Seen(self.parser.get_method().decode(), self._url.decode(), self._headers,
                    self._body, self)
        self._url, self._headers, self._body = b"", {}, b""
        self.seen.append(seen)
        self.server.requests.append(seen)
        self.server.handler(self, seen)

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def reset(self) -> None:
        """Close with a TCP reset (SO_LINGER 0)."""
        assert self.transport is not None
        sock = self.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()


@dataclass
class Server:
    handler: Handler = echo
    peers: list[Peer] = field(default_factory=list)
    requests: list[Seen] = field(default_factory=list)
    server: asyncio.AbstractServer | None = None
    port: int = 0

    async def start(self, unix: str | None = None) -> Server:
        loop = asyncio.get_running_loop()
        if unix is not None:
            self.server = await loop.create_unix_server(lambda: Peer(self), unix)
        else:
            self.server = await loop.create_server(lambda: Peer(self), "127.0.0.1", 0)
            self.port = self.server.sockets[0].getsockname()[1]
        return self

    def pool(self, settings: ClientSettings = QUICK, **options: Any) -> Pool:
        return Pool(settings=settings, host="127.0.0.1", port=self.port,
                    headers={"User-Agent": "test"}, **options)

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for peer in self.peers:
            if peer.transport is not None:
                peer.transport.abort()
        await self.server.wait_closed()


async def until(predicate: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    await wait_until(predicate, timeout=timeout, interval=0.002, what=what)


# -- reuse, limits, expiry -------------------------------------------------------------------


def test_keep_alive_reuses_one_connection(run: Any) -> None:
    async def main() -> None:
        server = await Server().start()
        pool = server.pool()
        for n in range(20):
            got = await pool.request("PUT", "/v1/sessions/s1",
                                     {"Content-Type": "application/json"}, b'{"n":%d}' % n)
            assert isinstance(got, Answer), got
            assert got.status == 200 and got.body == b'{"n":%d}' % n
            assert got.headers["x-request"] == str(n + 1)  # the n-th on that connection
        assert len(server.peers) == 1 and pool.opened == 1
        put = server.requests[0]
        assert put.method == "PUT" and put.path == "/v1/sessions/s1"
        assert put.headers["host"] == f"127.0.0.1:{server.port}"
        assert put.headers["content-length"] == "7" and put.headers["user-agent"] == "test"
        assert isinstance(await pool.request("GET", "/v1/sessions/s1", {}, None), Answer)
        get = server.requests[-1]
        assert get.method == "GET" and "content-length" not in get.headers
        await pool.close()
        await server.peers[0].closed  # close() closed it
        await server.stop()

    run(main)


def test_connections_at_most_max_connections(run: Any) -> None:
    async def main() -> None:
        held: list[Peer] = []
        server = await Server(handler=lambda peer, seen: held.append(peer)).start()
        pool = server.pool(ClientSettings(max_connections=2, timeout=scaled(15), pipeline=1))
        tasks = [asyncio.create_task(pool.request("GET", f"/{n}", {}, None)) for n in range(6)]
        await until(lambda: len(held) == 2, "two requests at the server")
        await window(0.05, "a third connection would be open by now")
        assert len(server.peers) == 2 and len(held) == 2, "a third connection was opened"
        while any(not t.done() for t in tasks):  # answer whatever is held, one at a time
            await until(lambda: bool(held) or all(t.done() for t in tasks), "a request")
            if held:
                peer = held.pop(0)
                echo(peer, peer.seen[-1])
        answers = [t.result() for t in tasks]
        assert all(isinstance(a, Answer) and a.status == 200 for a in answers), answers
        assert sorted(a.body for a in answers if isinstance(a, Answer)) == \
            [f"/{n}".encode() for n in range(6)]
        assert len(server.peers) == 2 and pool.opened == 2
        await pool.close()
        await server.stop()

    run(main)


def test_waiting_for_a_connection_is_bounded_by_the_timeout(run: Any) -> None:
    async def main() -> None:
        server = await Server(handler=lambda peer, seen: None).start()  # never answers
        pool = server.pool(ClientSettings(max_connections=1, timeout=0.3, pipeline=1))
        pool._tick = 60  # the first request's deadline goes unchecked meanwhile
        first = asyncio.create_task(pool.request("PUT", "/a", {}, b"x"))
        await until(lambda: len(server.requests) == 1, "the first request")
        started = time.monotonic()
        second = await pool.request("PUT", "/b", {}, b"y")
        assert 0.25 <= time.monotonic() - started < scaled(2)
        assert isinstance(second, Unanswered) and not second.sent
        assert "no connection to the sidecar free within 0.3 s" in second.reason
        await pool.close()
        stuck = await first
        assert stuck == Unanswered("the client was closed", sent=True)
        assert len(server.requests) == 1 and len(server.peers) == 1
        await server.stop()

    run(main)


def test_idle_connections_are_closed_after_keepalive(run: Any) -> None:
    async def main() -> None:
        server = await Server().start()
        pool = server.pool(ClientSettings(keepalive=0.2, timeout=2))
        assert isinstance(await pool.request("GET", "/a", {}, None), Answer)
        started = time.monotonic()
        async with asyncio.timeout(5):
            await server.peers[0].closed  # closed by the client's sweep
        assert 0.15 <= time.monotonic() - started < scaled(2)
        assert isinstance(await pool.request("GET", "/b", {}, None), Answer)
        assert len(server.peers) == 2 and pool.opened == 2
        # keepalive 0: never reused.
        never = server.pool(ClientSettings(keepalive=0))
        for _ in range(3):
            assert isinstance(await never.request("GET", "/c", {}, None), Answer)
        assert never.opened == 3
        await pool.close()
        await never.close()
        await server.stop()

    run(main)


# -- framings and closes ---------------------------------------------------------------------


def test_chunked_answers_and_unframed_ones_refused(run: Any) -> None:
    """Chunked answers keep the connection; an answer framed by neither Content-Length
    nor chunked (its body would end at the close) is refused: a cut could not be told
    from its end, and the sidecar never sends one."""
    body = bytes(range(256)) * 40

    def handler(peer: Peer, seen: Seen) -> None:
        if seen.path == "/chunked":
            framed = answer(200, chunked(body, 777), transfer_encoding="chunked")
            for i in range(0, len(framed), 1000):  # in pieces, as a network delivers it
                peer.write(framed[i:i + 1000])
        elif seen.path == "/until-close":
            peer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + body)
            assert peer.transport is not None
            peer.transport.close()
        else:
            echo(peer, seen)

    async def main() -> None:
        server = await Server(handler=handler).start()
        pool = server.pool()
        for _ in range(2):
            got = await pool.request("GET", "/chunked", {}, None)
            assert isinstance(got, Answer) and got.body == body
            assert got.headers["transfer-encoding"] == "chunked"
        assert pool.opened == 1  # chunked answers keep the connection
        got = await pool.request("GET", "/until-close", {}, None)
        assert isinstance(got, Unanswered) and got.sent
        assert "neither Content-Length nor chunked" in got.reason
        assert isinstance(await pool.request("GET", "/next", {}, None), Answer)
        assert pool.opened == 2
        await pool.close()
        await server.stop()

    run(main)


@pytest.mark.parametrize("closing", [
    answer(200, b"bye", connection="close"),
    answer(200, b"bye", version="1.0"),
    answer(200, b"bye", version="1.0", connection="keep-alive"),
])
def test_connection_close_and_http_1_0_answers_close_the_connection(run: Any,
                                                                   closing: bytes) -> None:
    async def main() -> None:
        server = await Server(handler=lambda peer, seen: peer.write(closing)).start()
        pool = server.pool()
        for _ in range(3):
            got = await pool.request("GET", "/", {}, None)
            assert isinstance(got, Answer) and got.body == b"bye"
        # The client closed each connection after its answer (the server did not).
        assert len(server.peers) == 3 and pool.opened == 3
        for peer in server.peers:
            async with asyncio.timeout(5):
                await peer.closed
        await pool.close()
        await server.stop()

    run(main)


# -- the keep-alive race ---------------------------------------------------------------------


def test_an_idle_connection_the_server_closed_is_not_reused(run: Any) -> None:
    """The server closes each connection right after its answer (without saying
    ``Connection: close``): the next request goes out on a new one and succeeds."""

    def handler(peer: Peer, seen: Seen) -> None:
        echo(peer, seen)
        assert peer.transport is not None
        peer.transport.close()

    async def main() -> None:
        server = await Server(handler=handler).start()
        pool = server.pool()
        for n in range(5):
            got = await pool.request("PUT", f"/{n}", {}, b"w%d" % n)
            assert isinstance(got, Answer) and got.body == b"w%d" % n, got
        assert [s.body for s in server.requests] == [b"w%d" % n for n in range(5)]
        assert len(server.peers) == 5
        await pool.close()
        await server.stop()

    run(main)


def test_keep_alive_race_is_retried_once_on_a_new_connection(run: Any) -> None:
    """The server answers, stops reading, and closes once the next request sits unread
    in its socket: the kernel resets the connection. The request was never read, so it
    is sent again on a new connection (and the server sees it once)."""
    closers: list[asyncio.Task[None]] = []

    def handler(peer: Peer, seen: Seen) -> None:
        echo(peer, seen)
        if len(server.peers) == 1:
            assert peer.transport is not None
            peer.transport.pause_reading()
            closers.append(asyncio.ensure_future(close_when_unread(peer)))

    async def close_when_unread(peer: Peer) -> None:
        assert peer.transport is not None
        fd = peer.transport.get_extra_info("socket").fileno()
        await until(lambda: bool(select.select([fd], [], [], 0)[0]), "the unread request")
        peer.transport.close()  # with unread data: a reset

    server = Server(handler=handler)

    async def main() -> None:
        await server.start()
        pool = server.pool()
        assert isinstance(await pool.request("PUT", "/1", {}, b"one"), Answer)
        got = await pool.request("PUT", "/2", {}, b"two")
        assert isinstance(got, Answer) and got.body == b"two", got
        await asyncio.gather(*closers)
        assert [s.body for s in server.requests] == [b"one", b"two"]
        assert [len(p.seen) for p in server.peers] == [1, 1] and pool.opened == 2
        await pool.close()
        await server.stop()

    run(main)


def test_no_retry_once_the_request_may_have_been_read(run: Any) -> None:
    """A close without a reset after the request was read, and a reset after part of
    the answer, may follow a request that was applied: never sent again, sent=True."""

    def handler(peer: Peer, seen: Seen) -> None:
        assert peer.transport is not None
        if len(peer.seen) == 1:
            echo(peer, seen)
        elif seen.path == "/read-then-closed":
            peer.transport.close()
        else:  # an answer started, then a reset
            peer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
            asyncio.get_running_loop().call_later(0.05, peer.reset)

    async def main() -> None:
        server = await Server(handler=handler).start()
        pool = server.pool()
        reasons = []
        for path in ("/read-then-closed", "/answer-started"):
            before = len(server.requests)
            assert isinstance(await pool.request("PUT", "/first", {}, b"x"), Answer)
            got = await pool.request("PUT", path, {}, b"y")
            assert isinstance(got, Unanswered) and got.sent, got
            assert len(server.requests) == before + 2, "the request was sent again"
            reasons.append(got.reason)
        assert reasons[0] == "the sidecar closed the connection without answering"
        assert reasons[1].startswith("ConnectionResetError"), reasons
        assert pool.opened == 2
        await pool.close()
        await server.stop()

    run(main)


# -- failures --------------------------------------------------------------------------------


def test_a_peer_that_never_answers_times_out(run: Any) -> None:
    async def main() -> None:
        server = await Server(handler=lambda peer, seen: None).start()
        pool = server.pool(ClientSettings(timeout=0.25))
        started = time.monotonic()
        got = await pool.request("PUT", "/s", {}, b"x")
        elapsed = time.monotonic() - started
        assert isinstance(got, Unanswered) and got.sent
        assert got.reason == "TimeoutError: no answer within 0.25 s"
        assert 0.2 <= elapsed < scaled(2)
        async with asyncio.timeout(5):
            await server.peers[0].closed  # the connection was dropped
        await pool.close()
        await server.stop()

    run(main)


def test_refused_and_missing_sockets_are_not_sent(run: Any, tmp_path: Path) -> None:
    async def main() -> None:
        refused = Pool(settings=QUICK, host="127.0.0.1", port=free_port())
        got = await refused.request("PUT", "/s", {}, b"x")
        assert isinstance(got, Unanswered) and not got.sent
        assert got.reason.startswith("ConnectionRefusedError"), got
        missing = Pool(settings=QUICK, unix=str(tmp_path / "nothing.sock"))
        got = await missing.request("GET", "/s", {}, None)
        assert isinstance(got, Unanswered) and not got.sent
        assert got.reason.startswith("FileNotFoundError"), got
        assert refused.opened == missing.opened == 0

    run(main)


def test_a_connect_that_hangs_times_out_unsent(run: Any) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    filler = [socket.create_connection(listener.getsockname())]  # fills the backlog
    extra: list[socket.socket] = []
    try:
        for _ in range(8):  # until a connect no longer completes
            sock = socket.socket()
            sock.setblocking(False)
            extra.append(sock)
            if sock.connect_ex(listener.getsockname()) != 0:
                if not select.select([], [sock], [], 0.2)[1]:
                    break
        else:
            pytest.fail("the listener's backlog never filled")

        async def main() -> None:
            pool = Pool(settings=ClientSettings(connect_timeout=0.2, timeout=5),
                        host="127.0.0.1", port=listener.getsockname()[1])
            started = time.monotonic()
            got = await pool.request("PUT", "/s", {}, b"x")
            assert isinstance(got, Unanswered) and not got.sent
            assert got.reason == "TimeoutError: could not connect within 0.2 s"
            assert time.monotonic() - started < scaled(2)

        run(main)
    finally:
        for sock in filler + extra + [listener]:
            sock.close()


def test_oversized_answers_are_refused(run: Any) -> None:
    def handler(peer: Peer, seen: Seen) -> None:
        if seen.path == "/big":
            peer.write(answer(200, b"x" * 10_001))
        elif seen.path == "/big-chunked":
            peer.write(answer(200, chunked(b"x" * 20_000, 3000), transfer_encoding="chunked"))
        elif seen.path == "/big-head":  # past MAX_HEAD and the parser's slice of slack
            peer.write(answer(200, b"", x_big="h" * (MAX_HEAD + HEAD_SLICE)))
        else:
            peer.write(answer(200, b"x" * 10_000))

    async def main() -> None:
        server = await Server(handler=handler).start()
        pool = server.pool(ClientSettings(timeout=5, max_answer=10_000))
        got = await pool.request("GET", "/fits", {}, None)
        assert isinstance(got, Answer) and len(got.body) == 10_000
        for path, what in (("/big", "answer is larger than 10000 bytes"),
                           ("/big-chunked", "answer is larger than 10000 bytes"),
                           ("/big-head", f"head is larger than {MAX_HEAD} bytes")):
            got = await pool.request("GET", path, {}, None)
            assert isinstance(got, Unanswered) and got.sent and what in got.reason, got
        assert pool.opened == 3  # each refusal dropped its connection
        await pool.close()
        await server.stop()

    run(main)


def test_a_broken_answer_is_a_parse_error(run: Any) -> None:
    async def main() -> None:
        server = await Server(handler=lambda peer, seen: peer.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n")).start()
        pool = server.pool()
        got = await pool.request("GET", "/", {}, None)
        assert isinstance(got, Unanswered) and got.sent
        assert got.reason.startswith("HttpParser"), got
        await pool.close()
        await server.stop()

    run(main)


def test_unsafe_request_heads_are_refused_before_sending(run: Any) -> None:
    async def main() -> None:
        server = await Server().start()
        pool = server.pool()
        for headers, target in (({"Content-Type": "a\r\nX-Injected: 1"}, "/"),
                                ({"X-A\r\nB": "v"}, "/"), ({"Content-Length": "1"}, "/"),
                                ({"Host": "elsewhere"}, "/"), ({}, "/a b"),
                                ({}, "/a\nb"), ({"X": "é€"}, "/")):
            with pytest.raises(BadRequest):
                await pool.request("PUT", target, headers, b"x")
        # A request's own User-Agent replaces the pool's.
        assert isinstance(await pool.request("GET", "/", {"user-agent": "mine"}, None), Answer)
        assert server.requests[-1].headers["user-agent"] == "mine"
        assert len(server.requests) == 1
        await pool.close()
        await server.stop()

    run(main)


# -- Unix sockets, cancellation, close -------------------------------------------------------


def test_a_pool_used_again_in_a_new_loop_starts_afresh(tmp_path: Path) -> None:
    """``asyncio.run`` twice with one client: the second loop opens its own connection
    rather than touching the first loop's."""
    path = str(tmp_path / "s.sock")
    pool = Pool(settings=QUICK, unix=path)
    served: list[int] = []

    async def once(factory_name: str) -> None:
        async with asyncio.timeout(30):
            await talk(factory_name)

    async def talk(factory_name: str) -> None:
        server = await Server().start(unix=path)
        got = await pool.request("GET", f"/{factory_name}", {}, None)
        assert isinstance(got, Answer) and got.body == f"/{factory_name}".encode()
        served.append(len(server.peers))
        await server.stop()

    for name in ("asyncio", "uvloop", "asyncio"):
        with asyncio.Runner(loop_factory=LOOPS[name]) as runner:
            runner.run(once(name))
    assert served == [1, 1, 1] and pool.opened == 3


def test_unix_socket_round_trip(run: Any, tmp_path: Path) -> None:
    path = str(tmp_path / "statesync.sock")

    async def main() -> None:
        server = await Server().start(unix=path)
        pool = Pool(settings=QUICK, unix=path, headers={"User-Agent": "test"})
        for n in range(3):
            got = await pool.request("PUT", "/v1/sessions/u", {}, b"state %d" % n)
            assert isinstance(got, Answer) and got.body == b"state %d" % n
        assert server.requests[0].headers["host"] == "localhost"
        assert pool.opened == 1 and len(server.peers) == 1
        await pool.close()
        await server.stop()

    run(main)


def test_a_cancelled_request_frees_its_connection(run: Any) -> None:
    async def main() -> None:
        server = await Server(handler=lambda peer, seen: (
            None if seen.path == "/slow" else echo(peer, seen))).start()
        pool = server.pool(ClientSettings(max_connections=1, pipeline=1))
        slow = asyncio.create_task(pool.request("GET", "/slow", {}, None))
        await until(lambda: len(server.requests) == 1, "the slow request")
        waiting = asyncio.create_task(pool.request("GET", "/after", {}, None))
        await asyncio.sleep(0.01)
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        got = await waiting
        assert isinstance(got, Answer) and got.body == b"/after"
        async with asyncio.timeout(5):
            await server.peers[0].closed  # its answer would be no one's
        assert len(server.peers) == 2
        await pool.close()
        await server.stop()

    run(main)


def test_close_closes_every_connection_and_the_pool_opens_new_ones(run: Any) -> None:
    async def main() -> None:
        server = await Server(handler=lambda peer, seen: (
            None if seen.path == "/hang" else echo(peer, seen))).start()
        pool = server.pool(ClientSettings(max_connections=2, pipeline=1))
        await asyncio.gather(*(pool.request("GET", "/", {}, None) for _ in range(2)))
        hanging = asyncio.create_task(pool.request("GET", "/hang", {}, None))
        await until(lambda: len(server.requests) == 3, "the hanging request")
        await pool.close()
        assert await hanging == Unanswered("the client was closed", sent=True)
        async with asyncio.timeout(5):
            await asyncio.gather(*(p.closed for p in server.peers))
        assert isinstance(await pool.request("GET", "/again", {}, None), Answer)
        assert pool.opened == 3
        await pool.close()
        await server.stop()

    run(main)


def test_async_client_uses_the_transport_unless_given_aiohttp_features(run: Any,
                                                                       tmp_path: Path) -> None:
    import aiohttp

    path = str(tmp_path / "s.sock")

    async def main() -> None:
        def handler(peer: Peer, seen: Seen) -> None:
            peer.write(answer(200, b'{"ready": true}', content_type="application/json"))

        server = await Server(handler=handler).start(unix=path)
        async with AsyncClient(f"unix:{path}") as client:
            assert client._pool is not None and client.url == f"unix:{path}"
            assert (await client.ready()).ready
            assert (await client.ready()).ready
            assert client._pool.opened == 1
        # trace_configs are aiohttp's: the aiohttp path, over the Unix socket too.
        async with AsyncClient(f"unix:{path}", trace_configs=[aiohttp.TraceConfig()]) as traced:
            assert traced._pool is None and (await traced.ready()).ready
        assert server.requests[-1].headers["user-agent"].startswith("meshxl-client/")
        async with aiohttp.ClientSession() as http:
            assert AsyncClient("http://127.0.0.1:1", http=http)._pool is None
            with pytest.raises(InputError, match="unix"):
                AsyncClient(f"unix:{path}", http=http)
        gone = AsyncClient(f"unix:{tmp_path}/gone.sock",
                           settings=ClientSettings(unavailable=Backoff(attempts=1)))
        with pytest.raises(Unreachable, match="sidecar unreachable: GET /readyz: "
                           "FileNotFoundError"):
            await gone.ready()
        await server.stop()

    run(main)


# -- the parser, property-tested -------------------------------------------------------------


class _Wire:
    """A transport that only records: the test feeds the connection by hand."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def abort(self) -> None:
        self.aborted = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


_TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                 "!#$%&'*+-.^_`|~", min_size=1, max_size=20)
_VISIBLE = "".join(chr(c) for c in range(0x21, 0x7f)) + \
    "".join(chr(c) for c in range(0xa0, 0x100))
_VALUE = st.builds(lambda first, rest: first + rest.rstrip(),
                   st.sampled_from(_VISIBLE), st.text(alphabet=_VISIBLE + " \t", max_size=40))
_RESERVED = {"content-length", "transfer-encoding", "connection", "upgrade", "keep-alive",
             "proxy-connection"}


@st.composite
def answers(draw: st.DrawFn) -> tuple[bytes, Answer, str]:
    status = draw(st.integers(200, 599).filter(lambda s: s not in (204, 304)))
    names = draw(st.lists(_TOKEN.filter(lambda n: n.lower() not in _RESERVED), max_size=8,
                          unique_by=str.lower))
    headers = {name: draw(_VALUE) for name in names}
    body = draw(st.binary(max_size=3000))
    framing = draw(st.sampled_from(["length", "chunked", "close"]))
    head = f"HTTP/1.1 {status} {draw(st.sampled_from(['OK', 'Some Reason', '']))}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    expected = {name.lower(): value for name, value in headers.items()}
    if framing == "length":
        head += f"Content-Length: {len(body)}\r\n"
        expected["content-length"] = str(len(body))
        payload = body
    elif framing == "chunked":
        head += "Transfer-Encoding: chunked\r\n"
        expected["transfer-encoding"] = "chunked"
        payload = chunked(body, draw(st.integers(1, 4000))) if body else b"0\r\n\r\n"
    else:
        payload = body
    wire = (head + "\r\n").encode("latin-1") + payload
    return wire, Answer(status, expected, body), framing


@settings(max_examples=300, deadline=None)
@given(answers(), st.lists(st.integers(0, 6000), max_size=8))
def test_parsed_answers_equal_what_was_sent(generated: tuple[bytes, Answer, str],
                                            cuts: list[int]) -> None:
    wire, expected, framing = generated
    loop = asyncio.new_event_loop()
    try:
        conn = Connection(Pool(settings=QUICK), loop)
        conn.connection_made(_Wire())  # type: ignore[arg-type]
        waiter = conn.send(b"GET / HTTP/1.1\r\n\r\n", loop.time() + 10, False)
        points = sorted({min(c, len(wire)) for c in cuts} | {0, len(wire)})
        for start, end in zip(points, points[1:], strict=False):
            conn.data_received(wire[start:end])
        if framing == "close":  # refused as soon as its head says so
            got = waiter.result()
            assert isinstance(got, Unanswered) and "neither Content-Length" in got.reason
            assert not conn.keep
            return
        assert waiter.done() and waiter.result() == expected
        assert conn.keep
    finally:
        loop.close()


# -- pipelining ----------------------------------------------------------------------------------


def test_requests_made_together_are_pipelined_and_matched_in_order(run: Any) -> None:
    reads: list[int] = []

    class Counting(Peer):
        def data_received(self, data: bytes) -> None:
            reads.append(len(data))
            super().data_received(data)

    async def main() -> None:
        server = Server()
        loop = asyncio.get_running_loop()
        server.server = await loop.create_server(lambda: Counting(server), "127.0.0.1", 0)
        server.port = server.server.sockets[0].getsockname()[1]
        pool = server.pool(ClientSettings(timeout=5, pipeline=8))
        got = await asyncio.gather(*(pool.request("PUT", f"/v1/sessions/s{n}", {},
                                                  b"body-%d" % n) for n in range(20)))
        assert [a.body for a in got if isinstance(a, Answer)] == [b"body-%d" % n
                                                                 for n in range(20)]
        assert pool.opened == 3 and len(server.peers) == 3  # 8 + 8 + 4 on three
        assert len(reads) <= 6, reads  # written together: a read or two per connection
        # Answers that arrive together are matched to their requests in order.
        assert [len(p.seen) for p in server.peers] == [8, 8, 4]
        await pool.close()
        await server.stop()

    run(main)


def test_a_request_that_times_out_drops_its_connection_and_those_behind_it(run: Any) -> None:
    def handler(peer: Peer, seen: Seen) -> None:
        if seen.path != "/stuck" and not any(s.path == "/stuck" for s in peer.seen):
            echo(peer, seen)  # nothing behind /stuck is answered (answers are in order)

    async def main() -> None:
        server = await Server(handler=handler).start()
        pool = server.pool(ClientSettings(timeout=0.3, pipeline=4))
        first = await pool.request("GET", "/first", {}, None)
        assert isinstance(first, Answer)
        stuck, behind = await asyncio.gather(pool.request("GET", "/stuck", {}, None),
                                             pool.request("PUT", "/behind", {}, b"x"))
        assert isinstance(stuck, Unanswered) and stuck.sent and "0.3 s" in stuck.reason
        assert isinstance(behind, Unanswered) and behind.sent
        assert "a request ahead of it went unanswered" in behind.reason
        assert isinstance(await pool.request("GET", "/after", {}, None), Answer)
        assert pool.opened == 2
        await pool.close()
        await server.stop()

    run(main)


def test_connection_close_in_a_pipeline_fails_only_what_came_after(run: Any) -> None:
    def handler(peer: Peer, seen: Seen) -> None:
        if seen.path == "/last":
            peer.write(answer(200, b"last", connection="close"))
            assert peer.transport is not None
            peer.transport.close()
        elif not any(s.path == "/last" for s in peer.seen):
            echo(peer, seen)

    async def main() -> None:
        server = await Server(handler=handler).start()
        # The third request's wait is the timeout: scaled, so that on a starved
        # machine the first two are answered within it.
        pool = server.pool(ClientSettings(timeout=scaled(2), pipeline=8))
        got = await asyncio.gather(pool.request("GET", "/a", {}, None),
                                   pool.request("GET", "/last", {}, None),
                                   pool.request("PUT", "/c", {}, b"c"))
        assert isinstance(got[0], Answer) and got[0].body == b"/a"
        assert isinstance(got[1], Answer) and got[1].body == b"last"
        assert isinstance(got[2], Unanswered) and got[2].sent  # written, never answered
        assert isinstance(await pool.request("GET", "/again", {}, None), Answer)
        assert pool.opened == 2
        await pool.close()
        await server.stop()

    run(main)


def test_a_cancelled_pipelined_request_leaves_the_others_their_answers(run: Any) -> None:
    release = asyncio.Event()
    waiting: list[tuple[Peer, Seen]] = []

    def handler(peer: Peer, seen: Seen) -> None:
        if release.is_set():
            echo(peer, seen)
            return
        waiting.append((peer, seen))
        if len(waiting) == 3:
            release.set()

    async def main() -> None:
        server = await Server(handler=handler).start()
        pool = server.pool(ClientSettings(timeout=5, pipeline=4))
        tasks = [asyncio.create_task(pool.request("GET", f"/{n}", {}, None)) for n in range(3)]
        async with asyncio.timeout(5):
            await release.wait()
        tasks[1].cancel()
        with pytest.raises(asyncio.CancelledError):
            await tasks[1]
        for peer, seen in waiting:  # the answers come, in order, the cancelled one's too
            echo(peer, seen)
        assert [(await t).body for t in (tasks[0], tasks[2])] == [b"/0", b"/2"]  # type: ignore[union-attr]
        assert isinstance(await pool.request("GET", "/next", {}, None), Answer)
        assert pool.opened == 1
        await pool.close()
        await server.stop()

    run(main)


@settings(max_examples=100, deadline=None)
@given(st.lists(answers().filter(lambda a: a[2] != "close"), min_size=1, max_size=5),
       st.lists(st.integers(0, 20000), max_size=10))
def test_pipelined_answers_split_anyhow_reach_their_requests(
        generated: list[tuple[bytes, Answer, str]], cuts: list[int]) -> None:
    wire = b"".join(w for w, _, _ in generated)
    loop = asyncio.new_event_loop()
    try:
        conn = Connection(Pool(settings=QUICK), loop)
        conn.connection_made(_Wire())  # type: ignore[arg-type]
        waiters = [conn.send(b"GET / HTTP/1.1\r\n\r\n", loop.time() + 10, False)
                   for _ in generated]
        points = sorted({min(c, len(wire)) for c in cuts} | {0, len(wire)})
        for start, end in zip(points, points[1:], strict=False):
            conn.data_received(wire[start:end])
        assert [w.result() for w in waiters] == [a for _, a, _ in generated]
        assert not conn.exchanges and conn.keep
    finally:
        loop.close()
