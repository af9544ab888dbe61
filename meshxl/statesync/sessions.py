"""The session layer's engine: one member's reads and writes of its cluster's sessions.

Every write goes in through :meth:`Sessions.write`, whatever asked for it: a PUT, PATCH
or DELETE (one write), PUTs pipelined on one connection (several, ``early``), a bulk save
(several), a transaction (``atomic``), the flush of delayed sync. Its steps:

1. **admit**: each write checked (:func:`~.conditions.check_write`) and given its place
   in its session's line (:mod:`.locks`) at once, in the order given, before anything
   waits, so a later write of a session (in this call or after it) stays behind it;
2. **together**: the writes whose lock is free and whose compare needs no etcd read
   (:func:`~.conditions.known_expectation`) are built into records and queued at once,
   sent in the same etcd transactions (:meth:`.store.SessionStore.write`), with no task,
   future or wake-up each: what a PUT costs the sidecar beyond its HTTP is mostly that;
3. **one by one**: any other (its session busy with another write, ``If-Match: *``, a
   delete, a patch, a session kept on this member) waits for its lock in a task of its
   own, so it holds back no other's outcome, then is written alone;
4. **again**: a write whose compare etcd refused is judged (:meth:`.ledger.Ledger.refusal`)
   and, where the rules allow, sent again against the key as it is now.

Fencing is by revision, not by locks (:mod:`.conditions`); every read first asks etcd,
linearizably and without the value, for the session's current revision, and serves the
cached state only if it is that revision (while etcd does not answer, it is served
marked ``cache-unverified``, and a write based on it still compares the revision read).
Two members therefore can never both acknowledge conflicting writes: etcd accepts one
compare and refuses the other.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, overload

from meshxl.errors import Conflict, MeshxlError, PreconditionFailed, Unavailable, detached
from meshxl.etcd import EtcdUnavailable
from meshxl.etcd.keys import Keys
from meshxl.etcd.shards import shard_etag

from .batches import PLANNED
from .cache import Entry, SessionCache
from .conditions import (
    BLIND_RETRIES,
    IF_MATCH,
    REPLICATE,
    check_size,
    check_write,
    known_expectation,
    local_precondition,
)
from .delayed import Local, LocalSessions
from .errors import LeaseLost, Superseded, no_session
from .ledger import Ledger
from .locks import SessionLocks
from .metrics import StatesyncMetrics
from .record import JSON_TYPE, SessionRecord, is_json
from .store import KeyState, SessionStore, WriteResult
from .txns import Guard, replicate
from .writes import DELETE, PATCH, PUT, Outcome, Settings, Stored, Takeover, Transacted, Write

if TYPE_CHECKING:
    from .transactions import Transactions

log = logging.getLogger(__name__)

__all__ = ["UNVERIFIED", "Sessions"]

UNVERIFIED = "cache-unverified"
"""``X-Meshxl-Source`` of a read served from the cache while etcd does not answer."""

_Ready = tuple[int, bytes, str, int, SessionRecord | None]
"""A write sent with others: (its index, key, mode, expected revision, prior record)."""


class Sessions:
    """One member's view of its cluster's sessions."""

    def __init__(self, store: SessionStore, cache: SessionCache, keys: Keys, cluster: str,
                 member: str, settings: Settings, metrics: StatesyncMetrics,
                 shard: str = ""):
        self.store = store
        self.shard = shard
        """The session shard it writes in (its ETags name it); "": not sharded."""
        self.cache = cache
        self.member = member
        self.settings = settings
        self.metrics = metrics
        self.locks = SessionLocks()
        self.ledger = Ledger(store, cache, keys.sessions_prefix(cluster), member, settings,
                             metrics, keys.deletions_prefix(cluster))
        self.local = LocalSessions(member, settings.sync_delay, metrics, settings.ttl)
        self.transactions: Transactions | None = None
        if self.local.enabled:
            cache.on_seen = self._seen_in_etcd

    # -- what the sidecar shows -------------------------------------------------------------

    @property
    def on_takeover(self) -> Callable[[Takeover], None] | None:
        return self.ledger.on_takeover

    @on_takeover.setter
    def on_takeover(self, hook: Callable[[Takeover], None] | None) -> None:
        self.ledger.on_takeover = hook

    @property
    def takeovers(self) -> int:
        return self.ledger.takeovers

    @property
    def conflicts(self) -> int:
        return self.ledger.conflicts

    @property
    def local_sessions(self) -> int:
        return len(self.local)

    def prune_observed(self) -> int:
        return self.ledger.prune()

    # -- reads ------------------------------------------------------------------------------

    async def get(self, session_id: str) -> Stored:
        local = self.local.get(session_id)
        if local is not None:
            self.metrics.read("local", "ok").inc()
            return self.local.stored(session_id, local)
        started = time.time_ns()
        stored = await self._read(session_id)
        if stored.record.ttl is not None and stored.record.expired(time.time()):
            raise no_session(session_id)  # its own TTL is over (etcd removes it soon)
        self.ledger.observe(session_id, int(stored.etag))
        if stored.record.owner != self.member:  # a takeover may follow: it starts here
            self.ledger.first_access.setdefault(session_id, started)
        return stored

    async def _read(self, session_id: str) -> Stored:
        """The current state, proven current against etcd (linearizable); while etcd
        does not answer, the cached state marked ``cache-unverified`` (else 503)."""
        key = self.ledger.key(session_id)
        cache = self.cache
        entry = cache.get(session_id)
        try:
            if entry is not None:
                generation = cache.history.generation
                revision = await self.store.check(key)
                if cache.history.generation != generation:  # etcd's history was replaced
                    entry = None                             # meanwhile: the entry is void
                elif revision == entry.revision:
                    self.metrics.read("cache", "ok").inc()
                    return Stored(session_id=session_id, record=entry.record, etag=str(revision),
                                  source="cache")
                elif 0 < revision < entry.revision:  # a restore whose revision was bumped
                    cache.history.went_back(session_id, entry.revision, revision)
                    entry = None
                if revision == 0:
                    self.metrics.read("cache", "not_found").inc()
                    raise no_session(session_id)
            state = await self.store.fetch(key)
        except EtcdUnavailable as exc:
            entry = self.cache.get(session_id) or entry
            if entry is None:
                raise Unavailable(f"etcd unavailable: {exc}") from None
            # etcd cannot prove the cache current: serve it, marked. A write based on
            # it compares this revision, so it cannot overwrite anything newer.
            self.metrics.read(UNVERIFIED, "ok").inc()
            return Stored(session_id=session_id, record=entry.record, etag=str(entry.revision),
                          source=UNVERIFIED)
        if state.revision == 0 or state.value is None:
            self.metrics.read("etcd", "not_found").inc()
            raise no_session(session_id)
        record = self.ledger.decode(session_id, state.revision, state.value, "read")
        if record is None:
            raise self.ledger.undecodable(session_id, state.revision)
        self.cache.write_through(session_id, state.revision, record)
        self.metrics.read("etcd", "ok").inc()
        return Stored(session_id=session_id, record=record, etag=str(state.revision), source="etcd")

    # -- writes: the one way in -------------------------------------------------------------

    @overload
    async def write(self, writes: Sequence[Write], *, atomic: Literal[True],
                    traceparent: str | None = None, planned: int | None = None
                    ) -> Transacted: ...

    @overload
    async def write(self, writes: Sequence[Write], *, early: Literal[True],
                    traceparent: str | None = None, planned: int | None = None
                    ) -> list[Outcome | asyncio.Task[Outcome]]: ...

    @overload
    async def write(self, writes: Sequence[Write], *,
                    traceparent: str | None = None, planned: int | None = None
                    ) -> list[Outcome]: ...

    async def write(self, writes: Sequence[Write], *, atomic: bool = False,
                    early: bool = False, traceparent: str | None = None,
                    planned: int | None = None
                    ) -> Transacted | list[Outcome] | list[Outcome | asyncio.Task[Outcome]]:
        """Write sessions (the module docstring): each write's outcome, in order, a
        :class:`Stored` or the error that refused it. ``atomic``: all or none, in one
        etcd transaction (:mod:`.transactions`). ``early``: a write that waits for its
        session is returned as the task it runs in, so the outcomes before it need not
        wait (PUTs pipelined on a connection, answered in order). ``traceparent``: the
        W3C trace context of the request, for writes without their own. ``planned``:
        the shard map version the request was planned under (:data:`.batches.PLANNED`),
        when :class:`.shards.ShardedSessions` hands it to this shard's engine as it is."""
        token = PLANNED.set(planned) if planned is not None else None
        try:
            if atomic:
                if self.transactions is None:  # transactions.py loaded at the first
                    from .transactions import Transactions
                    self.transactions = Transactions(self.ledger, self.local, self.locks,
                                                     self.store, self.metrics,
                                                     self.settings.max_bytes)
                transacted = await self.transactions.commit(writes, traceparent)
                for stored in transacted.stored:
                    self._tag(stored)
                return transacted
            outcomes: list[Any] = [None] * len(writes)
            ready, waiting = self._admit(writes, outcomes)
            loop = asyncio.get_running_loop()
            # Made before this coroutine first waits, each task takes charge of its place
            # (its try/finally) in its first step, before this one can be cancelled.
            tasks = [(i, loop.create_task(self._alone(writes[i], place, traceparent)))
                     for i, place in waiting] if len(writes) > 1 else []
            try:
                if ready:
                    await self._together(writes, ready, traceparent, outcomes)
                if waiting and not tasks:  # the one write of this call: no task
                    i, place = waiting[0]
                    outcomes[i] = await self._alone(writes[i], place, traceparent)
                if early:
                    for i, task in tasks:
                        outcomes[i] = task.result() if task.done() else task
                elif tasks:
                    await asyncio.wait([task for _, task in tasks])
                    for i, task in tasks:
                        outcomes[i] = task.result()
            except BaseException:
                for _, task in tasks:
                    task.cancel()
                await asyncio.gather(*(task for _, task in tasks), return_exceptions=True)
                raise
            return outcomes
        finally:
            if token is not None:
                PLANNED.reset(token)

    def _tag(self, outcome: object) -> None:
        """A stored session's ETag naming this engine's shard (none for a session kept
        on this member only, ``L<n>``: it has no shard yet)."""
        if self.shard and isinstance(outcome, Stored) and not outcome.etag.startswith("L"):
            outcome.etag = shard_etag(self.shard, outcome.etag)

    def _admit(self, writes: Sequence[Write], outcomes: list[Any]
               ) -> tuple[list[_Ready], list[tuple[int, asyncio.Future[None] | None]]]:
        """Check each write and take its place in its session's line, in the order
        given; split them into those sent together now and those written alone."""
        locks, ledger, cache = self.locks, self.ledger, self.cache
        observed = ledger.observed
        max_bytes = self.settings.max_bytes
        together = not self.local.enabled  # with delayed sync, a put may stay here
        ready: list[_Ready] = []
        waiting: list[tuple[int, asyncio.Future[None] | None]] = []
        for i, write in enumerate(writes):
            session_id = write.session_id
            try:
                check_write(write, max_bytes)
                key = ledger.key(session_id)
            except MeshxlError as exc:
                outcomes[i] = detached(exc)
                continue
            place = locks.reserve(session_id)
            if place is None and together and write.op == PUT and write.record is None \
                    and write.ttl is None:  # a TTL of its own: its own lease, alone
                entry = cache.get(session_id)
                seen = observed.get(session_id)
                try:
                    known = known_expectation(write, seen[0] if seen is not None else None,
                                              entry.revision if entry is not None else 0)
                    if known is not None and known[0] == IF_MATCH and cache.replaced:
                        self.ledger.check_not_replaced(write)
                except MeshxlError as exc:
                    locks.release(session_id)
                    outcomes[i] = detached(exc)
                    continue
                if known is not None:
                    ready.append((i, key, known[0], known[1],
                                  entry.record if entry is not None else None))
                    continue
            waiting.append((i, place))
        return ready, waiting

    async def _together(self, writes: Sequence[Write], ready: list[_Ready],
                        traceparent: str | None, outcomes: list[Any]) -> None:
        """Puts whose locks are held and whose compares are known: queued at once, in
        the same etcd transactions; then each acknowledged, or judged and written again
        alone. Their locks are released at the end."""
        ids = [writes[i].session_id for i, *_ in ready]
        try:
            with self.ledger.writing(ids):
                await self._send_together(writes, ready, traceparent, outcomes)
        except Exception as exc:  # a bug: each of them answered with it (500)
            error = detached(exc)
            for i, *_ in ready:
                if outcomes[i] is None:
                    outcomes[i] = error
        finally:
            release = self.locks.release
            for session_id in ids:
                release(session_id)
        if self.shard:
            for i, *_ in ready:
                self._tag(outcomes[i])

    async def _send_together(self, writes: Sequence[Write], ready: list[_Ready],
                             traceparent: str | None, outcomes: list[Any]) -> None:
        store, cache, ledger = self.store, self.cache, self.ledger
        lease = store.lease_now()
        if lease is None:
            try:
                lease = await store.lease()
            except EtcdUnavailable as exc:
                self.metrics.write(PUT, "unavailable").inc(len(ready))
                error = Unavailable(f"etcd unavailable, write not acknowledged: {exc}")
                for i, *_ in ready:
                    outcomes[i] = error
                return
        now = time.time()
        member = self.member
        records = [SessionRecord(owner=member, content_type=(write := writes[i]).content_type,
                                 created=prior.created if prior else now, updated=now,
                                 data=write.data, traceparent=write.traceparent or traceparent)
                   for i, _, _, _, prior in ready]
        puts = [(key, record.encode(), expected_revision)
                for (_, key, _, expected_revision, _), record in zip(ready, records, strict=True)]
        expect = cache.expect
        for (i, key, *_), (_, value, _), record in zip(ready, puts, records, strict=True):
            expect(key, writes[i].session_id, value, record)
        try:
            answers = await store.write(puts, lease)
        finally:
            settled = cache.settled
            for key, _, _ in puts:
                settled(key)
        acknowledged = 0
        again = []
        for plan, record, answer in zip(ready, records, answers, strict=True):
            i, _, _, expected_revision, prior = plan
            if isinstance(answer, WriteResult) and answer.ok:  # most: no second attempt
                outcomes[i] = ledger.acknowledged(PUT, writes[i].session_id, answer, record,
                                                  expected_revision == 0, prior, counted=False)
                acknowledged += 1
            else:
                again.append((plan, record, answer))
        self.metrics.write(PUT, "ok").inc(acknowledged)
        for (i, key, mode, expected_revision, prior), record, answer in again:
            try:
                outcomes[i] = await self._attempts(writes[i], key, mode, expected_revision, prior,
                                                   traceparent, first=(record, answer))
            except MeshxlError as exc:
                outcomes[i] = detached(exc)

    async def _alone(self, write: Write, place: asyncio.Future[None] | None,
                     traceparent: str | None) -> Outcome:
        """A write on its own: wait for its session's lock (its place in the line), then
        write; its outcome, whatever happens (a bug too: answered 500)."""
        locks = self.locks
        session_id = write.session_id
        held = place is None
        try:
            if place is not None:
                await place  # the lock, handed over in line
                held = True
            with self.ledger.writing((session_id,)):
                stored = await self._write_one(write, traceparent)
            self._tag(stored)
            return stored
        except Exception as exc:
            return detached(exc)
        finally:
            if held:
                locks.release(session_id)
            else:
                locks.give_up(session_id, place)

    async def _write_one(self, write: Write, traceparent: str | None) -> Stored:
        """One write with its session's lock held."""
        session_id = write.session_id
        key = self.ledger.key(session_id)
        local = self.local.get(session_id)
        if write.record is not None and (local is None or local.record is not write.record):
            raise PreconditionFailed(f"session {session_id!r} is kept on this member no "
                                     "longer")  # a flush of a session written meanwhile
        if local is not None:
            return await self._write_kept(write, key, local, traceparent)
        if write.op == PUT and self.local.keeps_new and not write.sync_now:
            floor = await self._new_here(session_id, key)
            if floor is not None and self.local.keeps_new:  # a planned move may have begun
                local_precondition(write, None)
                return self.local.keep(session_id, write.data, write.content_type,
                                       write.traceparent or traceparent, time.time(), floor)
        entry = self.cache.get(session_id)
        prior, cached = (entry.record, entry.revision) if entry is not None else (None, 0)
        if write.op == PATCH:
            current = await self._read(session_id)
            prior, cached = current.record, int(current.etag)
        ledger = self.ledger
        known = known_expectation(write, ledger.observed_revision(session_id), cached)
        mode, expected_revision = known if known is not None else await ledger.expectation(
            write, key, cached)
        return await self._attempts(write, key, mode, expected_revision, prior, traceparent)

    # -- delayed sync -----------------------------------------------------------------------

    async def _new_here(self, session_id: str, key: bytes) -> int | None:
        """Whether a put of a session not kept here starts keeping it here: etcd does
        not have it (asked of etcd: the cache may not have seen a brand-new session);
        then etcd's revision when it was asked (the copy's floor), else None. A session
        etcd has is never demoted."""
        if self.cache.get(session_id) is not None or session_id in self.ledger.observed:
            return None
        return await self.ledger.absent_at(key)

    async def _write_kept(self, write: Write, key: bytes, local: Local,
                          traceparent: str | None) -> Stored:
        """A write of a session kept on this member: a new version here while it is
        young; once its delay is over, it replicates the session to etcd (created when
        it was created here; never over another member's record, :data:`REPLICATE`) and
        the session is kept here no longer."""
        session_id = write.session_id
        if write.op == DELETE:
            self.local.drop(session_id)
            self.metrics.write(DELETE, "ok").inc()
            return self.local.stored(session_id, local)
        local_precondition(write, local.version)
        data, content_type = write.data, write.content_type
        if write.op == PATCH:
            data, content_type = self._merged(session_id, local.record, write.patch), JSON_TYPE
        now = time.time()
        trace = write.traceparent or traceparent
        if write.record is None and not write.sync_now and self.local.young(local, now):
            return self.local.keep(session_id, data, content_type, trace, now)
        record = write.record or SessionRecord(
            owner=self.member, content_type=content_type, created=local.record.created,
            updated=now, data=data, traceparent=trace, ttl=write.ttl)
        replica = Write(session_id=session_id, record=record)
        try:
            stored = await self._attempts(replica, key, REPLICATE, 0, local.record,
                                          traceparent, kept=local)
        except Superseded as exc:  # another member's record stands; the ledger fenced
            self.local.give_up(session_id, str(exc))  # this member from it
            raise
        self.local.drop(session_id)
        return stored

    def _seen_in_etcd(self, session_id: str, entry: Entry) -> None:
        """A copy kept here of a session another member wrote is given up, and this
        member fenced from it (:meth:`.delayed.LocalSessions.seen`)."""
        if self.local.seen(session_id, entry.record, entry.revision):
            self.ledger.observe(session_id, 0)

    async def flush_due(self) -> int:
        """Replicate the sessions kept here whose ``sync_delay`` is over; how many."""
        due = self.local.due(time.time())
        if not due:
            return 0
        outcomes = await self.write([Write(session_id=session_id, record=local.record)
                                     for session_id, local in due])
        flushed = 0
        for (session_id, _), outcome in zip(due, outcomes, strict=True):
            if isinstance(outcome, Stored):
                flushed += 1
            elif not isinstance(outcome, PreconditionFailed | Superseded):  # written meanwhile
                log.warning("delayed sync of session %s failed: %s", session_id, outcome)
        return flushed

    # -- to etcd, and again -----------------------------------------------------------------

    async def _attempts(self, write: Write, key: bytes, mode: str, expected_revision: int,
                        prior: SessionRecord | None, traceparent: str | None, *,
                        first: tuple[SessionRecord | None, Any] | None = None,
                        kept: Local | None = None) -> Stored:
        """Write, and again against the key as it is now while the rules allow
        (:meth:`.ledger.Ledger.refusal`). ``first``: the record of a first attempt
        already sent (with others) and its answer. ``kept``: the copy of a session kept
        on this member that this write replicates (it does not create the session),
        guarded against undoing a delete (:meth:`.ledger.Ledger.undone_delete`)."""
        op, session_id, ledger = write.op, write.session_id, self.ledger
        failed = 0
        lease_lost = False
        guard = ledger.guard(session_id, kept.floor) if kept is not None else None
        while failed < BLIND_RETRIES:
            if first is not None:
                record, answer = first
                first = None
            else:
                record = self._record(write, prior, traceparent)
                answer = await self._send(key, session_id, record, expected_revision, guard)
            if isinstance(answer, LeaseLost) and not lease_lost:
                lease_lost = True  # refused whole, nothing applied: again, a new lease
                continue
            if isinstance(answer, BaseException):
                if isinstance(answer, EtcdUnavailable):
                    self.metrics.write(op, "unavailable").inc()
                    raise Unavailable(f"etcd unavailable, write not acknowledged: "
                                      f"{answer}") from None
                raise answer
            if answer.ok:
                return ledger.acknowledged(op, session_id, answer, record,
                                           expected_revision == 0 and kept is None, prior)
            if answer.deleted is not None and kept is not None and guard is not None:
                undone = ledger.undone_delete(op, session_id, answer.deleted, kept.record,
                                              kept.floor is not None)
                if undone is not None:
                    raise undone
                guard = (guard[0], answer.deleted.revision)  # deleted before the copy
                failed += 1
                continue
            current = answer.current or KeyState(0)
            current_record = (ledger.decode(session_id, current.revision, current.value, op)
                              if current.value else None)
            refusal = ledger.refusal(op, session_id, mode, write.if_match, expected_revision,
                                     current, current_record, write.record)
            if refusal is not None:
                raise refusal
            if op == PATCH and current_record is None:
                if current.revision:
                    raise ledger.undecodable(session_id, current.revision)
                raise no_session(session_id)
            expected_revision, prior = current.revision, current_record
            failed += 1
        self.metrics.write(op, "conflict").inc()
        raise Conflict(f"session {session_id!r} kept changing under concurrent writers; "
                       "read it and try again")

    def _record(self, write: Write, prior: SessionRecord | None,
                traceparent: str | None) -> SessionRecord | None:
        """What a write stores over ``prior`` (None: a delete)."""
        if write.op == DELETE:
            return None
        if write.record is not None:
            return write.record
        now = time.time()
        trace = write.traceparent or traceparent
        if write.op == PATCH:
            if prior is None:
                raise no_session(write.session_id)
            return SessionRecord(owner=self.member, content_type=JSON_TYPE,
                                 created=prior.created, updated=now,
                                 data=self._merged(write.session_id, prior, write.patch),
                                 traceparent=trace)
        return SessionRecord(owner=self.member, content_type=write.content_type,
                             created=prior.created if prior else now, updated=now,
                             data=write.data, traceparent=trace, ttl=write.ttl)

    async def _send(self, key: bytes, session_id: str, record: SessionRecord | None,
                    expected_revision: int,
                    guard: Guard | None = None) -> WriteResult | BaseException:
        """One guarded write (``record`` None: a delete; ``guard``: a replication's,
        :meth:`.store.SessionStore.replicate`): etcd's answer, or the error."""
        if record is None and expected_revision:
            return await self.ledger.delete(key, session_id, expected_revision)
        value = record.encode() if record is not None else None
        cache = self.cache
        if value is not None:
            assert record is not None
            cache.expect(key, session_id, value, record)
        answer: WriteResult | BaseException
        try:
            lease = 0
            if value is not None and record is not None:
                lease = (self.store.lease_now() if record.ttl is None else None) \
                    or await self.store.lease_of(record.ttl)
            if guard is not None and value is not None:
                answer = await replicate(self.store, key, value, expected_revision, lease,
                                         guard)
            else:
                [answer] = await self.store.write([(key, value, expected_revision)], lease)
        except EtcdUnavailable as exc:
            answer = detached(exc)
        finally:
            if value is not None:
                cache.settled(key)
        return answer

    def _merged(self, session_id: str, record: SessionRecord, patch: Any) -> bytes:
        from . import mergepatch  # a PATCH's only: json_merge_patch loaded at the first
        if not is_json(record.content_type):
            raise Conflict(f"session {session_id!r} holds {record.content_type}, not JSON: "
                           "it cannot be merge-patched")
        try:
            data = mergepatch.merge(record.data, patch)
        except (ValueError, RecursionError) as exc:
            raise Conflict(f"session {session_id!r} holds invalid JSON: {exc}") from None
        check_size(data, self.settings.max_bytes)
        return data
