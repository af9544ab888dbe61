"""Resumable gRPC streams (grpc.aio): server-streaming and bidirectional calls whose stream
outlives their member; their Python client is :func:`.grpc_client.connect_grpc`.

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

On the wire (:mod:`.grpcwire`), the stream's fields are metadata, and its messages the
call's own:

* the call's metadata: ``x-meshxl-stream`` and ``x-meshxl-recv`` to resume (none: a
  new stream), ``x-meshxl-acks: field`` to carry acknowledgements in the messages; the
  server's initial metadata: ``x-meshxl-stream`` (the token), ``x-meshxl-in`` (the
  client messages its handler consumed: the client sends the rest again, first),
  ``x-meshxl-from`` (the number of the first message on this call: messages are
  numbered in their order on the call) and ``x-meshxl-acks: field`` when it grants
  them; trailing metadata ``x-meshxl-end`` when the handler finished (status OK),
  ``x-meshxl-refusal`` with a refusal's name (status :data:`~.protocol.REFUSALS`' gRPC
  code);
* acknowledgements: each message carries one (the client's of what it received, the
  server's of what the handler consumed) as a protobuf field appended to it; a
  direction with no message to carry it calls the unary
  ``/meshxl.streams.v1.Streams/Ack`` (JSON bodies ``{"id", "recv"}`` -> ``{"in"}``),
  routed like the stream by its session metadata.

The client and its resumption: :mod:`.grpc_client`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import grpc
from grpc import aio

from meshxl import headers as hdr

from .grpc_client import connect_grpc
from .grpcwire import (
    ACK_METHOD,
    ACKS,
    END_KEY,
    FIELD,
    FROM,
    IN,
    RECV,
    REFUSAL,
    SERVICE,
    STREAM,
    ended_at,
    json_in,
    json_out,
    split_ack,
    with_ack,
)
from .host import Refused, StreamHost
from .protocol import (
    FORBIDDEN,
    MALFORMED,
    MOVED,
    Payload,
    ProtocolError,
    Refusal,
    refusal_named,
    valid_token,
)
from .server import NO_TEXTS, Handler, ServerStream

log = logging.getLogger(__name__)

__all__ = ["ACK_METHOD", "GrpcStream", "acknowledgements", "connect_grpc", "stream_stream",
           "unary_stream"]


SessionOf = Callable[[aio.ServicerContext], str | None]


class GrpcStream:
    """A gRPC stream as its handler sees it: a :class:`.server.ServerStream` whose
    messages are the call's protobuf messages."""

    def __init__(self, inner: ServerStream, request: Any, response_type: Any):
        self.inner = inner
        self.response_type = response_type
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
        """As :meth:`.server.ServerStream.send`, a message of the method's response type
        (TypeError for another: its bytes would reach the client as one)."""
        if not isinstance(message, self.response_type):
            raise TypeError(f"the stream sends {self.response_type.__name__} messages, "
                            f"not {type(message).__name__}")
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

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.consumed = 0

    async def send_messages(self, messages: Sequence[tuple[int, Payload]],
                            ack: int | None = None,
                            texts: Mapping[int, str] = NO_TEXTS) -> None:
        for _, payload in messages:  # bytes: no texts
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


async def _serve(host: StreamHost, handler: Handler, request_type: Any, request: Any,
                 messages: AsyncIterator[bytes] | None, context: aio.ServicerContext,
                 session_of: SessionOf) -> None:
    session = session_of(context)
    if not session:
        await _abort(context, MALFORMED, "no session in the call's metadata")
        return
    conduit = _Conduit()
    metadata = dict(context.invocation_metadata() or ())
    token = metadata.get(STREAM)
    carried = metadata.get(ACKS) == FIELD
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
                                         (FROM, str(first)),
                                         *(((ACKS, FIELD),) if carried else ())))

    def wire(payload: Payload) -> bytes:  # a message as written: its bytes, and its ack
        assert isinstance(payload, bytes)
        return with_ack(payload, conduit.consumed) if carried else payload

    for _, payload in replay:
        await context.write(wire(payload))
    if stream.record.done:
        conduit.queue.put_nowait((_Conduit._END, stream.record.out,
                                  refusal_named(stream.record.failure or "")))
    reader = asyncio.get_running_loop().create_task(
        _read(stream, messages, request_type, carried)) if messages is not None else None
    try:
        while True:
            item = await conduit.queue.get()
            if isinstance(item, tuple) and item and item[0] is _Conduit._END:
                _, last, refusal = item
                if refusal is not None:
                    await _abort(context, refusal)
                context.set_trailing_metadata(((END_KEY, str(last)),))
                return
            await context.write(wire(item))
    finally:
        if reader is not None:
            reader.cancel()
        stream.detach(conduit)


END_GRACE = 0.1
"""Seconds the end of a call's messages waits before it counts as the client's end, in
a call whose client does not say its end (one without acknowledgements in its
messages: an earlier release's). A call reset by its client, or by Envoy draining its
listener, ends its messages just as a half-close does, and is cancelled an instant
later (grpc.aio, measured: 0.05 ms), later still on a busy server: taken for the
client's end, the handler would finish the stream for good, and the client, resuming
elsewhere, would find it ended (bench/streams.py's drain did, on an idle machine
without this grace and on a saturated one with it). A client that says its end
(grpcwire.py) needs none: the end of its messages without it is never its end."""


async def _read(stream: ServerStream, messages: AsyncIterator[bytes], request_type: Any,
                carried: bool) -> None:
    """The call's messages into the stream, each parsed here (the call's own
    deserializer would fail the call, not only the stream, on one that is not a
    message), its acknowledgement first when it carries one."""
    seq = stream.record.consumed
    try:
        async for data in messages:
            if carried:
                data, recv = split_ack(data)
                stream.acked(recv)
                last = ended_at(data)
                if last is not None:
                    stream.client_ended(last)
                    return
            try:
                message = request_type.FromString(data)
            except Exception as exc:  # protobuf's DecodeError, or what a type raises
                raise ProtocolError(f"a client message that is no "
                                    f"{request_type.__name__}: {exc}") from None
            seq += 1
            stream.received(seq, message)
        if not carried:  # an earlier client: the end of its messages, if not a reset
            await asyncio.sleep(END_GRACE)  # cancelled here (by _serve) if it was reset
            stream.client_ended(seq)
    except ProtocolError as exc:
        log.info("stream %s: %s", stream.token[:6], exc)
        stream.stop(MALFORMED)
    except (asyncio.CancelledError, aio.AioRpcError):
        pass


def unary_stream(host: StreamHost, handler: Callable[[GrpcStream], Any], *,
                 request_type: Any, response_type: Any,
                 session: str = hdr.SESSION) -> grpc.RpcMethodHandler:
    """A resumable server-streaming method (its handler gets a :class:`GrpcStream`)."""
    session_of = _metadata_session(session)

    async def method(request: Any, context: aio.ServicerContext) -> None:
        await _serve(host, lambda s: handler(GrpcStream(s, request, response_type)), request_type,
                     request, None, context, session_of)

    return grpc.unary_stream_rpc_method_handler(
        method, request_deserializer=request_type.FromString)


def stream_stream(host: StreamHost, handler: Callable[[GrpcStream], Any], *,
                  request_type: Any, response_type: Any,
                  session: str = hdr.SESSION) -> grpc.RpcMethodHandler:
    """A resumable bidirectional method (its handler gets a :class:`GrpcStream`)."""
    session_of = _metadata_session(session)

    async def method(requests: AsyncIterator[bytes], context: aio.ServicerContext) -> None:
        await _serve(host, lambda s: handler(GrpcStream(s, None, response_type)),
                     request_type, None, requests, context, session_of)

    return grpc.stream_stream_rpc_method_handler(method)


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
            ack, request_deserializer=json_in, response_serializer=json_out)})
