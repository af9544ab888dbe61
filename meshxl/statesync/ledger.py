"""What this member knows of the sessions it reads and writes, and the bookkeeping every
write shares, single or in a transaction.

* The revision this member last *observed* of each session (its last read or write of
  it): what a write of a session it owns compares (:mod:`.conditions`, ``owner``), so a
  member that lost the session to another one is fenced.
* The verdict on a write etcd refused (:meth:`Ledger.refusal`): 412, 409, 404, or
  "send it again against the key as it is now".
* A committed write (:meth:`Ledger.acknowledged`): the cache, the observed revision,
  and a takeover (its span starts at the session's first access here).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator

from meshxl.errors import (
    Conflict,
    InputError,
    MeshxlError,
    PreconditionFailed,
    Unavailable,
    Undecodable,
    detached,
)
from meshxl.etcd import EtcdUnavailable

from .cache import SessionCache
from .conditions import (
    BLIND,
    IF_ABSENT,
    IF_EXISTS,
    IF_MATCH,
    OWNER,
    REPLICATE,
    if_match_revision,
    parse_etag,
    revision,
    written_since,
)
from .deletions import DeletionRecord
from .errors import LeaseLost, Superseded, no_session
from .metrics import StatesyncMetrics
from .record import SessionRecord, storable_session_id
from .store import KeyState, KeyWrite, SessionStore, WriteResult
from .txns import Guard, transact
from .writes import DELETE, Settings, Stored, Takeover, Write

log = logging.getLogger(__name__)

__all__ = ["GONE", "Ledger"]

GONE = SessionRecord(owner="", content_type="", created=0.0, updated=0.0, data=b"")
"""The record a delete answers when the session's last state is not known here."""


class Ledger:
    """One member's bookkeeping of its cluster's sessions (see the module docstring)."""

    def __init__(self, store: SessionStore, cache: SessionCache, prefix: str, member: str,
                 settings: Settings, metrics: StatesyncMetrics, deletions: str = ""):
        self.store = store
        self.cache = cache
        self.member = member
        self.settings = settings
        self.metrics = metrics
        self._prefix = prefix.encode()
        """Every session key starts with it (``Keys.session``), encoded once."""
        self._deletions = deletions
        """Every deletion record's key starts with it (``Keys.deletion``)."""
        self.observed: dict[str, tuple[int, float]] = {}
        """Session -> (the revision this member last observed, when: monotonic)."""
        self.first_access: dict[str, int] = {}
        """Session -> when a read or write of it that may become a takeover started."""
        self.takeovers = 0
        self.conflicts = 0
        self.on_takeover: Callable[[Takeover], None] | None = None
        """Called (in the request's context) when this member took a session over."""

    def key(self, session_id: str) -> bytes:
        if not storable_session_id(session_id):  # one etcd key segment, bounded
            raise InputError(f"invalid session id {session_id[:80]!r}", field="session_id")
        return self._prefix + session_id.encode()

    def deletion(self, session_id: str, revision: int) -> KeyWrite:
        """The record a delete of ``session_id``'s version ``revision`` puts in its own
        transaction (:mod:`.deletions`): a new key, so its compare expects it absent."""
        key = f"{self._deletions}{session_id}/{revision}".encode()
        return key, DeletionRecord(self.member, time.time()).encode(), 0

    def guard(self, session_id: str, floor: int | None) -> Guard:
        """A replication's guard (:meth:`.store.SessionStore.replicate`): no deletion
        record of ``session_id`` created after ``floor`` (None: after none)."""
        return f"{self._deletions}{session_id}/".encode(), floor or 0

    # -- observations -----------------------------------------------------------------------

    def observe(self, session_id: str, revision: int) -> None:
        self.observed[session_id] = (revision, time.monotonic())

    def observed_revision(self, session_id: str) -> int | None:
        seen = self.observed.get(session_id)
        return seen[0] if seen is not None else None

    @contextlib.contextmanager
    def writing(self, session_ids: Iterable[str]) -> Iterator[None]:
        """Writes of these sessions start now: a takeover among them is timed from here
        (unless a read of it started earlier)."""
        started = time.time_ns()
        first_access = self.first_access
        ids = list(session_ids)
        for session_id in ids:
            first_access.setdefault(session_id, started)
        try:
            yield
        finally:
            for session_id in ids:
                first_access.pop(session_id, None)

    def prune(self) -> int:
        """Forget observations older than any session can live (called periodically)."""
        horizon = time.monotonic() - (self.settings.ttl + self.store.leases.bucket) * 1.5
        stale = [s for s, (_, at) in self.observed.items() if at < horizon]
        for session_id in stale:
            del self.observed[session_id]
        # A read that no takeover write followed within a minute starts nothing.
        cutoff = time.time_ns() - 60_000_000_000
        for session_id in [s for s, at in self.first_access.items() if at < cutoff]:
            del self.first_access[session_id]
        return len(stale)

    # -- what a write compares --------------------------------------------------------------

    async def check(self, key: bytes) -> int:
        """The key's revision in etcd now (0: absent)."""
        try:
            return await self.store.check(key)
        except EtcdUnavailable as exc:
            raise Unavailable(f"etcd unavailable: {exc}") from None

    async def absent_at(self, key: bytes) -> int | None:
        """etcd's revision now if it does not hold ``key`` (a kept copy's floor), else
        None."""
        try:
            revision, now = await self.store.check_at(key)
        except EtcdUnavailable as exc:
            raise Unavailable(f"etcd unavailable: {exc}") from None
        return now if revision == 0 else None

    async def expectation(self, write: Write, key: bytes, cached: int) -> tuple[str, int]:
        """The mode and revision a write compares (:mod:`.conditions`), reading etcd
        where :func:`~.conditions.known_expectation` cannot tell: ``If-Match: *`` asks
        etcd, never a cache that may lag, whether the session exists; a delete of a
        session this member knows nothing of asks for its revision (404 if none)."""
        session_id = write.session_id
        observed = self.observed_revision(session_id)
        if write.create_only:
            mode, expected_revision = IF_ABSENT, 0
        elif write.if_match is not None:
            tag = parse_etag(write.if_match)
            if tag == "*":
                mode, expected_revision = IF_EXISTS, await self.check(key)
                if expected_revision == 0:
                    raise PreconditionFailed(f"session {session_id!r} does not exist",
                                             current=None)
            else:
                mode, expected_revision = IF_MATCH, if_match_revision(write, tag)
                self.check_not_replaced(write)
        elif observed is not None:
            mode, expected_revision = OWNER, observed
        else:
            mode, expected_revision = BLIND, cached
        if write.op == DELETE and expected_revision == 0 and mode != IF_MATCH:
            expected_revision = await self.check(key)
            if expected_revision == 0:
                raise no_session(session_id)
        return mode, expected_revision

    def check_not_replaced(self, write: Write) -> None:
        """PreconditionFailed when the write's If-Match names a revision of a history
        etcd no longer has (restored from a backup): it can match nothing safely."""
        tag = write.if_match
        if tag is not None and self.cache.replaced_revision(revision(parse_etag(tag))):
            raise PreconditionFailed(
                f"If-Match {tag.strip()} names a revision from before etcd was restored "
                f"from a backup: read session {write.session_id!r} again", current=None)

    def refusal(self, op: str, session_id: str, mode: str, if_match: str | None,
                expected_revision: int, current: KeyState,
                current_record: SessionRecord | None,
                kept: SessionRecord | None = None) -> MeshxlError | None:
        """The answer to a write whose compare failed (counted), or None when it may be
        sent again against the key as it is now: new to this member, expired meanwhile,
        its own unconfirmed write, or an undecodable record (replaced). ``kept``: the
        copy a :data:`REPLICATE` write replicates."""
        if mode == IF_ABSENT:
            self.metrics.write(op, "precondition_failed").inc()
            return PreconditionFailed(f"session {session_id!r} exists (revision "
                                      f"{current.revision})", current=current.revision)
        if mode == IF_MATCH or (mode == IF_EXISTS and current.revision == 0):
            self.metrics.write(op, "precondition_failed").inc()
            return PreconditionFailed(
                f"session {session_id!r} is at revision {current.revision or 'none'}, "
                f"not {if_match}", current=current.revision or None)
        if mode == REPLICATE:
            return self.superseded(op, session_id, current, current_record, kept)
        if current.revision == 0 and op == DELETE:
            self.metrics.write(op, "not_found").inc()
            return no_session(session_id)
        if (mode == OWNER and current_record is not None
                and current_record.owner != self.member):
            self.conflicts += 1
            self.metrics.conflicts.inc()
            self.metrics.write(op, "conflict").inc()
            self.cache.write_through(session_id, current.revision, current_record)
            return Conflict(
                f"session {session_id!r} was written by member {current_record.owner!r} "
                f"(revision {current.revision}) after this member last saw it "
                f"(revision {expected_revision}): ownership lost",
                owner=current_record.owner, revision=current.revision)
        return None

    def superseded(self, op: str, session_id: str, current: KeyState,
                   current_record: SessionRecord | None,
                   kept: SessionRecord | None) -> Superseded | None:
        """The verdict on a replication of ``kept``, a session kept here (mode
        :data:`REPLICATE`), that found the key in etcd. None (compare again) when it is
        gone meanwhile, is this member's own record (an earlier replication whose answer
        was lost), or is another member's whose last write came before this copy was
        created (:func:`~.conditions.written_since`: its client had moved here, where the
        session started afresh). Otherwise another member wrote the session while this
        one kept it: its record stands, this member is fenced from it as a former owner
        is (it observed "none": its next write without a read is 409), and the caller
        gives up the copy kept here."""
        if current.revision == 0 or (current_record is not None and (
                current_record.owner == self.member
                or not written_since(current_record, kept))):
            return None
        self.conflicts += 1
        self.metrics.conflicts.inc()
        self.metrics.write(op, "conflict").inc()
        self.observe(session_id, 0)
        if current_record is None:
            return Superseded(
                f"session {session_id!r} was written in etcd by another writer (revision "
                f"{current.revision}, a record that cannot be decoded) while this member "
                "kept it (delayed sync): its copy here is given up", revision=current.revision)
        self.cache.write_through(session_id, current.revision, current_record)
        return Superseded(
            f"session {session_id!r} was written by member {current_record.owner!r} "
            f"(revision {current.revision}) while this member kept it (delayed sync): "
            "its copy here is given up, ownership lost",
            owner=current_record.owner, revision=current.revision)

    def undone_delete(self, op: str, session_id: str, deleted: KeyState,
                      kept: SessionRecord, exact: bool) -> Superseded | None:
        """The verdict on a replication of ``kept``, a session kept here, whose guard
        found ``deleted``: the newest deletion record of the session above the copy's
        floor. ``exact``: the floor is this etcd's revision from before the copy was
        first kept here, so that delete came after it: it stands. Otherwise (a copy
        adopted from another shard) it stands if it came after the copy was created, by
        the two members' clocks (:func:`~.conditions.written_since`'s rule); None: it
        came before (the guard may be raised past it). A delete that stands is another
        member's acknowledged write: the caller gives up the copy, and this member,
        having observed the session gone, writes it next as a new session."""
        try:
            record: DeletionRecord | None = DeletionRecord.decode(deleted.value or b"")
        except ValueError:
            record = None
        if not exact and record is not None and record.at < kept.created:
            return None
        self.conflicts += 1
        self.metrics.conflicts.inc()
        self.metrics.write(op, "conflict").inc()
        self.observe(session_id, 0)
        by = record.member if record is not None else "another writer"
        return Superseded(
            f"session {session_id!r} was deleted by member {by!r} (its deletion record "
            f"at revision {deleted.revision}) while this member kept it (delayed sync): "
            "its copy here is given up", deleted_by=by, revision=deleted.revision)

    async def delete(self, key: bytes, session_id: str,
                     expected_revision: int) -> WriteResult | BaseException:
        """A guarded delete of version ``expected_revision`` with its deletion record, one
        transaction (:mod:`.deletions`): etcd's answer as a single write's, or the
        error. A refused one reads the session (the failure branch of a transaction
        reads revisions only), whose record tells 409 from "send it again"."""
        mark, value, recorded = self.deletion(session_id, expected_revision)
        store = self.store
        try:
            for _ in range(2):
                result = await transact(store, [(key, None, expected_revision),
                                                (mark, value, recorded)])
                if result.ok:
                    return WriteResult(True, result.revision)
                now, there = result.current
                if now.revision != expected_revision or not there.revision:
                    break
                recorded = there.revision  # a record of this very version (an etcd
                # restored from an older backup gave the number again): replaced
            if now.revision == 0:
                return WriteResult(False, 0, now)
            return WriteResult(False, 0, await store.fetch(key))
        except (EtcdUnavailable, LeaseLost) as exc:
            return detached(exc)

    # -- committed --------------------------------------------------------------------------

    def acknowledged(self, op: str, session_id: str, result: WriteResult,
                     record: SessionRecord | None, new_session: bool,
                     prior: SessionRecord | None, *, counted: bool = True) -> Stored:
        """The write is committed: cache, ownership, takeover. ``counted``: count it in
        the metrics here (writes sent together are counted at once)."""
        if counted:
            self.metrics.write(op, "ok").inc()
        self.cache.write_through(session_id, result.revision, record)
        if record is None:
            self.observed.pop(session_id, None)
            return Stored(session_id=session_id, record=prior or GONE, etag=str(result.revision))
        self.observe(session_id, result.revision)
        previous_owner = prior.owner if prior is not None else None
        stored = Stored(session_id=session_id, record=record, etag=str(result.revision),
                        new_session=new_session, previous_owner=previous_owner)
        if stored.takeover:
            self.takeovers += 1
            self.metrics.takeovers.inc()
            log.info("took over session %s from member %s", session_id, previous_owner)
            if self.on_takeover is not None:
                assert prior is not None and previous_owner is not None
                self.on_takeover(Takeover(
                    session_id, previous_owner, self.member,
                    self.first_access.get(session_id, time.time_ns()), time.time_ns(),
                    prior.traceparent))
        return stored

    # -- stored records ---------------------------------------------------------------------

    def decode(self, session_id: str, revision: int, raw: bytes,
               where: str) -> SessionRecord | None:
        """A stored record, or None (counted, logged) when it cannot be decoded."""
        try:
            return SessionRecord.decode(raw)
        except ValueError as exc:
            self.metrics.undecodable.labels(where).inc()
            log.warning("session %s: stored record (revision %d) cannot be decoded: %s",
                        session_id, revision, str(exc)[:300])
            return None

    def undecodable(self, session_id: str, revision: int) -> Undecodable:
        self.metrics.read("etcd", "undecodable").inc()
        return Undecodable(
            f"session {session_id!r}: the stored record (revision {revision}) cannot be "
            "decoded (written by another program?); PUT without If-Match replaces it, "
            "DELETE removes it", undecodable=True, revision=revision)
