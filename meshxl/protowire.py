"""Protobuf's wire format, written by hand where the hot paths need bytes, not messages;
and ``google.protobuf.Any``'s type URLs.

The control plane pre-encodes each ``DiscoveryResponse`` once and adds a stream's nonce
as one more field (``meshxl.xds.cache``); the session store writes etcd's ``Txn``
requests as bytes (``meshxl.statesync.wire``). Both need a varint and a
length-delimited field, defined here once; unit tests hold every hand-written encoding
equal to protobuf's own (``tests/unit/test_protowire.py``, ``test_xds_cache.py``,
``test_statesync_wire.py``). What this costs against upb messages: docs/performance.md.
"""

from __future__ import annotations

from typing import Final

__all__ = ["TYPE_URL_PREFIX", "len_field", "type_name", "type_url", "varint"]

_SMALL = [bytes((n,)) for n in range(128)]


def varint(n: int) -> bytes:
    """A non-negative integer as a protobuf varint (tags and most lengths take one byte,
    revisions two to four: written without a loop)."""
    if n < 128:
        if n < 0:
            raise ValueError(f"negative varint {n}")
        return _SMALL[n]
    if n < 16384:
        return bytes((n & 0x7F | 0x80, n >> 7))
    if n < 2097152:
        return bytes((n & 0x7F | 0x80, n >> 7 & 0x7F | 0x80, n >> 14))
    if n < 268435456:
        return bytes((n & 0x7F | 0x80, n >> 7 & 0x7F | 0x80, n >> 14 & 0x7F | 0x80, n >> 21))
    out = bytearray()
    while n >= 128:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_LEN_TAGS = [bytes((number << 3 | 2,)) for number in range(16)]


def len_field(number: int, payload: bytes) -> bytes:
    """One length-delimited field (wire type 2, LEN): tag, length, payload. A parser merges
    a field appended to an encoded message into it."""
    tag = _LEN_TAGS[number] if 0 < number < 16 else varint(number << 3 | 2)
    return tag + varint(len(payload)) + payload


#: What every type URL starts with (``google.protobuf.Any``; xDS resources, Envoy's
#: ``typed_config``).
TYPE_URL_PREFIX: Final = "type.googleapis.com/"


def type_url(full_name: str) -> str:
    """The ``Any`` type URL of a message's full name
    (``envoy.config.cluster.v3.Cluster``)."""
    return TYPE_URL_PREFIX + full_name


def type_name(url: str) -> str:
    """The full message name a type URL names (what follows the prefix)."""
    return url.removeprefix(TYPE_URL_PREFIX)
