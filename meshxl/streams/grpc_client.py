"""The Python client of resumable gRPC streams (grpc.aio): :func:`connect_grpc`, a
:class:`.client.ClientStream` whose connections are calls (the wire: :mod:`.grpcwire`;
the server: :mod:`.grpcio`)::

    stream = connect_grpc(channel, "/chat.v1.Chat/Talk", request_type=Line,
                          response_type=Reply, metadata=[("x-session-id", "s1")])
    async with stream: await stream.send(Line(...)); async for reply in stream: ...

A call that ends with UNAVAILABLE, CANCELLED, INTERNAL, UNKNOWN or DEADLINE_EXCEEDED
without a refusal (its member died, Envoy reset it), or with the status of a refusal
the client resumes after (ABORTED: ``moved``), is resumed. ``moved`` is ABORTED, not
UNAVAILABLE: an acknowledgement refused as UNAVAILABLE (it reached a member that does
not serve its stream, as many do during a move) was sent again by Envoy on the other
members and counted towards ejecting the member that refused it (a 503 to Envoy), and
the judge of predictive failover counted it a failure of that member.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import grpc
from grpc import aio

from .client import ClientStream, Connection
from .grpcwire import (
    ACK_METHOD,
    ACKS,
    END_KEY,
    FIELD,
    FROM,
    IN,
    RECV,
    REFUSAL,
    STREAM,
    end_message,
    json_in,
    json_out,
    split_ack,
    with_ack,
)
from .protocol import (
    ACK,
    END,
    ERROR,
    MALFORMED,
    MESSAGE,
    READY,
    REFUSALS,
    RESUME,
    Frame,
    Limits,
    Payload,
    ProtocolError,
    refusal_named,
)

__all__ = ["ACK_DEADLINE", "ACK_EARLY", "ACK_LINGER", "connect_grpc"]

_RESUMABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                        grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        *(getattr(grpc.StatusCode, r.grpc_status) for r in REFUSALS
                          if r.retry)})
"""What a call may end with and its stream goes on: a member gone (or a call reset),
or a refusal the client resumes after whose name the trailers lost."""

ACK_LINGER = 1.0
"""Seconds a client's acknowledgement, and its question of what the handler consumed,
wait before one Ack call carries both, unless :data:`ACK_EARLY` of the unacknowledged
bytes have gathered first. Each Ack is a unary call through the mesh: a client that
talks as often as it listens made about two for each message it sent, then (lingering
0.25 s) four a second at 5 messages a second (``bench/streams.py``, 1,000 streams: the
call's CPU per message was 2,172 us against the plain call's 346). One that lingers
when its call closes is dropped with it; the stream says what it received when it
resumes. On a call whose messages carry the acknowledgements (:mod:`.grpcwire`), the
Ack goes only for a direction that stayed idle through the linger: a client that sent
nothing to carry what it received, a server that sent nothing to carry what its
handler consumed."""
ACK_EARLY = 4
"""An Ack goes at once when the bytes sent, or received, since the last one reach
``max_unacked_bytes / ACK_EARLY``: a side that sends fast waits for no linger to free
what it may send (``Limits.max_unacked_bytes`` an Ack interval would bound it to).

A stream has at most one Ack call in flight; one due meanwhile goes when it returns,
with what is acknowledged by then. None is cancelled early: not on a short deadline of
the client's (the route's per-try timeout bounds it, in Envoy), and not when its
stream's call ends (it is left to finish, its answer dropped). Each call a client gives
up is a RST_STREAM on its channel's connection, and Envoy's HTTP/2 server allows a
client a burst of 1,000 of them and 33 a second after (nghttp2's limit on reset
floods): past it, Envoy closes the connection (GOAWAY, INTERNAL_ERROR) with every
stream on it. Acks given up at 5 s under load, several per stream, spent it
(bench/streams.py's gRPC kind, 1,000 streams: every stream broke and resumed again
every 15 s or so, at about 780 us of CPU a message against 560 one Ack at a time)."""
ACK_DEADLINE = 30.0
"""A backstop only: an Ack that neither a member nor Envoy answers is given up."""


_ACKS: set[asyncio.Task[None]] = set()
"""The Ack calls in flight of calls closed meanwhile (held until they finish)."""


class _Call:
    """A stream's call (:class:`.client.Connection`)."""

    def __init__(self, channel: aio.Channel, method: str, request: Any, request_type: Any,
                 response_type: Any, metadata: Sequence[tuple[str, str]], limits: Limits):
        self.channel, self.method, self.request = channel, method, request
        self.request_type, self.response_type = request_type, response_type
        self.metadata = list(metadata)
        self.ack_delay = limits.ack_delay
        self._early = max(1, limits.max_unacked_bytes // ACK_EARLY)
        self._unasked = 0
        """Bytes sent and received since the last Ack call was made."""
        self.call: Any = None
        self.token: str | None = None
        self.frames_queue: asyncio.Queue[Frame | Exception | None] = asyncio.Queue()
        self.next_seq = 0
        self.code: grpc.StatusCode | None = None
        self.carried = False
        """The messages carry the acknowledgements (the server said so)."""
        self._probe: asyncio.TimerHandle | None = None
        self._ack_task: asyncio.Task[None] | None = None
        self._closed = False
        self._again = False
        """Another Ack is due when the one in flight returns."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._ack = channel.unary_unary(ACK_METHOD, request_serializer=json_out,
                                        response_deserializer=json_in)
        self._recv = 0
        """The highest server message the stream acknowledges."""
        self._told = 0
        """The highest acknowledgement the server was told (in a message, or an Ack)."""
        self._sent = 0
        """The highest message of ours sent."""
        self._heard = 0
        """The highest message of ours the server said its handler consumed."""
        self._talked = [False, False]
        """Since the last probe: a message of ours went (it carried what we received),
        one of the server's came (it carried what the handler consumed)."""

    async def hello(self, frame: Frame) -> None:
        metadata = [*self.metadata, (ACKS, FIELD)]
        if frame.type == RESUME:
            assert frame.token is not None
            self.token = frame.token
            metadata += [(STREAM, frame.token), (RECV, str(frame.recv))]
        if self.request is not None:
            self.call = self.channel.unary_stream(
                self.method, request_serializer=_serialize)(self.request, metadata=metadata)
        else:
            self.call = self.channel.stream_stream(self.method)(metadata=metadata)
        initial = dict(await self.call.initial_metadata() or ())
        if STREAM not in initial:  # refused before its first message: read the status
            code = await self.call.code()
            self.frames_queue.put_nowait(self._ended(code, await self.call.trailing_metadata()))
            self.frames_queue.put_nowait(None)
            return
        self.token = str(initial[STREAM])
        self.next_seq = int(initial[FROM])
        self.carried = initial.get(ACKS) == FIELD
        self._sent = self._heard = int(initial[IN])
        self.frames_queue.put_nowait(Frame(READY, token=self.token, consumed=self._heard,
                                           last=self.next_seq - 1))
        self._spawn(self._pump())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _pump(self) -> None:
        """The call's messages as frames, then how it ended, then ``None``: whatever
        ends the pump (the call's status, a cancellation, an error of grpc's own),
        :meth:`frames` ends with it, so the stream resumes instead of waiting on a
        call that is gone. A message that is not one fails the stream."""
        ended: Frame | Exception | None = None
        try:
            async for data in self.call:
                consumed = None
                if self.carried:
                    data, consumed = split_ack(data)
                    self._heard = max(self._heard, consumed)
                    self._talked[1] = True
                try:
                    message = self.response_type.FromString(data)
                except Exception as exc:  # protobuf's DecodeError, or what a type raises
                    raise ProtocolError(f"a server message that is no "
                                        f"{self.response_type.__name__}: {exc}") from None
                self.frames_queue.put_nowait(Frame(MESSAGE, seq=self.next_seq,
                                                   payload=message, ack=consumed))
                self.next_seq += 1
                self._count(len(data))
            ended = self._ended(await self.call.code(), await self.call.trailing_metadata())
        except aio.AioRpcError as exc:
            ended = self._ended(exc.code(), exc.trailing_metadata())
        except ProtocolError as exc:
            ended = exc
            self.call.cancel()
        finally:
            if ended is not None:
                self.frames_queue.put_nowait(ended)
            self.frames_queue.put_nowait(None)

    def _ended(self, code: grpc.StatusCode, trailing: Any) -> Frame | None:
        self.code = code
        meta = dict(trailing or ())
        if code == grpc.StatusCode.OK and END_KEY in meta:
            return Frame(END, seq=int(meta[END_KEY]))
        refusal = refusal_named(str(meta.get(REFUSAL, "")))
        if refusal is not None:
            return Frame(ERROR, refusal=refusal)
        if code not in _RESUMABLE and code != grpc.StatusCode.OK:
            return Frame(ERROR, refusal=MALFORMED,
                         message=f"the call ended with {code.name}")
        return None

    async def send_message(self, seq: int, payload: Payload, ack: int | None = None,
                           text: str | None = None) -> None:
        data = _serialize(payload)  # a message (its own measure): no text
        if ack is not None:
            self._recv = max(self._recv, ack)
        if self.carried:
            told = self._recv
            await self.call.write(with_ack(data, told))
            self._told = max(self._told, told)
            self._talked[0] = True
        else:
            await self.call.write(data)
        self._sent = max(self._sent, seq)
        self._count(len(data))
        self._exchange_soon()  # learn what the handler consumed, soon

    def _count(self, size: int) -> None:
        """``size`` bytes more sent or received: past :data:`ACK_EARLY`'s share of the
        limit, the Ack goes now."""
        self._unasked += size
        if self._unasked >= self._early and self.token is not None:
            if self._probe is not None:
                self._probe.cancel()
            self._probe_now()

    def _exchange_soon(self) -> None:
        """One Ack call within :data:`ACK_LINGER` carries both ways' acknowledgements:
        what the client received, and (its answer) what the handler consumed."""
        if self._probe is None:
            self._probe = asyncio.get_running_loop().call_later(
                max(self.ack_delay, ACK_LINGER), self._probe_now)

    def _probe_now(self) -> None:
        self._probe = None
        self._unasked = 0
        if not self._due():
            return
        if self._acking:
            self._again = True
            return
        self._ack_task = task = asyncio.get_running_loop().create_task(self._send_ack())
        _ACKS.add(task)  # not one of the call's tasks: close() leaves it to finish
        task.add_done_callback(_ACKS.discard)

    def _due(self) -> bool:
        """An Ack call is due: always on a call whose messages carry none; else only
        for an acknowledgement owed in a direction that stayed idle since the last
        probe. One owed while its direction talks goes with its next message (a
        server slow to commit answers an Ack with no more than its messages carry);
        the probe comes back after the next linger while one is owed."""
        if not self.carried:
            return True
        sent, came = self._talked
        self._talked = [False, False]
        owed_told, owed_heard = self._recv > self._told, self._sent > self._heard
        if (owed_told and not sent) or (owed_heard and not came):
            return True
        if owed_told or owed_heard:
            self._exchange_soon()
        return False

    async def send_ack(self, seq: int) -> None:
        self._recv = max(self._recv, seq)
        self._exchange_soon()

    @property
    def _acking(self) -> bool:
        """An Ack call is in flight."""
        return self._ack_task is not None and not self._ack_task.done()

    async def _send_ack(self) -> None:
        while self.token is not None and not self._closed:
            self._again = False
            told = self._recv
            try:
                answer = await self._ack({"id": self.token, "recv": told},
                                         metadata=self.metadata, timeout=ACK_DEADLINE)
            except aio.AioRpcError:
                return  # the call itself tells whether the stream goes on
            if self._closed:
                return
            self._told = max(self._told, told)
            if isinstance(answer, dict) and isinstance(answer.get("in"), int):
                self._heard = max(self._heard, answer["in"])
                self.frames_queue.put_nowait(Frame(ACK, seq=answer["in"]))
            if not self._again:
                return

    async def send_end(self, last: int) -> None:
        if self.carried:  # said, not inferred from the half-close (grpcwire.py)
            told = self._recv
            await self.call.write(end_message(last, told))
            self._told = max(self._told, told)
        await self.call.done_writing()

    async def frames(self) -> AsyncIterator[Frame]:
        while True:
            frame = await self.frames_queue.get()
            if frame is None:
                return
            if isinstance(frame, Exception):
                raise frame
            yield frame

    @property
    def close_code(self) -> int | None:
        return None

    async def close(self) -> None:
        """Cancel the call; :meth:`frames` ends (a send that failed closes the call
        while the stream still reads it: it must not wait on it forever). An Ack in
        flight is left to finish (:data:`ACK_EARLY`'s note)."""
        self._closed = True
        if self._probe is not None:
            self._probe.cancel()
        if self.call is not None:
            self.call.cancel()
        for task in list(self._tasks):
            task.cancel()
        self.frames_queue.put_nowait(None)


def _serialize(message: Any) -> bytes:
    return bytes(message.SerializeToString())


def connect_grpc(channel: aio.Channel, method: str, *, response_type: Any,
                 request_type: Any = None, request: Any = None,
                 metadata: Sequence[tuple[str, str]] | Mapping[str, str] = (),
                 limits: Limits | None = None, resume_timeout: float = 30.0
                 ) -> ClientStream:
    """A resumable gRPC stream: server-streaming with ``request`` (sent again with every
    resume), else bidirectional (``send`` messages of ``request_type``). ``metadata``
    goes with every call: the session's (what the mesh routes on). Messages sent and
    received are the protobuf messages themselves."""
    pairs = list(metadata.items()) if isinstance(metadata, Mapping) else list(metadata)
    settings = limits or Limits()

    async def connect() -> Connection:
        return _Call(channel, method, request, request_type, response_type, pairs,
                     settings)

    return ClientStream(connect, limits=settings, resume_timeout=resume_timeout,
                        measure=lambda message: int(message.ByteSize()))
