"""One HTTP/2 connection (h2c) of :mod:`meshxl.etcd.h2c` to an etcd member: frames in and
out, flow control, SETTINGS, PING, GOAWAY (the behaviour is described there).
"""

from __future__ import annotations

import asyncio
import logging
import struct
from typing import Protocol, cast

import grpc

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
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    frame,
    frame_head,
    keeps_table,
)
from meshxl.hpackin import HeaderDecoder, HeaderError

from .h2calls import RECEIVE_WINDOW, Call, error, timeout_field

__all__ = ["KEEPALIVE", "PING_TIMEOUT", "Connection", "Owner"]

log = logging.getLogger("meshxl.etcd")

PING_TIMEOUT = 2.0
"""Seconds a PING may go unanswered before its connection is closed (grpcio's keepalive
timeout on the channels)."""
KEEPALIVE = 5.5
"""Seconds of silence on a connection with streams open (a watch while nothing is
written) after which it sends a PING: a member gone silent ends the watch, which
resumes elsewhere or anew. Not sooner: etcd counts a PING less than 5 s after the last
one, with nothing sent between them, against the client (``--grpc-keepalive-min-time``)."""
_DEFAULT_WINDOW = 65_535
_MAX_FRAME = 16_384
_LAST_STREAM = 1 << 30
"""Stream ids a connection uses at most; then the next call dials anew (HTTP/2 allows
2**31 - 1)."""
_KNOWN_BLOCKS = 16
_CANCEL = struct.pack(">L", 0x8)
_RESET_CODES = {0x7: grpc.StatusCode.UNAVAILABLE, 0x8: grpc.StatusCode.CANCELLED,
                0xB: grpc.StatusCode.RESOURCE_EXHAUSTED}
"""An RST_STREAM's error code as grpc reports it (REFUSED_STREAM: never processed)."""


class Owner(Protocol):
    """What a connection tells its channel."""

    host: str
    port: int

    def drain(self) -> None:
        """Room for more streams: start the calls waiting."""

    def lost(self, connection: Connection) -> None:
        """``connection`` is closed or going away: the next call dials anew."""


class Connection(asyncio.Protocol):
    """One connection: calls started on it (:meth:`start`) get their answers here."""

    def __init__(self, owner: Owner):
        self.owner = owner
        self.loop = asyncio.get_running_loop()
        """Kept: on Python 3.11 each ``asyncio.get_running_loop()`` is a ``getpid``
        system call, and the hot path would make several a call."""
        self.decoder = HeaderDecoder()  # the table size of SETTINGS' default (4,096)
        self.known: dict[bytes, dict[bytes, bytes]] = {}
        """Header blocks decoded that leave the dynamic table as it was (etcd's answers
        after the first), while the table is as they found it."""
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, Call] = {}
        self.next_stream = 1
        self.max_streams = 1 << 31
        self.going_away = False
        self.buffer = b""
        self.out: list[bytes] = []
        self.flushing = False
        self.send_window = _DEFAULT_WINDOW
        self.initial_window = _DEFAULT_WINDOW
        self.max_frame = _MAX_FRAME
        self.blocked: dict[int, None] = {}
        """Streams whose request waits for window, in order."""
        self.consumed = 0
        self.block: bytes | bytearray | None = None
        """The header block being read (its HEADERS frame's payload, and its
        CONTINUATIONs')."""
        self.block_stream = 0
        self.block_flags = 0
        self.received_at = 0.0
        self.pinged: asyncio.TimerHandle | None = None
        """The PING sent and not answered yet: closes the connection when it fires."""
        self.keepalive: asyncio.TimerHandle | None = None

    def usable(self) -> bool:
        return (self.transport is not None and not self.going_away
                and len(self.streams) < self.max_streams)

    # -- the connection ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        settings = struct.pack(">HLHL", 0x2, 0, 0x4, RECEIVE_WINDOW)  # no push; windows
        transport.write(PREFACE + frame(SETTINGS, 0, 0, settings) + frame(
            WINDOW_UPDATE, 0, 0, struct.pack(">L", RECEIVE_WINDOW - _DEFAULT_WINDOW)))
        self.received_at = self.loop.time()
        self.keepalive = self.loop.call_later(KEEPALIVE, self._keep_alive)

    def _keep_alive(self) -> None:
        if self.transport is None:
            return
        loop = self.loop
        silent = loop.time() - self.received_at
        if silent >= KEEPALIVE and self.streams:
            self.ping(f"{silent:.1f} s without a frame")
            self._flush_soon()
        self.keepalive = loop.call_later(KEEPALIVE, self._keep_alive)

    def ping(self, why: str) -> None:
        """PING, and close the connection unless something comes back within
        :data:`PING_TIMEOUT`."""
        if self.pinged is None and self.transport is not None:
            self.out.append(frame(PING, 0, 0, b"meshxl\0\0"))
            self.pinged = self.loop.call_later(
                PING_TIMEOUT, self.abort, f"{why}, and no answer to a PING in "
                                          f"{PING_TIMEOUT:g} s")

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        for timer in (self.pinged, self.keepalive):
            if timer is not None:
                timer.cancel()
        self.pinged = self.keepalive = None
        why = f": {exc}" if exc else ""
        failure = error(grpc.StatusCode.UNAVAILABLE, f"the connection to etcd was lost{why}")
        streams, self.streams = self.streams, {}
        for call in streams.values():
            call.fail(failure)
        self.owner.lost(self)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self, why: str) -> None:
        log.info("etcd connection to %s:%s closed: %s", self.owner.host, self.owner.port, why)
        if self.transport is not None:
            self.transport.abort()

    def _flush(self) -> None:
        self.flushing = False
        if self.out and self.transport is not None:
            self.transport.write(b"".join(self.out))
        self.out.clear()

    def _flush_soon(self) -> None:
        """Write at the loop's next turn: the calls started in one turn leave in one
        write."""
        if not self.flushing:
            self.flushing = True
            self.loop.call_soon(self._flush)

    # -- calls ------------------------------------------------------------------------

    def start(self, call: Call) -> None:
        stream = self.next_stream
        self.next_stream += 2
        if self.next_stream > _LAST_STREAM:
            self.going_away = True
            self.owner.lost(self)
        call.stream = stream
        call.window = self.initial_window
        call.sent = now = self.loop.time()
        self.streams[stream] = call
        head = call.head
        if call.end_stream:  # a unary call: its deadline goes with it
            remaining = call.deadline - now
            head += timeout_field(remaining if remaining > 0 else call.timeout)
        self.out.append(frame(HEADERS, END_HEADERS, stream, head))
        self._send(stream, call)
        self._flush_soon()

    def _send(self, stream: int, call: Call) -> None:
        """As much of the call's request as the windows allow: usually all of it, in one
        frame (a unary call's ends the stream)."""
        message = call.message
        size = len(message)
        end = END_STREAM if call.end_stream else 0
        if size <= self.send_window and size <= call.window and size <= self.max_frame:
            self.out.append(frame(DATA, end, stream, message))
            self.send_window -= size
            call.window -= size
            call.message = b""
            return
        at = 0
        while at < size:
            room = min(self.send_window, call.window, self.max_frame, size - at)
            if room <= 0:
                self.blocked[stream] = None
                call.message = message[at:]
                return
            self.out.append(frame(DATA, end if at + room == size else 0, stream,
                                  message[at:at + room]))
            at += room
            self.send_window -= room
            call.window -= room
        call.message = b""

    def reset(self, call: Call, why: str | None = None) -> None:
        """Reset ``call``'s stream (its caller gave up: a deadline passed, a stream
        cancelled); with ``why``, PING too when nothing came since it was sent, and close
        the connection unless the PING is answered in :data:`PING_TIMEOUT`."""
        if self.streams.pop(call.stream, None) is not None:
            self.out.append(frame(RST_STREAM, 0, call.stream, _CANCEL))
            self.blocked.pop(call.stream, None)
        if why and self.received_at < call.sent:
            self.ping(why)
        self._ended()
        self._flush_soon()

    def _ended(self) -> None:
        """A stream ended: room for a call waiting; a connection going away closes once
        its last stream ended."""
        streams = len(self.streams)
        if self.going_away:
            if not streams:
                self.close()
        elif streams + 1 == self.max_streams:
            self.owner.drain()

    # -- frames -----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        pos, end = 0, len(buffer)
        self.received_at = self.loop.time()
        if self.pinged is not None:  # anything received: the connection is alive
            self.pinged.cancel()
            self.pinged = None
        while end - pos >= 9 and self.transport is not None:
            size, kind, flags, stream = frame_head(buffer, pos)
            if size > _MAX_FRAME:
                return self.abort(f"a frame of {size} bytes")
            if end - pos - 9 < size:
                break
            payload = buffer[pos + 9:pos + 9 + size]
            pos += 9 + size
            if self.block is not None and kind != CONTINUATION:
                return self.abort("a header block interrupted")
            if kind == DATA:
                self._data(stream, flags, payload)
            elif kind == HEADERS:
                if flags & PADDED:
                    payload = payload[1:len(payload) - payload[0]] if payload else payload
                if flags & PRIORITY_FLAG:
                    payload = payload[5:]
                self.block, self.block_stream, self.block_flags = payload, stream, flags
                if flags & END_HEADERS:
                    self._header_block()
            elif kind == CONTINUATION:
                if self.block is None or stream != self.block_stream:
                    return self.abort("CONTINUATION without its HEADERS")
                block = self.block
                if not isinstance(block, bytearray):  # rare: a block in several frames
                    self.block = block = bytearray(block)
                block += payload
                if flags & END_HEADERS:
                    self._header_block()
            elif kind == SETTINGS:
                if not flags & ACK:
                    self._settings(payload)
            elif kind == WINDOW_UPDATE:
                self._window_update(stream, payload)
            elif kind == PING:
                if not flags & ACK:
                    self.out.append(frame(PING, ACK, 0, payload))
            elif kind == RST_STREAM:
                self._reset_by_peer(stream, payload)
            elif kind == GOAWAY:
                self._goaway(payload)
        self.buffer = buffer[pos:]
        if self.consumed >= RECEIVE_WINDOW // 2:
            self.out.append(frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", self.consumed)))
            self.consumed = 0
        if self.out:  # PING acknowledgements with the calls this turn starts: one write
            self._flush_soon()

    def _data(self, stream: int, flags: int, payload: bytes) -> None:
        self.consumed += len(payload)
        if flags & PADDED:
            payload = payload[1:len(payload) - payload[0]] if payload else payload
        call = self.streams.get(stream)
        if call is None:
            return  # a stream reset, or past its deadline
        grant = call.take(payload)
        if grant < 0:  # too large, or not a message: given up
            self.reset(call)
        elif grant:
            self.out.append(frame(WINDOW_UPDATE, 0, stream, struct.pack(">L", grant)))
        if flags & END_STREAM and stream in self.streams:  # ended without trailers
            self.streams.pop(stream)
            call.end({})
            self._ended()

    def _header_block(self) -> None:
        assert self.block is not None
        block, stream, flags = self.block, self.block_stream, self.block_flags
        if not isinstance(block, bytes):  # a block in several frames
            block = bytes(block)
        self.block = None
        fields = self.known.get(block)
        if fields is None:
            try:  # every block decoded, so the dynamic table stays the server's
                decoded = self.decoder.decode(block)
            except HeaderError as exc:
                return self.abort(f"a header block that does not decode: {exc}")
            fields = {bytes(name): bytes(value) for name, value in decoded}
            if not keeps_table(block):
                self.known.clear()  # decoded with the table as it was
            elif len(self.known) < _KNOWN_BLOCKS and len(block) <= 256:
                self.known[block] = fields
        call = self.streams.get(stream)
        if call is None:
            return
        if flags & END_STREAM:  # trailers, or an answer of trailers only
            del self.streams[stream]
            self.blocked.pop(stream, None)
            call.end(fields)
            self._ended()
        elif call.received is None and not call.headers(fields):
            self.reset(call)
            call.end(fields)

    def _reset_by_peer(self, stream: int, payload: bytes) -> None:
        call = self.streams.pop(stream, None)
        if call is not None:
            self.blocked.pop(stream, None)
            code = int.from_bytes(payload[:4], "big") if len(payload) >= 4 else 0
            call.fail(error(_RESET_CODES.get(code, grpc.StatusCode.INTERNAL),
                            f"etcd reset the stream (HTTP/2 error {code})"))
            self._ended()

    def _settings(self, payload: bytes) -> None:
        for key, value in struct.iter_unpack(">HL", payload[:len(payload) - len(payload) % 6]):
            if key == 0x3:
                self.max_streams = value
            elif key == 0x4 and value <= 0x7FFFFFFF:
                for call in self.streams.values():  # the open streams' windows follow it
                    call.window += value - self.initial_window
                self.initial_window = value
            elif key == 0x5 and _MAX_FRAME <= value <= 0xFFFFFF:
                self.max_frame = value
        self.out.append(frame(SETTINGS, ACK, 0))
        self._send_blocked()
        self.owner.drain()

    def _window_update(self, stream: int, payload: bytes) -> None:
        if len(payload) != 4:
            return self.abort("WINDOW_UPDATE of a bad size")
        increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if stream == 0:
            self.send_window += increment
        elif (call := self.streams.get(stream)) is not None:
            call.window += increment
        if self.blocked:
            self._send_blocked()

    def _send_blocked(self) -> None:
        for stream in list(self.blocked):
            if self.send_window <= 0:
                return
            del self.blocked[stream]  # back in it if its window is spent again
            call = self.streams.get(stream)
            if call is not None and call.message:
                self._send(stream, call)

    def _goaway(self, payload: bytes) -> None:
        if len(payload) < 8:
            return self.abort("GOAWAY of a bad size")
        last = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
        code = int.from_bytes(payload[4:8], "big")
        self.going_away = True
        failure = error(grpc.StatusCode.UNAVAILABLE,
                        f"etcd is going away (HTTP/2 error {code}): "
                        f"{payload[8:200].decode('utf-8', 'replace')}")
        for stream in [s for s in self.streams if s > last]:  # never processed
            self.streams.pop(stream).fail(failure)
        self.owner.lost(self)
        if not self.streams:
            self.close()
