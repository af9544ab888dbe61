"""The resumable stream protocol, ``meshxl.resume.v1``: what both ends send. Pure code.

A *stream* is one logical conversation between a client library and a server handler
that outlives its connections. It has an unguessable id (its *token*, 128 random bits)
bound to the session it belongs to, and numbers the messages of each direction from 1.
Each side keeps what it sent until the other acknowledges it; the server's side keeps
it in its record (:mod:`.record`), committed through the statesync sidecar, so a member
that takes the stream over replays what the client has not received, and knows how far
the handler got with what the client sent.

Every connection of a stream starts with the client saying which stream it resumes (or
that it opens one) and what it received (``recv``); the server answers ``ready`` with
the stream's token, how many client messages its handler has consumed (``in``: the
client sends again everything after it), and then the server messages after ``recv``.
From then on, both send messages (``m``, numbered) and acknowledgements (``a``: the
highest number received, for the server's messages; committed as consumed, for the
client's), an acknowledgement riding on a message where one goes anyway (``m``'s ``a``).
``end`` says the handler finished after message ``s``.

Carried over WebSocket (subprotocol :data:`SUBPROTOCOL`): text frames hold JSON
objects (:func:`encode_frame`, :func:`decode_frame`); a binary message travels as a
binary frame, its number in 8 bytes before it (where frames are text lines, as base64 in
the message frame's ``b``). Over Server-Sent Events and gRPC the
same fields travel as event ids, headers and metadata (:mod:`.sse`, :mod:`.grpcio`).

Refusals have one code per transport (:data:`REFUSALS`): a WebSocket close code in the
private range 4000-4999, an HTTP status with a JSON body, a gRPC status.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import secrets
from dataclasses import dataclass
from typing import Any, Final

from meshxl.errors import InputError

__all__ = [
    "ACK", "END", "ERROR", "FORBIDDEN", "MALFORMED", "MESSAGE", "MOVED", "OPEN", "READY",
    "REFUSALS", "RESUME", "SUBPROTOCOL", "TOO_FAR_BEHIND", "TOO_MANY_STREAMS", "TRY_AGAIN",
    "FAILED", "UNKNOWN", "Frame", "Limits", "Payload", "ProtocolError", "Refusal",
    "compact_json", "decode_binary", "decode_frame", "encode_binary", "encode_frame",
    "encoded_size", "json_text", "message_frame", "new_token", "refusal_named",
    "refusal_of_close", "valid_token",
]

SUBPROTOCOL: Final = "meshxl.resume.v1"
"""The WebSocket subprotocol a resumable stream's connections negotiate."""

OPEN, RESUME, READY, MESSAGE, ACK, END, ERROR = (
    "open", "resume", "ready", "m", "a", "end", "error")
_TYPES = frozenset({OPEN, RESUME, READY, MESSAGE, ACK, END, ERROR})

TOKEN_BYTES = 16
"""A token's random bytes: 128 bits, as unguessable as a session cookie should be."""
_TOKEN_LENGTH = 22  # base64url of 16 bytes, without padding
_MAX_SEQ = (1 << 53) - 1  # exact in every JSON implementation (browsers' numbers)
MAX_FRAME_BYTES = 1 << 20
"""A frame's size at most (a message's payload is bounded by :class:`Limits` first)."""

Payload = Any
"""A message: a JSON value (``None``, bool, number, string, list, object), or ``bytes``
(sent as a binary frame, stored as base64). A str is a JSON string."""


class ProtocolError(InputError):
    """A frame that breaks the protocol: it closes its own stream (:data:`MALFORMED`),
    nothing else (an :class:`~meshxl.errors.InputError`, a ValueError)."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a stream cannot go on, as each transport says it."""

    name: str
    close_code: int
    """WebSocket close code (4000-4999: the application's)."""
    http_status: int
    grpc_status: str
    """A ``grpc.StatusCode`` name."""
    retry: bool
    """The client library tries again (elsewhere: the stream goes on) rather than giving
    up and raising to the application."""
    meaning: str


MOVED = Refusal("moved", 4000, 421, "ABORTED", True,
                "the stream goes on elsewhere (this member was drained, or another took "
                "the stream over): resume it")
"""Not a 5xx, nor UNAVAILABLE: Envoy would send it again on another member (the backup
site), count it towards ejecting the member and the judge of predictive failover
towards degrading it, when it is the protocol at work during every move. 421 and
ABORTED (409 to Envoy) are the caller's to act on: the client library resumes."""
TRY_AGAIN = Refusal("try-again", 4013, 503, "UNAVAILABLE", True,
                    "the stream cannot be committed here now (etcd or the sidecar does "
                    "not answer): resume it, here or elsewhere")
UNKNOWN = Refusal("unknown-stream", 4404, 404, "NOT_FOUND", False,
                  "no such stream: never opened, ended and forgotten, or expired (its "
                  "record lived the session TTL after its last message)")
FORBIDDEN = Refusal("forbidden", 4403, 403, "PERMISSION_DENIED", False,
                    "the stream belongs to another session")
TOO_FAR_BEHIND = Refusal("too-far-behind", 4409, 409, "OUT_OF_RANGE", False,
                         "the client lags beyond what the stream keeps: it did not "
                         "acknowledge within the limits, or asks for messages already "
                         "acknowledged and dropped")
TOO_MANY_STREAMS = Refusal("too-many-streams", 4429, 429, "RESOURCE_EXHAUSTED", False,
                           "the session has as many open streams as its limit allows")
MALFORMED = Refusal("malformed", 4400, 400, "INVALID_ARGUMENT", False,
                    "a frame that breaks the protocol: this stream is closed, no other")
FAILED = Refusal("failed", 4500, 500, "INTERNAL", False,
                 "the server's handler failed (an exception in the application): the "
                 "stream ended there, and a resume reports the same")
REFUSALS: Final = (MOVED, TRY_AGAIN, UNKNOWN, FORBIDDEN, TOO_FAR_BEHIND, TOO_MANY_STREAMS,
                   MALFORMED, FAILED)
_BY_NAME = {r.name: r for r in REFUSALS}
_BY_CODE = {r.close_code: r for r in REFUSALS}


def refusal_named(name: str) -> Refusal | None:
    return _BY_NAME.get(name)


def refusal_of_close(code: int | None) -> Refusal | None:
    return _BY_CODE.get(code) if code is not None else None


@dataclass(frozen=True, slots=True)
class Limits:
    """A stream's bounds (both sides read them; the server enforces them)."""

    max_unacked_bytes: int = 256 * 1024
    """Bytes of messages one side has sent and the other not acknowledged: beyond it,
    ``send`` waits. Server messages are kept in the stream's record until acknowledged,
    so this also bounds the record (a session state is at most 1 MiB)."""
    max_message_bytes: int = 64 * 1024
    """One message's encoded size at most."""
    max_streams_per_session: int = 16
    """Open streams of one session at most (a new one beyond is refused)."""
    lag_timeout: float = 30.0
    """How long the server waits for a client's acknowledgement once the unacknowledged
    bytes reach the limit, before it gives up the stream (:data:`TOO_FAR_BEHIND`)."""
    detached_timeout: float = 30.0
    """How long a server keeps a stream's handler running with no connection before it
    stops it (a later resume starts it again from the committed state)."""
    ack_delay: float = 0.25
    """At most this long between receiving a message and acknowledging it (sooner when a
    message of one's own goes first: it carries the acknowledgement). An acknowledgement
    only lets the sender drop what it keeps for a replay, so it may wait for a ride: a
    stream that talks about as often as it listens sends one frame a message, not two."""
    ack_every: int = 32
    """...or at once after this many unacknowledged messages."""

    def __post_init__(self) -> None:
        for name in ("max_unacked_bytes", "max_message_bytes", "max_streams_per_session",
                     "ack_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        for name in ("lag_timeout", "detached_timeout", "ack_delay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite positive duration, not {value!r}")
        if self.max_message_bytes > self.max_unacked_bytes:
            raise ValueError("max_message_bytes must be at most max_unacked_bytes")
        if self.max_unacked_bytes > 768 * 1024:
            raise ValueError("max_unacked_bytes must be at most 786432: the record that "
                             "keeps them is a session state (1 MiB at most)")


def new_token() -> str:
    """A new stream's id: 128 random bits, base64url without padding (22 characters)."""
    return base64.urlsafe_b64encode(secrets.token_bytes(TOKEN_BYTES)).rstrip(b"=").decode()


def valid_token(token: object) -> bool:
    if not isinstance(token, str) or len(token) != _TOKEN_LENGTH:
        return False
    try:
        raw = base64.urlsafe_b64decode(token + "==")
    except (binascii.Error, ValueError):
        return False
    return len(raw) == TOKEN_BYTES and base64.urlsafe_b64encode(raw).rstrip(b"=").decode() \
        == token


@dataclass(frozen=True, slots=True)
class Frame:
    """One protocol frame (the fields its type uses; the others stay None)."""

    type: str
    seq: int | None = None
    """``m``: the message's number; ``a``: the highest acknowledged; ``end``: the last."""
    payload: Payload = None
    ack: int | None = None
    """``m`` (a JSON message's): an acknowledgement carried along, as an ``a`` frame's
    ``s`` would say it (one frame instead of two, where the other side answers)."""
    token: str | None = None
    recv: int | None = None
    """``resume``: the highest server message the client received."""
    consumed: int | None = None
    """``ready``: the client messages the handler has consumed (``in``)."""
    last: int | None = None
    """``ready``: the server's last message number so far (``out``)."""
    refusal: Refusal | None = None
    message: str | None = None


def _seq(value: object, field: str, *, zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) \
            or not (0 if zero else 1) <= value <= _MAX_SEQ:
        raise ProtocolError(f"{field} must be an integer from {0 if zero else 1} to "
                            f"{_MAX_SEQ}, not {str(value)[:40]}")
    return value


def encode_frame(frame: Frame, *, text_bytes: bool = False) -> str:
    """A frame as a WebSocket text frame's JSON (a binary message: :func:`encode_binary`;
    ``text_bytes``: in the frame, as base64 in ``b``, for a transport whose frames are
    text lines: the event stream's upload, :mod:`.sse`)."""
    t = frame.type
    doc: dict[str, Any] = {"t": t}
    if t == MESSAGE:
        binary = isinstance(frame.payload, bytes | bytearray | memoryview)
        if binary and not text_bytes:
            raise ValueError("a binary message travels in a binary frame (encode_binary)")
        doc["s"] = frame.seq
        if frame.ack is not None:
            doc["a"] = frame.ack
        if not binary:
            return message_frame(_seq(frame.seq, "seq"), json_text(frame.payload), frame.ack)
        doc["b"] = base64.b64encode(frame.payload).decode("ascii")
    elif t in (ACK, END):
        doc["s"] = frame.seq
    elif t == RESUME:
        doc["id"], doc["recv"] = frame.token, frame.recv
    elif t == READY:
        doc.update(id=frame.token, **{"in": frame.consumed, "out": frame.last})
    elif t == ERROR:
        assert frame.refusal is not None
        doc["code"], doc["message"] = frame.refusal.name, frame.message or frame.refusal.meaning
    return compact_json(doc)


def decode_frame(text: str | bytes) -> Frame:
    """A WebSocket text frame's frame; :class:`ProtocolError` for anything else."""
    if len(text) > MAX_FRAME_BYTES:
        raise ProtocolError(f"a frame of {len(text)} bytes (at most {MAX_FRAME_BYTES})")
    try:
        doc = _decode(text if isinstance(text, str) else bytes(text).decode())
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"a text frame that is not JSON: {str(exc)[:80]}") from None
    if not isinstance(doc, dict) or doc.get("t") not in _TYPES:
        raise ProtocolError("a frame must be a JSON object whose t is one of "
                            f"{sorted(_TYPES)}")
    t = doc["t"]
    if t == MESSAGE:
        ack = _seq(doc["a"], "a", zero=True) if "a" in doc else None
        if "d" in doc:
            return Frame(MESSAGE, seq=_seq(doc.get("s"), "s"), payload=doc["d"], ack=ack)
        if not isinstance(doc.get("b"), str):
            raise ProtocolError("a message frame carries its payload in d (JSON) or b "
                                "(bytes, base64)")
        try:
            data = base64.b64decode(doc["b"], validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError("a message frame's b is base64") from None
        return Frame(MESSAGE, seq=_seq(doc.get("s"), "s"), payload=data, ack=ack)
    if t == ACK:
        return Frame(ACK, seq=_seq(doc.get("s"), "s", zero=True))
    if t == END:
        return Frame(END, seq=_seq(doc.get("s"), "s", zero=True))
    if t == OPEN:
        return Frame(OPEN)
    if t == RESUME:
        token = doc.get("id")
        if not valid_token(token):
            raise ProtocolError("resume needs the stream's id (22 characters of base64url)")
        return Frame(RESUME, token=token, recv=_seq(doc.get("recv"), "recv", zero=True))
    if t == READY:
        token = doc.get("id")
        if not valid_token(token):
            raise ProtocolError("ready carries the stream's id")
        return Frame(READY, token=token, consumed=_seq(doc.get("in"), "in", zero=True),
                     last=_seq(doc.get("out"), "out", zero=True))
    code = doc.get("code")
    refusal = refusal_named(code) if isinstance(code, str) else None
    if refusal is None:
        raise ProtocolError(f"an error frame with an unknown code {str(code)[:40]!r}")
    message = doc.get("message")
    return Frame(ERROR, refusal=refusal,
                 message=message[:500] if isinstance(message, str) else None)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


# One encoder and one decoder, made once: json.dumps and json.loads with options make
# one per call, which costs more than encoding a small frame (every message pays it).
compact_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False,
                                allow_nan=False).encode
"""A value as compact JSON (``ValueError`` for NaN or infinity, ``TypeError`` for what
is not JSON)."""
_decode = json.JSONDecoder(parse_constant=_no_constant).decode


def encode_binary(seq: int, payload: bytes | bytearray | memoryview) -> bytes:
    """A binary message's frame: its number (8 bytes, big-endian), then its bytes."""
    return _seq(seq, "seq").to_bytes(8, "big") + bytes(payload)


def decode_binary(frame: bytes) -> tuple[int, bytes]:
    if len(frame) < 8:
        raise ProtocolError("a binary frame starts with its message's number (8 bytes)")
    if len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError(f"a frame of {len(frame)} bytes (at most {MAX_FRAME_BYTES})")
    return _seq(int.from_bytes(frame[:8], "big"), "seq"), frame[8:]


def json_text(payload: Payload) -> str:
    """A JSON message's compact text (a value that is not JSON is a
    :class:`ProtocolError`). A server message is encoded once, when it is sent: the
    limits count it, the stream's record stores it and the transport sends it as it is
    (three encodings a message before, an eighth of a WebSocket app's CPU)."""
    try:
        return compact_json(payload)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"a message must be JSON or bytes: {exc}") from None


def message_frame(seq: int, text: str, ack: int | None) -> str:
    """A JSON message's frame (:func:`encode_frame`'s) from its text (:func:`json_text`)."""
    if ack is None:
        return f'{{"t":"m","s":{seq},"d":{text}}}'
    return f'{{"t":"m","s":{seq},"a":{ack},"d":{text}}}'


def encoded_size(payload: Payload) -> int:
    """A message's size as the limits count it: its bytes, or its compact JSON's (a
    value that is not JSON is a :class:`ProtocolError`)."""
    if isinstance(payload, bytes | bytearray | memoryview):
        return len(payload)
    return len(json_text(payload).encode())
