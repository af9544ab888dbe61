"""Resumable gRPC streams (grpc.aio): server-streaming and bidirectional calls whose stream
outlives their member, and their Python client.

Server::

    server.add_generic_rpc_handlers((
        grpc.method_handlers_generic_handler("chat.v1.Chat", {
            "Talk": stream_stream(host, talk, request_type=Line, response_type=Reply),
            "Watch": unary_stream(host, watch, request_type=Query, response_type=Event),
        }),
        acknowledgements(host),   # the streams' Ack service, once per server
    ))

A handler gets a :class:`GrpcStream`: ``send(message)`` and iteration over the client's
messages (bidirectional), ``request`` (server-streaming), ``state``, as
:class:`.server.ServerStream`'s. Client::

    stream = connect_grpc(channel, "/chat.v1.Chat/Talk", request_type=Line,
                          response_type=Reply, metadata=[("x-session-id", "s1")])
    async with stream: await stream.send(Line(...)); async for reply in stream: ...

On the wire, the stream's fields are metadata, and its messages the call's own:

* the call's metadata: ``x-meshxl-stream`` and ``x-meshxl-recv`` to resume (none: a
  new stream); the server's initial metadata: ``x-meshxl-stream`` (the token),
  ``x-meshxl-in`` (the client messages its handler consumed: the client sends the rest
  again, first) and ``x-meshxl-from`` (the number of the first message on this call:
  messages are numbered in their order on the call); trailing metadata
  ``x-meshxl-end`` when the handler finished (status OK), ``x-meshxl-refusal`` with a
  refusal's name (status :data:`~.protocol.REFUSALS`' gRPC code);
* acknowledgements: a unary call ``/meshxl.streams.v1.Streams/Ack`` (JSON bodies
  ``{"id", "recv"}`` -> ``{"in"}``), routed like the stream by its session metadata:
  the client's acknowledgement of what it received, and its answer the server's of what
  the handler consumed. gRPC has no room for either inside a call's messages.

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
import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import grpc
from grpc import aio

from meshxl import headers as hdr

from .client import ClientStream, Connection
from .host import Refused, StreamHost
from .protocol import (
    ACK,
    END,
    ERROR,
    FORBIDDEN,
    MALFORMED,
    MESSAGE,
    MOVED,
    READY,
    REFUSALS,
    RESUME,
    Frame,
    Limits,
    Payload,
    ProtocolError,
    Refusal,
    refusal_named,
    valid_token,
)
from .server import Handler, ServerStream

log = logging.getLogger(__name__)

__all__ = ["ACK_METHOD", "GrpcStream", "acknowledgements", "connect_grpc", "stream_stream",
           "unary_stream"]

SERVICE = "meshxl.streams.v1.Streams"
ACK_METHOD = f"/{SERVICE}/Ack"
STREAM, RECV, IN, FROM, END_KEY, REFUSAL = (
    "x-meshxl-stream", "x-meshxl-recv", "x-meshxl-in", "x-meshxl-from", "x-meshxl-end",
    "x-meshxl-refusal")
_RESUMABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                        grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        *(getattr(grpc.StatusCode, r.grpc_status) for r in REFUSALS
                          if r.retry)})
"""What a call may end with and its stream goes on: a member gone (or a call reset),
or a refusal the client resumes after whose name the trailers lost."""

SessionOf = Callable[[aio.ServicerContext], str | None]


class GrpcStream:
    """A gRPC stream as its handler sees it: a :class:`.server.ServerStream` whose
    messages are the call's protobuf messages."""

    def __init__(self, inner: ServerStream, request: Any):
        self.inner = inner
        self.request = request
        """The call's request (server-streaming; None for a bidirectional call)."""

    @property
    def state(self) -> Any:
        return self.inner.state

    @state.setter
    def state(self, value: Any) -> None:
        self.inner.state = value

    @property
    def resumed(self) -> bool:
        return self.inner.resumed

    @property
    def seq(self) -> int:
        return self.inner.seq

    @property
    def session(self) -> str:
        return self.inner.session

    async def send(self, message: Any, **state: Any) -> int:
        return await self.inner.send(message.SerializeToString(), **state)

    async def receive(self) -> Any:
        return await self.inner.receive()

    def __aiter__(self) -> GrpcStream:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self.inner.receive()
        except EOFError:
            raise StopAsyncIteration from None

    async def flush(self) -> None:
        await self.inner.flush()


def _metadata_session(name: str) -> SessionOf:
    def read(context: aio.ServicerContext) -> str | None:
        for key, value in context.invocation_metadata() or ():
            if key == name and isinstance(value, str):
                return value
        return None

    return read


class _Conduit:
    """A stream's call (:class:`.server.Conduit`): what the host pushes is written by the
    call's own task, in order."""

    _END = object()

    def __init__(self, response_type: Any):
        self.response_type = response_type
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.consumed = 0

    async def send_messages(self, messages: Sequence[tuple[int, Payload]],
                            ack: int | None = None) -> None:
        for _, payload in messages:
            self.queue.put_nowait(payload)
        if ack is not None:
            await self.send_ack(ack)

    async def send_ack(self, consumed: int) -> None:
        self.consumed = max(self.consumed, consumed)

    async def send_end(self, last: int, failure: Refusal | None) -> None:
        self.queue.put_nowait((self._END, last, failure))

    async def close(self, refusal: Refusal | None) -> None:
        self.queue.put_nowait((self._END, None, refusal or MOVED))


async def _abort(context: aio.ServicerContext, refusal: Refusal, message: str = "") -> None:
    context.set_trailing_metadata(((REFUSAL, refusal.name),))
    await context.abort(getattr(grpc.StatusCode, refusal.grpc_status),
                        f"meshxl-stream {refusal.name}: {message or refusal.meaning}")


def _number(context: aio.ServicerContext, key: str) -> int | None:
    for name, value in context.invocation_metadata() or ():
        if name == key:
            if not isinstance(value, str) or not value.isdigit() or len(value) > 16:
                raise ProtocolError(f"{key} is a message number")
            return int(value)
    return None


async def _serve(host: StreamHost, handler: Handler, response_type: Any, request: Any,
                 messages: AsyncIterator[Any] | None, context: aio.ServicerContext,
                 session_of: SessionOf) -> None:
    session = session_of(context)
    if not session:
        await _abort(context, MALFORMED, "no session in the call's metadata")
        return
    conduit = _Conduit(response_type)
    token = dict(context.invocation_metadata() or ()).get(STREAM)
    try:
        recv = _number(context, RECV) or 0
        if token is not None and not valid_token(token):
            raise ProtocolError("x-meshxl-stream is the stream's id")
        if token is None:
            stream = await host.open(session, "grpc", handler, conduit, request)
            replay: list[tuple[int, Payload]] = []
        else:
            assert isinstance(token, str)
            stream, replay = await host.resume(session, "grpc", token, recv, handler,
                                               conduit, request)
    except ProtocolError as exc:
        await _abort(context, MALFORMED, str(exc))
        return
    except Refused as refused:
        await _abort(context, refused.refusal, str(refused))
        return
    first = replay[0][0] if replay else stream.record.out + 1
    conduit.consumed = stream.record.consumed
    await context.send_initial_metadata(((STREAM, stream.token),
                                         (IN, str(stream.record.consumed)),
                                         (FROM, str(first))))
    for _, payload in replay:
        await context.write(response_type.FromString(payload))
    if stream.record.done:
        conduit.queue.put_nowait((_Conduit._END, stream.record.out,
                                  refusal_named(stream.record.failure or "")))
    reader = asyncio.get_running_loop().create_task(_read(stream, messages)) \
        if messages is not None else None
    try:
        while True:
            item = await conduit.queue.get()
            if isinstance(item, tuple) and item and item[0] is _Conduit._END:
                _, last, refusal = item
                if refusal is not None:
                    await _abort(context, refusal)
                context.set_trailing_metadata(((END_KEY, str(last)),))
                return
            await context.write(response_type.FromString(item))
    finally:
        if reader is not None:
            reader.cancel()
        stream.detach(conduit)


END_GRACE = 0.1
"""Seconds the end of a call's messages waits before it counts as the client's end. A
call reset by its client, or by Envoy draining its listener, ends its messages just as
a half-close does, and is cancelled an instant later (grpc.aio, measured: 0.05 ms):
taken for the client's end, the handler would finish the stream for good, and the
client, resuming elsewhere, would find it ended (bench/streams.py's drain did)."""


async def _read(stream: ServerStream, messages: AsyncIterator[Any]) -> None:
    seq = stream.record.consumed
    try:
        async for message in messages:
            seq += 1
            stream.received(seq, message)
        await asyncio.sleep(END_GRACE)  # cancelled here (by _serve) if the call was reset
        stream.client_ended(seq)
    except ProtocolError as exc:
        log.info("stream %s: %s", stream.token[:6], exc)
        stream.stop(MALFORMED)
    except (asyncio.CancelledError, aio.AioRpcError):
        pass


def unary_stream(host: StreamHost, handler: Callable[[GrpcStream], Any], *,
                 request_type: Any, response_type: Any,
                 session: str = hdr.SESSION) -> grpc.RpcMethodHandler:
    """A server-streaming method whose stream is resumable (the module docstring)."""
    session_of = _metadata_session(session)

    async def method(request: Any, context: aio.ServicerContext) -> None:
        await _serve(host, lambda s: handler(GrpcStream(s, request)), response_type,
                     request, None, context, session_of)

    return grpc.unary_stream_rpc_method_handler(
        method, request_deserializer=request_type.FromString,
        response_serializer=response_type.SerializeToString)


def stream_stream(host: StreamHost, handler: Callable[[GrpcStream], Any], *,
                  request_type: Any, response_type: Any,
                  session: str = hdr.SESSION) -> grpc.RpcMethodHandler:
    """A bidirectional method whose stream is resumable (the module docstring)."""
    session_of = _metadata_session(session)

    async def method(requests: AsyncIterator[Any], context: aio.ServicerContext) -> None:
        await _serve(host, lambda s: handler(GrpcStream(s, None)), response_type, None,
                     requests, context, session_of)

    return grpc.stream_stream_rpc_method_handler(
        method, request_deserializer=request_type.FromString,
        response_serializer=response_type.SerializeToString)


def acknowledgements(host: StreamHost, *, session: str = hdr.SESSION
                     ) -> grpc.GenericRpcHandler:
    """The streams' Ack service (the module docstring), once per server."""
    session_of = _metadata_session(session)

    async def ack(request: Any, context: aio.ServicerContext) -> Any:
        if not isinstance(request, dict) or not valid_token(request.get("id")) \
                or not isinstance(request.get("recv"), int) or request["recv"] < 0:
            await _abort(context, MALFORMED, 'an acknowledgement is {"id", "recv"}')
        stream = host.live.get(request["id"])
        if stream is None:
            await _abort(context, MOVED, "this process does not serve the stream now")
            raise AssertionError("unreachable")
        if stream.session != session_of(context):
            await _abort(context, FORBIDDEN)
        try:
            stream.acked(request["recv"])
        except ProtocolError as exc:
            await _abort(context, MALFORMED, str(exc))
        return {"in": stream.record.consumed}

    return grpc.method_handlers_generic_handler(SERVICE, {
        "Ack": grpc.unary_unary_rpc_method_handler(
            ack, request_deserializer=_json_in, response_serializer=_json_out)})


def _json_in(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None


def _json_out(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


# -- the client --------------------------------------------------------------------------


ACK_LINGER = 1.0
"""Seconds a client's acknowledgement, and its question of what the handler consumed,
wait before one Ack call carries both, unless :data:`ACK_EARLY` of the unacknowledged
bytes have gathered first. Each Ack is a unary call through the mesh: a client that
talks as often as it listens made about two for each message it sent, then (lingering
0.25 s) four a second at 5 messages a second (``bench/streams.py``, 1,000 streams: the
call's CPU per message was 2,172 us against the plain call's 346). One that lingers
when its call closes is dropped with it; the stream says what it received when it
resumes."""
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
        self.frames_queue: asyncio.Queue[Frame | None] = asyncio.Queue()
        self.next_seq = 0
        self.code: grpc.StatusCode | None = None
        self._probe: asyncio.TimerHandle | None = None
        self._ack_task: asyncio.Task[None] | None = None
        self._closed = False
        self._again = False
        """Another Ack is due when the one in flight returns."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._ack = channel.unary_unary(ACK_METHOD, request_serializer=_json_out,
                                        response_deserializer=_json_in)
        self._recv = 0

    async def hello(self, frame: Frame) -> None:
        metadata = list(self.metadata)
        if frame.type == RESUME:
            assert frame.token is not None
            self.token = frame.token
            metadata += [(STREAM, frame.token), (RECV, str(frame.recv))]
        if self.request is not None:
            self.call = self.channel.unary_stream(
                self.method, request_serializer=_serialize,
                response_deserializer=self.response_type.FromString)(
                    self.request, metadata=metadata)
        else:
            self.call = self.channel.stream_stream(
                self.method, request_serializer=_serialize,
                response_deserializer=self.response_type.FromString)(metadata=metadata)
        initial = dict(await self.call.initial_metadata() or ())
        if STREAM not in initial:  # refused before its first message: read the status
            code = await self.call.code()
            self.frames_queue.put_nowait(self._ended(code, await self.call.trailing_metadata()))
            self.frames_queue.put_nowait(None)
            return
        self.token = str(initial[STREAM])
        self.next_seq = int(initial[FROM])
        self.frames_queue.put_nowait(Frame(READY, token=self.token,
                                           consumed=int(initial[IN]),
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
        call that is gone."""
        ended: Frame | None = None
        try:
            async for message in self.call:
                self.frames_queue.put_nowait(Frame(MESSAGE, seq=self.next_seq,
                                                   payload=message))
                self.next_seq += 1
                self._count(int(message.ByteSize()))
            ended = self._ended(await self.call.code(), await self.call.trailing_metadata())
        except aio.AioRpcError as exc:
            ended = self._ended(exc.code(), exc.trailing_metadata())
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

    async def send_message(self, seq: int, payload: Payload, ack: int | None = None) -> None:
        await self.call.write(payload)
        if ack is not None:
            self._recv = max(self._recv, ack)
        self._count(int(payload.ByteSize()))
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
        if self._acking:
            self._again = True
            return
        self._ack_task = task = asyncio.get_running_loop().create_task(self._send_ack())
        _ACKS.add(task)  # not one of the call's tasks: close() leaves it to finish
        task.add_done_callback(_ACKS.discard)

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
            try:
                answer = await self._ack({"id": self.token, "recv": self._recv},
                                         metadata=self.metadata, timeout=ACK_DEADLINE)
            except aio.AioRpcError:
                return  # the call itself tells whether the stream goes on
            if self._closed:
                return
            if isinstance(answer, dict) and isinstance(answer.get("in"), int):
                self.frames_queue.put_nowait(Frame(ACK, seq=answer["in"]))
            if not self._again:
                return

    async def send_end(self, last: int) -> None:
        await self.call.done_writing()

    async def frames(self) -> AsyncIterator[Frame]:
        while True:
            frame = await self.frames_queue.get()
            if frame is None:
                return
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
