"""The sidecar's HTTP/1.1 server: its API's cost per request is the application's cost
per session write, so it is lean.

Why not aiohttp's server, which the other meshxl servers run on: on the same machine,
aiohttp's request handling took 113-132 us of CPU per request, a handler doing nothing;
this server, on llhttp (through ``httptools``) and uvloop, 17-25 us (docs/performance.md,
"The sidecar's HTTP server"). It serves one small JSON API on loopback, so it does what
that needs and refuses the rest clearly:

* HTTP/1.1 and 1.0; keep-alive (HTTP/1.1's default); pipelined requests answered in
  order (reading pauses while :data:`MAX_QUEUED` wait, or :data:`MAX_PIPELINED` are
  taken up). A request starts as soon as none of those before it on its connection
  that still run conflicts with it (:attr:`Route.access`): writes run beside writes
  (the session layer orders a session's writes by its lock, taken in the order they
  came), a read waits for the requests before it that touch its session, a write for
  the reads before it that do, and an ``alone`` request for everything. A route with a
  group handler (:attr:`Route.group`) takes the requests queued one after another for
  it, each of another session, in one call, each still answered on its own. Answers
  ready in the same turn of the event loop leave in one write;
* bodies by ``Content-Length`` or chunked, buffered whole, at most the route's
  ``max_body``: a larger one is read to its end and discarded (so the client, which
  may send it all before reading, gets the answer) and refused with 413, without
  being kept; ``Expect: 100-continue`` is answered ``100 Continue``, or at once with
  the refusal;
* request heads bounded: a request line or header field of at most
  :data:`MAX_FIELD_SIZE` bytes (414, 431), at most :data:`MAX_HEADERS` fields (431);
* timeouts: a complete head within ``header_timeout`` seconds of the connection's last
  answer (idle connections close then), a body within ``body_timeout`` (408);
* every error answer is JSON, ``{"error": ..., "status": ...}`` (:mod:`meshxl.web`'s
  shape and its :func:`~meshxl.web.http_status` mapping): the parser's 400, 404 with
  the path, 405 with the allowed methods, a handler's :class:`~meshxl.errors.MeshxlError`
  or :class:`Refused`, and anything unexpected as a 500 (its traceback to the log only).

Handlers are ``async def handler(request: Request) -> Response``; a group handler,
``async def group(requests, answer)``, calls ``answer(index, response_or_error)`` once
for each. A request whose client went away still runs to its end (a write in flight to
etcd is not cut in half); its answer is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

import httptools

from meshxl.errors import InputError, MeshxlError, detached
from meshxl.headers import lower_name
from meshxl.web import BODY_TIMEOUT, HEADER_TIMEOUT, MAX_FIELD_SIZE, MAX_HEADERS, http_status

log = logging.getLogger(__name__)

__all__ = ["ALONE", "READ", "WRITE", "HttpServer", "Refused", "Request", "Response", "Route",
           "Router", "error", "json_response"]

MAX_QUEUED = 8
"""Pipelined requests waiting (not taken up) on one connection before it stops reading."""
MAX_PIPELINED = 64
"""Pipelined requests taken up and not answered on one connection before it stops
reading."""
DISCARD_LIMIT = 16 * 1024 * 1024
"""Bytes of a refused body read and dropped before the connection is closed instead."""
LINGER = 2.0
"""Seconds a connection closed under a request body still reads (and drops) it, so the
client gets the answer rather than a reset."""
IGNORED_BODY = 0
"""``max_body`` of a route that reads no body: whatever is sent is dropped."""
READ, WRITE, ALONE = "read", "write", "alone"
"""A route's :attr:`Route.access`."""
JSON = "application/json"

Handler = Callable[["Request"], Awaitable["Response"]]
Answer = Callable[[int, "Response | Exception"], None]
"""``answer(index, outcome)``: the answer to a group's request ``index``, a response or
the error its handler would have raised."""
GroupHandler = Callable[[list["Request"], Answer], Awaitable[None]]
"""Takes up several requests of one route together and answers each through ``answer``
(in any order, each once) before it returns."""
Authorize = Callable[["Request"], "Response | None"]
"""Called with a request's head (no body yet): a refusal, or None to go on."""
Wrap = Callable[["Request", Handler], Awaitable["Response"]]
"""Runs the handler for a request (tracing: a span around it)."""

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


class Refused(InputError):
    """A request refused with a status the error family does not name (415, 418...):
    ``status`` with a JSON error body and ``headers``."""

    def __init__(self, status: int, message: str, headers: Sequence[tuple[str, str]] = (),
                 **details: Any):
        super().__init__(message, **details)
        self.status, self.headers = status, list(headers)


class _Stop(Exception):
    """Raised in a parser callback, which stops httptools: answer ``response``, close."""

    def __init__(self, response: Response):
        super().__init__(response.status)
        self.response = response


# -- requests and responses ---------------------------------------------------------------


class Request:
    """One request: ``headers`` by lower-case name (repeated fields joined with
    ``", "``), ``params`` the route's path parameters (percent-decoded)."""

    __slots__ = ("body", "headers", "keep_alive", "method", "params", "path", "query",
                 "refusal", "route", "session", "version")

    def __init__(self, method: str, path: str, query: str, version: str,
                 headers: dict[str, str], keep_alive: bool):
        self.method = method
        self.path = path
        self.query = query
        self.version = version
        self.headers = headers
        self.keep_alive = keep_alive
        self.body = b""
        self.params: dict[str, str] = {}
        self.route: Route | None = None
        self.refusal: Response | None = None
        """Decided from the head (401, 404, 405, 413...): answered instead of the route."""
        self.session: str | None = None
        """The one session it touches (the route's ``key`` parameter), None: any."""

    @property
    def content_type(self) -> str:
        """The media type without parameters, lower case ("" without one)."""
        value = self.headers.get("content-type")
        return value.split(";", 1)[0].strip().lower() if value else ""

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.path[:80]}>"


class Response:
    """An answer: status, body, headers (``Content-Length`` and ``Date`` are added)."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int = 200, body: bytes = b"",
                 headers: list[tuple[str, str]] | None = None):
        self.status = status
        self.body = body
        self.headers = headers if headers is not None else []

    def header(self, name: str) -> str | None:
        lower = name.lower()
        return next((v for n, v in self.headers if n.lower() == lower), None)


def json_response(data: Any, status: int = 200,
                  headers: Iterable[tuple[str, str]] = ()) -> Response:
    body = json.dumps(data, default=str).encode()
    return Response(status, body, [("Content-Type", JSON), *headers])


def error(status: int, message: str, headers: Iterable[tuple[str, str]] = (),
          **details: Any) -> Response:
    """The JSON error answer every meshxl server gives: ``{"error", "status", ...}``."""
    return json_response({"error": message, "status": status, **details}, status, headers)


# -- routing -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    pattern: str
    """``/v1/sessions/{session_id}``: a ``{name}`` is one path segment."""
    handler: Handler
    max_body: int = IGNORED_BODY
    """Bytes of body the handler takes (413 beyond); 0: any body is dropped."""
    what: str = "request body"
    """Named in the 413's message."""
    access: str = ALONE
    """Beside which requests pipelined before it on its connection it may run:
    ``write``: beside any write (its handler keeps writes in the order they came: a
    session's lock, taken before it first waits) and beside reads of other sessions;
    ``read``: beside anything touching other sessions; ``alone``: after all of them."""
    key: str | None = None
    """The path parameter naming the one session it touches; None: it may touch any."""
    group: GroupHandler | None = None
    """Takes up, in one call, requests of this route pipelined one after the other on a
    connection, each touching another session (a ``write`` route with a ``key``):
    what a request costs besides its HTTP is then shared (no task each). Not while
    ``wrap`` is set: each request then runs inside its own wrap (its span)."""


class Router:
    """Exact paths in a dict, patterns by segment count; a ``{name}`` segment matches
    one non-empty path segment, percent-decoded (``a%2Fb`` is the segment ``a/b``)."""

    def __init__(self) -> None:
        self._exact: dict[str, dict[str, Route]] = {}
        self._patterns: dict[int, list[tuple[list[str | None], list[str], dict[str, Route]]]] = {}
        self._routes: list[Route] = []

    def add(self, method: str, pattern: str, handler: Handler, *,
            max_body: int = IGNORED_BODY, what: str = "request body",
            access: str = ALONE, key: str | None = None,
            group: GroupHandler | None = None) -> None:
        if access not in (READ, WRITE, ALONE):
            raise ValueError(f"access is {READ!r}, {WRITE!r} or {ALONE!r}, not {access!r}")
        if group is not None and (access != WRITE or key is None):
            raise ValueError("a group handler takes writes of one session each "
                             "(access write, with a key)")
        route = Route(method, pattern, handler, max_body, what, access, key, group)
        self._routes.append(route)
        segments = pattern.split("/")
        if not any(s.startswith("{") for s in segments):
            self._exact.setdefault(pattern, {})[method] = route
            return
        literals: list[str | None] = [None if s.startswith("{") else s for s in segments]
        names = [s[1:-1] for s in segments if s.startswith("{")]
        for known, known_names, methods in self._patterns.get(len(segments), []):
            if known == literals and known_names == names:
                methods[method] = route
                return
        self._patterns.setdefault(len(segments), []).append((literals, names, {method: route}))

    def routes(self) -> list[Route]:
        return list(self._routes)

    def resolve(self, path: str) -> tuple[dict[str, Route], dict[str, str]] | None:
        """The methods served at ``path`` (raw, as sent) and its parameters, or None."""
        plain = "%" not in path
        methods = self._exact.get(path if plain else unquote(path, errors="replace"))
        if methods is not None:
            return methods, {}
        segments = path.split("/")
        for literals, names, methods in self._patterns.get(len(segments), ()):
            values: list[str] = []
            for literal, segment in zip(literals, segments, strict=True):
                if not plain and "%" in segment:
                    segment = unquote(segment, errors="replace")
                if literal is None:
                    if not segment:
                        break
                    values.append(segment)
                elif literal != segment:
                    break
            else:
                return methods, dict(zip(names, values, strict=True))
        return None


# -- the server ----------------------------------------------------------------------------


class HttpServer:
    """Serves ``router`` on the sockets given to :meth:`listen`."""

    def __init__(self, router: Router, *, authorize: Authorize | None = None,
                 wrap: Wrap | None = None, header_timeout: float = HEADER_TIMEOUT,
                 body_timeout: float = BODY_TIMEOUT):
        self.router = router
        self.authorize = authorize
        self.wrap = wrap
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.connections: set[_Connection] = set()
        self.closing = False
        self.drained = asyncio.Event()
        """Set when the server is closing and its last connection has closed."""
        self.date = b""
        self._servers: list[asyncio.AbstractServer] = []
        self._sweeper: asyncio.Task[None] | None = None
        self._stamp()

    async def listen(self, sock: socket.socket) -> None:
        """Serve on a bound, listening-ready socket (TCP or Unix)."""
        loop = asyncio.get_running_loop()
        self._servers.append(await loop.create_server(lambda: _Connection(self), sock=sock))
        if self._sweeper is None:
            self._sweeper = loop.create_task(self._sweep())

    async def close(self, grace: float = 5.0) -> None:
        """Stop accepting, close idle connections, let answers under way finish (at
        most ``grace`` seconds), then drop what is left."""
        self.closing = True
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            conn.shutdown()
        if self.connections:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self.drained.wait()
        for conn in list(self.connections):
            conn.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()

    def _stamp(self) -> None:
        self.date = formatdate(usegmt=True).encode()

    async def _sweep(self) -> None:
        """Once a second: the Date header, and connections past their deadline (one
        pass over them all costs less than a timer armed and cancelled per request)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(1.0)
            self._stamp()
            now = loop.time()
            for conn in list(self.connections):
                if conn.deadline and now >= conn.deadline:
                    conn.expire()

    async def call(self, request: Request) -> Response:
        """The route's answer (inside ``wrap``, which sees the final answer)."""
        if self.wrap is not None:
            return await self.wrap(request, _answer)
        return await _answer(request)


async def _answer(request: Request) -> Response:
    """The route handler's answer, its errors mapped to JSON answers."""
    assert request.route is not None
    try:
        return await request.route.handler(request)
    except Exception as exc:
        return _failure(request, exc)


def _failure(request: Request, exc: Exception) -> Response:
    """The JSON answer to a handler's error (logged with its traceback if unexpected)."""
    try:
        if isinstance(exc, Refused):
            return error(exc.status, str(exc), exc.headers, **exc.details)
        if isinstance(exc, MeshxlError):
            return error(http_status(exc), str(exc), **exc.details)
        log.error("%s %s failed", request.method, request.path[:200], exc_info=exc)
        return error(500, f"internal error: {type(exc).__name__}", path=request.path)
    finally:  # answered: the frames it passed through (and their data) go now
        detached(exc)


_IDLE, _HEAD, _BODY, _DONE = range(4)


def _conflict(new: Request, running: Request) -> bool:
    """Whether ``new`` must wait for ``running``, pipelined before it on its connection."""
    a, b = new.route, running.route
    assert a is not None and b is not None
    if a.access == ALONE or b.access == ALONE:
        return True
    if a.access == WRITE and b.access == WRITE:
        return False  # ordered by the sessions' locks
    return new.session is None or running.session is None or new.session == running.session


class _Slot:
    """A request taken up, in arrival order: its answer, once there is one (a request
    refused from its head has its answer at once; ``request`` None: the answer to bytes
    that could not be parsed, the connection's last)."""

    __slots__ = ("request", "response")

    def __init__(self, request: Request | None, response: Response | None):
        self.request = request
        self.response = response


class _Connection(asyncio.Protocol):
    """One client connection: parse, queue, answer in order."""

    def __init__(self, server: HttpServer):
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[Request | Response] = deque()
        """Complete requests not taken up yet, in arrival order; last, the answer to one
        that could not be parsed (then the connection closes)."""
        self.slots: deque[_Slot] = deque()
        """Requests taken up and not answered yet, in arrival order."""
        self.active: list[Request] = []
        """Requests whose handlers run."""
        self.others = 0
        """Of them, those that are not writes (a write never waits for a write)."""
        self.flush_soon = False
        self.paused_reading = False
        self.paused_writing = False
        self.closing = False
        """Close after the answers queued so far (an error, a shutdown, Connection: close)."""
        self.lingering = False
        self.deadline = 0.0
        self.state = _IDLE
        # The message being parsed.
        self._url: list[bytes] = []
        self._url_size = 0
        self._headers: dict[str, str] = {}
        self._header_count = 0
        self._head_bytes = 0
        self._request: Request | None = None
        self._body: list[bytes] = []
        self._body_size = 0
        self._limit = 0

    # -- transport events -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's: not a subclass
        self.server.connections.add(self)
        self.deadline = self.loop.time() + self.server.header_timeout
        if self.server.closing:
            self.shutdown()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        if self.server.closing and not self.server.connections:
            self.server.drained.set()
        self.transport = None
        self.queue.clear()

    def pause_writing(self) -> None:
        self.paused_writing = True

    def resume_writing(self) -> None:
        self.paused_writing = False
        self._next()

    def data_received(self, data: bytes) -> None:
        if self.lingering or self.closing and not self.slots and not self.queue:
            return  # closing: what still arrives is dropped
        if self.state == _HEAD:  # a head arriving in pieces (its first piece is bounded
            self._head_bytes += len(data)  # by the transport's read size)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # Upgrade and CONNECT are not served: answer what completed, then close.
            if self.state != _IDLE:
                self._fail(error(400, "protocol upgrades and CONNECT are not supported"))
            else:
                self.closing = True
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Stop):
                self._fail(cause.response)
            else:
                log.error("HTTP parser callback failed", exc_info=cause or exc)
                self._fail(error(500, "internal error parsing the request"))
        except httptools.HttpParserError as exc:
            self._fail(error(400, f"bad HTTP request: {exc}"))
        else:
            if self.state == _HEAD and self._head_bytes > MAX_HEADERS * MAX_FIELD_SIZE:
                self._fail(error(431, "request head too large"))
        self._next()

    def eof_received(self) -> bool | None:
        if self.slots or self.queue:
            self.closing = True  # answer what came (half-closed clients read it)
            return True
        return None

    # -- parser callbacks (httptools) -------------------------------------------------------

    def on_message_begin(self) -> None:
        self.state = _HEAD
        self._url = []
        self._url_size = 0
        self._headers = {}
        self._header_count = 0
        self._body = []
        self._body_size = 0
        self._head_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url_size += len(url)
        if self._url_size > MAX_FIELD_SIZE:
            raise _Stop(error(414, f"request target longer than {MAX_FIELD_SIZE} bytes"))
        self._url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > MAX_HEADERS or len(name) + len(value) > MAX_FIELD_SIZE:
            self._too_large(name)
        key = lower_name(name)
        headers = self._headers
        text = value.decode("latin-1")
        if key in headers:
            text = f"{headers[key]}, {text}"
        headers[key] = text

    def _too_large(self, name: bytes) -> None:
        if self._header_count > MAX_HEADERS:
            raise _Stop(error(431, f"more than {MAX_HEADERS} header fields"))
        raise _Stop(error(431, f"header field {name[:60].decode('latin-1')!r} longer "
                               f"than {MAX_FIELD_SIZE} bytes"))

    def on_headers_complete(self) -> None:
        self.state = _BODY
        self.deadline = self.loop.time() + self.server.body_timeout
        parser = self.parser
        url = self._url[0] if len(self._url) == 1 else b"".join(self._url)
        path, _, query = url.decode("latin-1").partition("?")
        path = path.partition("#")[0]
        request = Request(parser.get_method().decode("latin-1"), path, query,
                          parser.get_http_version(), self._headers,
                          parser.should_keep_alive())
        self._request = request
        self._limit = 0
        expects = self._headers.get("expect", "").lower() == "100-continue"
        request.refusal = self._admit(request)
        if request.refusal is not None:
            if expects:  # the client waits before sending the body: answer now
                raise _Stop(request.refusal)
        elif expects and not self.slots and not self.queue and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        request = self._request
        assert request is not None
        if request.refusal is not None or self._limit == IGNORED_BODY:
            if self._body_size > DISCARD_LIMIT:  # too much to read and drop: hang up
                raise _Stop(request.refusal or error(413, "request body too large"))
            return
        if self._body_size > self._limit:
            assert request.route is not None
            self._body = []
            request.refusal = error(413, f"{request.route.what} is more than {self._limit} "
                                         f"bytes; the limit is {self._limit}",
                                    limit=self._limit)
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        self.state = _DONE
        self.deadline = 0.0
        request = self._request
        assert request is not None
        if self._body and request.refusal is None:
            request.body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        self.queue.append(request)
        if not request.keep_alive:  # its answer is the last: nothing after it is read
            self.closing = True
            if self.transport is not None and not self.paused_reading:
                self.paused_reading = True
                self.transport.pause_reading()
        self._request = None
        self._body = []
        self.state = _IDLE
        if (len(self.queue) >= MAX_QUEUED or len(self.slots) >= MAX_PIPELINED) \
                and not self.paused_reading and self.transport:
            self.paused_reading = True
            self.transport.pause_reading()

    # -- admission: what is known from the head ---------------------------------------------

    def _admit(self, request: Request) -> Response | None:
        """A refusal decided from the head (token, route, method, declared size), or
        None: the request goes on, its body bounded by the route's ``max_body``."""
        server = self.server
        if server.authorize is not None:
            refusal = server.authorize(request)
            if refusal is not None:
                return refusal
        found = server.router.resolve(request.path)
        if found is None:
            return error(404, "Not Found", path=request.path)
        methods, params = found
        route = methods.get(request.method)
        if route is None:
            allowed = sorted(methods)
            return error(405, "Method Not Allowed", [("Allow", ",".join(allowed))],
                         path=request.path, allowed=allowed)
        request.route = route
        request.params = params
        if route.key is not None:
            request.session = params.get(route.key)
        self._limit = route.max_body
        length = request.headers.get("content-length")
        if route.max_body and length is not None and length.isdigit() and \
                int(length) > route.max_body:
            return error(413, f"{route.what} is {int(length)} bytes; the limit is "
                              f"{route.max_body}", limit=route.max_body)
        return None

    # -- answering ----------------------------------------------------------------------------

    def _next(self) -> None:
        """Take up queued requests in order, each as soon as none of those still running
        conflicts with it (the module docstring, :attr:`Route.access`)."""
        queue, slots = self.queue, self.slots
        while queue and not self.paused_writing:
            item = queue[0]
            if isinstance(item, Response):  # bytes that could not be parsed: the end
                queue.popleft()
                slots.append(_Slot(None, item))
                continue
            if item.refusal is not None:
                queue.popleft()
                slots.append(_Slot(item, item.refusal))
                continue
            assert item.route is not None
            write = item.route.access == WRITE
            if self.active and (self.others or not write) and any(
                    _conflict(item, other) for other in self.active):
                break
            queue.popleft()
            slot = _Slot(item, None)
            slots.append(slot)
            self.active.append(item)
            if not write:
                self.others += 1
            if item.route.group is not None and queue and self.server.wrap is None:
                requests, group = self._group(item, slot)
                if len(group) > 1:
                    self.loop.create_task(self._handle_group(requests, group))
                    continue
            self.loop.create_task(self._handle(slot))
        if slots and slots[0].response is not None and not self.flush_soon:
            self._flush()
        if self.paused_reading and not self.closing and self.transport \
                and len(queue) < MAX_QUEUED // 2 and len(slots) < MAX_PIPELINED // 2:
            self.paused_reading = False
            self.transport.resume_reading()
        if not slots and not queue:
            if self.closing:
                self._close()
            elif self.state == _IDLE and not self.deadline:
                self.deadline = self.loop.time() + self.server.header_timeout
                self._head_bytes = 0

    def _group(self, first: Request, slot: _Slot) -> tuple[list[Request], list[_Slot]]:
        """``first`` (taken up in ``slot``) and the requests queued right behind it that
        its route's group handler takes with it: the same route, each another session,
        none refused from its head or waiting for a request under way (taken up here)."""
        queue, slots, active = self.queue, self.slots, self.active
        requests, group = [first], [slot]
        sessions = {first.session}
        while queue:
            item = queue[0]
            if not isinstance(item, Request) or item.refusal is not None \
                    or item.route is not first.route or item.session in sessions:
                break
            if self.others and any(_conflict(item, other) for other in active):
                break  # a read of its session under way: it waits, and what follows it
            queue.popleft()
            sessions.add(item.session)
            taken = _Slot(item, None)
            slots.append(taken)
            active.append(item)
            requests.append(item)
            group.append(taken)
        return requests, group

    async def _handle(self, slot: _Slot) -> None:
        request = slot.request
        assert request is not None and request.route is not None
        if self.server.wrap is not None:
            response = await self.server.call(request)
        else:  # the route's handler at once: _answer's work, a coroutine fewer per request
            try:
                response = await request.route.handler(request)
            except Exception as exc:
                response = _failure(request, exc)
        slot.response = response
        self._answered(request)

    async def _handle_group(self, requests: list[Request], group: list[_Slot]) -> None:
        """Requests taken up together (:attr:`Route.group`), ``group`` their slots,
        each answered when its own answer comes: a slow one holds back only the
        answers after it."""
        route = requests[0].route
        assert route is not None and route.group is not None

        def answer(index: int, outcome: Response | Exception) -> None:
            slot = group[index]
            if slot.response is not None:
                return  # answered already
            request = requests[index]
            slot.response = outcome if isinstance(outcome, Response) \
                else _failure(request, outcome)
            self._answered(request)

        try:
            await route.group(requests, answer)
            missing: Exception = RuntimeError("the group handler left a request unanswered")
        except Exception as exc:
            missing = exc
        for index, slot in enumerate(group):
            if slot.response is None:
                answer(index, missing)

    def _answered(self, request: Request) -> None:
        """A request's answer is in its slot: send what is ready in order, and take up
        what waited for it."""
        self.active.remove(request)
        assert request.route is not None
        if request.route.access != WRITE:
            self.others -= 1
        if self.transport is None:
            return
        if len(self.slots) == 1:  # nothing else under way: answer now
            self._next()
        elif not self.flush_soon:
            # Others finish in this turn too (a batch of writes answered by one etcd
            # transaction): their answers leave together, in one write.
            self.flush_soon = True
            self.loop.call_soon(self._flush_then_next)

    def _flush_then_next(self) -> None:
        self.flush_soon = False
        if self.transport is not None:
            self._next()

    def _flush(self) -> None:
        """Write the answers ready at the head of the line, in one write."""
        slots = self.slots
        out = []
        while slots and slots[0].response is not None:
            slot = slots.popleft()
            request = slot.request
            last = self.closing and not slots and not self.queue
            assert slot.response is not None
            if request is None:
                out.append(self._encode(slot.response, keep_alive=False))
            else:
                out.append(self._encode(slot.response, keep_alive=not last,
                                        head_only=request.method == "HEAD",
                                        http10=request.version == "1.0"))
        if out and self.transport is not None:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def _encode(self, response: Response, *, keep_alive: bool, head_only: bool = False,
                http10: bool = False) -> bytes:
        status = response.status
        body = response.body
        try:
            head = _head(response, self.server.date, keep_alive, http10)
        except ValueError as exc:  # a header that cannot be sent: never a broken answer
            log.error("answer %d not sent as it was: %s", status, exc)
            status, body = 500, b'{"error":"internal error: invalid response header",' \
                                b'"status":500}'
            head = _head(Response(500, body, [("Content-Type", JSON)]), self.server.date,
                         keep_alive, http10)
        if not keep_alive:
            self.closing = True
        return head + body if body and not head_only else head

    def _fail(self, response: Response) -> None:
        """A request that cannot be parsed or read on: answer it after those before it,
        then close; nothing more is parsed."""
        self.closing = True
        self.queue.append(response)
        if self.transport is not None and not self.paused_reading:
            self.paused_reading = True
            self.transport.pause_reading()

    def _close(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.state in (_HEAD, _BODY) and transport.can_write_eof():
            # The client is still sending: half-close, and read (dropping it) a while,
            # so it reads the answer instead of a reset.
            self.lingering = True
            self.deadline = self.loop.time() + LINGER
            if self.paused_reading:
                self.paused_reading = False
                transport.resume_reading()
            transport.write_eof()
            return
        transport.close()

    # -- the server's sweeper and shutdown ----------------------------------------------------

    def expire(self) -> None:
        """Past the deadline: an idle connection or a slow head closes; a slow body is
        answered 408 (then closed)."""
        transport = self.transport
        self.deadline = 0.0
        if transport is None:
            return
        if self.lingering or self.state != _BODY or self.slots or self.queue:
            transport.close()
            return
        self.closing = True
        self.state = _IDLE
        transport.write(self._encode(error(408, f"request body did not arrive within "
                                                f"{self.server.body_timeout:g} s"),
                                     keep_alive=False))
        transport.close()

    def shutdown(self) -> None:
        self.closing = True
        if not self.slots and not self.queue:
            self._close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


_SENDABLE_NAMES: set[str] = set()
"""Header names already checked (the few the API sends, checked once each)."""


def _head(response: Response, date: bytes, keep_alive: bool, http10: bool) -> bytes:
    """The status line and header block, checked: a value with a line break (or any
    other control character) would split the answer."""
    status = response.status
    lines = []
    for name, value in response.headers:
        if name not in _SENDABLE_NAMES:
            if not _TOKEN.match(name):
                raise ValueError(f"header name {name[:60]!r} cannot be sent")
            if len(_SENDABLE_NAMES) < 256:
                _SENDABLE_NAMES.add(name)
        if not value.isprintable():
            raise ValueError(f"header {name[:60]!r} has a value that cannot be sent")
        lines.append(f"{name}: {value}\r\n")
    if status != 204 and not 100 <= status < 200:
        lines.append(f"Content-Length: {len(response.body)}\r\n")
    if not keep_alive:
        lines.append("Connection: close\r\n")
    elif http10:
        lines.append("Connection: keep-alive\r\n")
    return (b"HTTP/1.1 %d %s\r\nDate: %s\r\n" % (status, _REASONS.get(status, b"Unknown"), date)
            + "".join(lines).encode("latin-1") + b"\r\n")
