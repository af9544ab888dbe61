"""The multi-session API's wire format: bulk get, bulk save, transactions. Pure code.

Requests and answers are JSON. A session's state travels in ``data`` with an
``encoding``:

* ``"json"`` (the default when writing): ``data`` is the state itself, a JSON value,
  for JSON content types (``application/json``, ``*+json``). Written, it is stored as
  compact JSON (``{"a":1}``): the same value, whatever spacing the request had. Read,
  the stored text is put into the answer as it is, so a bulk read gives the value a
  single GET gives, without a decode and re-encode;
* ``"base64"``: ``data`` is the state's bytes in standard base64, kept byte for byte,
  for any content type (the default content type is then
  ``application/octet-stream``). A read answers base64 for every type that is not
  JSON, and for stored JSON that is not plain UTF-8 JSON (a BOM, UTF-16, ``NaN``),
  so the answer is always valid JSON and the bytes always come back exact.

Everything is checked before anything is written: a bad request is one 400 (413 for
sizes) whose ``field`` names the item and the field (``items[3].data``), and
``item`` its index. Each session may appear once per request (etcd refuses a
transaction naming a key twice; in a bulk request the order of two writes of one
session would be a guess).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from meshxl import httpbase
from meshxl.errors import InputError, MeshxlError, TooLarge

from .conditions import check_if_match
from .record import (
    JSON_TYPE,
    SESSION_ID_RULE,
    is_json,
    served_content_type,
    valid_content_type,
    valid_session_id,
)
from .store import MAX_TXN_OPS, MAX_TXN_WRITES
from .writes import DELETE, PUT, Stored, Write

_string = json.encoder.encode_basestring_ascii

# One encoder each, made once (json.dumps with options makes one per call).
_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_COMPACT_ASCII = json.JSONEncoder(separators=(",", ":"), allow_nan=False)

SAVE_FIELDS = ("session", "data", "encoding", "content_type", "if_match", "if_none_match",
               "sync")
UPSERT_FIELDS = ("operation", *SAVE_FIELDS)

MAX_ITEMS = MAX_TXN_OPS
"""Sessions per bulk get or bulk save at most (etcd's operations per transaction level)."""
MAX_OPERATIONS = MAX_TXN_WRITES
"""Operations per transaction at most: one etcd transaction nested in a batch, which
etcd's 128 operations per level leave 127."""
MAX_BODY = 4 * 1024 * 1024
"""Bytes of a bulk save or transaction request body."""
MAX_GET_BODY = 64 * 1024
"""Bytes of a bulk get request body (128 ids of 200 characters fit)."""
MAX_TXN_BYTES = 1_200_000
"""Bytes of session ids and states in one transaction: with the records' headers it
stays under etcd's 1.5 MiB request limit."""
OCTET_STREAM = "application/octet-stream"
ENCODINGS = ("json", "base64")


UPSERT = "upsert"
"""The wire format's name of a put (a transaction's ``operation``); a delete is
``delete`` on the wire too."""


@dataclass(slots=True, kw_only=True)
class Item(Write):
    """One session of a bulk save or transaction request, checked: the write it asks
    for (a :class:`~.writes.Write`, what :meth:`.sessions.Sessions.write` takes) and its
    place in the request."""

    index: int


def operation(write: Write) -> str:
    """A write's ``operation`` as the wire format names it: ``upsert`` or ``delete``."""
    return UPSERT if write.op == PUT else DELETE


class _Where:
    """Names a request field in errors: ``items[3].data``."""

    def __init__(self, array: str, index: int):
        self.array, self.index = array, index

    def field(self, name: str) -> str:
        return f"{self.array}[{self.index}].{name}"

    def bad(self, name: str, message: str) -> InputError:
        where = self.field(name)
        return InputError(f"{where}: {message}", field=where, item=self.index)


# -- requests -------------------------------------------------------------------------


def parse_get(body: bytes) -> list[str]:
    """``{"sessions": ["a", "b"]}`` -> the ids, checked."""
    request = _object(body, "sessions")
    ids = _array(request, "sessions")
    seen: set[str] = set()
    for i, session_id in enumerate(ids):
        if not isinstance(session_id, str) or not valid_session_id(session_id):
            where = f"sessions[{i}]"
            raise InputError(f"{where}: invalid session id {_show(session_id)}: use "
                             f"{SESSION_ID_RULE}", field=where, item=i)
        if session_id in seen:
            raise InputError(f"sessions[{i}]: session {session_id!r} is named twice",
                             field=f"sessions[{i}]", item=i)
        seen.add(session_id)
    return list(ids)


def parse_save(body: bytes, max_bytes: int) -> list[Item]:
    """``{"items": [{"session", "data", "encoding"?, "content_type"?, "if_match"?,
    "if_none_match"?}, ...]}`` -> the items, checked; ``max_bytes`` per state."""
    numbers = _Numbers()
    request = _object(body, "items", numbers)
    items = [_item(_Where("items", i), raw, max_bytes, SAVE_FIELDS, numbers.plain)
             for i, raw in enumerate(_array(request, "items"))]
    _once(items, "items")
    return items


def parse_transaction(body: bytes, max_bytes: int) -> list[Item]:
    """``{"operations": [{"operation": "upsert"|"delete", "session", ...}, ...]}`` ->
    the items, checked; the states together within :data:`MAX_TXN_BYTES`."""
    numbers = _Numbers()
    request = _object(body, "operations", numbers)
    items = []
    for i, raw in enumerate(_array(request, "operations", MAX_OPERATIONS)):
        where = _Where("operations", i)
        if not isinstance(raw, dict):
            raise where.bad("operation", "each operation is an object")
        named = raw.get("operation", UPSERT)
        if named == UPSERT:
            items.append(_item(where, raw, max_bytes, UPSERT_FIELDS, numbers.plain))
        elif named == DELETE:
            _only(where, raw, ("operation", "session", "if_match"))
            items.append(Item(index=i, session_id=_session(where, raw), op=DELETE,
                              if_match=_if_match(where, raw)))
        else:
            raise where.bad("operation", f'"upsert" or "delete", not {_show(named)}')
    _once(items, "operations")
    total = sum(len(item.session_id) + len(item.data) for item in items)
    if total > MAX_TXN_BYTES:
        raise TooLarge(f"the transaction's sessions hold {total} bytes; one transaction "
                       f"takes at most {MAX_TXN_BYTES} (etcd's request limit): split it "
                       "or use bulk save", field="operations", limit=MAX_TXN_BYTES)
    return items


def _object(body: bytes, array: str, numbers: _Numbers | None = None) -> dict[str, Any]:
    try:
        request = httpbase.loads(body, what="request body",
                             parse_float=numbers.number if numbers else None,
                             parse_constant=numbers.constant if numbers else None)
    except httpbase.BadJson as exc:
        raise InputError(str(exc), field="body") from None
    if not isinstance(request, dict):
        raise InputError(f'the request body is a JSON object {{"{array}": [...]}}',
                         field="body")
    unknown = sorted(set(request) - {array})
    if unknown:
        raise InputError(f"unknown field {unknown[0][:60]!r} (the body holds {array!r})",
                         field=unknown[0][:60])
    return request


def _array(request: dict[str, Any], name: str, limit: int = MAX_ITEMS) -> list[Any]:
    value = request.get(name)
    if not isinstance(value, list) or not value:
        raise InputError(f"{name} must be a non-empty array", field=name)
    if len(value) > limit:
        raise TooLarge(f"{name} holds {len(value)} entries; the limit is {limit}",
                       field=name, limit=limit)
    return value


def _only(where: _Where, raw: dict[str, Any], allowed: Sequence[str]) -> None:
    for name in raw:
        if name not in allowed:
            raise where.bad(str(name)[:60], f"unknown field (allowed: {', '.join(allowed)})")


def _session(where: _Where, raw: dict[str, Any]) -> str:
    session_id = raw.get("session")
    if not isinstance(session_id, str) or not valid_session_id(session_id):
        raise where.bad("session", f"invalid session id {_show(session_id)}: use "
                        f"{SESSION_ID_RULE}")
    return session_id


def _if_match(where: _Where, raw: dict[str, Any]) -> str | None:
    value = raw.get("if_match")
    if value is None:
        return None
    if not isinstance(value, str):
        raise where.bad("if_match", 'an ETag string such as "42" or "*"')
    try:  # the header's check, answered with this field's name
        check_if_match(value)
    except InputError as exc:
        raise where.bad("if_match", str(exc).replace("If-Match", "if_match")) from None
    return value


_ALLOWED: dict[tuple[str, ...], frozenset[str]] = {
    fields: frozenset(fields) for fields in (SAVE_FIELDS, UPSERT_FIELDS)}


def _item(where: _Where, raw: Any, max_bytes: int, allowed: tuple[str, ...],
          plain: bool = False) -> Item:
    if not isinstance(raw, dict):
        raise where.bad("session", "each item is an object")
    if not raw.keys() <= _ALLOWED[allowed]:
        _only(where, raw, allowed)
    session_id = _session(where, raw)
    encoding = raw.get("encoding", "json")
    if encoding not in ENCODINGS:
        raise where.bad("encoding", f'"json" or "base64", not {_show(encoding)}')
    content_type = raw.get("content_type", JSON_TYPE if encoding == "json" else OCTET_STREAM)
    if not isinstance(content_type, str) or not valid_content_type(content_type):
        raise where.bad("content_type", "a media type of at most 255 printable ASCII "
                        "characters, such as application/json")
    if "data" not in raw:
        raise where.bad("data", "the session's state is required")
    if encoding == "json":
        if not is_json(content_type):
            raise where.bad("encoding", f"a state of type {content_type} is sent as "
                            'base64 ("encoding": "base64")')
        data = encode_json(where, raw["data"], plain)
    else:
        text = raw["data"]
        if not isinstance(text, str):
            raise where.bad("data", "base64 text (encoding base64)")
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise where.bad("data", "not valid base64 (standard alphabet, with "
                            "padding)") from None
        if is_json(content_type):
            try:
                httpbase.check_json(data, what="the decoded state")
            except httpbase.BadJson as exc:
                raise where.bad("data", f"{exc}; send another content_type to store it "
                                "as bytes") from None
    if len(data) > max_bytes:
        field = where.field("data")
        raise TooLarge(f"{field}: the session state is {len(data)} bytes; the limit is "
                       f"{max_bytes}", field=field, item=where.index, limit=max_bytes)
    if_match = _if_match(where, raw)
    if_none_match = raw.get("if_none_match")
    if if_none_match is not None and if_none_match != "*":
        raise where.bad("if_none_match", 'takes only "*" (create, never replace)')
    if if_none_match is not None and if_match is not None:
        raise where.bad("if_none_match", "send if_match or if_none_match, not both")
    sync = raw.get("sync")
    if sync is not None and sync != "now":
        raise where.bad("sync", 'takes only "now" (committed before it is answered)')
    return Item(index=where.index, session_id=session_id, data=data,
                content_type=content_type, if_match=if_match,
                create_only=if_none_match is not None, sync_now=sync is not None)


def encode_json(where: _Where, value: Any, plain: bool = False) -> bytes:
    """A JSON value as stored: compact, UTF-8 (strings with lone surrogates, which
    UTF-8 cannot carry, escaped), no NaN or Infinity (not JSON): the standard library's
    compact encoding, byte for byte.

    ``plain``: the value holds no NaN or Infinity and no float the standard library
    writes with a one-digit exponent (below 1e-4: ``1e-07``, where orjson writes
    ``1e-7``), as :class:`_Numbers` tells while parsing; orjson then writes the same
    bytes about twenty times faster (where it cannot, lone surrogates and integers
    beyond 64 bits, it refuses and the standard library writes them). The property test
    in ``tests/unit/test_statesync_bulk.py`` checks the bytes for any value.
    """
    if plain:
        try:
            return orjson.dumps(value)
        except orjson.JSONEncodeError:
            pass
    try:
        text = _COMPACT.encode(value)
    except ValueError as exc:
        raise where.bad("data", f"not JSON: {exc}") from None
    try:
        return text.encode()
    except UnicodeEncodeError:
        return _COMPACT_ASCII.encode(value).encode()


class _Numbers:
    """``parse_float`` and ``parse_constant`` of a request's parse: note whether its
    values are :func:`encode_json`'s ``plain``."""

    def __init__(self) -> None:
        self.plain = True

    def number(self, text: str) -> float:
        value = float(text)
        if value and not 1e-4 <= abs(value) < math.inf:  # NaN and Infinity too
            self.plain = False
        return value

    def constant(self, name: str) -> float:
        self.plain = False  # NaN, Infinity, -Infinity: refused when written
        return float(name)


def _once(items: list[Item], array: str) -> None:
    seen: set[str] = set()
    for item in items:
        if item.session_id in seen:
            where = f"{array}[{item.index}].session"
            raise InputError(f"{where}: session {item.session_id!r} is named twice",
                             field=where, item=item.index)
        seen.add(item.session_id)


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text[:80]


# -- answers ----------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def embeddable(data: bytes) -> bool:
    """Whether stored JSON can go into an answer as it is: UTF-8 without a BOM,
    strict JSON (no NaN or Infinity)."""
    try:
        text = data.decode()
        if text[:1] == "\ufeff":
            return False
        json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return False
    return True


def _open(fields: dict[str, Any]) -> bytes:
    """``fields`` as a JSON object without its closing brace, to append to."""
    return json.dumps(fields, separators=(",", ":")).encode()[:-1]


def read_item(stored: Stored) -> bytes:
    """One bulk get answer: the state with its metadata."""
    record = stored.record
    head = _open({"session": stored.session_id, "status": 200, "etag": stored.etag,
                  "owner": record.owner, "source": stored.source,
                  "content_type": served_content_type(record.content_type)})
    if is_json(record.content_type) and embeddable(record.data):
        return head + b',"encoding":"json","data":' + record.data + b"}"
    return (head + b',"encoding":"base64","data":"' + base64.b64encode(record.data)
            + b'"}')


_BOOL = ("false", "true")


def write_answer(stored: Stored, *, status: bool = False) -> bytes:
    """What a write answers (PUT's body; with ``status``, a bulk save item), built by
    hand: this is every write's answer, and the fields need no escaping but the owner
    (a session id and an ETag are URL-safe)."""
    new, record = stored.new_session, stored.record
    code = f'"status":{201 if new else 200},' if status else ""
    return (f'{{"session":"{stored.session_id}",{code}"etag":"{stored.etag}",'
            f'"owner":{_string(record.owner)},"created":{_BOOL[new]},'
            f'"takeover":{_BOOL[stored.takeover]},'
            f'"replicated":{_BOOL[stored.source != "local"]}}}').encode()


def write_fields(stored: Stored) -> dict[str, Any]:
    """What a single write answers, as a bulk item: status, ETag, owner..."""
    return {"session": stored.session_id, "status": 201 if stored.new_session else 200,
            "etag": stored.etag, "owner": stored.record.owner,
            "created": stored.new_session, "takeover": stored.takeover,
            "replicated": stored.source != "local"}


def error_fields(session_id: str, exc: MeshxlError) -> dict[str, Any]:
    """What a single request answers for ``exc``, as a bulk item."""
    return {"session": session_id, "status": httpbase.http_status(exc), "error": str(exc),
            **exc.details}


def items_body(parts: Sequence[bytes]) -> bytes:
    return b'{"items":[' + b",".join(parts) + b"]}"


def dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


__all__ = ["ENCODINGS", "MAX_BODY", "MAX_GET_BODY", "MAX_ITEMS", "MAX_OPERATIONS",
           "MAX_TXN_BYTES", "UPSERT", "Item", "operation",
           "embeddable", "error_fields", "items_body", "parse_get", "parse_save",
           "parse_transaction", "read_item", "write_answer", "write_fields"]
