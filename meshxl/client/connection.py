"""One kept-alive HTTP/1.1 connection of the client's transport (:mod:`.transport`): the
requests in flight on it, in order, and their answers, parsed as they arrive by the
shared :class:`~meshxl.client.framing.AnswerReader` and matched to them first in,
first out.
"""

from __future__ import annotations

import asyncio
import select
import ssl
from collections import deque
from typing import Protocol, cast

from .errors import describe
from .framing import MAX_ANSWER, MAX_HEAD, AnswerReader, Broken
from .plans import Answer, Unanswered

__all__ = ["MAX_ANSWER", "MAX_HEAD", "Connection", "Owner"]

_RESET = (ConnectionResetError, BrokenPipeError)


class Owner(Protocol):
    """What a connection needs of its pool (:class:`meshxl.client.transport.Pool`)."""

    tls: ssl.SSLContext | None
    depth: int
    timeout: float
    max_answer: int

    def answered(self, conn: Connection) -> None:
        """An answer on ``conn`` is complete: it may take another request."""

    def lost(self, conn: Connection) -> None:
        """``conn`` closed (or failed): forget it."""


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


class Connection(asyncio.Protocol):
    """One connection: requests in flight in order, answers parsed as they arrive and
    matched to them first in, first out.

    The pool hands it to requests while it has room (``settings.pipeline``) and keeps it
    idle when nothing is on it."""

    __slots__ = ("_flush_soon", "_loop", "_out", "_poll", "_pool", "_transport", "closed",
                 "connecting", "exchanges", "idle", "idle_since", "keep", "reader", "reused",
                 "unread")

    def __init__(self, pool: Owner, loop: asyncio.AbstractEventLoop) -> None:
        self._pool = pool
        self._loop = loop
        self.reader = AnswerReader(self._answered, max_body=pool.max_answer)
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
        try:
            self.reader.feed(data)
        except Broken as exc:
            self.fail(str(exc))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.keep = False
        if self.exchanges:
            started = self.reader.started
            try:
                self.reader.eof()
            except Broken as broken:
                reason = str(broken)
            else:
                reason = "the sidecar closed the connection without answering"
            self.unread = not started and isinstance(exc, _RESET)
            self.fail_all(describe(exc) if exc is not None else reason)
        self._pool.lost(self)

    def _answered(self, answer: Answer) -> None:
        """The reader completed the oldest request's answer."""
        self.exchanges.popleft().resolve(answer)
        if not self.reader.keep:
            self.keep = False
        self._pool.answered(self)

    # -- the request path -------------------------------------------------------------------

    def send(self, data: bytes, deadline: float,
             head_only: bool) -> asyncio.Future[Answer | Unanswered]:
        """Queue one request; it is written with the others made in this turn of the
        event loop. The future gets its answer, or why there is none (the pool's clock
        fails the connection when its oldest request passes ``deadline``)."""
        future: asyncio.Future[Answer | Unanswered] = self._loop.create_future()
        self.exchanges.append(_Exchange(future, deadline, head_only,
                                        self.reused and not self.exchanges))
        self.reader.expect(head_only)
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

    @property
    def busy(self) -> bool:
        return bool(self.exchanges)

    def fail_all(self, reason: str) -> None:
        """Every request still on the connection: no answer will come."""
        exchanges, self.exchanges = self.exchanges, deque()
        for exchange in exchanges:
            exchange.resolve(Unanswered(reason, sent=exchange.written))

    def fail(self, reason: str) -> None:
        """Out of step (a broken answer, a timeout): drop the connection and what is on
        it."""
        self.keep = False
        self.fail_all(reason)
        self.abort()

    def expire(self) -> None:
        late = min(self.exchanges, key=lambda e: e.deadline)
        late.resolve(Unanswered(describe(TimeoutError(
            f"no answer within {self._pool.timeout:g} s")), sent=late.written))
        self.fail("dropped with its connection: a request ahead of it went unanswered "
                  f"for {self._pool.timeout:g} s")

    def abort(self) -> None:
        if self._transport is not None and not self.closed:
            self._transport.abort()
