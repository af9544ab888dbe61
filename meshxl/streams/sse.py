"""Resumable Server-Sent Events for aiohttp servers (their Python client: :mod:`.sse_client`).

::

    app.router.add_route("*", "/feed", server_sent_events(host, feed))   # GET and POST
    async with connect_sse(url, headers={"x-session-id": "s1"}) as stream: ...

The server's messages travel as events of the response to ``GET`` (``Accept:
text/event-stream``); the client's as ``POST`` requests to the same URL. The fields of
:mod:`.protocol`:

* the stream: a new one has no header; a resumed one has ``X-Meshxl-Stream: TOKEN`` and
  ``X-Meshxl-Recv: N``, or ``Last-Event-ID: TOKEN:N`` (what a browser's
  ``EventSource`` sends by itself when it reconnects, so even a plain ``EventSource``
  gets the messages it missed, once);
* events: first ``event: ready`` (data ``{"id": TOKEN, "in": K, "out": N, "epoch": E}``,
  ``E`` the stream's epoch on this connection's server), then each
  message with ``id: TOKEN:SEQ`` (``data:`` its JSON; ``event: binary`` with base64 for
  bytes), ``event: ack`` (data: the client messages the handler consumed), ``event:
  end`` (data: the last message), ``event: error`` (data ``{"code", "message"}``)
  before the server closes, and ``: ping`` comments as a heartbeat;
* the client's frames, from the Python client: an *upload*, one ``POST`` per connection
  (``Content-Type: application/x-ndjson``, ``X-Meshxl-Stream`` and ``X-Meshxl-Epoch``)
  whose body streams the frames of :mod:`.protocol`, a JSON line each (messages, bytes
  as base64 in ``b``, acknowledgements, the end), answered ``200`` at once; a refusal
  is an ``error`` line, then the answer's end. A message then costs a line, not a
  request through the mesh (``bench/streams.py``: docs/streams.md);
* a client message, from a browser (which cannot stream a request body over HTTP/1.1):
  ``POST`` with ``X-Meshxl-Stream: TOKEN`` and ``X-Meshxl-Seq: N``,
  its body the message (``application/json``, or ``application/octet-stream`` for
  bytes); answered 202 ``{"in": K}``; an acknowledgement: ``X-Meshxl-Ack: N`` (on a
  message's POST, or alone, 204); the end of the client's side: ``X-Meshxl-End: N``;
  ``X-Meshxl-Epoch: E``, the epoch its ``ready`` said, names the server the POST is for:
  each POST is routed on its own, and one that reaches a former server of the stream
  (which does not know yet that it was taken over) would be taken there and lost, so a
  server whose epoch differs refuses it (:data:`~.protocol.MOVED`);
* a refusal: the status and JSON body ``{"error", "code"}`` of :data:`~.protocol.REFUSALS`
  (a POST to a stream this process does not serve is :data:`~.protocol.MOVED`, 421:
  sent again once the events resume; not a 5xx, which Envoy would retry on another
  priority, count towards ejecting the member, and judge it by).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import LineTooLong

from meshxl import headers as hdr

from .host import Refused, StreamHost
from .protocol import (
    ERROR,
    FORBIDDEN,
    MALFORMED,
    MAX_FRAME_BYTES,
    MESSAGE,
    MOVED,
    Frame,
    Payload,
    ProtocolError,
    Refusal,
    compact_json,
    decode_frame,
    encode_frame,
    encoded_size,
    refusal_named,
    valid_token,
)
from .server import NO_TEXTS, Handler, ServerStream
from .websocket import SessionOf, session_reader

log = logging.getLogger(__name__)

__all__ = ["ACK_HEADER", "END_HEADER", "EPOCH_HEADER", "EVENT_STREAM", "RECV_HEADER",
           "SEQ_HEADER", "STREAM_HEADER", "UPLOAD_TYPE", "server_sent_events"]

STREAM_HEADER = "X-Meshxl-Stream"
RECV_HEADER = "X-Meshxl-Recv"
SEQ_HEADER = "X-Meshxl-Seq"
ACK_HEADER = "X-Meshxl-Ack"
END_HEADER = "X-Meshxl-End"
EPOCH_HEADER = "X-Meshxl-Epoch"
EVENT_STREAM = "text/event-stream"
UPLOAD_TYPE = "application/x-ndjson"
"""The content type of an upload: one POST for the client's frames of a connection."""


def _event(data: str, *, event: str | None = None, id: str | None = None) -> bytes:
    lines = []
    if event is not None:
        lines.append(f"event: {event}")
    if id is not None:
        lines.append(f"id: {id}")
    lines.append(f"data: {data}")
    return ("\n".join(lines) + "\n\n").encode()


def _compact(value: Any) -> str:
    return compact_json(value)


def _ready(token: str, consumed: int, out: int, epoch: int) -> bytes:
    """The first event of a connection: the stream, where it stands, and its epoch on
    this server (which the client's POSTs name)."""
    return _event(_compact({"id": token, "in": consumed, "out": out, "epoch": epoch}),
                  event="ready")


class _Conduit:
    """A stream's event stream (:class:`.server.Conduit`)."""

    def __init__(self, response: web.StreamResponse, token: str):
        self.response = response
        self.token = token
        self.lock = asyncio.Lock()
        self.closed = asyncio.Event()

    async def send_messages(self, messages: Sequence[tuple[int, Payload]],
                            ack: int | None = None,
                            texts: Mapping[int, str] = NO_TEXTS) -> None:
        async with self.lock:
            await self._messages(messages, ack, texts)

    async def _messages(self, messages: Sequence[tuple[int, Payload]],
                        ack: int | None = None,
                        texts: Mapping[int, str] = NO_TEXTS) -> None:
        """The messages' events, and ``ack``'s, in one write."""
        out = b"".join(
            _event(base64.b64encode(bytes(p)).decode("ascii"), event="binary",
                   id=f"{self.token}:{seq}")
            if isinstance(p, bytes | bytearray | memoryview) else
            _event(texts.get(seq) or _compact(p), id=f"{self.token}:{seq}")
            for seq, p in messages)
        if ack is not None:
            out += _event(str(ack), event="ack")
        if out:
            await self.response.write(out)

    async def send_ack(self, consumed: int) -> None:
        async with self.lock:
            await self._messages((), consumed)

    async def send_end(self, last: int, failure: Refusal | None) -> None:
        async with self.lock:
            if failure is not None:
                await self.response.write(_event(_compact(
                    {"code": failure.name, "message": failure.meaning}), event="error"))
            await self.response.write(_event(str(last), event="end"))

    async def close(self, refusal: Refusal | None) -> None:
        if refusal is not None:
            with contextlib.suppress(Exception):
                async with self.lock:
                    await self.response.write(_event(_compact(
                        {"code": refusal.name, "message": refusal.meaning}), event="error"))
        self.closed.set()


def _refused(refusal: Refusal, message: str = "") -> web.Response:
    return web.json_response({"error": message or refusal.meaning, "code": refusal.name},
                             status=refusal.http_status)


def _number(value: str | None, name: str) -> int | None:
    if value is None:
        return None
    if not value.isascii() or not value.isdigit() or len(value) > 16:
        raise ProtocolError(f"{name} is a message number, not {value[:40]!r}")
    return int(value)


def _resume_of(request: web.Request) -> tuple[str, int] | None:
    """The stream a GET resumes: its headers, else ``Last-Event-ID`` (None: a new one)."""
    token = request.headers.get(STREAM_HEADER)
    if token is not None:
        recv = _number(request.headers.get(RECV_HEADER, "0"), RECV_HEADER) or 0
    else:
        last = request.headers.get("Last-Event-ID")
        if not last:
            return None
        token, _, seq = last.rpartition(":")
        recv = _number(seq, "Last-Event-ID's message number") or 0
    if not valid_token(token):
        raise ProtocolError("the stream's id is 22 characters of base64url")
    return token, recv


def server_sent_events(host: StreamHost, handler: Handler, *,
                       session: str | SessionOf = hdr.SESSION, heartbeat: float = 2.0
                       ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """An aiohttp handler (route it for GET and POST) serving ``handler``'s resumable
    streams as Server-Sent Events (the module docstring)."""
    session_of = session_reader(session)

    async def serve(request: web.Request) -> web.StreamResponse:
        who = session_of(request)
        if not who:
            return _refused(MALFORMED, f"no session: send the {hdr.SESSION} header or "
                                       "cookie")
        try:
            if request.method == "POST":
                return await _post(host, request, who)
            if request.method != "GET":
                return web.json_response({"error": "GET events, POST messages"},
                                         status=405, headers={"Allow": "GET, POST"})
            resume = _resume_of(request)
        except ProtocolError as exc:
            return _refused(MALFORMED, str(exc))
        return await _events(host, handler, request, who, resume, heartbeat)

    return serve


async def _events(host: StreamHost, handler: Handler, request: web.Request, session: str,
                  resume: tuple[str, int] | None, heartbeat: float) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": EVENT_STREAM,
                                           "Cache-Control": "no-cache"})
    conduit = _Conduit(response, resume[0] if resume else "")
    async with conduit.lock:
        try:
            if resume is None:
                stream = await host.open(session, "sse", handler, conduit)
                replay: list[tuple[int, Payload]] = []
                conduit.token = stream.token
            else:
                stream, replay = await host.resume(session, "sse", resume[0], resume[1],
                                                   handler, conduit)
        except Refused as refused:
            return _refused(refused.refusal, str(refused))
        try:
            await response.prepare(request)
            await response.write(_ready(stream.token, stream.record.consumed,
                                        stream.record.out, stream.record.epoch))
            await conduit._messages(replay)
            if stream.record.done:
                failure = refusal_named(stream.record.failure) \
                    if stream.record.failure else None
                await response.write(_event(str(stream.record.out), event="end")
                                     if failure is None else
                                     _event(_compact({"code": failure.name,
                                                      "message": failure.meaning}),
                                            event="error")
                                     + _event(str(stream.record.out), event="end"))
        except (ConnectionError, RuntimeError):
            stream.detach(conduit)
            return response
    try:
        while not conduit.closed.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(heartbeat):
                    await conduit.closed.wait()
            if not conduit.closed.is_set():
                async with conduit.lock:
                    await response.write(b": ping\n\n")
    except (ConnectionError, RuntimeError, asyncio.CancelledError):
        pass
    finally:
        stream.detach(conduit)
    return response


async def _post(host: StreamHost, request: web.Request, session: str) -> web.StreamResponse:
    token = request.headers.get(STREAM_HEADER)
    if not valid_token(token):
        return _refused(MALFORMED, f"a message needs {STREAM_HEADER}: the stream's id")
    assert token is not None
    stream = host.live.get(token)
    if stream is None:
        return _refused(MOVED, "this process does not serve the stream now: send it again "
                               "once its events resume")
    if stream.session != session:
        return _refused(FORBIDDEN)
    try:
        epoch = _number(request.headers.get(EPOCH_HEADER), EPOCH_HEADER)
    except ProtocolError as exc:
        return _refused(MALFORMED, str(exc))
    if epoch is not None and epoch != stream.record.epoch:
        # A POST for the connection of another server of the stream: this one was
        # taken over (and does not know it yet), or took it over since. Taken here, the
        # message would be answered 202 and never committed; refused, the client
        # resumes and sends it again where the stream is.
        return _refused(MOVED, f"the stream is at epoch {stream.record.epoch} here, not "
                               f"{epoch}: send it again once its events resume")
    if request.content_type == UPLOAD_TYPE:
        return await _upload(host, request, stream, epoch)
    try:
        seq = _number(request.headers.get(SEQ_HEADER), SEQ_HEADER)
        ack = _number(request.headers.get(ACK_HEADER), ACK_HEADER)
        end = _number(request.headers.get(END_HEADER), END_HEADER)
        if ack is not None:
            stream.acked(ack)
        if seq is not None:
            body = await request.read()
            if len(body) > host.limits.max_message_bytes:
                raise ProtocolError(f"a message of {len(body)} bytes; the limit is "
                                    f"{host.limits.max_message_bytes}")
            stream.received(seq, _payload(body, request.content_type), ordered=False)
        if end is not None:
            stream.client_ended(end)
    except ProtocolError as exc:
        stream.stop(MALFORMED)
        return _refused(MALFORMED, str(exc))
    if seq is None:
        return web.Response(status=204)
    return web.json_response({"in": stream.record.consumed}, status=202)


def _taken_here(host: StreamHost, stream: ServerStream, epoch: int | None) -> bool:
    """``stream`` is still this process's, at the epoch a POST names (the checks of
    :func:`_post`, made again for each frame of an upload)."""
    return host.live.get(stream.token) is stream \
        and (epoch is None or epoch == stream.record.epoch)


async def _upload(host: StreamHost, request: web.Request, stream: ServerStream,
                  epoch: int | None) -> web.StreamResponse:
    """An upload: one POST whose body carries the client's frames of one connection, a
    line each (messages, acknowledgements, its end: :func:`~.protocol.encode_frame`,
    bytes as base64), for as long as the connection lasts. Answered at once ``200``
    (so that no proxy keeps the body to send it again: Envoy's retries end with the
    answer's headers); a refusal later is an ``error`` line, then the answer's end."""
    response = web.StreamResponse(headers={"Content-Type": UPLOAD_TYPE,
                                           "Cache-Control": "no-cache"})
    await response.prepare(request)
    refusal: Refusal | None = None
    reason = ""
    limit = host.limits.max_message_bytes
    try:
        while line := await request.content.readline(max_line_length=MAX_FRAME_BYTES):
            if not _taken_here(host, stream, epoch):
                refusal, reason = MOVED, "the stream goes on elsewhere now: resume it"
                break
            frame = decode_frame(line)
            if frame.type == MESSAGE and len(line) > limit \
                    and encoded_size(frame.payload) > limit:
                raise ProtocolError(f"a message of {encoded_size(frame.payload)} "
                                    f"bytes; the limit is {limit}")
            stream.client_frame(frame, ordered=False)
    except (ProtocolError, LineTooLong) as exc:
        log.info("stream %s: %s", stream.token[:6], exc)
        stream.stop(MALFORMED)
        refusal, reason = MALFORMED, str(exc)
    except (ConnectionError, aiohttp.ClientPayloadError):
        return response  # the client's connection ended: it resumes, or it closed
    with contextlib.suppress(ConnectionError, RuntimeError):
        if refusal is not None:
            await response.write(encode_frame(Frame(ERROR, refusal=refusal,
                                                    message=reason[:500])).encode() + b"\n")
        await response.write_eof()
    return response


def _payload(body: bytes, content_type: str) -> Payload:
    if content_type == "application/octet-stream":
        return body
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"a message is JSON (or application/octet-stream): {exc}") \
            from None
