"""Resumable WebSockets for aiohttp servers: a route whose streams outlive their member.

::

    host = StreamHost(AsyncClient())                      # one per process
    app.router.add_get("/chat", websocket(host, chat))    # chat(stream): a Handler

A connection that negotiates the subprotocol ``meshxl.resume.v1`` (the client libraries
do) carries a resumable stream (:mod:`.protocol`); one that does not gets ``plain``
(an ordinary aiohttp WebSocket handler, ``handler(request) -> response``): it works as
any WebSocket does, and its client reconnects on its own when the member goes away.
Without ``plain`` such a connection is refused (400, JSON).

The session a stream belongs to is the one the mesh routes on: by default the request's
``x-session-id`` header, else its cookie of that name (``session``: another header
name, or a function of the request).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence

from aiohttp import WSMsgType, web

from meshxl import headers as hdr

from .host import Refused, StreamHost
from .protocol import (
    ACK,
    END,
    ERROR,
    MALFORMED,
    OPEN,
    RESUME,
    SUBPROTOCOL,
    Frame,
    Payload,
    ProtocolError,
    Refusal,
    decode_binary,
    decode_frame,
    encode_binary,
    encode_frame,
    json_text,
    message_frame,
)
from .server import NO_TEXTS, Handler, ServerStream

log = logging.getLogger(__name__)

__all__ = ["SessionOf", "session_reader", "websocket"]

SessionOf = Callable[[web.Request], str | None]
HELLO_TIMEOUT = 10.0
"""How long a new connection may take to say which stream it carries."""
GOING_AWAY = 1001


def session_reader(session: str | SessionOf = hdr.SESSION) -> SessionOf:
    """A request's session: the header named ``session`` (else its cookie of that name),
    or what the function ``session`` makes of the request."""
    if callable(session):
        return session
    name = session

    def read(request: web.Request) -> str | None:
        return request.headers.get(name) or request.cookies.get(name)

    return read


class _Conduit:
    """A stream's WebSocket connection (:class:`.server.Conduit`). Nothing is sent
    before the stream's ``ready`` and replay (``opening`` holds the lock until then)."""

    def __init__(self, ws: web.WebSocketResponse):
        self.ws = ws
        self.lock = asyncio.Lock()

    async def send_messages(self, messages: Sequence[tuple[int, Payload]],
                            ack: int | None = None,
                            texts: Mapping[int, str] = NO_TEXTS) -> None:
        async with self.lock:
            await self._messages(messages, ack, texts)

    async def _messages(self, messages: Sequence[tuple[int, Payload]],
                        ack: int | None = None,
                        texts: Mapping[int, str] = NO_TEXTS) -> None:
        """The messages, ``ack`` on the last if it is JSON (a binary frame carries
        none: then an ``a`` frame of its own)."""
        last = len(messages) - 1
        for i, (seq, payload) in enumerate(messages):
            if _binary(payload):
                await self.ws.send_bytes(encode_binary(seq, payload))
            else:
                text = texts.get(seq)
                await self.ws.send_str(message_frame(
                    seq, json_text(payload) if text is None else text,
                    ack if i == last else None))
        if ack is not None and (not messages or _binary(messages[-1][1])):
            await self.ws.send_str(encode_frame(Frame(ACK, seq=ack)))

    async def send_ack(self, consumed: int) -> None:
        async with self.lock:
            await self._messages((), consumed)

    async def send_end(self, last: int, failure: Refusal | None) -> None:
        async with self.lock:
            if failure is not None:
                await self.ws.send_str(encode_frame(Frame(ERROR, refusal=failure)))
            await self.ws.send_str(encode_frame(Frame(END, seq=last)))

    async def close(self, refusal: Refusal | None) -> None:
        await self.ws.close(code=refusal.close_code if refusal else GOING_AWAY,
                            message=(refusal.name if refusal else "resume").encode())


def websocket(host: StreamHost, handler: Handler, *,
              plain: Callable[[web.Request], Awaitable[web.StreamResponse]] | None = None,
              session: str | SessionOf = hdr.SESSION, heartbeat: float = 2.0
              ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """An aiohttp handler serving ``handler``'s resumable streams (the module docstring).
    ``heartbeat``: seconds between pings, so a connection whose peer is gone (a
    partition) is found within about twice that."""
    session_of = session_reader(session)

    async def serve(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(protocols=(SUBPROTOCOL,), heartbeat=heartbeat,
                                   max_msg_size=1 << 20)
        ready = ws.can_prepare(request)
        if not ready.ok or ready.protocol != SUBPROTOCOL:
            if plain is not None:
                return await plain(request)
            return web.json_response(
                {"error": f"a resumable stream: open it as a WebSocket with the "
                          f"subprotocol {SUBPROTOCOL} (meshxl's stream clients do)"},
                status=400)
        who = session_of(request)
        await ws.prepare(request)
        if not who:
            await ws.close(code=MALFORMED.close_code, message=b"no session")
            return ws
        await _carry(host, handler, ws, who)
        return ws

    return serve


async def _carry(host: StreamHost, handler: Handler, ws: web.WebSocketResponse,
                 session: str) -> None:
    conduit = _Conduit(ws)
    try:
        hello = await ws.receive(timeout=HELLO_TIMEOUT)
        if hello.type != WSMsgType.TEXT:
            raise ProtocolError("a stream's first frame is open or resume")
        first = decode_frame(hello.data)
        if first.type not in (OPEN, RESUME):
            raise ProtocolError("a stream's first frame is open or resume")
    except (ProtocolError, TimeoutError) as exc:
        await ws.close(code=MALFORMED.close_code, message=str(exc)[:120].encode())
        return
    async with conduit.lock:
        try:
            if first.type == OPEN:
                stream = await host.open(session, "websocket", handler, conduit)
                replay: list[tuple[int, Payload]] = []
            else:
                assert first.token is not None and first.recv is not None
                stream, replay = await host.resume(session, "websocket", first.token,
                                                   first.recv, handler, conduit)
        except Refused as refused:
            with contextlib.suppress(Exception):
                await ws.send_str(encode_frame(Frame(ERROR, refusal=refused.refusal,
                                                     message=str(refused))))
            await ws.close(code=refused.refusal.close_code,
                           message=refused.refusal.name.encode())
            return
        try:
            await ws.send_str(encode_frame(Frame(
                "ready", token=stream.token, consumed=stream.record.consumed,
                last=stream.record.out)))
            await conduit._messages(replay)
            if stream.record.done:
                failure = None if stream.record.failure is None else \
                    _refusal(stream.record.failure)
                if failure is not None:
                    await ws.send_str(encode_frame(Frame(ERROR, refusal=failure)))
                await ws.send_str(encode_frame(Frame(END, seq=stream.record.out)))
        except (ConnectionError, RuntimeError):
            stream.detach(conduit)
            return
    await _read(ws, stream, conduit)


async def _read(ws: web.WebSocketResponse, stream: ServerStream, conduit: _Conduit) -> None:
    try:
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                stream.client_frame(decode_frame(msg.data))
            elif msg.type == WSMsgType.BINARY:
                seq, data = decode_binary(msg.data)
                stream.received(seq, data)
            elif msg.type == WSMsgType.ERROR:
                break
    except ProtocolError as exc:
        log.info("stream %s: %s", stream.token[:6], exc)
        with contextlib.suppress(Exception):
            await ws.send_str(encode_frame(Frame(ERROR, refusal=MALFORMED,
                                                 message=str(exc))))
        stream.stop(MALFORMED)
        await ws.close(code=MALFORMED.close_code, message=b"malformed")
    finally:
        stream.detach(conduit)


def _binary(payload: Payload) -> bool:
    return isinstance(payload, bytes | bytearray | memoryview)


def _refusal(name: str) -> Refusal | None:
    from .protocol import refusal_named

    return refusal_named(name)
