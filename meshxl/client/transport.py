"""The async client's HTTP/1.1 transport: a pool of kept-alive connections to one origin,
the sidecar, over TCP or a Unix socket.

Why not aiohttp's client: the sidecar is on loopback, so the client's CPU per request is
what limits an application's write rate, and aiohttp's client spends several times this
one's (measured in ``docs/statesync.md``, "Transport"). This is only what the session
API uses: requests pipelined, up to ``settings.pipeline`` on a connection, those made in
one turn of the event loop written together; answers parsed by httptools (llhttp) as
they arrive, in order: ``Content-Length``, chunked and read-until-close bodies. No
redirects, cookies, proxies, compression or streaming. Works on asyncio's default loop
and on uvloop, and starts no task.

What a request can end with (:mod:`meshxl.client.plans`): an :class:`Answer`, or
:class:`Unanswered` with ``sent=False`` when it never left (connect refused or timed
out, no connection free in time, its connection lost before it was written) and
``sent=True`` once it was written (the sidecar may have applied it). A connection whose
answers fall out of step (a request on it timed out, an answer broke the framing) is
dropped with everything still on it: ``sent=True`` for those written.
"""

from __future__ import annotations

import asyncio
import select
import ssl
from collections import deque
from collections.abc import Mapping
from typing import cast

import httptools

from meshxl.headers import lower_name

from .errors import BadRequest, describe
from .plans import Answer, Unanswered
from .settings import ClientSettings

__all__ = ["MAX_ANSWER", "MAX_HEAD", "Pool"]

MAX_ANSWER = 64 * 1024 * 1024
"""Bytes of an answer's body at most: a broken peer cannot exhaust the memory."""
MAX_HEAD = 64 * 1024
"""Bytes of an answer's status line and headers at most."""

_NO_BODY = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
"""Methods sent without ``Content-Length`` when they carry no body (RFC 9110 8.6)."""
_FRAMING = frozenset({"host", "content-length", "transfer-encoding", "connection"})
"""Headers the transport writes itself: a caller's would break the framing."""
_RESET = (ConnectionResetError, BrokenPipeError)
_SLOT, _TIMEOUT, _CLOSED = object(), object(), object()
"""What a request waiting for a connection is woken with, besides a connection."""


class _Exchange:
    """One request on a connection and the future of its answer."""

    __slots__ = ("deadline", "first", "future", "head_only", "written")

    def __init__(self, future: asyncio.Future[Answer | Unanswered], deadline: float,
                 head_only: bool, first: bool):
        self.future = future
        self.deadline = deadline
        self.head_only = head_only
        self.first = first
        """The only request on a reused connection (the keep-alive race may be retried)."""
        self.written = False

    def resolve(self, outcome: Answer | Unanswered) -> None:
        if not self.future.done():
            self.future.set_result(outcome)


class _Connection(asyncio.Protocol):
    """One connection: requests in flight in order, answers parsed as they arrive and
    matched to them first in, first out.

    The pool hands it to requests while it has room (``settings.pipeline``) and keeps it
    idle when nothing is on it."""

    __slots__ = ("_body", "_error", "_flush_soon", "_headers", "_headers_done", "_loop",
                 "_out", "_parser", "_poll", "_pool", "_received", "_size", "_skip",
                 "_transport", "closed", "connecting", "exchanges", "idle", "idle_since", "keep",
                 "reused", "unread")

    def __init__(self, pool: Pool, loop: asyncio.AbstractEventLoop) -> None:
        self._pool = pool
        self._loop = loop
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._poll: select.poll | None = None
        self.closed = False
        self.connecting = False
        """Being connected: requests queue on it and leave once it is up."""
        self.idle = False
        self.idle_since = 0.0
        self.reused = False
        self.keep = True
        """The answers so far left the connection reusable (HTTP/1.1, no ``Connection:
        close``, nothing out of step)."""
        self.unread = False
        """The peer reset the connection before one byte of an answer."""
        self.exchanges: deque[_Exchange] = deque()
        self._out: list[bytes] = []
        self._flush_soon = False
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._size = 0
        self._received = False
        """Bytes of the oldest request's answer came."""
        self._headers_done = False
        self._skip = False
        self._error = ""

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        # A zero-timeout poll before reuse finds a close the loop has not delivered yet
        # (not over TLS, whose own records may be readable on an idle connection).
        if sock is not None and self._pool.tls is None and hasattr(select, "poll"):
            self._poll = select.poll()
            self._poll.register(sock.fileno(), select.POLLIN)
        if self._out and not self._flush_soon:  # requests made while it was connecting
            self._flush_soon = True
            self._loop.call_soon(self._flush)

    def data_received(self, data: bytes) -> None:
        if not self.exchanges:
            self._abort()  # bytes nobody asked for: the peer is out of step
            return
        self._received = True
        try:
            if self._headers_done:
                self._parser.feed_data(data)
            elif self._size + len(data) <= MAX_HEAD:
                self._size += len(data)
                self._parser.feed_data(data)
            else:  # feed the head's allowance only: the rest must be body
                cut, self._size = MAX_HEAD - self._size, MAX_HEAD
                self._parser.feed_data(data[:cut])
                if not self._headers_done:
                    self._error = f"the answer's head is larger than {MAX_HEAD} bytes"
                    raise ValueError(self._error)
                self._parser.feed_data(data[cut:])
        except (httptools.HttpParserError, httptools.HttpParserUpgrade, ValueError) as exc:
            self.fail(self._error or describe(exc))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.keep = False
        if self.exchanges:
            head = self.exchanges[0]
            if self._headers_done and not self._framed():  # the body ends at the close
                self.exchanges.popleft()
                head.resolve(Answer(self._parser.get_status_code(), self._headers,
                                    b"".join(self._body)))
            else:
                self.unread = not self._received and isinstance(exc, _RESET)
            reason = describe(exc) if exc is not None else (
                "the sidecar closed the connection before its answer was complete"
                if self._received else "the sidecar closed the connection without answering")
            self._fail_all(reason)
        self._pool._lost(self)

    # -- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._headers, self._body, self._size = {}, [], 0
        self._headers_done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[lower_name(name)] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._headers_done = True
        self._size = 0
        head = self.exchanges[0]
        if head.head_only and self._parser.get_status_code() >= 200:
            # An answer to HEAD has no body whatever its Content-Length says; the parser
            # cannot be told so, so the connection is not reused after it (a HEAD goes
            # alone on its connection).
            self.keep = False
            self._skip = True
            self.exchanges.popleft()
            head.resolve(Answer(self._parser.get_status_code(), self._headers, b""))
            self._pool._answered(self)

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > MAX_ANSWER:
            self._error = f"the answer is larger than {MAX_ANSWER} bytes"
            raise ValueError(self._error)
        self._body.append(body)

    def on_message_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:  # interim (100 Continue, 103 Early Hints): the answer follows
            self._headers, self._headers_done, self._size = {}, False, 0
            return
        if self._skip:  # the end of a HEAD answer, already given
            self._skip = False
            return
        if not self.exchanges:
            self.fail("the sidecar sent an answer nobody asked for")
            return
        if not (self._parser.should_keep_alive() and
                self._parser.get_http_version() == "1.1"):
            self.keep = False
        head = self.exchanges.popleft()
        head.resolve(Answer(status, self._headers, b"".join(self._body)))
        self._headers_done = self._received = False
        self._pool._answered(self)

    # -- the request path -------------------------------------------------------------------

    def send(self, data: bytes, deadline: float,
             head_only: bool) -> asyncio.Future[Answer | Unanswered]:
        """Queue one request; it is written with the others made in this turn of the
        event loop. The future gets its answer, or why there is none (the pool's clock
        fails the connection when its oldest request passes ``deadline``)."""
        future: asyncio.Future[Answer | Unanswered] = self._loop.create_future()
        self.exchanges.append(_Exchange(future, deadline, head_only,
                                        self.reused and not self.exchanges))
        self._out.append(data)
        if not self._flush_soon:
            self._flush_soon = True
            self._loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._flush_soon = False
        if self.closed or self._transport is None or not self._out:
            return  # not connected yet: connection_made writes them
        out, self._out = self._out, []
        for exchange in self.exchanges:
            exchange.written = True
        self._transport.write(out[0] if len(out) == 1 else b"".join(out))

    def has_room(self) -> bool:
        return (not self.closed and self.keep and len(self.exchanges) < self._pool.depth
                and not (self.exchanges and self.exchanges[-1].head_only))

    def usable(self, horizon: float) -> bool:
        """Idle since after ``horizon``, and nothing (a close) waiting to be read."""
        return not self.closed and self.idle_since > horizon and not (
            self._poll is not None and self._poll.poll(0))

    def _framed(self) -> bool:
        """The answer says where its body ends (else it ends when the peer closes)."""
        return "content-length" in self._headers or self._headers.get(
            "transfer-encoding", "").rstrip().lower().endswith("chunked")

    @property
    def busy(self) -> bool:
        return bool(self.exchanges)

    def _fail_all(self, reason: str) -> None:
        """Every request still on the connection: no answer will come."""
        exchanges, self.exchanges = self.exchanges, deque()
        for exchange in exchanges:
            exchange.resolve(Unanswered(reason, sent=exchange.written))

    def fail(self, reason: str) -> None:
        """Out of step (a broken answer, a timeout): drop the connection and what is on
        it."""
        self.keep = False
        self._fail_all(reason)
        self._abort()

    def expire(self) -> None:
        late = min(self.exchanges, key=lambda e: e.deadline)
        late.resolve(Unanswered(describe(TimeoutError(
            f"no answer within {self._pool.timeout:g} s")), sent=late.written))
        self.fail("dropped with its connection: a request ahead of it went unanswered "
                  f"for {self._pool.timeout:g} s")

    def _abort(self) -> None:
        if self._transport is not None and not self.closed:
            self._transport.abort()


def _expire_wait(waiter: asyncio.Future[object]) -> None:
    if not waiter.done():
        waiter.set_result(_TIMEOUT)


class Pool:
    """Kept-alive connections to one origin: at most ``settings.max_connections`` open,
    each carrying up to ``settings.pipeline`` requests at once (more requests wait for
    room, within their ``timeout``); idle ones closed after ``settings.keepalive``.

    A request goes on the connection that took the one before while it has room, so
    requests made together share their writes and reads; else on another with room;
    else on an idle one, last in, first out (the most recently used is the least likely
    to have been closed by the peer, and under a falling load the surplus ones stay idle
    long enough to be closed); else on a new one.

    ``headers`` go with every request (checked once); ``unix``: a Unix socket's path
    instead of ``host`` and ``port`` (the ``Host`` header is then ``localhost``).
    """

    def __init__(self, *, settings: ClientSettings, host: str = "localhost", port: int = 80,
                 unix: str | None = None, tls: ssl.SSLContext | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        self.timeout = settings.timeout
        self.depth = settings.pipeline
        self.tls = tls
        self._host, self._port, self._unix = host, port, unix
        authority = "localhost" if unix is not None else (
            f"[{host}]" if ":" in host else host) + (
            "" if port == (443 if tls is not None else 80) else f":{port}")
        self._base = {"Host": authority, **(headers or {})}
        self._fixed = _lines(self._base)
        self._taken = _FRAMING | {name.lower() for name in self._base}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: list[_Connection] = []
        self._spare: set[_Connection] = set()
        """Connections with requests on them and room for more."""
        self._current: _Connection | None = None
        self._all: set[_Connection] = set()
        self._open = 0
        self._waiters: deque[asyncio.Future[object]] = deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._clock: asyncio.TimerHandle | None = None
        self._tick = min(0.1, max(0.005, self.timeout / 20))
        self.opened = 0
        """Connections opened so far (a measure of reuse)."""

    async def request(self, method: str, target: str, headers: Mapping[str, str],
                      body: bytes | None) -> Answer | Unanswered:
        """Send one request (``target``: the path and query) and read its answer, within
        ``settings.timeout`` in all."""
        data = self._encode(method, target, headers, body)
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # first use, or a new loop (asyncio.run again)
            self._forget(loop)
        deadline = loop.time() + self.timeout
        head_only = method == "HEAD"
        retried = False
        while True:
            conn: _Connection | Unanswered | None = None if retried else \
                self._room(loop, head_only)
            if conn is None:
                conn = await self._acquire(loop, deadline, fresh=retried)
            if isinstance(conn, Unanswered):
                return conn
            opener = conn.connecting and not conn.exchanges  # a new one: connect it
            # Sent (queued) before a new connection is awaited, so the requests made
            # while it connects take only the room left on it.
            future = conn.send(data, deadline, head_only)
            exchange = conn.exchanges[-1]
            self._current = conn
            if conn.has_room():
                self._spare.add(conn)
            else:
                self._spare.discard(conn)
            if self._clock is None:
                self._clock = loop.call_later(self._tick, self._check_deadlines, loop)
            try:
                if opener:
                    await self._connect(loop, conn, deadline)
                outcome = await future
            except BaseException:  # cancelled: its answer is read and dropped when it comes
                if len(conn.exchanges) == 1 and conn.exchanges[0] is exchange:
                    self._drop(conn)  # nothing else on it: free it at once
                raise
            if isinstance(outcome, Answer):
                return outcome
            # The keep-alive race: the peer closed this idle connection as the request
            # went out. A reset before any answer byte means the peer's socket was closed
            # with the request unread in it (or the request reached a closed socket): the
            # kernel sends a reset, not a plain close, only when data was left unread.
            # So the request was never read, and sending it again, once, on a new
            # connection is safe. A plain close (EOF) proves nothing (a sidecar killed
            # after reading the request closes that way too): no retry, sent=True. Only
            # for a request that went alone on the reused connection.
            if conn.unread and exchange.first and not retried:
                retried = True
                continue
            return outcome

    # -- connections ------------------------------------------------------------------------

    def _forget(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start afresh in ``loop``: connections of another loop can be neither used nor
        closed from this one (their transports close their sockets when collected)."""
        self._loop = loop
        self._idle, self._spare, self._all, self._open = [], set(), set(), 0
        self._waiters, self._current = deque(), None
        self._sweeper = self._clock = None

    def _room(self, loop: asyncio.AbstractEventLoop, head_only: bool) -> _Connection | None:
        """A connection with room for one more request, or None (then a new one, or
        wait). A HEAD goes alone (its answer's end cannot be parsed): an idle one."""
        if not head_only:
            current = self._current
            if current is not None and current.has_room():
                return current
            while self._spare:
                conn = next(iter(self._spare))
                if conn.has_room():
                    return conn
                self._spare.discard(conn)
        return self._take_idle(loop)

    def _take_idle(self, loop: asyncio.AbstractEventLoop) -> _Connection | None:
        """The most recently idle connection still usable (the others are closed)."""
        if not self._idle:
            return None
        horizon = loop.time() - self.settings.keepalive
        while self._idle:
            conn = self._idle.pop()
            conn.idle = False
            if conn.usable(horizon):
                conn.reused = True
                return conn
            self._drop(conn)
        return None

    async def _acquire(self, loop: asyncio.AbstractEventLoop, deadline: float,
                       fresh: bool) -> _Connection | Unanswered:
        """A new connection (not connected yet: :meth:`_connect`), an idle one (when
        ``fresh`` but no new one may be opened), or, at the limit, the first one whose
        answer leaves room."""
        if self._open >= self.settings.max_connections and fresh:
            conn = self._take_idle(loop)
            if conn is not None:
                return conn
        if self._open >= self.settings.max_connections:
            got = await self._wait(loop, deadline)
            if isinstance(got, _Connection):
                return got
            if got is _TIMEOUT:
                return Unanswered(describe(TimeoutError(
                    f"no connection to the sidecar free within {self.timeout:g} s "
                    f"(max_connections={self.settings.max_connections})")), sent=False)
            if got is _CLOSED:
                return Unanswered("the client was closed", sent=False)
        else:
            self._open += 1
        conn = _Connection(self, loop)
        conn.connecting = True
        self._all.add(conn)  # holds the slot taken above
        return conn

    async def _wait(self, loop: asyncio.AbstractEventLoop, deadline: float) -> object:
        waiter: asyncio.Future[object] = loop.create_future()
        self._waiters.append(waiter)
        timer = loop.call_at(deadline, _expire_wait, waiter)
        try:
            return await waiter
        except BaseException:  # cancelled: pass on what it was handed
            if waiter.done() and not waiter.cancelled():
                got = waiter.result()
                if isinstance(got, _Connection):
                    self._answered(got)
                elif got is _SLOT:
                    self._free_slot()
            raise
        finally:
            timer.cancel()
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    async def _connect(self, loop: asyncio.AbstractEventLoop, conn: _Connection,
                       deadline: float) -> None:
        """Connect ``conn``: the requests queued on it meanwhile (the caller's and those
        made while it connects) leave once it is up, or fail unsent if it never is."""
        budget = min(self.settings.connect_timeout, deadline - loop.time())
        try:
            async with asyncio.timeout(budget):
                if self._unix is not None:
                    await loop.create_unix_connection(lambda: conn, self._unix)
                else:
                    await loop.create_connection(lambda: conn, self._host, self._port,
                                                 ssl=self.tls)
        except TimeoutError:
            reason = describe(TimeoutError(f"could not connect within {budget:.3g} s"))
        except OSError as exc:
            reason = describe(exc)
        except BaseException:
            conn.connecting = False
            conn._fail_all("the request that was opening the connection was cancelled")
            self._drop(conn)
            raise
        else:
            conn.connecting = False
            self.opened += 1
            if not conn.closed:
                return
            reason = "the sidecar closed the connection as it was opened"
        conn.connecting = False
        conn._fail_all(reason)
        self._drop(conn)

    def _answered(self, conn: _Connection) -> None:
        """An answer came (or a waiter gave its connection back): the room it left goes
        to a waiting request; a connection with nothing on it is kept idle, or closed
        (not reusable, or ``keepalive`` 0)."""
        loop = self._loop
        if conn.exchanges:
            if conn.has_room() and not self._give(conn):
                self._spare.add(conn)
            return
        self._spare.discard(conn)
        if conn.closed or not conn.keep or conn not in self._all or \
                self.settings.keepalive <= 0 or loop is None:
            self._drop(conn)
            return
        if self._give(conn):
            return
        if self._current is conn:
            self._current = None
        conn.idle, conn.idle_since = True, loop.time()
        self._idle.append(conn)
        if self._sweeper is None:
            self._sweeper = loop.call_at(conn.idle_since + self.settings.keepalive,
                                         self._sweep, loop)

    def _give(self, conn: _Connection) -> bool:
        """Hand ``conn`` to the first request waiting for room, if any."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                conn.reused = True
                waiter.set_result(conn)
                return True
        return False

    def _lost(self, conn: _Connection) -> None:
        """The connection closed (the peer, or an abort): forget it."""
        self._drop(conn)

    def _drop(self, conn: _Connection) -> None:
        """Close a connection and free its slot (once, whoever calls)."""
        if conn.idle:
            conn.idle = False
            self._idle.remove(conn)
        self._spare.discard(conn)
        if self._current is conn:
            self._current = None
        conn._abort()
        if conn in self._all:
            self._all.discard(conn)
            self._free_slot()

    def _free_slot(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(_SLOT)  # the slot passes to it: _open stays
                return
        self._open -= 1

    def _check_deadlines(self, loop: asyncio.AbstractEventLoop) -> None:
        """One clock for every request's deadline, ticking while requests are out:
        cheaper than a timer per request, at most ``_tick`` late. A connection's oldest
        request has its earliest deadline (all share the timeout)."""
        self._clock = None
        now, busy = loop.time(), False
        for conn in list(self._all):
            if conn.exchanges:
                if min(e.deadline for e in conn.exchanges) <= now:
                    conn.expire()
                else:
                    busy = True
        if busy:
            self._clock = loop.call_later(self._tick, self._check_deadlines, loop)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        """Close the connections idle for ``keepalive`` (the oldest are first in line);
        then sleep until the next one is due."""
        self._sweeper = None
        horizon = loop.time() - self.settings.keepalive + 0.01  # timers may fire early
        while self._idle and self._idle[0].idle_since <= horizon:
            self._drop(self._idle[0])
        if self._idle:
            self._sweeper = loop.call_at(self._idle[0].idle_since + self.settings.keepalive,
                                         self._sweep, loop)

    async def close(self) -> None:
        """Close every connection (a request in flight gets :class:`Unanswered`, one
        waiting for a connection too); the pool opens new ones if used again."""
        for timer in (self._sweeper, self._clock):
            if timer is not None:
                timer.cancel()
        self._sweeper = self._clock = None
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(_CLOSED)
        for conn in list(self._all):
            if conn.busy:
                conn.fail("the client was closed")
            self._drop(conn)
        await asyncio.sleep(0)  # let the transports report their close

    # -- the request's bytes ----------------------------------------------------------------

    def _encode(self, method: str, target: str, headers: Mapping[str, str],
                body: bytes | None) -> bytes:
        fixed, extra, taken = self._fixed, "", self._taken
        for name, value in headers.items():
            if name.lower() in taken or ":" in name or not (
                    name.isprintable() and value.isprintable()):
                fixed, extra = self._merged(headers)
                break
            extra += f"{name}: {value}\r\n"
        if not (method.isalpha() and target.startswith("/") and target.isprintable()) \
                or " " in target:
            raise BadRequest(f"cannot send {method[:20]!r} {target[:80]!r}: a method and "
                             "a path without spaces or control characters")
        size = len(body) if body is not None else 0
        length = f"Content-Length: {size}\r\n" if size or method not in _NO_BODY else ""
        try:
            head = f"{method} {target} HTTP/1.1\r\n{fixed}{extra}{length}\r\n".encode("latin-1")
        except UnicodeEncodeError as exc:
            raise BadRequest(f"a request header is not ISO-8859-1 text: {exc}") from None
        return head + body if body else head

    def _merged(self, headers: Mapping[str, str]) -> tuple[str, str]:
        """The header lines when a request's headers are not plain: a request's own
        ``User-Agent`` or ``Authorization`` replaces the client's, framing headers are
        the transport's alone, a line break is refused."""
        own = {name.lower() for name in headers}
        if _FRAMING & own:
            raise BadRequest(f"the transport writes {', '.join(sorted(_FRAMING & own))} "
                             "itself")
        base = {k: v for k, v in self._base.items() if k.lower() not in own}
        return _lines(base), _lines(headers)


def _lines(headers: Mapping[str, str]) -> str:
    """Header lines, refusing what would end a line early (header injection)."""
    lines = []
    for name, value in headers.items():
        if not (name.isprintable() and value.isprintable()) or ":" in name:
            raise BadRequest(f"header {name[:40]!r}: {value[:80]!r} holds a line break or "
                             "control character", field=name[:40])
        lines.append(f"{name}: {value}\r\n")
    return "".join(lines)
