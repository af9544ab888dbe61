"""The calls of :mod:`meshxl.etcd.h2c`, as data: a unary call (one message each way) and
a stream (one request message, then the server's messages until it ends), each taking
its answer's bytes and trailers from the connection (:mod:`meshxl.etcd.h2conn`) and
settling what its caller awaits. Pure but for asyncio's futures.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote_to_bytes

import grpc

from meshxl.h2wire import literal

__all__ = ["MAX_MESSAGE", "RECEIVE_WINDOW", "Call", "StreamCall", "error", "grpc_timeout",
           "status_of", "timeout_field"]

MAX_MESSAGE = 32 << 20
"""Bytes of one answer at most (``grpc.max_receive_message_length`` of the channels)."""
RECEIVE_WINDOW = 1 << 30
"""The window this side grants (connection, and each stream), granted back when half is
used."""
_CODES = {code.value[0]: code for code in grpc.StatusCode}


def error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """A failure as grpcio raises it, so callers take both clients' failures alike."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def grpc_timeout(seconds: float) -> bytes:
    """``grpc-timeout``'s value: at most 8 digits and a unit (milliseconds, rounded up;
    seconds beyond 27 hours)."""
    millis = max(1, -int(-seconds * 1000 // 1))
    if millis < 100_000_000:
        return b"%dm" % millis
    return b"%dS" % min(-int(-seconds // 1), 99_999_999)


_TIMEOUT_FIELDS: dict[int, bytes] = {}
"""``grpc-timeout`` header fields by their milliseconds, each encoded once."""


def timeout_field(seconds: float) -> bytes:
    """The ``grpc-timeout`` header field of a call (:func:`grpc_timeout`), a literal
    without indexing: the store's calls each take what is left of their deadline, so
    nearly every one sends one of a few values (about 5,000 ms), kept encoded (at most
    1,024 of them)."""
    millis = -int(-seconds * 1000 // 1)
    field = _TIMEOUT_FIELDS.get(millis)
    if field is None:
        field = literal(b"grpc-timeout", grpc_timeout(seconds))
        if 0 < millis < 100_000_000 and len(_TIMEOUT_FIELDS) < 1024:
            _TIMEOUT_FIELDS[millis] = field
    return field


def status_of(fields: dict[bytes, bytes]) -> grpc.aio.AioRpcError | None:
    """The error a call's trailers (or a trailers-only answer) carry; None for OK."""
    status = fields.get(b"grpc-status")
    if status is None:
        http = fields.get(b":status", b"")
        code = (grpc.StatusCode.UNAVAILABLE if http in (b"502", b"503", b"504")
                else grpc.StatusCode.UNKNOWN if http == b"200" else grpc.StatusCode.INTERNAL)
        return error(code, "etcd answered without a grpc-status (HTTP "
                           f"{http.decode('latin-1') or '?'})")
    if status == b"0":
        return None
    code = _CODES.get(int(status) if status.isdigit() else -1, grpc.StatusCode.UNKNOWN)
    return error(code, unquote_to_bytes(fields.get(b"grpc-message", b"")).decode(
        "utf-8", "replace"))


class Call:
    """A unary call: its request on the way out, its answer on the way in."""

    __slots__ = ("deadline", "end_stream", "future", "head", "message", "parse", "received",
                 "sent", "stream", "timeout", "window")

    def __init__(self, future: asyncio.Future[Any], head: bytes, message: bytes,
                 parse: Callable[[bytes], Any], timeout: float, deadline: float):
        self.future: asyncio.Future[Any] | None = future
        """What the caller awaits; None once settled (the deadlines' heap keeps the call
        until its deadline: small by then)."""
        self.head = head
        """Its header block but ``grpc-timeout``."""
        self.message = message
        """The gRPC message (5-byte prefix and request) while some of it is not sent."""
        self.parse = parse
        self.timeout = timeout
        self.deadline = deadline
        self.end_stream = True
        """Its request ends its side of the stream."""
        self.stream = 0
        """Its stream's id once started."""
        self.sent = 0.0
        self.received: bytes | bytearray | None = None
        """The answer's DATA so far (None until its headers came): the first DATA frame's
        payload as it came (usually the whole message), a bytearray once more came."""
        self.window = 0
        """Its stream's send window."""

    def done(self) -> bool:
        future = self.future
        return future is None or future.done()

    def fail(self, exc: BaseException) -> None:
        future = self.future
        if future is not None:
            self.future = None
            self.message = b""
            self.received = None
            if not future.done():
                future.set_exception(exc)

    def headers(self, fields: dict[bytes, bytes]) -> bool:
        """The answer's headers: whether they open an answer (``:status`` 200)."""
        if fields.get(b":status") != b"200":
            return False
        self.received = b""
        return True

    def take(self, payload: bytes) -> int:
        """DATA of its answer; what to grant back to its stream (0: nothing yet)."""
        received = self.received
        if not received:  # kept as it came: not copied to be parsed
            self.received = received = payload
        else:
            if not isinstance(received, bytearray):  # more than one frame: gathered
                self.received = received = bytearray(received)
            received += payload
        if len(received) > MAX_MESSAGE + 5:
            self.fail(error(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"etcd's answer is larger than {MAX_MESSAGE} bytes"))
            return -1
        return 0

    def end(self, fields: dict[bytes, bytes]) -> None:
        """Its trailers: settled with the answer parsed, or the status's error."""
        future = self.future
        if future is None or future.done():
            self.future = None
            return
        failure = status_of(fields)
        if failure is not None:
            return self.fail(failure)
        body = self.received or b""
        if len(body) < 5 or body[0] or int.from_bytes(body[1:5], "big") != len(body) - 5:
            return self.fail(error(grpc.StatusCode.INTERNAL, "etcd's answer is not one "
                                                            "uncompressed gRPC message"))
        try:
            result = self.parse(bytes(body[5:]))
        except Exception as exc:  # noqa: BLE001 - a message that does not parse
            return self.fail(error(grpc.StatusCode.INTERNAL,
                                   f"etcd's answer does not parse: {exc}"))
        self.future = None
        self.message = b""
        self.received = None
        future.set_result(result)


class StreamCall(Call):
    """A stream: one request message (its side stays open), then each message the
    server sends, read in order with :meth:`read` (``grpc.aio.EOF`` once it ended)."""

    __slots__ = ("cancel", "closed", "consumed", "loop", "messages", "reader")

    def __init__(self, future: asyncio.Future[Any], head: bytes, message: bytes,
                 parse: Callable[[bytes], Any]):
        super().__init__(future, head, message, parse, 0.0, float("inf"))
        self.loop = future.get_loop()
        self.end_stream = False
        self.messages: deque[Any] = deque()
        self.reader: asyncio.Future[None] | None = None
        self.closed: BaseException | None = None
        """Why it ended (``EOFError``: its trailers said OK)."""
        self.consumed = 0
        self.cancel: Callable[[], None] = _nothing
        """Reset its stream; a read under way or to come raises CancelledError (set by
        the channel that starts it)."""

    def done(self) -> bool:
        return self.closed is not None

    def fail(self, exc: BaseException) -> None:
        if self.closed is None:
            self.closed = exc
            self._wake()

    def take(self, payload: bytes) -> int:
        received = self.received
        if not received:
            size = len(payload) - 5
            if size >= 0 and not payload[0] and size <= MAX_MESSAGE \
                    and int.from_bytes(payload[1:5], "big") == size:
                # The usual: a DATA frame holding one whole message, parsed from it.
                try:
                    self.messages.append(self.parse(payload[5:]))
                except Exception as exc:  # noqa: BLE001 - a message that does not parse
                    self.fail(error(grpc.StatusCode.INTERNAL,
                                    f"etcd's message does not parse: {exc}"))
                    return -1
                return self._taken(len(payload))
        if not isinstance(received, bytearray):
            self.received = received = bytearray()
        received += payload
        while len(received) >= 5:
            size = int.from_bytes(received[1:5], "big")
            if received[0] or size > MAX_MESSAGE:
                self.fail(error(grpc.StatusCode.INTERNAL if received[0] else
                                grpc.StatusCode.RESOURCE_EXHAUSTED,
                                "etcd sent a message compressed or over "
                                f"{MAX_MESSAGE} bytes"))
                return -1
            if len(received) < 5 + size:
                break
            try:
                self.messages.append(self.parse(bytes(received[5:5 + size])))
            except Exception as exc:  # noqa: BLE001 - a message that does not parse
                self.fail(error(grpc.StatusCode.INTERNAL, f"etcd's message does not parse: "
                                                          f"{exc}"))
                return -1
            del received[:5 + size]
        return self._taken(len(payload))

    def _taken(self, size: int) -> int:
        """``size`` bytes of DATA taken: the reader woken, what to grant back."""
        self._wake()
        self.consumed += size
        if self.consumed >= RECEIVE_WINDOW // 2:
            granted, self.consumed = self.consumed, 0
            return granted
        return 0

    def end(self, fields: dict[bytes, bytes]) -> None:
        self.fail(status_of(fields) or EOFError("the stream ended"))

    def _wake(self) -> None:
        reader = self.reader
        if reader is not None:
            self.reader = None
            if not reader.done():
                reader.set_result(None)

    async def read(self) -> Any:
        """The next message; ``grpc.aio.EOF`` once the stream ended OK; its error (an
        ``AioRpcError``) once it failed; CancelledError once cancelled."""
        while not self.messages:
            closed = self.closed
            if closed is not None:
                if isinstance(closed, EOFError):
                    return grpc.aio.EOF
                if isinstance(closed, asyncio.CancelledError):
                    raise asyncio.CancelledError
                raise closed
            reader = self.reader = self.loop.create_future()
            await reader
        return self.messages.popleft()


def _nothing() -> None:
    return None
