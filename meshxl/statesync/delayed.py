"""Delayed sync (ClusterXL's): a session younger than ``sync_delay`` is kept on the member
that wrote it, not replicated, so short-lived sessions never cost etcd a write.

A session is kept here only while etcd has never had it: its first write finds it in
neither the cache nor etcd. Each write of it while it is young makes a new version here
(ETag ``L<n>``); the first write once it is due, or the periodic flush, replicates it
to etcd (its creation time kept) and it is kept here no longer. A delete forgets it.

Replication never replaces a record another member wrote while the copy was kept here
(:data:`~.conditions.REPLICATE`, :func:`~.conditions.written_since`): a session
another member wrote meanwhile (this one paused, or slower) is theirs, and the copy
here is given up (:meth:`LocalSessions.give_up`) as soon as the cache sees that record
or when the replication finds it. Only a record whose last write came before the copy
was created here (the session's client moved here from there, and it started afresh)
is replaced. Nor does it undo a delete: each copy remembers etcd's revision when etcd
was found not to hold the session (:attr:`Local.floor`), and its replication applies
only while no deletion record of the session was created after it
(:meth:`.store.SessionStore.replicate`); a session another member wrote and deleted
meanwhile stays deleted, and the copy here is given up.

A copy is kept no longer than the session would have lived in etcd: one whose last
write is ``ttl`` old expires here (a member paused that long), never replicated, as
etcd would have expired it, and a deletion record, which lives at least ``ttl`` after
its delete, is still there for every copy that may be replicated.

While a planned move away from this member is under way (planned.py) it keeps nothing:
every session is due (the flush replicates them all), a write of a kept one replicates
it, and a new one is written to etcd at once (:attr:`LocalSessions.keeps_new`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from .conditions import written_since
from .metrics import StatesyncMetrics
from .record import SessionRecord
from .writes import PUT, Stored

log = logging.getLogger(__name__)

__all__ = ["Local", "LocalSessions"]


@dataclass(slots=True)
class Local:
    """A session kept here: its record and its version (``L<n>``)."""

    record: SessionRecord
    version: int
    floor: int | None = None
    """etcd's revision when etcd was found not to hold the session, before the copy was
    first kept here: a deletion record created after it is a delete this copy must not
    undo. None: not known in this etcd cluster (a copy adopted from another shard's
    engine); a deletion record then stands if its delete came after the copy was
    created, by the two members' clocks."""


class LocalSessions:
    """The sessions kept on this member (delayed sync)."""

    def __init__(self, member: str, sync_delay: float, metrics: StatesyncMetrics,
                 ttl: float = math.inf):
        self.member = member
        self.sync_delay = sync_delay
        self.ttl = ttl
        self.enabled = sync_delay > 0
        self.metrics = metrics
        self._kept: dict[str, Local] = {}
        self._versions = 0
        self.writing_through = False
        """A planned move away from this member is under way: nothing is young."""

    def __len__(self) -> int:
        return len(self._kept)

    def ids(self) -> list[str]:
        return list(self._kept)

    def kept(self) -> Mapping[str, Local]:
        """The sessions kept here, by id (a read-only view: quotas count them)."""
        return MappingProxyType(self._kept)

    def get(self, session_id: str, now: float | None = None) -> Local | None:
        """The copy kept here (None: none, or it expired: :meth:`expired`)."""
        local = self._kept.get(session_id)
        if local is not None and self.expired(session_id, local, now or time.time()):
            return None
        return local

    def expired(self, session_id: str, local: Local, now: float) -> bool:
        """Whether ``local`` outlived its session's ``ttl`` since its last write (its
        member was paused that long): then it is dropped, never replicated."""
        if now - local.record.updated < self.ttl:
            return False
        if self.drop(session_id) is not None:
            log.warning("delayed sync: session %r expired on this member before it was "
                        "replicated (last written %.0f s ago, ttl %.0f s)", session_id,
                        now - local.record.updated, self.ttl)
        return True

    @property
    def keeps_new(self) -> bool:
        """A new session's first write may stay here."""
        return self.enabled and not self.writing_through

    def young(self, local: Local, now: float) -> bool:
        return not self.writing_through and now - local.record.created < self.sync_delay

    def due(self, now: float) -> list[tuple[str, Local]]:
        """The sessions whose delay is over (the flush replicates them); those that
        expired are dropped."""
        for session_id, local in list(self._kept.items()):
            self.expired(session_id, local, now)
        return [(session_id, local) for session_id, local in self._kept.items()
                if not self.young(local, now)]

    def stored(self, session_id: str, local: Local, *, new_session: bool = False) -> Stored:
        return Stored(session_id=session_id, record=local.record, etag=f"L{local.version}",
                      new_session=new_session, source="local")

    def keep(self, session_id: str, data: bytes, content_type: str,
             traceparent: str | None, now: float, floor: int | None = None) -> Stored:
        """A new version of a session kept here (its conditions checked already).
        ``floor``: for a session not kept here yet, etcd's revision when etcd was found
        not to hold it (:attr:`Local.floor`)."""
        local = self._kept.get(session_id)
        self._versions += 1
        record = SessionRecord(owner=self.member, content_type=content_type,
                               created=local.record.created if local else now, updated=now,
                               data=data, traceparent=traceparent)
        kept = self._kept[session_id] = Local(record, self._versions,
                                              local.floor if local else floor)
        self.metrics.write(PUT, "local").inc()
        self.metrics.local.set(len(self._kept))
        return self.stored(session_id, kept, new_session=local is None)

    def adopt(self, session_id: str, local: Local) -> None:
        """Keep ``local``, kept until now by another shard's engine (a reshard); later
        versions here number above it, so an ``L<n>`` ETag never names two states. Its
        floor was a revision of the other shard's etcd: not known here."""
        self._kept[session_id] = Local(local.record, local.version)
        self._versions = max(self._versions, local.version)
        self.metrics.local.set(len(self._kept))

    def drop(self, session_id: str) -> Local | None:
        """Keep it here no longer (replicated, or deleted)."""
        local = self._kept.pop(session_id, None)
        if local is not None:
            self.metrics.local.set(len(self._kept))
        return local

    def give_up(self, session_id: str, why: str) -> None:
        """Keep ``session_id`` here no longer: another member wrote it in etcd meanwhile
        (``why``), and that record is the session's state (counted, logged)."""
        if self.drop(session_id) is not None:
            self.metrics.superseded.inc()
            log.warning("delayed sync: %s", why)

    def seen(self, session_id: str, record: SessionRecord, revision: int) -> bool:
        """etcd holds ``record`` of ``session_id`` at ``revision`` (the cache saw it): a
        copy kept here of a session another member wrote since it was created here is
        given up, so reads here stop serving it; whether one was."""
        local = self._kept.get(session_id)
        if (record.owner == self.member or local is None
                or not written_since(record, local.record)):
            return False
        self.give_up(session_id, f"session {session_id!r} was written by member "
                     f"{record.owner!r} (revision {revision}) while this member kept it: "
                     "its copy here is given up")
        return True
