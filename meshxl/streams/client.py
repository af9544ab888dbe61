"""The client side of a resumable stream: one logical stream over as many connections as
it takes. Python asyncio; the WebSocket transport here (aiohttp), Server-Sent Events
and gRPC in :mod:`.sse` and :mod:`.grpcio`.

::

    async with connect_websocket(url, headers={"x-session-id": "s1"}) as stream:
        await stream.send({"text": "hi"})
        async for message in stream:          # each server message once, in order
            ...

When a connection breaks (its member was killed, drained, cut off) the stream connects
again, to wherever the mesh sends its session now, says what it received, sends again
what the server had not consumed, and goes on: the application sees no error and no
gap, no message twice. Only a stream that cannot go on raises: :class:`StreamRefused`
(unknown or expired, another session's, too far behind, malformed: the server's
refusal, :mod:`.protocol`) or :class:`StreamLost` (no connection for
``resume_timeout``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Protocol

import aiohttp

from meshxl.errors import Conflict, Unavailable

from .protocol import (
    ACK,
    END,
    ERROR,
    FAILED,
    MESSAGE,
    OPEN,
    READY,
    RESUME,
    SUBPROTOCOL,
    Frame,
    Limits,
    Payload,
    ProtocolError,
    Refusal,
    decode_binary,
    decode_frame,
    encode_binary,
    encode_frame,
    json_text,
    message_frame,
    refusal_of_close,
)

log = logging.getLogger(__name__)

__all__ = ["ClientStream", "Connection", "HttpSessions", "StreamLost", "StreamRefused",
           "connect_websocket"]


class StreamRefused(Conflict):
    """The server refused the stream for good (:class:`~.protocol.Refusal`): a
    :class:`~meshxl.errors.Conflict`, the stream's state forbids it going on."""

    def __init__(self, refusal: Refusal, message: str = ""):
        super().__init__(f"{refusal.name}: {message or refusal.meaning}")
        self.refusal = refusal


class StreamLost(Unavailable):
    """No connection could carry the stream on for ``resume_timeout`` seconds (an
    :class:`~meshxl.errors.Unavailable`)."""


class Connection(Protocol):
    """One connection of a stream, as a transport provides it."""

    async def hello(self, frame: Frame) -> None: ...

    async def send_message(self, seq: int, payload: Payload, ack: int | None = None,
                           text: str | None = None) -> None:
        """Send the message, and deliver ``ack`` (the highest server message received):
        in its frame where the transport can, else as the transport acknowledges.
        ``text``: a JSON message's text (:func:`~.protocol.json_text`), made once."""

    async def send_ack(self, seq: int) -> None: ...

    async def send_end(self, last: int) -> None: ...

    def frames(self) -> AsyncIterator[Frame]: ...

    @property
    def close_code(self) -> int | None: ...

    async def close(self) -> None: ...


Connect = Callable[[], Awaitable[Connection]]


async def _chain(first: Frame | None, rest: AsyncIterator[Frame]) -> AsyncIterator[Frame]:
    if first is None:
        return
    yield first
    async for frame in rest:
        yield frame


class ClientStream:
    """A resumable stream's client end (the module docstring). ``connect`` makes a new
    connection to the stream's URL (with the session's header or cookie, so the mesh
    routes it as the session)."""

    def __init__(self, connect: Connect, *, limits: Limits | None = None,
                 resume_timeout: float = 30.0, backoff: tuple[float, float] = (0.02, 1.0),
                 connect_timeout: float = 10.0,
                 measure: Callable[[Payload], int] | None = None,
                 on_close: Callable[[], Awaitable[None]] | None = None):
        self._connect = connect
        self._on_close = on_close
        self._measure = measure
        self.limits = limits or Limits()
        self.resume_timeout = resume_timeout
        self.connect_timeout = connect_timeout
        """Seconds one attempt has to connect and carry the server's first frame (ready,
        or a refusal; the browser client's ``connectTimeoutMs``): a member taking a
        stream over answers within a few (etcd's own timeouts bound it); a connection
        held silent longer is given up and the stream connects again."""
        self._backoff = backoff
        self.token: str | None = None
        self.recv = 0
        """The highest server message received (delivered in order)."""
        self._next = 1
        self._unacked: collections.deque[tuple[int, Payload, int, str | None]] = \
            collections.deque()
        """Sent and not consumed: ``(seq, payload, size, JSON text or None)``."""
        self._unacked_bytes = 0
        self.consumed = 0
        """The highest message of ours the server's handler consumed (committed)."""
        self._inbox: collections.deque[Payload] = collections.deque()
        self._server_end: int | None = None
        self._end_failure: Refusal | None = None
        """The stream ended because the server's handler failed (``failed``): raised once
        every message before it was received."""
        self._ended_sent = False
        self._acked = 0
        self._ack_timer: asyncio.TimerHandle | None = None
        self._conn: Connection | None = None
        self._sent: tuple[Connection | None, int] = (None, 0)
        """The connection the stream was last ready on, and the highest message of ours
        sent on it: a position of that connection only (a message a former one sent may
        have reached a server that no longer carries the stream)."""
        self._sending: tuple[Connection | None, asyncio.Lock] = (None, asyncio.Lock())
        """The connection whose sender holds the lock, and the lock: one sender at a time
        on a connection (:meth:`_sender`)."""
        self._ready = asyncio.Event()
        self._changed = asyncio.Event()
        self._failure: BaseException | None = None
        self._task: asyncio.Task[None] | None = None
        self._resending: set[asyncio.Task[None]] = set()
        self._closing = False
        self.resumes: list[float] = []
        """Seconds from each break to the next ``ready`` (a statistic)."""
        self.connections = 0

    # -- lifetime ---------------------------------------------------------------------

    async def start(self) -> ClientStream:
        """Open the stream (first connection, until the server says ready)."""
        self._task = asyncio.get_running_loop().create_task(self._run())
        await self._wait(lambda: self._ready.is_set())
        return self

    async def __aenter__(self) -> ClientStream:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop carrying the stream (the server keeps it until its handler ends or it
        is left alone for its detached timeout)."""
        self._closing = True
        task, self._task = self._task, None
        tasks = [t for t in (task, *self._resending) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()
        if self._on_close is not None:
            await self._on_close()

    # -- what the application uses -------------------------------------------------------

    async def send(self, payload: Payload) -> int:
        """Queue a message for the server (a JSON value, or bytes); its number. Waits
        while the server has not consumed ``max_unacked_bytes`` of what was sent."""
        self._raise_failure()
        if self._ended_sent:
            raise RuntimeError("the stream's sending side was closed (close)")
        text: str | None = None
        if self._measure is not None:
            size = self._measure(payload)
        elif isinstance(payload, bytes | bytearray | memoryview):
            size = len(payload)
        else:  # encoded once: the limits count it, every connection sends it as it is
            text = json_text(payload)
            size = len(text.encode())
        if size > self.limits.max_message_bytes:
            raise ProtocolError(f"a message of {size} bytes; the limit is "
                                f"{self.limits.max_message_bytes}")
        await self._wait(lambda: self._unacked_bytes + size <= self.limits.max_unacked_bytes
                         or not self._unacked)
        seq = self._next
        self._next += 1
        self._unacked.append((seq, payload, size, text))
        self._unacked_bytes += size
        conn = self._conn
        if conn is not None and self._ready.is_set():
            await self._send_unsent(conn)
        return seq

    async def _send_unsent(self, conn: Connection) -> None:
        """Send on ``conn``, in order, every message not sent on it yet (one sender at a
        time: a message never overtakes another). A sender whose connection was replaced
        meanwhile stops, and what it sent counts for nothing: the new connection sends
        again everything its server had not consumed (``ready``)."""
        async with self._sender(conn):
            try:
                unacked = self._unacked
                while self._carries(conn) and unacked and unacked[-1][0] > self._sent[1]:
                    # Numbers follow one another: the first not sent is found by its
                    # place, not by walking what waits for its acknowledgement.
                    seq, payload, _, text = unacked[max(0, self._sent[1] + 1 - unacked[0][0])]
                    ack = self.recv if self.recv > self._acked else None
                    await conn.send_message(seq, payload, ack, text)
                    if not self._carries(conn):
                        return
                    self._sent = (conn, seq)
                    if ack is not None:  # carried: no wait for an ack alone
                        self._acked = max(self._acked, ack)
                        self._carried()
            except Exception:  # the connection broke: sent again on the next one
                self._broken(conn)

    def _sender(self, conn: Connection) -> asyncio.Lock:
        """The lock of ``conn``'s senders. Each connection has its own: a sender still
        writing on a connection that broke (a message POST held up by a member that
        died, until its timeout) must not hold back the new connection's resend, and
        what it writes there counts for nothing anyway (:meth:`_carries`).
        A sender of a connection that is not the stream's gets a lock of its own: it
        finds nothing to send."""
        owner, lock = self._sending
        if owner is conn:
            return lock
        lock = asyncio.Lock()
        if conn is self._conn:
            self._sending = (conn, lock)
        return lock

    def _carries(self, conn: Connection) -> bool:
        """``conn`` is the stream's connection, and the one its sent position counts."""
        return self._conn is conn and self._sent[0] is conn

    async def flush(self) -> None:
        """Until the server's handler consumed every message sent so far."""
        target = self._next - 1
        await self._wait(lambda: self.consumed >= target)

    async def close(self) -> None:
        """Close the sending side: the server's iteration ends after our last message
        (the server may go on sending)."""
        if not self._ended_sent:
            self._ended_sent = True
            conn = self._conn
            if conn is not None and self._ready.is_set():
                await self._send_unsent(conn)
                async with self._sender(conn):
                    with contextlib.suppress(Exception):
                        await conn.send_end(self._next - 1)

    def __aiter__(self) -> ClientStream:
        return self

    async def __anext__(self) -> Payload:
        try:
            return await self.receive()
        except EOFError:
            raise StopAsyncIteration from None

    async def receive(self) -> Payload:
        """The next server message; EOFError once the server's handler finished and
        everything it sent was received (:class:`StreamRefused` with ``failed`` when it
        ended by raising)."""
        await self._wait(lambda: bool(self._inbox) or self._finished)
        if self._inbox:
            return self._inbox.popleft()
        if self._end_failure is not None:
            raise StreamRefused(self._end_failure)
        raise EOFError("the server ended the stream")

    @property
    def _finished(self) -> bool:
        return self._server_end is not None and self.recv >= self._server_end

    async def _wait(self, condition: Callable[[], bool]) -> None:
        while not condition():
            self._raise_failure()
            self._changed.clear()
            await self._changed.wait()
        if not self._inbox:
            self._raise_failure()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    # -- the connections ----------------------------------------------------------------

    async def _run(self) -> None:
        rng = random.Random()
        broken: float | None = None
        attempt = 0
        while not self._closing:
            conn: Connection | None = None
            refusal: Refusal | None = None
            try:
                # Connected, and the server's first frame (ready, or a refusal), within
                # connect_timeout and what is left of the resume budget: a connection
                # that Envoy or a member holds open and silent is given up and another
                # tried, and none outlasts resume_timeout unnoticed.
                budget = self.resume_timeout - (time.monotonic() - broken
                                                if broken is not None else 0.0)
                async with asyncio.timeout(max(0.0, min(self.connect_timeout, budget))):
                    conn = await self._connect()
                    self.connections += 1
                    self._conn = conn
                    frames = conn.frames()
                    await conn.hello(Frame(OPEN) if self.token is None else
                                     Frame(RESUME, token=self.token, recv=self.recv))
                    first = await anext(frames, None)
                async for frame in _chain(first, frames):
                    if frame.type == READY:
                        await self._on_ready(frame, conn)
                        if broken is not None:
                            self.resumes.append(time.monotonic() - broken)
                        broken, attempt = None, 0
                    elif frame.type == MESSAGE:
                        self._on_message(frame, conn)
                        if frame.ack is not None:
                            self._on_consumed(frame.ack)
                    elif frame.type == ACK:
                        assert frame.seq is not None
                        self._on_consumed(frame.seq)
                    elif frame.type == END:
                        self._server_end = frame.seq
                        self._changed.set()
                    elif frame.type == ERROR:
                        refusal = frame.refusal
                        if refusal is FAILED:  # the handler failed: said after its last
                            self._end_failure = refusal  # message, before its end
                    if self._finished:
                        await self._ack_now(conn)
                        self._changed.set()
                        with contextlib.suppress(Exception):
                            await conn.close()
                        return
                refusal = refusal or refusal_of_close(conn.close_code)
            except (ProtocolError, StreamRefused) as exc:
                refusal = exc.refusal if isinstance(exc, StreamRefused) else None
                if refusal is None:
                    self._fail(exc)
                    return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the connection failed, whatever its transport said
                # (aiohttp's errors, gRPC's AioRpcError, an OSError): connect again, until
                # resume_timeout says the stream is lost.
                log.debug("stream %s: connection failed: %s", (self.token or "new")[:6], exc)
            finally:
                self._ready.clear()
                self._conn = None
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
            if refusal is not None and not refusal.retry:
                self._fail(StreamRefused(refusal))
                return
            now = time.monotonic()
            broken = broken if broken is not None else now
            if now - broken > self.resume_timeout:
                self._fail(StreamLost(f"no connection carried the stream for "
                                      f"{self.resume_timeout:.0f} s"))
                return
            # The exponent capped: a stream given hours to resume makes thousands of
            # attempts, and 2 ** 1100 is no float (the stream would die of it).
            pause = 0.0 if attempt == 0 else min(self._backoff[1],
                                                 self._backoff[0] * 2 ** min(attempt - 1, 60))
            attempt += 1
            await asyncio.sleep(pause * (0.5 + rng.random()))

    def _fail(self, error: BaseException) -> None:
        self._failure = error
        self._changed.set()

    def _broken(self, conn: Connection) -> None:
        """A send on ``conn`` failed: it is closed, so the stream resumes on a new one
        (which sends again what was not consumed)."""
        if self._conn is conn:
            self._ready.clear()
            asyncio.get_running_loop().create_task(_close_quietly(conn))

    async def _on_ready(self, frame: Frame, conn: Connection) -> None:
        assert frame.token is not None and frame.consumed is not None
        if self.token is not None and frame.token != self.token:
            raise ProtocolError("the server resumed another stream")
        self.token = frame.token
        self._on_consumed(frame.consumed)
        self._sent = (conn, frame.consumed)
        # The resend goes beside the reading of this connection, not before it: a
        # transport's send completes only as its flow control lets the message go, and
        # a server that sends (replay, new messages) while its client reads nothing
        # waits on that client's window in turn; with 1,000 streams resending at once
        # through one Envoy, the first message after a resume came 35-38 s late.
        # Messages the application sends meanwhile queue behind it (one sender a
        # connection), and an end said before this ready goes after it; one said later
        # is close()'s to send.
        ended = self._ended_sent
        self._ready.set()
        self._changed.set()
        self._resend(conn, ended)

    def _resend(self, conn: Connection, ended: bool) -> None:
        async def resend() -> None:
            await self._send_unsent(conn)
            if ended and self._carries(conn):
                async with self._sender(conn):
                    with contextlib.suppress(Exception):
                        await conn.send_end(self._next - 1)
        task = asyncio.get_running_loop().create_task(resend())
        self._resending.add(task)
        task.add_done_callback(self._resending.discard)

    def _on_message(self, frame: Frame, conn: Connection) -> None:
        assert frame.seq is not None
        if frame.seq <= self.recv:
            return  # replayed: received before
        if frame.seq != self.recv + 1:
            raise ProtocolError(f"server message {frame.seq} after {self.recv}: a gap")
        self.recv = frame.seq
        self._inbox.append(frame.payload)
        self._changed.set()
        if self.recv - self._acked >= self.limits.ack_every:
            asyncio.get_running_loop().create_task(self._ack_now(conn))
        elif self._ack_timer is None:
            self._ack_timer = asyncio.get_running_loop().call_later(
                self.limits.ack_delay, self._ack_later)

    def _carried(self) -> None:
        """Everything received is acknowledged (a message carried it): the wait for an
        acknowledgement alone starts again with the next message received. Left
        running, the timer of the first one fired ``ack_delay`` after it, found a
        later message unacknowledged and sent an acknowledgement alone that the next
        message would have carried (a stream that talks and listens every 0.2 s sent
        one every other message or so)."""
        if self.recv <= self._acked and self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None

    def _ack_later(self) -> None:
        self._ack_timer = None
        conn = self._conn
        if conn is not None and self.recv > self._acked:
            asyncio.get_running_loop().create_task(self._ack_now(conn))

    async def _ack_now(self, conn: Connection) -> None:
        if self.recv <= self._acked:
            return
        seq = self.recv
        try:
            await conn.send_ack(seq)
            self._acked = max(self._acked, seq)
        except Exception:
            self._broken(conn)

    def _on_consumed(self, seq: int) -> None:
        if seq >= self._next:
            raise ProtocolError(f"the server consumed message {seq} of {self._next - 1}")
        if seq > self.consumed:
            self.consumed = seq
        while self._unacked and self._unacked[0][0] <= seq:
            self._unacked_bytes -= self._unacked.popleft()[2]
        self._changed.set()


class _WebSocket:
    """A stream's WebSocket connection (:class:`Connection`)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws = ws

    async def hello(self, frame: Frame) -> None:
        await self.ws.send_str(encode_frame(frame))

    async def send_message(self, seq: int, payload: Payload, ack: int | None = None,
                           text: str | None = None) -> None:
        if isinstance(payload, bytes | bytearray | memoryview):
            await self.ws.send_bytes(encode_binary(seq, payload))
            if ack is not None:  # a binary frame carries no acknowledgement
                await self.send_ack(ack)
        else:
            await self.ws.send_str(message_frame(
                seq, json_text(payload) if text is None else text, ack))

    async def send_ack(self, seq: int) -> None:
        await self.ws.send_str(encode_frame(Frame(ACK, seq=seq)))

    async def send_end(self, last: int) -> None:
        await self.ws.send_str(encode_frame(Frame(END, seq=last)))

    async def frames(self) -> AsyncIterator[Frame]:
        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                yield decode_frame(msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                seq, data = decode_binary(msg.data)
                yield Frame(MESSAGE, seq=seq, payload=data)
            else:
                break

    @property
    def close_code(self) -> int | None:
        return self.ws.close_code

    async def close(self) -> None:
        await self.ws.close()


def connect_websocket(url: str, *, headers: Mapping[str, str] | None = None,
                      http: aiohttp.ClientSession | None = None,
                      limits: Limits | None = None, resume_timeout: float = 30.0,
                      heartbeat: float = 2.0, **options: Any) -> ClientStream:
    """A resumable stream over WebSockets to ``url`` (``async with`` it, or ``await
    stream.start()``). ``headers`` go with every connection: the session's (the header
    or cookie the mesh routes on). ``http``: an aiohttp session to connect with (one is
    made, and closed with the stream's task, otherwise). ``heartbeat``: seconds between
    pings, so a connection whose server is gone without a word (a partition) is left
    within about twice that."""
    http_of = HttpSessions(http)

    async def connect() -> Connection:
        ws = await http_of().ws_connect(url, protocols=(SUBPROTOCOL,), headers=headers,
                                      heartbeat=heartbeat, max_msg_size=1 << 20,
                                      timeout=aiohttp.ClientWSTimeout(ws_close=2.0),
                                      **options)
        if ws.protocol != SUBPROTOCOL:
            await ws.close()
            raise ProtocolError(f"{url} does not speak {SUBPROTOCOL}")
        return _WebSocket(ws)

    return ClientStream(connect, limits=limits, resume_timeout=resume_timeout,
                        on_close=http_of.close)


class HttpSessions:
    """The aiohttp session a stream's connections are made with: the application's
    (``http``), or one of the stream's own, made on first use and closed with it."""

    def __init__(self, http: aiohttp.ClientSession | None,
                 timeout: aiohttp.ClientTimeout | None = None):
        self.http, self.timeout = http, timeout
        self._own: aiohttp.ClientSession | None = None

    def __call__(self) -> aiohttp.ClientSession:
        if self.http is not None:
            return self.http
        if self._own is None or self._own.closed:
            self._own = aiohttp.ClientSession(timeout=self.timeout) \
                if self.timeout is not None else aiohttp.ClientSession()
        return self._own

    async def close(self) -> None:
        if self._own is not None:
            await self._own.close()


async def _close_quietly(conn: Connection) -> None:
    with contextlib.suppress(Exception):
        await conn.close()
