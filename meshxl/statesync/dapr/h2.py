"""gRPC's unary calls over HTTP/2 without TLS (h2c), on the event loop's own transports:
the server under Dapr's gRPC API. Why not grpcio's asyncio server, which the sidecar has
loaded anyway: measured on one machine side by side, it costs 230-380 us of the server's
CPU per call of a handler doing nothing, this 50-65 us; a Dapr save through it cost
1.62x a native one (docs/dapr.md has this one's figures; the target is 1.2x). What a
call costs here once its connection is up is kept to what differs per call: a client's
header block, the same bytes call after call (fields indexed in the dynamic table), is
decoded once while the table stays as it was (decoding it with ``hpack`` each time was
most of what a save through gRPC cost more than a native one), and the answers of the
calls that end in one turn of the loop (those one etcd transaction committed) go out in
one write.

What it does, and refuses clearly (RFC 9113, gRPC's HTTP/2 protocol):

* the client's preface, then SETTINGS both ways (each acknowledged), PING answered,
  PRIORITY ignored, GOAWAY honoured (no new stream; the connection closes when its
  streams are done), RST_STREAM drops the stream's answer;
* header blocks (HEADERS and CONTINUATION) decoded with ``hpack`` (the HPACK of the
  python-hyper project: its static and dynamic tables, Huffman), every block but one
  seen before that leaves the dynamic table as it was (kept decoded, at most
  :data:`KNOWN_BLOCKS`, until a block changes the table), so the table never drifts;
  answers use no dynamic table (literals and the static table);
* each request's message (the 5-byte gRPC prefix, uncompressed: a compressed one is
  UNIMPLEMENTED) read whole, at most :data:`MAX_MESSAGE` bytes (RESOURCE_EXHAUSTED
  beyond), then handed to the handler in a task of its own; its answer (a message and
  status 0, or a status and message) sent as HEADERS, DATA and trailers, or trailers
  only, within the peer's flow-control windows and frame size;
* a call refused from its headers (another service, a method not served, a wrong
  token) answered with its status at its first message, or :data:`REFUSAL_WAIT` after
  its headers when none comes, then reset (NO_ERROR) if its requests go on;
* flow control for what it receives: a large connection window granted at once, and each
  DATA frame's bytes granted back (connection and stream) as it is read;
* at most :data:`MAX_STREAMS` streams at once (REFUSED_STREAM beyond), header blocks of
  :data:`MAX_HEADER_BLOCK` bytes at most, :data:`MAX_BUFFERED` bytes of requests read
  and not answered on a connection, :data:`MAX_CONNECTIONS` connections; a frame larger
  than 16 KiB, a bad preface or a header block that does not decode end the connection
  with GOAWAY and the error.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Awaitable, Callable

from meshxl.h2wire import (
    ACK,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PADDED,
    PING,
    PREFACE,
    PRIORITY_FLAG,
    PUSH_PROMISE,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    frame_head,
)
from meshxl.h2wire import frame as _frame
from meshxl.h2wire import keeps_table as _keeps_table
from meshxl.h2wire import literal as _literal

__all__ = ["MAX_MESSAGE", "MAX_STREAMS", "Call", "Connections", "Early", "GrpcConnection",
           "Handler",
           "serve_on", "trailers"]

log = logging.getLogger(__name__)

NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR = 0x0, 0x1, 0x3, 0x6
REFUSED_STREAM, CANCEL, COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x7, 0x8, 0x9, 0xB
MAX_FRAME = 16_384
"""The largest frame it takes (HTTP/2's default: it advertises no other)."""
MAX_STREAMS = 128
MAX_HEADER_BLOCK = 65_536
MAX_MESSAGE = 16 << 20
"""Bytes of one request message at most (the Dapr HTTP API's body limit)."""
MAX_BUFFERED = 64 << 20
"""Bytes of requests a connection may have read and not yet answered (its streams'
messages together): past it the connection ends (GOAWAY, ENHANCE_YOUR_CALM)."""
KNOWN_BLOCKS, KNOWN_SIZE = 16, 4096
"""Header blocks a connection keeps decoded (:attr:`GrpcConnection.known`) at most, and
the largest header list kept (HPACK's size: 32 bytes a field and its octets)."""
MAX_CONNECTIONS = 1024
"""Connections at once: another one is closed at once (GOAWAY, ENHANCE_YOUR_CALM)."""
RECEIVE_WINDOW = 1 << 24
"""The connection window granted at once: what a client may send before it is granted
more (each DATA frame's bytes are granted back as they are read)."""
STREAM_WINDOW = 1 << 20
_DEFAULT_WINDOW = 65_535
REFUSAL_WAIT = 0.5
"""Seconds a call refused from its headers waits for its first message before its
answer goes anyway. A client (grpcio's among them) whose first message is still being
sent when the answer and the stream's reset arrive sees its send fail, and reports that
(INTERNAL) instead of the answer's status; a client that waits for the server before it
sends still gets its answer, never a hang."""

_OK_HEAD = b"\x88\x0f\x10\x10application/grpc"
"""``:status: 200`` (static index 8) and ``content-type: application/grpc`` (literal
without indexing, name at static index 31)."""
_SAFE = frozenset(range(0x20, 0x7F)) - {ord("%")}

Call = tuple[str, bytes, dict[str, str]]
"""A unary call as the handler gets it: its path, its request message, its headers."""
Handler = Callable[[str, bytes, dict[str, str]], Awaitable[tuple[int, str, bytes]]]
"""``(path, message, headers) -> (grpc status, status message, answer message)``."""
Early = Callable[[str, dict[str, str]], "tuple[int, str] | None"]
"""``(path, headers) -> (grpc status, message)`` of a call refused from its headers
alone (a method not served, a stream among them, which may never end its requests),
answered at once and its stream reset; None: read its message and call the handler."""


_OK_TRAILERS = b"\x00\x0bgrpc-status\x010"
"""``grpc-status: 0`` (:func:`trailers`), the same for every call answered."""


def _grpc_message(text: str) -> bytes:
    """``grpc-message``'s percent-encoding of UTF-8 (gRPC's HTTP/2 protocol)."""
    return b"".join(bytes((b,)) if b in _SAFE else b"%%%02X" % b for b in text.encode())


def trailers(status: int, message: str) -> bytes:
    block = _literal(b"grpc-status", str(status).encode())
    if message:
        block += _literal(b"grpc-message", _grpc_message(message[:4000]))
    return block


class _Stream:
    __slots__ = ("body", "ended", "headers", "out", "path", "refusal", "send_window",
                 "timer", "trailers")

    def __init__(self, send_window: int):
        self.headers: dict[str, str] = {}
        self.path = ""
        self.body = bytearray()
        self.ended = False
        self.send_window = send_window
        self.out = b""
        """Answer bytes (DATA payload) not yet sent: they wait for window."""
        self.trailers: bytes | None = None
        self.refusal: tuple[int, str] | None = None
        """The status a call refused from its headers gets at its first message."""
        self.timer: asyncio.TimerHandle | None = None


class GrpcConnection(asyncio.Protocol):
    """One client connection (the module docstring)."""

    def __init__(self, handler: Handler, connections: Connections, early: Early | None = None):
        import hpack

        self.handler = handler
        self.early = early
        self.connections = connections
        self.decoder = hpack.Decoder()
        self.decoder.max_header_list_size = MAX_HEADER_BLOCK
        self.hpack_error: type[Exception] = hpack.HPACKError
        self.known: dict[bytes, dict[str, str]] = {}
        """Header blocks decoded that leave the dynamic table as it was (a client's
        calls after its first: indexed fields), while the table is as they found it."""
        self.flushing = False
        """An answer's write is due at the loop's next turn (:meth:`_flush_soon`)."""
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.preface = False
        self.streams: dict[int, _Stream] = {}
        self.block: bytearray | None = None
        """A header block whose CONTINUATION frames are still to come."""
        self.block_stream = 0
        self.block_flags = 0
        self.last_stream = 0
        self.send_window = _DEFAULT_WINDOW
        self.initial_window = _DEFAULT_WINDOW
        self.max_frame = MAX_FRAME
        self.going_away = False
        self.out: list[bytes] = []
        self.buffered = 0
        """Bytes of the open streams' messages read so far (:data:`MAX_BUFFERED`)."""
        self.tasks: set[asyncio.Task[None]] = set()
        self.waiting: dict[int, None] = {}
        """Streams whose answers wait for window, in order."""

    # -- the connection ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if len(self.connections.live) >= MAX_CONNECTIONS:
            return self._fail(ENHANCE_YOUR_CALM, f"{MAX_CONNECTIONS} connections open")
        self.connections.add(self)
        settings = struct.pack(">HLHLHL", 0x3, MAX_STREAMS, 0x4, STREAM_WINDOW,
                               0x6, MAX_HEADER_BLOCK)
        transport.write(_frame(SETTINGS, 0, 0, settings) + _frame(
            WINDOW_UPDATE, 0, 0, struct.pack(">L", RECEIVE_WINDOW - _DEFAULT_WINDOW)))

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        self.transport = None
        for stream in self.streams.values():
            if stream.timer is not None:
                stream.timer.cancel()
        self.streams.clear()

    def close(self) -> None:
        """GOAWAY: no new stream; closed once the streams under way are answered."""
        if self.transport is None:
            return
        self.going_away = True
        self.out.append(_frame(GOAWAY, 0, 0, struct.pack(">LL", self.last_stream, NO_ERROR)))
        self._flush()  # after the answers not yet written; closed if none is under way

    def _fail(self, code: int, why: str) -> None:
        log.info("gRPC connection closed: %s", why)
        if self.transport is not None:
            self.transport.write(_frame(GOAWAY, 0, 0, struct.pack(
                ">LL", self.last_stream, code) + why.encode()[:200]))
            self.transport.close()
            self.transport = None

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        if not self.preface:
            if len(buffer) < len(PREFACE):
                if not PREFACE.startswith(buffer):
                    return self._fail(PROTOCOL_ERROR, "not HTTP/2's client preface")
                self.buffer = buffer
                return
            if not buffer.startswith(PREFACE):
                return self._fail(PROTOCOL_ERROR, "not HTTP/2's client preface")
            buffer = buffer[len(PREFACE):]
            self.preface = True
        pos, end = 0, len(buffer)
        granted = 0
        while end - pos >= 9 and self.transport is not None:
            size, kind, flags, stream = frame_head(buffer, pos)
            if size > MAX_FRAME:
                return self._fail(FRAME_SIZE_ERROR, f"a frame of {size} bytes")
            if end - pos - 9 < size:
                break
            payload = buffer[pos + 9:pos + 9 + size]
            pos += 9 + size
            if self.block is not None and kind != CONTINUATION:
                return self._fail(PROTOCOL_ERROR, "a header block interrupted")
            if kind == DATA:
                granted += size
                self._data(stream, flags, payload)
            elif kind == HEADERS:
                self._headers(stream, flags, payload)
            elif kind == CONTINUATION:
                self._continuation(stream, flags, payload)
            elif kind == SETTINGS:
                self._settings(flags, payload)
            elif kind == WINDOW_UPDATE:
                self._window_update(stream, payload)
            elif kind == PING:
                if not flags & ACK:
                    self.out.append(_frame(PING, ACK, 0, payload))
            elif kind == RST_STREAM:
                self._drop(stream)
            elif kind == GOAWAY:
                self.going_away = True
            elif kind == PUSH_PROMISE:
                return self._fail(PROTOCOL_ERROR, "a client may not push")
            # PRIORITY and unknown frame types: ignored (RFC 9113 section 4.1).
        self.buffer = buffer[pos:]
        if granted:
            self.out.append(_frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", granted)))
        self._flush()

    def _flush(self) -> None:
        self.flushing = False
        if self.out and self.transport is not None:
            self.transport.write(b"".join(self.out))
        self.out.clear()
        if self.going_away and not self.streams and self.transport is not None:
            self.transport.close()

    def _flush_soon(self) -> None:
        """A write at the loop's next turn, not at once: the calls answered in this turn
        (those whose etcd transaction just committed) go out in one write."""
        if not self.flushing:
            self.flushing = True
            asyncio.get_running_loop().call_soon(self._flush)

    # -- frames -----------------------------------------------------------------------

    @staticmethod
    def _unpad(flags: int, payload: bytes) -> bytes | None:
        if flags & PADDED:
            if not payload or payload[0] >= len(payload):
                return None
            payload = payload[1:len(payload) - payload[0]]
        return payload

    def _data(self, stream_id: int, flags: int, payload: bytes) -> None:
        stream = self.streams.get(stream_id)
        body = self._unpad(flags, payload)
        if body is None:
            return self._fail(PROTOCOL_ERROR, "bad padding")
        if stream is None or stream.ended:
            return  # a stream answered or refused already: its bytes are dropped
        if stream.refusal is not None:
            stream.ended = bool(flags & END_STREAM)
            return self._refuse(stream_id, stream)
        if len(stream.body) + len(body) > MAX_MESSAGE + 5:  # answered, the rest reset
            return self._answer(stream_id, stream, 8, f"the request is larger than "
                                f"{MAX_MESSAGE} bytes", b"")
        stream.body += body
        self.buffered += len(body)
        if self.buffered > MAX_BUFFERED:
            return self._fail(ENHANCE_YOUR_CALM, f"more than {MAX_BUFFERED} bytes of "
                              "requests under way")
        if body and not flags & END_STREAM:
            self.out.append(_frame(WINDOW_UPDATE, 0, stream_id, struct.pack(">L", len(body))))
        if flags & END_STREAM:
            stream.ended = True
            self._start(stream_id, stream)

    def _headers(self, stream_id: int, flags: int, payload: bytes) -> None:
        block = self._unpad(flags, payload)
        if block is None or stream_id == 0:
            return self._fail(PROTOCOL_ERROR, "bad HEADERS")
        if flags & PRIORITY_FLAG:
            block = block[5:]
        self.block, self.block_stream, self.block_flags = bytearray(block), stream_id, flags
        if flags & END_HEADERS:
            self._header_block()

    def _continuation(self, stream_id: int, flags: int, payload: bytes) -> None:
        if self.block is None or stream_id != self.block_stream:
            return self._fail(PROTOCOL_ERROR, "CONTINUATION without its HEADERS")
        self.block += payload
        if len(self.block) > MAX_HEADER_BLOCK:
            return self._fail(ENHANCE_YOUR_CALM, "a header block over "
                              f"{MAX_HEADER_BLOCK} bytes")
        if flags & END_HEADERS:
            self._header_block()

    def _header_block(self) -> None:
        assert self.block is not None
        block, stream_id, flags = bytes(self.block), self.block_stream, self.block_flags
        self.block = None
        decoded = self.known.get(block)
        if decoded is None:
            try:  # any other block decoded, so the dynamic table stays the peer's
                fields = self.decoder.decode(block, raw=True)
            except self.hpack_error as exc:
                return self._fail(COMPRESSION_ERROR, f"a header block that does not "
                                  f"decode: {exc}")
            # bytes (raw): any octets, never a decode error here
            decoded = {bytes(name).decode("latin-1"): bytes(value).decode("latin-1")
                       for name, value in fields}
            if not _keeps_table(block):
                self.known.clear()  # decoded with the table as it was
            elif len(self.known) < KNOWN_BLOCKS and sum(
                    32 + len(name) + len(value) for name, value in fields) <= KNOWN_SIZE:
                self.known[block] = decoded
        stream = self.streams.get(stream_id)
        if stream is not None:  # trailers of a request
            if flags & END_STREAM and not stream.ended:
                stream.ended = True
                if stream.refusal is not None:
                    return self._refuse(stream_id, stream)
                self._start(stream_id, stream)
            return
        if stream_id <= self.last_stream or stream_id % 2 == 0:
            return  # an old stream's late headers, or not a client's stream
        self.last_stream = stream_id
        if self.going_away:
            self.out.append(_frame(RST_STREAM, 0, stream_id, struct.pack(">L", REFUSED_STREAM)))
            return
        if len(self.streams) >= MAX_STREAMS:
            self.out.append(_frame(RST_STREAM, 0, stream_id, struct.pack(">L", REFUSED_STREAM)))
            return
        stream = self.streams[stream_id] = _Stream(self.initial_window)
        headers = stream.headers = dict(decoded)  # the handler's own
        stream.path = headers.get(":path", "")
        refusal = self.early(stream.path, headers) if self.early is not None else None
        if refusal is not None:
            if flags & END_STREAM:
                return self._answer(stream_id, stream, refusal[0], refusal[1], b"")
            stream.refusal = refusal  # answered at its first message (REFUSAL_WAIT)
            stream.timer = asyncio.get_running_loop().call_later(
                REFUSAL_WAIT, self._refuse, stream_id, stream)
            return
        if flags & END_STREAM:
            stream.ended = True
            self._start(stream_id, stream)

    def _settings(self, flags: int, payload: bytes) -> None:
        if flags & ACK:
            return
        if len(payload) % 6:
            return self._fail(FRAME_SIZE_ERROR, "SETTINGS of a bad size")
        for key, value in struct.iter_unpack(">HL", payload):
            if key == 0x4:
                if value > 0x7FFFFFFF:
                    return self._fail(FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE too large")
                for stream in self.streams.values():
                    stream.send_window += value - self.initial_window
                self.initial_window = value
            elif key == 0x5:
                if not MAX_FRAME <= value <= 0xFFFFFF:
                    return self._fail(PROTOCOL_ERROR, "a bad MAX_FRAME_SIZE")
                self.max_frame = value
        self.out.append(_frame(SETTINGS, ACK, 0))
        self._send_waiting()

    def _window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            return self._fail(FRAME_SIZE_ERROR, "WINDOW_UPDATE of a bad size")
        increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if stream_id == 0:
            self.send_window += increment
        elif (stream := self.streams.get(stream_id)) is not None:
            stream.send_window += increment
        self._send_waiting()

    def _drop(self, stream_id: int) -> None:
        """RST_STREAM: the stream is forgotten; a handler under way finishes, unheard."""
        stream = self.streams.pop(stream_id, None)
        if stream is not None:
            self.buffered -= len(stream.body)
            if stream.timer is not None:
                stream.timer.cancel()
        self.waiting.pop(stream_id, None)

    def _refuse(self, stream_id: int, stream: _Stream) -> None:
        """A call refused from its headers answered: at its first message or end, or
        :data:`REFUSAL_WAIT` after its headers."""
        if self.streams.get(stream_id) is not stream or stream.refusal is None:
            return
        if stream.timer is not None:
            stream.timer.cancel()
        self._answer(stream_id, stream, *stream.refusal, b"")
        self._flush()

    # -- calls and answers --------------------------------------------------------------

    def _start(self, stream_id: int, stream: _Stream) -> None:
        body = bytes(stream.body)
        if len(body) < 5 or int.from_bytes(body[1:5], "big") != len(body) - 5:
            return self._answer(stream_id, stream, 13, "the request is not one gRPC "
                                "message", b"")
        if body[0]:
            return self._answer(stream_id, stream, 12, "compressed messages are not "
                                "supported (send them uncompressed)", b"")
        task = asyncio.get_running_loop().create_task(self._call(stream_id, stream, body[5:]))
        self.tasks.add(task)  # held until done (the loop keeps only a weak reference)
        task.add_done_callback(self.tasks.discard)

    async def _call(self, stream_id: int, stream: _Stream, message: bytes) -> None:
        try:
            status, text, answer = await self.handler(stream.path, message, stream.headers)
        except Exception as exc:  # noqa: BLE001 - a defect: INTERNAL, logged
            log.error("gRPC %s failed", stream.path[:200], exc_info=exc)
            status, text, answer = 13, f"internal error: {type(exc).__name__}", b""
        if self.streams.get(stream_id) is stream:
            self._answer(stream_id, stream, status, text, answer)
            self._flush_soon()

    def _answer(self, stream_id: int, stream: _Stream, status: int, text: str,
                answer: bytes) -> None:
        if status:  # trailers only
            self.out.append(_frame(HEADERS, END_HEADERS | END_STREAM, stream_id,
                                   _OK_HEAD + trailers(status, text)))
            self._end(stream_id)
            return
        self.out.append(_frame(HEADERS, END_HEADERS, stream_id, _OK_HEAD))
        stream.out = b"\x00" + len(answer).to_bytes(4, "big") + answer
        stream.trailers = _OK_TRAILERS
        self._send(stream_id, stream)

    def _send(self, stream_id: int, stream: _Stream) -> None:
        """As much of the stream's answer as the windows allow; its trailers after it."""
        out = stream.out
        while out:
            room = min(self.send_window, stream.send_window, self.max_frame, len(out))
            if room <= 0:
                stream.out = out
                self.waiting[stream_id] = None
                return
            self.out.append(_frame(DATA, 0, stream_id, out[:room]))
            out = out[room:]
            self.send_window -= room
            stream.send_window -= room
        stream.out = b""
        assert stream.trailers is not None
        self.out.append(_frame(HEADERS, END_HEADERS | END_STREAM, stream_id, stream.trailers))
        self.waiting.pop(stream_id, None)
        self._end(stream_id)

    def _send_waiting(self) -> None:
        for stream_id in list(self.waiting):
            stream = self.streams.get(stream_id)
            if stream is None:
                self.waiting.pop(stream_id, None)
            elif self.send_window > 0:
                self._send(stream_id, stream)

    def _end(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is not None:
            self.buffered -= len(stream.body)
        if stream is not None and not stream.ended:  # answered before its request ended
            self.out.append(_frame(RST_STREAM, 0, stream_id, struct.pack(">L", NO_ERROR)))


class Connections:
    """The connections open, and an event set whenever there is none."""

    def __init__(self) -> None:
        self.live: set[GrpcConnection] = set()
        self.none = asyncio.Event()
        self.none.set()

    def add(self, connection: GrpcConnection) -> None:
        self.live.add(connection)
        self.none.clear()

    def discard(self, connection: GrpcConnection) -> None:
        self.live.discard(connection)
        if not self.live:
            self.none.set()


def serve_on(handler: Handler, early: Early | None = None
             ) -> tuple[Callable[[], GrpcConnection], Connections]:
    """A protocol factory for ``loop.create_server`` and its connections."""
    connections = Connections()
    return (lambda: GrpcConnection(handler, connections, early)), connections

