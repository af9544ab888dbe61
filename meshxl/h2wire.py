"""HTTP/2's frames and the few HPACK pieces written by hand, for the two places that speak
gRPC on the event loop's own transports: the Dapr API's server
(``meshxl.statesync.dapr.h2``) and the etcd client's transactions (``meshxl.etcd.h2c``).

Header blocks sent are literals without indexing (no dynamic table of this side to keep
in step); blocks received are decoded by ``hpack`` (python-hyper's: the Dapr API's
server) or :mod:`meshxl.hpackin` (the etcd client), and :func:`keeps_table` tells which
of them may be kept decoded. Pure code: ``tests/unit/test_etcd_h2c.py`` and
``tests/unit/test_dapr_h2.py`` decode what is written here with ``hpack``.
"""

from __future__ import annotations

import struct

__all__ = ["ACK", "CONTINUATION", "DATA", "END_HEADERS", "END_STREAM", "GOAWAY", "HEADERS",
           "PADDED", "PING", "PREFACE", "PRIORITY", "PRIORITY_FLAG", "PUSH_PROMISE",
           "RST_STREAM", "SETTINGS", "WINDOW_UPDATE", "frame", "frame_head", "integer",
           "keeps_table", "length", "literal"]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, \
    CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    """A frame: its 9-byte header (RFC 9113 section 4.1) and ``payload``."""
    size = len(payload)
    return struct.pack(">BHBBL", size >> 16, size & 0xFFFF, kind, flags, stream) + payload


def frame_head(buffer: bytes, pos: int) -> tuple[int, int, int, int]:
    """The frame header at ``pos`` (its 9 bytes there): ``(size, kind, flags, stream)``,
    the payload's size first so a reader can refuse a frame too large before it waits
    for it."""
    return (buffer[pos] << 16 | buffer[pos + 1] << 8 | buffer[pos + 2], buffer[pos + 3],
            buffer[pos + 4], int.from_bytes(buffer[pos + 5:pos + 9], "big") & 0x7FFFFFFF)


def length(text: bytes) -> bytes:
    """A string's length as HPACK writes it (7-bit prefix, no Huffman)."""
    size = len(text)
    if size < 127:
        return bytes((size,))
    size -= 127
    out = bytearray((127,))
    while size >= 128:
        out.append(size & 0x7F | 0x80)
        size >>= 7
    out.append(size)
    return bytes(out)


def literal(name: bytes, value: bytes) -> bytes:
    """A header field, literal without indexing, new name (no Huffman)."""
    return b"\x00" + length(name) + name + length(value) + value


def integer(block: bytes, at: int, prefix: int) -> tuple[int, int]:
    """An HPACK integer of ``prefix`` bits at ``at`` (RFC 7541 section 5.1): its value
    and where what follows it starts."""
    value = block[at] & prefix
    at += 1
    if value < prefix:
        return value, at
    shift = 0
    while True:
        byte = block[at]
        at += 1
        value += (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7


def keeps_table(block: bytes) -> bool:
    """Whether decoding a header block leaves the HPACK dynamic table as it was: only
    indexed fields and literals not indexed (RFC 7541 sections 6.1, 6.2.2, 6.2.3), no
    literal added to the table, no table size update. Then its decoding depends on the
    table alone, and the same bytes decode the same while the table is unchanged."""
    at, end = 0, len(block)
    try:
        while at < end:
            first = block[at]
            if first & 0x80:  # indexed
                at = integer(block, at, 0x7F)[1]
            elif first & 0x60:  # a literal added to the table; a table size update
                return False
            else:  # a literal without indexing or never indexed: name (index 0), value
                index, at = integer(block, at, 0x0F)
                for _ in range(1 if index else 2):
                    size, at = integer(block, at, 0x7F)
                    at += size
    except IndexError:
        return False
    return at == end
