"""The async client's HTTP/1.1 transport: a pool of kept-alive connections to one origin,
the sidecar, over TCP or a Unix socket.

Why not aiohttp's client: the sidecar is on loopback, so the client's CPU per request is
what limits an application's write rate, and aiohttp's client spends several times this
one's (measured in ``docs/statesync.md``, "Transport"). This is only what the session
API uses: requests pipelined, up to ``settings.pipeline`` on a connection, those made in
one turn of the event loop written together; answers parsed as they arrive, in order,
by :mod:`meshxl.client.framing` (httptools, llhttp; the blocking client parses with the
same code). No redirects, cookies, proxies, compression or streaming. Works on
asyncio's default loop and on uvloop, and starts no task.

What a request can end with (:mod:`meshxl.client.plans`): an :class:`Answer`, or
:class:`Unanswered` with ``sent=False`` when it never left (connect refused or timed
out, no connection free in time, its connection lost before it was written) and
``sent=True`` once it was written (the sidecar may have applied it). A connection whose
answers fall out of step (a request on it timed out, an answer broke the framing) is
dropped with everything still on it: ``sent=True`` for those written.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Mapping

from .connection import MAX_ANSWER, MAX_HEAD, Connection
from .errors import describe
from .framing import RequestWriter
from .plans import Answer, Unanswered
from .settings import ClientSettings

__all__ = ["MAX_ANSWER", "MAX_HEAD", "Pool"]

_SLOT, _TIMEOUT, _CLOSED = object(), object(), object()
"""What a request waiting for a connection is woken with, besides a connection."""


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
        self.max_answer = settings.max_answer
        self.tls = tls
        self._host, self._port, self._unix = host, port, unix
        authority = "localhost" if unix is not None else (
            f"[{host}]" if ":" in host else host) + (
            "" if port == (443 if tls is not None else 80) else f":{port}")
        self._writer = RequestWriter({"Host": authority, **(headers or {})})
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: list[Connection] = []
        self._spare: set[Connection] = set()
        """Connections with requests on them and room for more."""
        self._current: Connection | None = None
        self._all: set[Connection] = set()
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
        data = self._writer.encode(method, target, headers, body)
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # first use, or a new loop (asyncio.run again)
            self._forget(loop)
        deadline = loop.time() + self.timeout
        head_only = method == "HEAD"
        retried = False
        while True:
            conn: Connection | Unanswered | None = None if retried else \
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

    def _room(self, loop: asyncio.AbstractEventLoop, head_only: bool) -> Connection | None:
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

    def _take_idle(self, loop: asyncio.AbstractEventLoop) -> Connection | None:
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
                       fresh: bool) -> Connection | Unanswered:
        """A new connection (not connected yet: :meth:`_connect`), an idle one (when
        ``fresh`` but no new one may be opened), or, at the limit, the first one whose
        answer leaves room."""
        if self._open >= self.settings.max_connections and fresh:
            conn = self._take_idle(loop)
            if conn is not None:
                return conn
        if self._open >= self.settings.max_connections:
            got = await self._wait(loop, deadline)
            if isinstance(got, Connection):
                return got
            if got is _TIMEOUT:
                return Unanswered(describe(TimeoutError(
                    f"no connection to the sidecar free within {self.timeout:g} s "
                    f"(max_connections={self.settings.max_connections})")), sent=False)
            if got is _CLOSED:
                return Unanswered("the client was closed", sent=False)
        else:
            self._open += 1
        conn = Connection(self, loop)
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
                if isinstance(got, Connection):
                    self.answered(got)
                elif got is _SLOT:
                    self._free_slot()
            raise
        finally:
            timer.cancel()
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    async def _connect(self, loop: asyncio.AbstractEventLoop, conn: Connection,
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
            conn.fail_all("the request that was opening the connection was cancelled")
            self._drop(conn)
            raise
        else:
            conn.connecting = False
            self.opened += 1
            if not conn.closed:
                return
            reason = "the sidecar closed the connection as it was opened"
        conn.connecting = False
        conn.fail_all(reason)
        self._drop(conn)

    def answered(self, conn: Connection) -> None:
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

    def _give(self, conn: Connection) -> bool:
        """Hand ``conn`` to the first request waiting for room, if any."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                conn.reused = True
                waiter.set_result(conn)
                return True
        return False

    def lost(self, conn: Connection) -> None:
        """The connection closed (the peer, or an abort): forget it."""
        self._drop(conn)

    def _drop(self, conn: Connection) -> None:
        """Close a connection and free its slot (once, whoever calls)."""
        if conn.idle:
            conn.idle = False
            self._idle.remove(conn)
        self._spare.discard(conn)
        if self._current is conn:
            self._current = None
        conn.abort()
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
