"""The few messages of ``dapr.proto.runtime.v1.Dapr`` meshxl serves, read and written by
hand (protobuf's wire format, :mod:`meshxl.protowire`): no generated code, no
descriptors in the sidecar. ``tests/unit/test_dapr_wire.py`` holds each equal to the
Dapr SDK's generated messages. Why by hand: docs/dapr.md, "How the gRPC API is built".

Field numbers (dapr/proto/runtime/v1/state.proto, common/v1/common.proto):
``GetStateRequest`` store_name 1, key 2, consistency 3, metadata 4;
``GetBulkStateRequest`` store_name 1, keys 2, parallelism 3, metadata 4;
``SaveStateRequest`` / ``DeleteBulkStateRequest`` store_name 1, states 2;
``StateItem`` key 1, value 2, etag 3 (``Etag`` value 1), metadata 4, options 5
(``StateOptions`` concurrency 1, consistency 2); ``DeleteStateRequest`` store_name 1,
key 2, etag 3, options 4, metadata 5; ``ExecuteStateTransactionRequest`` storeName 1,
operations 2 (``TransactionalStateOperation`` operationType 1, request 2), metadata 3;
``GetStateResponse`` data 1, etag 2, metadata 3; ``GetBulkStateResponse`` items 1
(``BulkStateItem`` key 1, data 2, etag 3, error 4, metadata 5); ``GetMetadataResponse``
id 1, registered_components 3 (name 1, type 2, version 3, capabilities 4),
extended_metadata 4, runtime_version 8; ``SetMetadataRequest`` key 1, value 2. A map
entry is a message of key 1 and value 2.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from meshxl.errors import InputError
from meshxl.protowire import len_field

__all__ = ["CONCURRENCY", "BadMessage", "GetBulk", "GetOne", "ItemAnswer", "StateItem",
           "Transaction", "bulk_answer", "fields", "get_answer", "metadata_answer",
           "read_delete", "read_get", "read_get_bulk", "read_items", "read_set_metadata",
           "read_transaction"]

CONCURRENCY = {0: "", 1: "first-write", 2: "last-write"}
"""``StateOptions.StateConcurrency`` as the HTTP API's words."""


class BadMessage(InputError):
    """Bytes that are not the message (truncated, a wrong wire type, not UTF-8)."""


def _varint(buf: bytes, at: int) -> tuple[int, int]:
    if at < len(buf) and buf[at] < 0x80:  # one byte: tags, short lengths
        return buf[at], at + 1
    result = shift = 0
    while True:
        if at >= len(buf):
            raise BadMessage("truncated varint")
        byte = buf[at]
        at += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, at
        shift += 7
        if shift > 63:
            raise BadMessage("varint too long")


def fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """Each field of a message: its number and value (an int for a varint, bytes for
    a length-delimited field); fixed-width fields skipped."""
    at, end = 0, len(buf)
    while at < end:
        tag = buf[at]  # one byte (fields 1 to 15) read here, longer ones by _varint
        tag, at = (tag, at + 1) if tag < 0x80 else _varint(buf, at)
        number, kind = tag >> 3, tag & 7
        if kind == 0:
            value, at = _varint(buf, at)
            yield number, value
        elif kind == 2:
            size = buf[at] if at < end else 0x80
            size, at = (size, at + 1) if size < 0x80 else _varint(buf, at)
            if at + size > end:
                raise BadMessage("truncated field")
            yield number, buf[at:at + size]
            at += size
        elif kind == 1:
            at += 8
        elif kind == 5:
            at += 4
        else:
            raise BadMessage(f"wire type {kind} of field {number}")
    if at != end:
        raise BadMessage("truncated fixed-width field")


def _text(value: int | bytes) -> str:
    if not isinstance(value, bytes):
        raise BadMessage("a string field holds a number")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise BadMessage("a string field is not UTF-8") from None


def _bytes(value: int | bytes) -> bytes:
    if not isinstance(value, bytes):
        raise BadMessage("a bytes field holds a number")
    return value


def _int(value: int | bytes) -> int:
    if not isinstance(value, int):
        raise BadMessage("a number field holds bytes")
    return value


def _entry(value: int | bytes, into: dict[str, str]) -> None:
    key = val = ""
    for number, part in fields(_bytes(value)):
        if number == 1:
            key = _text(part)
        elif number == 2:
            val = _text(part)
    into[key] = val


@dataclass(slots=True)
class StateItem:
    key: str = ""
    value: bytes = b""
    etag: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    concurrency: str = ""


def _state_item(buf: bytes) -> StateItem:
    item = StateItem()
    for number, value in fields(buf):
        if number == 1:
            item.key = _text(value)
        elif number == 2:
            item.value = _bytes(value)
        elif number == 3:
            item.etag = ""
            for n, v in fields(_bytes(value)):
                if n == 1:
                    item.etag = _text(v)
        elif number == 4:
            _entry(value, item.metadata)
        elif number == 5:
            item.concurrency = _options(_bytes(value))
    return item


def _options(buf: bytes) -> str:
    concurrency = ""
    for number, value in fields(buf):
        if number == 1:
            concurrency = CONCURRENCY.get(_int(value), "")
    return concurrency


@dataclass(slots=True)
class GetOne:
    store: str = ""
    key: str = ""
    metadata: dict[str, str] = field(default_factory=dict)


def read_get(buf: bytes) -> GetOne:
    request = GetOne()
    for number, value in fields(buf):
        if number == 1:
            request.store = _text(value)
        elif number == 2:
            request.key = _text(value)
        elif number == 4:
            _entry(value, request.metadata)
    return request


@dataclass(slots=True)
class GetBulk:
    store: str = ""
    keys: list[str] = field(default_factory=list)


def read_get_bulk(buf: bytes) -> GetBulk:
    request = GetBulk()
    for number, value in fields(buf):
        if number == 1:
            request.store = _text(value)
        elif number == 2:
            request.keys.append(_text(value))
    return request


def read_items(buf: bytes) -> tuple[str, list[StateItem]]:
    """``SaveStateRequest`` or ``DeleteBulkStateRequest``: the store and its items."""
    store, items = "", []
    for number, value in fields(buf):
        if number == 1:
            store = _text(value)
        elif number == 2:
            items.append(_state_item(_bytes(value)))
    return store, items


def read_delete(buf: bytes) -> tuple[str, StateItem]:
    """``DeleteStateRequest``: its store, and its key, ETag and options as an item."""
    store, item = "", StateItem()
    for number, value in fields(buf):
        if number == 1:
            store = _text(value)
        elif number == 2:
            item.key = _text(value)
        elif number == 3:
            item.etag = ""
            for n, v in fields(_bytes(value)):
                if n == 1:
                    item.etag = _text(v)
        elif number == 4:
            item.concurrency = _options(_bytes(value))
        elif number == 5:
            _entry(value, item.metadata)
    return store, item


@dataclass(slots=True)
class Transaction:
    store: str = ""
    operations: list[tuple[str, StateItem]] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)


def read_transaction(buf: bytes) -> Transaction:
    request = Transaction()
    for number, value in fields(buf):
        if number == 1:
            request.store = _text(value)
        elif number == 2:
            kind, item = "", StateItem()
            for n, v in fields(_bytes(value)):
                if n == 1:
                    kind = _text(v)
                elif n == 2:
                    item = _state_item(_bytes(v))
            request.operations.append((kind, item))
        elif number == 3:
            _entry(value, request.metadata)
    return request


def read_set_metadata(buf: bytes) -> tuple[str, str]:
    key = value = ""
    for number, part in fields(buf):
        if number == 1:
            key = _text(part)
        elif number == 2:
            value = _text(part)
    return key, value


# -- answers ------------------------------------------------------------------------------

def _str(number: int, text: str) -> bytes:
    return len_field(number, text.encode()) if text else b""


def _map(number: int, entries: dict[str, str]) -> bytes:
    return b"".join(len_field(number, _str(1, k) + _str(2, v)) for k, v in entries.items())


def get_answer(data: bytes, etag: str, metadata: dict[str, str]) -> bytes:
    """``GetStateResponse`` (a missing key: all empty, as daprd answers it)."""
    return (len_field(1, data) if data else b"") + _str(2, etag) + _map(3, metadata)


@dataclass(frozen=True, slots=True)
class ItemAnswer:
    key: str
    data: bytes = b""
    etag: str = ""
    error: str = ""
    metadata: dict[str, str] = field(default_factory=dict)


def bulk_answer(items: list[ItemAnswer]) -> bytes:
    """``GetBulkStateResponse``."""
    return b"".join(len_field(1, _str(1, i.key) + (len_field(2, i.data) if i.data else b"")
                              + _str(3, i.etag) + _str(4, i.error) + _map(5, i.metadata))
                    for i in items)


def metadata_answer(app_id: str, components: list[dict[str, object]],
                    extended: dict[str, str], runtime_version: str) -> bytes:
    """``GetMetadataResponse``: the id, the stores as registered components, the
    extended metadata and the runtime's version."""
    parts = [_str(1, app_id)]
    for c in components:
        caps = c.get("capabilities", [])
        assert isinstance(caps, list)
        parts.append(len_field(3, _str(1, str(c["name"])) + _str(2, str(c["type"]))
                               + _str(3, str(c["version"]))
                               + b"".join(_str(4, str(cap)) for cap in caps)))
    parts.append(_map(4, extended))
    parts.append(_str(8, runtime_version))
    return b"".join(parts)
