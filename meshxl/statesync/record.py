"""A session as stored in etcd: a one-line JSON header, a newline, the state's bytes.

The header carries the owner (the member that wrote last), the content type and
timestamps; the state follows verbatim, so any content type is kept byte for byte,
JSON needs no re-encoding, and ``etcdctl get`` still shows who owns what. Pure code.
"""

from __future__ import annotations

import functools
import json
import math
import re
import sys
from dataclasses import dataclass

_string = json.encoder.encode_basestring_ascii

_NUMBERS = (int, float)
SESSION_ID = re.compile(r"^[A-Za-z0-9._~:{}-]{1,200}$")
#: What a session id may be, in words (error messages).
SESSION_ID_RULE = "1-200 characters of A-Z a-z 0-9 . _ ~ - : { } (not . or ..)"
STORED_ID = re.compile(r"^[A-Za-z0-9._~:{}%|-]{1,1024}$")
"""What the engine stores as a session id: the API's ids, and Dapr's keys as the Dapr
API writes them (``app||cart%2F1``: its key's other characters percent-encoded,
:mod:`.dapr.keys`), which no id of the API can be (it has neither ``|`` nor ``%``)."""
MAX_STORED_ID = 1024
STREAM_RECORDS = "~stream."
"""Session ids of resumable streams' records (:mod:`meshxl.streams`, its
``RECORD_PREFIX``): written again with every message of the stream by the member that
serves it, read by another member only when it takes the stream over (a read that asks
etcd anyway). Other members' caches keep none of them (:mod:`.cache`): decoding each
record on every member cost each sidecar about 11 us a stream message, which grew with
the cluster."""
NO_EXPIRY = -1
"""A write's :attr:`SessionRecord.ttl` that keeps it until it is deleted (Dapr's
``ttlInSeconds: -1``)."""
NAME = re.compile(r"^[A-Za-z0-9._~-]{1,200}$")
"""Other names of the API (problems): URL-safe without encoding."""
JSON_TYPE = "application/json"
HEADER_LIMIT = 4096
"""Bytes the header line may take: every field in it is bounded far below (a member
name, a media type of at most :data:`MAX_CONTENT_TYPE` characters, two numbers and a
55-character trace context), so whatever :meth:`SessionRecord.encode` writes decodes."""
MAX_CONTENT_TYPE = 255
MAX_OWNER = 253
TRACEPARENT = re.compile(r"^(?!ff)[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}"
                         r"-[0-9a-f]{2}$")


def valid_traceparent(value: str | None) -> str | None:
    """A W3C ``traceparent`` (``00-<trace id>-<span id>-<flags>``, 55 characters) as
    given, or None for anything else: trace context is optional metadata, so an
    invalid one is dropped (as the W3C specification says), never stored."""
    if value is None or len(value) != 55:
        return None
    return value if TRACEPARENT.match(value) else None


_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
MEDIA_TYPE = re.compile(
    rf"{_TOKEN}/{_TOKEN}(?: *; *{_TOKEN}=(?:{_TOKEN}|\"(?:[ !#-\[\]-~]|\\[ -~])*\"))*")
"""RFC 9110's ``media-type`` (type/subtype, then ``; name=value`` parameters, a value a
token or a quoted string), in printable ASCII."""


def valid_content_type(value: str) -> bool:
    """A media type (:data:`MEDIA_TYPE`) of at most :data:`MAX_CONTENT_TYPE` characters:
    it is stored and sent back as the session's Content-Type, so anything a client could
    not read as one (``#3](j``) is refused."""
    return len(value) <= MAX_CONTENT_TYPE and _media_type(value)


@functools.lru_cache(maxsize=512)
def _media_type(value: str) -> bool:
    """Cached (an application uses a handful of types; what is cached is bounded by
    :func:`valid_content_type`'s length check first)."""
    return MEDIA_TYPE.fullmatch(value) is not None


def served_content_type(value: str) -> str:
    """The Content-Type a stored record is answered with: its own, or
    ``application/octet-stream`` for a record written (by an older version, or another
    program) with one that is not a media type."""
    return value if valid_content_type(value) else "application/octet-stream"


def valid_session_id(session_id: str) -> bool:
    """No slash (it is one etcd key segment), at most 200 characters; ``{`` and ``}``
    (a hash tag: ``{user42}:cart``, docs/scaling.md) are percent-encoded in a URL."""
    return bool(SESSION_ID.match(session_id)) and session_id not in (".", "..")


def storable_session_id(session_id: str) -> bool:
    """A session id the engine stores (:data:`STORED_ID`): one etcd key segment, bounded;
    the API's own ids are checked by :func:`valid_session_id` first."""
    return bool(STORED_ID.match(session_id)) and session_id not in (".", "..")


def valid_name(name: str) -> bool:
    """A name of the API other than a session id: URL-safe as it is."""
    return bool(NAME.match(name)) and name not in (".", "..")


@functools.lru_cache(maxsize=512)
def is_json(content_type: str) -> bool:
    """A JSON media type (``application/json``, ``*+json``), parameters aside. Cached:
    an application uses a handful of types, asked for on every write."""
    base = content_type.split(";", 1)[0].strip().lower()
    return base == JSON_TYPE or base.endswith("+json")


@functools.lru_cache(maxsize=256)
def _header_start(owner: str, content_type: str) -> bytes:
    """A record header up to its ``created`` value (a member writes its records with a
    handful of content types: encoded once each)."""
    return f'{{"owner":{_string(owner)},"type":{_string(content_type)},"created":'.encode()


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionRecord:
    owner: str
    content_type: str
    created: float
    """When the session was first written (wall clock, seconds)."""
    updated: float
    """When this version was written: replication lag is measured from it."""
    data: bytes
    traceparent: str | None = None
    """W3C trace context of the write, so a takeover can link to it."""
    ttl: int | None = None
    """Seconds it lives after :attr:`updated` (a per-write TTL: Dapr's ``ttlInSeconds``),
    :data:`NO_EXPIRY` never; None: the cluster's ``sessions.ttl`` (its lease's bucket)."""

    @property
    def expires(self) -> float | None:
        """When a per-write TTL ends it (wall clock, seconds); None: no per-write TTL."""
        ttl = self.ttl
        return self.updated + ttl if ttl is not None and ttl > 0 else None

    def expired(self, now: float) -> bool:
        expires = self.expires
        return expires is not None and now >= expires

    def __post_init__(self) -> None:
        # Refuse what would not read back (the API validates first, with 4xx answers).
        if len(self.owner) > MAX_OWNER or len(self.content_type) > MAX_CONTENT_TYPE:
            raise ValueError("session record owner or content type too long")
        if self.traceparent is not None and valid_traceparent(self.traceparent) is None:
            raise ValueError(f"invalid traceparent {self.traceparent[:80]!r}")
        if self.ttl is not None and not _valid_ttl(self.ttl):
            raise ValueError(f"invalid session ttl {self.ttl!r}")

    def encode(self) -> bytes:
        # Built by hand from JSON-encoded parts: on the write path, 5x cheaper than
        # json.dumps of a dict (strings go through the C string encoder, floats through
        # repr, which is valid JSON for finite numbers).
        trace = f',"traceparent":{_string(self.traceparent)}' if self.traceparent else ""
        if self.ttl is not None:
            trace += f',"ttl":{self.ttl}'
        return (_header_start(self.owner, self.content_type)
                + f'{self.created!r},"updated":{self.updated!r}{trace}}}\n'.encode()
                + self.data)

    @classmethod
    def decode(cls, raw: bytes) -> SessionRecord:
        """Parse a stored record; ValueError names what is wrong."""
        newline = raw.find(b"\n", 0, HEADER_LIMIT)
        if newline < 0:
            raise ValueError("session record has no header line")
        try:
            header = json.loads(raw[:newline])
            owner, content_type = header["owner"], header["type"]
            if not isinstance(owner, str) or not isinstance(content_type, str):
                raise TypeError("owner and type must be strings")
            created, updated = header["created"], header["updated"]
            # Exact types: what json.loads makes of numbers (a bool is not one); no
            # generator: this runs for every write the watch brings, the member's own too.
            if (type(created) not in _NUMBERS or type(updated) not in _NUMBERS
                    or not math.isfinite(created) or not math.isfinite(updated)):
                raise TypeError("created and updated must be finite numbers")
            traceparent = header.get("traceparent")
            ttl = header.get("ttl")
            if ttl is not None and (type(ttl) is not int or not _valid_ttl(ttl)):
                raise TypeError("ttl must be a whole number of seconds, or -1")
            return cls(
                owner=sys.intern(owner),
                content_type=sys.intern(content_type),
                created=float(created),
                updated=float(updated),
                data=raw[newline + 1:],
                traceparent=valid_traceparent(traceparent) if isinstance(traceparent, str)
                else None,
                ttl=ttl,
            )
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise ValueError(f"bad session record header: {exc}") from None


MAX_TTL = 10 * 365 * 86_400
"""The longest per-write TTL (seconds): ten years (etcd's lease TTLs are int64 seconds;
this keeps what a record carries, and its lease, plainly bounded)."""


def _valid_ttl(ttl: int) -> bool:
    return ttl == NO_EXPIRY or 0 < ttl <= MAX_TTL
