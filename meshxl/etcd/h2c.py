"""etcd's ``KV.Txn`` calls and ``Watch`` streams over HTTP/2 without TLS (h2c) on the
event loop's own transport: the session store's transactions
(``meshxl/statesync/store.py``) and the session cache's watch (:mod:`.watch`).

Why not grpcio's channel, which the client has anyway: each of its calls passes through
grpc's own threads (its event engine reads the answer, its completion-queue poller wakes
the event loop through a socket), three thread hand-offs a call. Measured in one
process against one etcd, 64 transactions in flight (a guarded put of 1 KiB each):
100-108 us of the process's CPU per call through grpcio, 24-25 us here, answers parsed
included (docs/performance.md, "The etcd transaction's own cost"). A session store with
batching off pays it for every write, with batching for every batch; the session
cache's watch pays grpcio's hand-offs for every message, one per transaction.

What it does (RFC 9113; gRPC's HTTP/2 protocol):

* one connection per etcd member at a time, dialled by the first call that needs it
  (after one is lost, by the next call): the client preface, SETTINGS (no push, a
  1 GiB window for what it receives, granted back to the connection when half is used),
  the server's SETTINGS and PINGs acknowledged;
* each call a stream (:mod:`.h2calls`; the connection is :mod:`.h2conn`): a header
  block of literals (no dynamic table of its own to keep in step: the same bytes every
  call but ``grpc-timeout``) and its message in DATA frames
  within the server's windows and frame size (the rest waits for its WINDOW_UPDATE);
  at most the server's MAX_CONCURRENT_STREAMS at once, the calls beyond them queued;
* answers' header blocks decoded with :mod:`meshxl.hpackin`, a block that leaves the
  dynamic table as it was kept decoded (Go's encoder sends the same indexed bytes for
  every answer: :func:`meshxl.h2wire.keeps_table`); the message uncompressed, at most
  :data:`~.h2calls.MAX_MESSAGE` bytes (the channels' limit, ``meshxl.etcd.connect``);
  ``grpc-status`` and ``grpc-message`` raised as grpcio's ``AioRpcError``, so the
  callers (retries, the balancer) take both clients' failures alike;
* a watch: its create request sent without ending the stream, etcd's messages read in
  order, each stream's window granted back as it is read; cancelling it resets it;
* deadlines: ``grpc-timeout`` tells etcd; here one timer, at the earliest deadline of
  the calls under way, fails a call DEADLINE_EXCEEDED and resets its stream. A call past
  its deadline with nothing received since it was sent makes the connection send a
  PING; one unanswered for :data:`PING_TIMEOUT` closes it (a partition: the next call
  dials anew);
* GOAWAY: no new stream on that connection; its streams above the last one the server
  took fail UNAVAILABLE (never processed), the others finish; a lost connection fails
  its calls UNAVAILABLE (whether they applied is unknown: the store decides what may be
  sent again).

TLS and etcd's token authentication stay on grpcio's channel and
:mod:`meshxl.etcd.auth`'s interceptors: only a plain :class:`Client` has a
:class:`Channel`.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import deque
from collections.abc import Callable
from typing import Any

import aetcd
import grpc
from aetcd import rpc

from meshxl.h2wire import literal

from .h2calls import Call, StreamCall, error
from .h2conn import PING_TIMEOUT, Connection

__all__ = ["CONNECT_TIMEOUT", "PING_TIMEOUT", "TXN", "WATCH", "Channel", "Client",
           "StreamCall", "txn_parse", "watch_parse"]

TXN = "/etcdserverpb.KV/Txn"
WATCH = "/etcdserverpb.Watch/Watch"
CONNECT_TIMEOUT = 2.0
"""Seconds one dial may take (the calls' own deadlines may end their wait sooner)."""
_seq = itertools.count()


class Channel:
    """Calls to one etcd member (the module docstring): :meth:`call` returns a future of
    ``parse(answer)``, :meth:`stream` a :class:`~.h2calls.StreamCall` to read."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host.strip("[]"), port
        self._authority = f"{host}:{port}".encode()
        self._heads: dict[str, bytes] = {}
        self._connection: Connection | None = None
        self._dialing: asyncio.Task[None] | None = None
        self._waiting: deque[Call] = deque()
        """Calls not yet on a stream: dialling, or at the server's stream limit."""
        self._deadlines: list[tuple[float, int, Call]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._closed = False
        self._calls = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        """The loop of its calls, kept (:attr:`.h2conn.Connection.loop`)."""

    def call(self, path: str, request: bytes, timeout: float,
             parse: Callable[[bytes], Any]) -> asyncio.Future[Any]:
        loop = self._loop or self._bind()
        future: asyncio.Future[Any] = loop.create_future()
        if self._closed:
            future.set_exception(error(grpc.StatusCode.UNAVAILABLE, "the channel is closed"))
            return future
        deadline = loop.time() + timeout
        call = Call(future, self._heads.get(path) or self._head(path),
                    b"\x00" + len(request).to_bytes(4, "big") + request, parse, timeout,
                    deadline)
        heapq.heappush(self._deadlines, (deadline, next(_seq), call))
        if self._timer is None or deadline < self._timer_at:
            self._arm(loop)
        self._calls += 1
        if not self._calls & 1023:
            self._prune()
        self._start(call, loop)
        return future

    def stream(self, path: str, request: bytes, parse: Callable[[bytes], Any]) -> StreamCall:
        """A stream opened with ``request``, its messages each ``parse``d."""
        loop = self._loop or self._bind()
        call = StreamCall(loop.create_future(), self._heads.get(path) or self._head(path),
                          b"\x00" + len(request).to_bytes(4, "big") + request, parse)
        call.cancel = lambda: self._cancel(call)
        if self._closed:
            call.fail(error(grpc.StatusCode.UNAVAILABLE, "the channel is closed"))
        else:
            self._start(call, loop)
        return call

    def _bind(self) -> asyncio.AbstractEventLoop:
        loop = self._loop = asyncio.get_running_loop()
        return loop

    def _start(self, call: Call, loop: asyncio.AbstractEventLoop) -> None:
        connection = self._connection
        if connection is not None and connection.usable() and not self._waiting:
            connection.start(call)
        else:
            self._waiting.append(call)
            self._dial(loop)

    def _cancel(self, call: StreamCall) -> None:
        if call.closed is None:
            call.fail(asyncio.CancelledError())
            if self._connection is not None and call.stream:
                self._connection.reset(call)

    def _head(self, path: str) -> bytes:
        """A call's header block but ``grpc-timeout``: pseudo-header fields first
        (``:method POST`` and ``:scheme http`` from the static table)."""
        head = self._heads[path] = (
            b"\x83\x86" + literal(b":path", path.encode())
            + literal(b":authority", self._authority)
            + literal(b"content-type", b"application/grpc") + literal(b"te", b"trailers")
            + literal(b"user-agent", b"meshxl-h2c"))
        return head

    # -- connections ------------------------------------------------------------------

    def _dial(self, loop: asyncio.AbstractEventLoop) -> None:
        connection = self._connection
        if connection is not None and connection.usable():
            self.drain()
        elif connection is not None and connection.transport is not None \
                and not connection.going_away:
            return  # at the server's stream limit: started as streams end
        elif self._dialing is None and not self._closed:
            self._dialing = loop.create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                _, connection = await loop.create_connection(
                    lambda: Connection(self), self.host, self.port)
        except (OSError, TimeoutError) as exc:
            failure = error(grpc.StatusCode.UNAVAILABLE,
                            f"failed to connect to etcd at {self.host}:{self.port}: "
                            f"{type(exc).__name__}: {exc}")
            while self._waiting:
                self._waiting.popleft().fail(failure)
            return
        finally:
            self._dialing = None
        if self._closed:
            connection.close()
            return
        self._connection = connection
        self.drain()

    def drain(self) -> None:
        """Start the calls waiting, as far as the connection takes them."""
        connection = self._connection
        waiting = self._waiting
        while waiting and connection is not None and connection.usable():
            call = waiting.popleft()
            if not call.done():
                connection.start(call)
        if waiting and (connection is None or connection.transport is None
                        or connection.going_away):
            self._dial(self._loop or self._bind())

    def lost(self, connection: Connection) -> None:
        """``connection`` closed or going away: the next call dials anew."""
        if self._connection is connection:
            self._connection = None
        if self._waiting and not self._closed:
            self._dial(self._loop or self._bind())

    def close(self) -> None:
        """Fail what is under way (UNAVAILABLE) and close the connection."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._dialing is not None:
            self._dialing.cancel()
        failure = error(grpc.StatusCode.UNAVAILABLE, "the channel is closed")
        while self._waiting:
            self._waiting.popleft().fail(failure)
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        self._deadlines.clear()

    # -- deadlines --------------------------------------------------------------------

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = self._deadlines[0][0]
        self._timer = loop.call_at(self._timer_at, self._expire)

    def _expire(self) -> None:
        """Fail the calls past their deadline; drop those settled from the heap."""
        loop = self._loop or self._bind()
        now = loop.time()
        deadlines = self._deadlines
        self._timer = None
        while deadlines and (deadlines[0][0] <= now or deadlines[0][2].done()):
            _, _, call = heapq.heappop(deadlines)
            if call.done():
                continue
            call.fail(error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))
            connection = self._connection
            if connection is not None and call.stream:
                connection.reset(call, "a call's deadline passed")
        if deadlines:
            self._arm(loop)

    def _prune(self) -> None:
        """Drop the calls settled from the deadlines' heap (each would stay there until
        its deadline otherwise: thousands a second)."""
        kept = [entry for entry in self._deadlines if not entry[2].done()]
        if len(kept) < len(self._deadlines):
            heapq.heapify(kept)
            self._deadlines = kept


class Client(aetcd.Client):  # type: ignore[misc]
    """aetcd's client of one etcd member without TLS or credentials, whose ``KV.Txn``
    calls and session watch may go over a :class:`Channel` (made on first use, closed
    with the client)."""

    _h2c: Channel | None = None

    def channel_h2c(self) -> Channel:
        channel = self._h2c
        if channel is None:
            channel = self._h2c = Channel(self._host, self._port)
        return channel

    async def close(self) -> None:
        if self._h2c is not None:
            self._h2c.close()
            self._h2c = None
        await super().close()


def txn_parse(answer: bytes) -> rpc.TxnResponse:
    return rpc.TxnResponse.FromString(answer)


def watch_parse(message: bytes) -> rpc.WatchResponse:
    return rpc.WatchResponse.FromString(message)
