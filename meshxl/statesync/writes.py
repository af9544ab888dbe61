"""What the session layer is asked to write and what it answers: a :class:`Write` of one
session, a :class:`Stored` session, a :class:`Transacted` transaction, a
:class:`Takeover`, and the layer's :class:`Settings`. Pure data; and the layer's one
way in as the API sees it, :class:`SessionEngine`.

One vocabulary for what a write does to its session: :data:`PUT` (store a state),
:data:`PATCH` (merge a JSON patch into it) and :data:`DELETE`; the metrics' ``op`` label
says the same. The multi-session API's wire format names a put ``upsert``
(:mod:`.bulk` translates).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypeAlias, overload

from meshxl.errors import MeshxlError
from meshxl.model.spec import SessionSync

from .record import JSON_TYPE, SessionRecord

__all__ = ["DELETE", "PATCH", "PUT", "JsonValue", "Outcome", "SessionEngine", "Settings",
           "Stored", "Takeover", "Transacted", "Write"]

PUT, PATCH, DELETE = "put", "patch", "delete"

JsonValue: TypeAlias = (
    "dict[str, JsonValue] | list[JsonValue] | str | int | float | bool | None")
"""A JSON document as :func:`json.loads` makes it."""


Settings = SessionSync
"""The session layer's settings are the model's ``sessions`` block, one declaration
(:class:`meshxl.model.spec.SessionSync`: ``ttl``, ``sync_delay``, ``max_bytes``,
``replication``, ``quota``), with the command line's values over it
(:func:`.mesh_reads.session_settings`)."""


@dataclass(slots=True, kw_only=True)
class Write:
    """One session's write, as the API asks for it (not frozen: one is made for every
    session written, and a frozen dataclass sets each field through
    ``object.__setattr__``)."""

    session_id: str
    op: str = PUT
    data: bytes = b""
    """A put's state."""
    patch: JsonValue = None
    """A patch's RFC 7386 merge patch (a JSON value)."""
    content_type: str = JSON_TYPE
    if_match: str | None = None
    create_only: bool = False
    """``If-None-Match: *``: only if the session does not exist."""
    sync_now: bool = False
    """``X-Meshxl-Sync: now``: committed in etcd before it is acknowledged, never kept
    on this member only, whatever ``sync_delay`` says (a session kept here is
    replicated by it)."""
    traceparent: str | None = None
    """The W3C trace context of its own request (a PUT's); None: the request's as a
    whole (a bulk save's)."""
    record: SessionRecord | None = None
    """A record to store as it is: a session kept on this member (delayed sync),
    replicated when its delay is over."""
    ttl: int | None = None
    """A put's TTL of its own, in seconds (Dapr's ``ttlInSeconds``; ``-1``: never
    expires), kept in its record (:attr:`.record.SessionRecord.ttl`) with a lease of that
    TTL; None: the cluster's ``sessions.ttl``. Such a write is sent alone, and is
    ``sync_now`` (delayed sync keeps no TTL of its own)."""


@dataclass(slots=True, kw_only=True)
class Stored:
    """A session's state as the API returns it (not frozen: made on every write)."""

    session_id: str
    record: SessionRecord
    etag: str
    """``"<etcd revision>"``, or ``"L<n>"`` while only on this member (delayed sync)."""
    new_session: bool = False
    """This write created the session (the API answers 201 and ``"created": true``)."""
    previous_owner: str | None = None
    source: str = "etcd"

    @property
    def takeover(self) -> bool:
        return self.previous_owner is not None and self.previous_owner != self.record.owner


Outcome = Stored | Exception
"""A write's outcome: the session as stored, a :class:`~meshxl.errors.MeshxlError` that
refused it, or (a bug) any other exception, which the API answers 500."""


@dataclass(frozen=True, kw_only=True)
class Transacted:
    """A transaction's answer. Committed: every put's :class:`Stored` (None for a
    delete), all at ``revision``. Not committed: nothing applied, and ``errors`` holds
    the failure of each operation that failed, by its index."""

    committed: bool
    revision: int = 0
    stored: tuple[Stored | None, ...] = ()
    errors: Mapping[int, MeshxlError] = field(default_factory=dict)


@dataclass(frozen=True)
class Takeover:
    """A session this member took over: from its first access here to the write that
    made this member the owner (wall clock, ns)."""

    session_id: str
    previous_owner: str
    owner: str
    start_ns: int
    end_ns: int
    previous_traceparent: str | None

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


class SessionEngine(Protocol):
    """The session layer as the API (and the sidecar) use it: :class:`.sessions.Sessions`
    over one etcd cluster, or :class:`.shards.ShardedSessions`, each session in its
    shard's ``Sessions``. A write crosses this seam typed: each overload of
    :meth:`write` says what it answers."""

    @property
    def settings(self) -> Settings: ...

    @property
    def takeovers(self) -> int: ...

    @property
    def conflicts(self) -> int: ...

    @property
    def local_sessions(self) -> int: ...

    @property
    def on_takeover(self) -> Callable[[Takeover], None] | None: ...

    @on_takeover.setter
    def on_takeover(self, hook: Callable[[Takeover], None] | None) -> None: ...

    def prune_observed(self) -> int: ...

    async def flush_due(self) -> int: ...

    async def get(self, session_id: str) -> Stored: ...

    @overload
    async def write(self, writes: Sequence[Write], *, atomic: Literal[True],
                    traceparent: str | None = None) -> Transacted: ...

    @overload
    async def write(self, writes: Sequence[Write], *, early: Literal[True],
                    traceparent: str | None = None
                    ) -> list[Outcome | asyncio.Task[Outcome]]: ...

    @overload
    async def write(self, writes: Sequence[Write], *,
                    traceparent: str | None = None) -> list[Outcome]: ...
