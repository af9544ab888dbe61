"""What a resumable gRPC stream adds to its call on the wire: the metadata it names, the
Ack service's bodies, and the acknowledgement each message carries. Pure code.

A stream's acknowledgements ride inside its messages when both ends speak this module
(the client asks with ``x-meshxl-acks: field`` in the call's metadata, the server says
yes with the same in its initial metadata): every message the client sends carries
the highest server message it received, every message the server sends the highest
client message its handler consumed, as one field appended to the message's protobuf
bytes. Protobuf concatenates fields, so the bytes stay a message of the call's type
(any protobuf parser reads the field as an unknown one): :data:`ACK_FIELD`, wire type
I64 (8 bytes, little-endian), always last and always there, so the receiver takes the
last :data:`TRAILER_SIZE` bytes off before it parses the message. A direction that is
idle still acknowledges with the unary ``/meshxl.streams.v1.Streams/Ack`` (JSON
bodies ``{"id", "recv"}`` -> ``{"in"}``); a call without the field (a client or
server of an earlier release) acknowledges only with it.

In such a call the client says its end before it half-closes: one last message made
only of :data:`END_FIELD` (the number of its last message, I64) and its
acknowledgement (:func:`end_message`). The end of the call's messages alone does not
say it: a call reset by its client or by Envoy draining ends them just as a
half-close does, and is cancelled only later, later still on a busy server; a server
that took that for the client's end would finish the stream for good, and the
client, resuming elsewhere, would find it ended. (A call without the field falls back
on a grace period: grpcio.END_GRACE.)
"""

from __future__ import annotations

import json
from typing import Any

from .protocol import ProtocolError

__all__ = ["ACKS", "ACK_FIELD", "ACK_METHOD", "END_FIELD", "END_KEY", "FIELD", "FROM", "IN",
           "RECV", "REFUSAL", "SERVICE", "STREAM", "TRAILER_SIZE", "end_message", "ended_at",
           "json_in", "json_out", "split_ack", "with_ack"]

SERVICE = "meshxl.streams.v1.Streams"
ACK_METHOD = f"/{SERVICE}/Ack"
STREAM, RECV, IN, FROM, END_KEY, REFUSAL = (
    "x-meshxl-stream", "x-meshxl-recv", "x-meshxl-in", "x-meshxl-from", "x-meshxl-end",
    "x-meshxl-refusal")
ACKS, FIELD = "x-meshxl-acks", "field"
"""The metadata that asks for (client) and grants (server) acknowledgements in the
messages, and its one value."""

ACK_FIELD = (1 << 29) - 1
"""The acknowledgement's field number: protobuf's highest, which no message's own
fields are likely to reach (they never see it: it is taken off before parsing)."""
_LAST = (1 << 53) - 1
_TAG = bytes([0xF9, 0xFF, 0xFF, 0xFF, 0x0F])
"""The field's key: ``(ACK_FIELD << 3) | 1`` (wire type I64) as a varint."""
TRAILER_SIZE = len(_TAG) + 8
END_FIELD = ACK_FIELD - 1
"""The client's end: the field of the message that says it (:func:`end_message`)."""
_END_TAG = bytes([0xF1, 0xFF, 0xFF, 0xFF, 0x0F])
"""``(END_FIELD << 3) | 1`` as a varint."""


def end_message(last: int, ack: int) -> bytes:
    """The message that says the client's end after its message ``last``."""
    return with_ack(_END_TAG + last.to_bytes(8, "little"), ack)


def ended_at(body: bytes) -> int | None:
    """The last message number an end message says (its bytes without the
    acknowledgement: :func:`split_ack`'s); None: a message of the stream."""
    if len(body) != len(_END_TAG) + 8 or not body.startswith(_END_TAG):
        return None
    last = int.from_bytes(body[-8:], "little")
    if last > _LAST:
        raise ProtocolError(f"an end after message {last}, past the highest")
    return last


def with_ack(body: bytes, ack: int) -> bytes:
    """A message's protobuf bytes with the acknowledgement ``ack`` appended."""
    return body + _TAG + ack.to_bytes(8, "little")


def split_ack(data: bytes) -> tuple[bytes, int]:
    """A message's protobuf bytes and its acknowledgement; :class:`ProtocolError` when
    it carries none, or one no message number can be."""
    if len(data) < TRAILER_SIZE or data[-TRAILER_SIZE:-8] != _TAG:
        raise ProtocolError("a message of the stream without its acknowledgement field")
    ack = int.from_bytes(data[-8:], "little")
    if ack > _LAST:
        raise ProtocolError(f"an acknowledgement of message {ack}, past the highest")
    return data[:-TRAILER_SIZE], ack


def json_in(raw: bytes) -> Any:
    """An Ack call's body (None: not JSON)."""
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None


def json_out(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()
