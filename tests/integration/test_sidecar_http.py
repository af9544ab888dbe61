"""The sidecar's HTTP/1.1 server (meshxl/statesync/http/), in process on loopback
sockets: keep-alive, pipelining, limits, timeouts, errors as JSON, on asyncio's
loop and on uvloop. Requests are written as raw bytes, the way misbehaving clients send
them, and answers read back with http.client's parser where it helps."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import httptools
import pytest
import uvloop

from meshxl.errors import Conflict
from meshxl.local.wait import wait_until
from meshxl.statesync import http as srv
from meshxl.statesync.http import HttpServer, Request, RequestRefused, Response, Router
from tests.harness.clock import scaled

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def _router(calls: list[Request] | None = None) -> Router:
    async def echo(request: Request) -> Response:
        if calls is not None:
            calls.append(request)
        return srv.json_response({"method": request.method, "path": request.path,
                                  "params": request.params, "body": request.body.decode("latin-1"),
                                  "query": request.query})

    async def slow(request: Request) -> Response:
        await asyncio.sleep(float(request.params["seconds"]))
        return Response(200, request.params["seconds"].encode())

    async def conflict(request: Request) -> Response:
        raise Conflict("taken", owner="b")

    async def teapot(request: Request) -> Response:
        raise RequestRefused(418, "short and stout", [("X-Why", "tea")], spout=True)

    async def broken(request: Request) -> Response:
        raise KeyError("secret detail")

    async def bad_header(request: Request) -> Response:
        return Response(200, b"x", [("X-Split", "a\r\nSet-Cookie: x=1")])

    r = Router()
    r.add("PUT", "/v1/sessions/{session_id}", echo, max_body=1024, what="session state")
    r.add("GET", "/v1/sessions/{session_id}", echo)
    r.add("POST", "/v1/sessions:bulkSave", echo, max_body=64, what="bulk save request")
    r.add("GET", "/slow/{seconds}", slow)
    r.add("GET", "/conflict", conflict)
    r.add("GET", "/teapot", teapot)
    r.add("GET", "/broken", broken)
    r.add("GET", "/bad-header", bad_header)
    r.add("GET", "/healthz", echo)
    return r


@contextlib.asynccontextmanager
async def serving(router: Router, **options: Any) -> AsyncIterator[tuple[HttpServer, int]]:
    """``router`` served on a free loopback port; closed at the end."""
    server = HttpServer(router, **options)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    await server.listen(sock)
    try:
        yield server, port
    finally:
        await server.close(grace=1.0)


async def exchange(port: int, data: bytes, *, until_close: bool = True,
                   timeout: float = 5.0) -> bytes:
    """Send ``data`` raw; what comes back until the server closes (``until_close``), or
    until one whole answer came (or ``timeout``)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        if until_close:
            async with asyncio.timeout(timeout):
                return await reader.read()
        raw = b""
        async with asyncio.timeout(timeout):
            while not _whole(raw, head_only=data.startswith(b"HEAD")):
                chunk = await reader.read(65536)
                if not chunk:
                    break
                raw += chunk
        return raw
    finally:
        writer.close()


def _whole(raw: bytes, head_only: bool) -> bool:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        return False
    if head_only:
        return True
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    return len(body) >= length


def answers(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Every answer in ``raw`` (status, headers by lower-case name, body)."""
    out: list[tuple[int, dict[str, str], bytes]] = []

    class Collect:
        headers: dict[str, str]
        body: bytes

        def on_message_begin(self) -> None:
            self.headers, self.body = {}, b""

        def on_header(self, name: bytes, value: bytes) -> None:
            self.headers[name.decode().lower()] = value.decode("latin-1")

        def on_body(self, body: bytes) -> None:
            self.body += body

        def on_message_complete(self) -> None:
            out.append((parser.get_status_code(), self.headers, self.body))

    parser = httptools.HttpResponseParser(Collect())
    parser.feed_data(raw)
    return out


def run(loop: str, coro_fn: Callable[[], Any]) -> Any:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        return runner.run(coro_fn())


@pytest.fixture(params=sorted(LOOPS))
def loop(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def put(path: str, body: bytes, extra: str = "") -> bytes:
    return (f"PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
            .encode() + body)


# -- framing and keep-alive ----------------------------------------------------------------


def test_keep_alive_pipelining_and_order(loop: str) -> None:
    async def main() -> None:
        async with serving(_router()) as (_, port):
            data = (put("/v1/sessions/a", b"one") + b"GET /slow/0.2 HTTP/1.1\r\nHost: x\r\n\r\n"
                    + put("/v1/sessions/b%2Fc", b"two")
                    + b"GET /v1/sessions/z HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            got = answers(await exchange(port, data))
            assert [s for s, _, _ in got] == [200, 200, 200, 200]
            first, slow, third, last = (b for _, _, b in got)
            assert json.loads(first)["body"] == "one"
            assert slow == b"0.2"  # answered in order though it finished last
            assert json.loads(third)["params"] == {"session_id": "b/c"}
            assert got[3][1]["connection"] == "close"
            assert all("date" in h for _, h, _ in got)

    run(loop, main)


def test_http10_closes_unless_keep_alive(loop: str) -> None:
    async def main() -> None:
        async with serving(_router()) as (_, port):
            got = answers(await exchange(port, b"GET /healthz HTTP/1.0\r\n\r\n"))
            assert got[0][0] == 200 and got[0][1]["connection"] == "close"
            raw = await exchange(port, b"GET /healthz HTTP/1.0\r\nConnection: keep-alive"
                                       b"\r\n\r\n", until_close=False)
            assert b"Connection: keep-alive" in raw

    run(loop, main)


def test_chunked_bodies_and_limits(loop: str) -> None:
    async def main() -> None:
        async with serving(_router()) as (_, port):
            chunked = (b"PUT /v1/sessions/c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked"
                       b"\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
            got = answers(await exchange(port, chunked + b"GET /healthz HTTP/1.1\r\nHost: x"
                                                         b"\r\nConnection: close\r\n\r\n"))
            assert json.loads(got[0][2])["body"] == "abcde" and got[1][0] == 200
            # Over the route's limit, chunked: read to its end, dropped, 413; the
            # connection serves on.
            big = b"".join(b"100\r\n" + b"x" * 256 + b"\r\n" for _ in range(8)) + b"0\r\n\r\n"
            got = answers(await exchange(
                port, b"PUT /v1/sessions/c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked"
                      b"\r\n\r\n" + big + b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
                                          b"Connection: close\r\n\r\n"))
            assert [s for s, _, _ in got] == [413, 200]
            assert json.loads(got[0][2]) == {
                "error": "session state is more than 1024 bytes; the limit is 1024",
                "status": 413, "limit": 1024}
            # Declared too large: refused from the head, the body still read and dropped.
            got = answers(await exchange(port, put("/v1/sessions:bulkSave", b"y" * 65,
                                                   "Connection: close\r\n")
                                         .replace(b"PUT", b"POST")))
            assert got[0][0] == 413 and "bulk save request is 65 bytes" in \
                json.loads(got[0][2])["error"]

    run(loop, main)


def test_expect_continue(loop: str) -> None:
    async def main() -> None:
        async with serving(_router()) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"PUT /v1/sessions/e HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                         b"Expect: 100-continue\r\n\r\n")
            async with asyncio.timeout(5):
                assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(b"ok")
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK")
            writer.close()
            # Refused from the head: answered at once, no 100, then closed.
            raw = await exchange(port, b"PUT /v1/sessions/e HTTP/1.1\r\nHost: x\r\n"
                                       b"Content-Length: 5000\r\nExpect: 100-continue\r\n\r\n")
            assert raw.startswith(b"HTTP/1.1 413 ") and b"100 Continue" not in raw

    run(loop, main)


# -- errors are JSON -----------------------------------------------------------------------


@pytest.mark.parametrize(("request_bytes", "status", "words"), [
    (b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n", 404, "Not Found"),
    (b"DELETE /v1/sessions/a HTTP/1.1\r\nHost: x\r\n\r\n", 405, "Method Not Allowed"),
    (b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 200, None),  # GET's answer, no body
    (b"GET /conflict HTTP/1.1\r\nHost: x\r\n\r\n", 409, "taken"),
    (b"GET /teapot HTTP/1.1\r\nHost: x\r\n\r\n", 418, "short and stout"),
    (b"GET /broken HTTP/1.1\r\nHost: x\r\n\r\n", 500, "internal error: KeyError"),
    (b"GET /bad-header HTTP/1.1\r\nHost: x\r\n\r\n", 500, "invalid response header"),
    (b"FROB /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad HTTP request"),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414, "request target"),
    (b"GET /healthz HTTP/1.1\r\nX-Big: " + b"h" * 9000 + b"\r\n\r\n", 431, "X-Big"),
    (b"GET /healthz HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(101))
     + b"\r\n", 431, "more than 100 header fields"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
     200, None),
])
def test_every_refusal_is_json(loop: str, request_bytes: bytes, status: int,
                               words: str | None) -> None:
    async def main() -> None:
        async with serving(_router()) as (_, port):
            raw = await exchange(port, request_bytes, until_close=False)
            head, _, body = raw.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 %d " % status), raw[:300]
            if request_bytes.startswith(b"HEAD"):
                assert body == b""  # a HEAD answer has no body
                return
            if status == 200:  # an upgrade is not served: the request is, then closed
                assert b"Connection: close" in head
                return
            payload = json.loads(body)
            assert payload["status"] == status and words in payload["error"], payload
            assert b"application/json" in head
            assert b"secret detail" not in raw

    run(loop, main)


def test_405_names_the_allowed_methods_and_handler_details_pass_through(loop: str) -> None:
    async def main() -> None:
        async with serving(_router()) as (_, port):
            got = answers(await exchange(port, b"POST /v1/sessions/a HTTP/1.1\r\nHost: x\r\n"
                                               b"Content-Length: 0\r\nConnection: close\r\n\r\n"))
            assert got[0][1]["allow"] == "GET,HEAD,PUT"  # HEAD: GET's answer, no body
            assert json.loads(got[0][2])["allowed"] == ["GET", "HEAD", "PUT"]
            got = answers(await exchange(port, b"GET /teapot HTTP/1.1\r\nHost: x\r\n"
                                               b"Connection: close\r\n\r\n"))
            assert got[0][1]["x-why"] == "tea" and json.loads(got[0][2])["spout"] is True
            got = answers(await exchange(port, b"GET /conflict HTTP/1.1\r\nHost: x\r\n"
                                               b"Connection: close\r\n\r\n"))
            assert json.loads(got[0][2])["owner"] == "b"

    run(loop, main)


def test_authorize_runs_before_routing_and_body(loop: str) -> None:
    calls: list[Request] = []

    def authorize(request: Request) -> Response | None:
        if request.headers.get("authorization") == "Bearer ok":
            return None
        return srv.error(401, "no", [("WWW-Authenticate", "Bearer")])

    async def main() -> None:
        async with serving(_router(calls), authorize=authorize) as (_, port):
            for target in (b"/nowhere", b"/v1/sessions/a"):
                raw = await exchange(port, b"PUT " + target + b" HTTP/1.1\r\nHost: x\r\n"
                                     b"Content-Length: 5000\r\nConnection: close\r\n\r\n"
                                     + b"x" * 5000)
                assert raw.startswith(b"HTTP/1.1 401 "), raw[:200]
                assert b"WWW-Authenticate: Bearer" in raw
            raw = await exchange(port, b"GET /nowhere HTTP/1.1\r\nHost: x\r\n"
                                       b"Authorization: Bearer ok\r\nConnection: close\r\n\r\n")
            assert raw.startswith(b"HTTP/1.1 404 ")
        assert calls == []

    run(loop, main)


# -- timeouts, shutdown ---------------------------------------------------------------------


def test_slow_heads_and_bodies_time_out(loop: str) -> None:
    async def main() -> None:
        async with serving(_router(), header_timeout=1.0, body_timeout=1.0) as (_, port):
            started = asyncio.get_running_loop().time()
            assert await exchange(port, b"GET /healthz HTTP/1.1\r\nHost:") == b""
            slow_body = await exchange(port, b"PUT /v1/sessions/a HTTP/1.1\r\nHost: x\r\n"
                                             b"Content-Length: 10\r\n\r\nabc")
            assert slow_body.startswith(b"HTTP/1.1 408 ")
            assert "did not arrive" in json.loads(slow_body.partition(b"\r\n\r\n")[2])["error"]
            idle = await exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert idle.startswith(b"HTTP/1.1 200 ")  # then closed as idle
            assert asyncio.get_running_loop().time() - started < scaled(10)

    run(loop, main)


def test_close_finishes_answers_under_way(loop: str) -> None:
    async def main() -> None:
        async with serving(_router()) as (server, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /slow/0.3 HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            await wait_until(lambda: [c for c in server.connections if c.active],
                             what="the slow request under way")
            idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
            await wait_until(lambda: len(server.connections) == 2, what="the idle connection")
            await server.close(grace=3.0)
            async with asyncio.timeout(5):
                raw = await reader.read()
            assert raw.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in raw
            async with asyncio.timeout(5):
                assert await idle_reader.read() == b""
            assert not server.connections
            writer.close()
            idle_writer.close()

    run(loop, main)


def test_unix_socket(loop: str, tmp_path: Any) -> None:
    async def main() -> None:
        server = HttpServer(_router())
        path = str(tmp_path / "api.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        await server.listen(sock)
        try:
            reader, writer = await asyncio.open_unix_connection(path)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            async with asyncio.timeout(5):
                raw = await reader.read()
            assert answers(raw)[0][0] == 200
            writer.close()
        finally:
            await server.close(grace=1.0)

    run(loop, main)


# -- routing, property -------------------------------------------------------------------


def test_router_segments_and_decoding() -> None:
    r = _router()
    assert r.resolve("/v1/sessions/a")[1] == {"session_id": "a"}  # type: ignore[index]
    assert r.resolve("/v1/sessions/%41%2e") [1] == {"session_id": "A."}  # type: ignore[index]
    assert r.resolve("/v1/sessions/") is None
    assert r.resolve("/v1/sessions/a/b") is None
    assert r.resolve("/v1/sessions%3AbulkSave") is not None
    assert sorted(r.resolve("/v1/sessions/x")[0]) == ["GET", "PUT"]  # type: ignore[index]


def _grouped_router(groups: list[list[str]], handled: list[str],
                    release: asyncio.Event | None = None) -> Router:
    """PUT /s/{id} with a group handler recording each group's sessions; ``x-outcome``
    picks each request's answer: ok, an error raised, left unanswered, or slow (waits
    for ``release``)."""

    async def one(request: Request) -> Response:
        handled.append(request.params["id"])
        return Response(200, f"one {request.params['id']}".encode())

    async def group(requests: list[Request], answer: srv.Answer) -> None:
        groups.append([r.params["id"] for r in requests])
        slow = []
        for i, request in enumerate(requests):
            outcome = request.headers.get("x-outcome", "ok")
            if outcome == "ok":
                answer(i, Response(200, f"group {request.params['id']}".encode()))
            elif outcome == "conflict":
                answer(i, Conflict("taken", owner="b"))
            elif outcome == "slow":
                slow.append(i)
            elif outcome == "raise":
                raise KeyError("the whole group failed")
        if slow:
            assert release is not None
            await release.wait()
            for i in slow:
                answer(i, Response(200, b"slow"))

    async def read(request: Request) -> Response:
        return Response(200, f"read {request.params['id']}".encode())

    r = Router()
    r.add("PUT", "/s/{id}", one, max_body=64, access=srv.WRITE, key="id", group=group)
    r.add("GET", "/s/{id}", read, access=srv.READ, key="id")
    return r


def _put(session: str, outcome: str = "ok") -> bytes:
    return (f"PUT /s/{session} HTTP/1.1\r\nHost: x\r\nX-Outcome: {outcome}\r\n"
            "Content-Length: 0\r\n\r\n").encode()


def test_pipelined_writes_of_other_sessions_are_taken_up_together(loop: str) -> None:
    """A route's group handler takes the writes queued one after another on a connection,
    each another session, in one call; a second write of a session, a read of one being
    written, or a request of another route ends the group. Every request gets its own
    answer, in order: an error as JSON with its status, a request the handler left
    unanswered or a handler that raised as 500."""
    groups: list[list[str]] = []
    handled: list[str] = []

    async def main() -> None:
        async with serving(_grouped_router(groups, handled)) as (_, port):
            stream = (_put("a") + _put("b") + _put("c", "conflict") + _put("a")  # a again
                      + _put("d") + b"GET /s/d HTTP/1.1\r\nHost: x\r\n\r\n"
                      + _put("e") + _put("f", "unanswered") + _put("h")
                      + b"GET /s/x HTTP/1.1\r\nHost: x\r\n\r\n"
                      + _put("g", "raise") + _put("i") + b"GET /s/y HTTP/1.1\r\nHost: x"
                      b"\r\nConnection: close\r\n\r\n")
            got = answers(await exchange(port, stream))
        bodies = [b for _, _, b in got]
        assert [(status, body) for status, _, body in got[:2]] == [
            (200, b"group a"), (200, b"group b")]
        assert got[2][0] == 409 and json.loads(got[2][2]) == {
            "error": "taken", "status": 409, "owner": "b"}
        assert bodies[3:7] == [b"group a", b"group d", b"read d", b"group e"]
        assert got[7][0] == 500 and json.loads(got[7][2])["error"] == \
            "internal error: RuntimeError"                  # left unanswered
        assert bodies[8:10] == [b"group h", b"read x"]
        for status, _, body in got[10:12]:                  # the group's handler raised
            assert status == 500 and json.loads(body)["error"] == "internal error: KeyError"
        assert bodies[12] == b"read y"
        # a b c | a d (the read of d waits) | e f h | g i
        assert groups == [["a", "b", "c"], ["a", "d"], ["e", "f", "h"], ["g", "i"]]
        assert handled == []

    run(loop, main)


def test_a_slow_write_in_a_group_holds_back_only_the_answers_after_it(loop: str) -> None:
    """Answers leave in order as each comes: those before a slow write of the group are
    sent while it still runs; a lone write goes to the route's handler, as does every
    write while a wrap (tracing) runs around each request."""
    groups: list[list[str]] = []
    handled: list[str] = []
    release = asyncio.Event()

    async def main() -> None:
        async with serving(_grouped_router(groups, handled, release)) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(_put("a") + _put("b") + _put("c", "slow") + _put("d"))
            raw = b""
            async with asyncio.timeout(5):
                while raw.count(b"HTTP/1.1 200") < 2:
                    raw += await reader.read(65536)
            assert [b for _, _, b in answers(raw)] == [b"group a", b"group b"]
            release.set()
            async with asyncio.timeout(5):
                while raw.count(b"HTTP/1.1 200") < 4:
                    raw += await reader.read(65536)
            assert [b for _, _, b in answers(raw)] == [b"group a", b"group b", b"slow",
                                                        b"group d"]
            writer.write(_put("lone"))
            async with asyncio.timeout(5):
                while raw.count(b"HTTP/1.1 200") < 5:
                    raw += await reader.read(65536)
            writer.close()
        assert groups == [["a", "b", "c", "d"]] and handled == ["lone"]

        async def wrap(request: Request, handler: Any) -> Response:
            response: Response = await handler(request)
            return response
        async with serving(_grouped_router(groups, handled), wrap=wrap) as (_, port):
            got = answers(await exchange(port, _put("p") + _put("q") + (
                b"PUT /s/r HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                b"Connection: close\r\n\r\n")))
        assert [b for _, _, b in got] == [b"one p", b"one q", b"one r"]
        assert handled == ["lone", "p", "q", "r"] and len(groups) == 1

    run(loop, main)


def test_a_group_handler_takes_writes_of_one_session_each() -> None:
    async def group(requests: list[Request], answer: srv.Answer) -> None:
        pass

    async def handler(request: Request) -> Response:
        return Response(200)
    r = Router()
    with pytest.raises(ValueError, match="group handler"):
        r.add("PUT", "/s/{id}", handler, access=srv.READ, key="id", group=group)
    with pytest.raises(ValueError, match="group handler"):
        r.add("PUT", "/s", handler, access=srv.WRITE, group=group)


def test_pipelined_requests_run_beside_each_other_unless_they_conflict(loop: str) -> None:
    """Writes beside writes; a read beside what touches other sessions; a read after a
    write of its session waits for it, a write after a read of its session too; an
    ``alone`` request after everything. Answers in order whatever finishes first."""
    events: list[str] = []

    def handler(kind: str) -> Any:
        async def handle(request: Request) -> Response:
            name = f"{kind} {request.params['id']}"
            events.append(f"start {name}")
            await asyncio.sleep(float(request.headers.get("x-take", "0")))
            events.append(f"end {name}")
            return Response(200, name.encode())
        return handle

    async def alone(request: Request) -> Response:
        events.append("start alone")
        return Response(200, b"alone")

    r = Router()
    r.add("PUT", "/s/{id}", handler("write"), max_body=64, access=srv.WRITE, key="id")
    r.add("GET", "/s/{id}", handler("read"), access=srv.READ, key="id")
    r.add("GET", "/alone", alone)

    def req(method: str, path: str, take: float = 0.0) -> bytes:
        return (f"{method} {path} HTTP/1.1\r\nHost: x\r\nX-Take: {take}\r\n"
                f"Content-Length: 0\r\n\r\n").encode()

    async def main() -> None:
        async with serving(r) as (_, port):
            stream = (req("PUT", "/s/a", 0.3) + req("PUT", "/s/b", 0.1)  # side by side
                      + req("GET", "/s/c")                               # other session
                      + req("GET", "/s/a")                               # waits for PUT a
                      + req("PUT", "/s/c", 0.05)                         # in line after it
                      + req("GET", "/alone") + req("GET", "/s/d")
                      + b"GET /s/e HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            got = answers(await exchange(port, stream))
        assert [b for _, _, b in got] == [b"write a", b"write b", b"read c", b"read a",
                                          b"write c", b"alone", b"read d", b"read e"]
        order = events.index
        assert order("start write b") < order("end write a")      # writes side by side
        assert order("start read c") < order("end write a")       # another session's read
        assert order("start read a") > order("end write a")       # its session's write first
        assert order("start write c") > order("start read a")     # in order behind it
        assert order("start alone") > order("end write c")        # after everything
        assert order("start read d") > order("start alone")

    run(loop, main)
