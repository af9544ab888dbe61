"""Transactions: puts and deletes of several sessions, all or none, in one etcd
transaction (``POST /v1/sessions:transaction``).

Each operation compares the revision a single write would (:mod:`.conditions`: If-Match,
create only, the revision this member observed, or the newest it knows for a session
new to it), and fails the way a single write would (412, 409, 404); an operation whose
compare failed only because the session moved under a write that may replace it (a
takeover, an expired session) is compared again, as a single write is, and the
transaction sent again. A session kept only on this member (delayed sync) is checked
against its version here and replicated by the transaction, never over a record
another member wrote meanwhile (:data:`~.conditions.REPLICATE`: 409 and the copy here
given up, :class:`~.errors.Superseded`); a delete forgets it. The
sessions' locks are held throughout. Each delete puts its deletion record in the same
transaction (:mod:`.deletions`), one more key: N operations of which D deletes write
N + D keys, which etcd takes up to 127.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

from meshxl.errors import Conflict, InputError, MeshxlError, Unavailable
from meshxl.etcd import EtcdUnavailable

from .conditions import (
    BLIND,
    BLIND_RETRIES,
    OWNER,
    REPLICATE,
    check_write,
    local_precondition,
)
from .delayed import LocalSessions
from .errors import Superseded, result_name
from .ledger import Ledger
from .locks import SessionLocks
from .metrics import StatesyncMetrics
from .record import SessionRecord
from .store import MAX_TXN_WRITES, KeyState, SessionStore, WriteResult
from .txns import transact
from .writes import DELETE, PUT, Stored, Transacted, Write

__all__ = ["Transactions"]


@dataclass
class _Planned:
    """An operation as it will be sent: the revision it compares."""

    write: Write
    key: bytes
    mode: str
    expected_revision: int
    prior: SessionRecord | None
    local: bool = False
    """The session was kept on this member only (delayed sync)."""
    floor: int | None = None
    """A kept session's floor (:attr:`.delayed.Local.floor`)."""
    guard_floor: int | None = None
    """The floor its guard compares: raised past a delete that came before the copy."""


class Transactions:
    """One member's transactions (see the module docstring)."""

    def __init__(self, ledger: Ledger, local: LocalSessions, locks: SessionLocks,
                 store: SessionStore, metrics: StatesyncMetrics, max_bytes: int):
        self.ledger, self.local, self.locks = ledger, local, locks
        self.store, self.metrics, self.max_bytes = store, metrics, max_bytes

    async def commit(self, writes: Sequence[Write], traceparent: str | None) -> Transacted:
        """Apply every write or none: puts and deletes, each session once."""
        ids = [w.session_id for w in writes]
        if not 0 < len(writes) <= MAX_TXN_WRITES:
            raise InputError(f"a transaction holds 1 to {MAX_TXN_WRITES} operations, "
                             f"not {len(writes)}")
        if len(set(ids)) != len(ids):
            raise InputError("a transaction names each session once")
        deletes = sum(1 for w in writes if w.op == DELETE)
        if len(writes) + deletes > MAX_TXN_WRITES:
            raise InputError(f"a transaction of {len(writes)} operations with {deletes} "
                             f"deletes writes {len(writes) + deletes} keys in etcd (each "
                             f"delete also its deletion record); etcd takes at most "
                             f"{MAX_TXN_WRITES}")
        keys = [self.ledger.key(session_id) for session_id in ids]
        for write in writes:
            if write.op not in (PUT, DELETE):
                raise InputError(f"a transaction puts and deletes, not {write.op}")
            check_write(write, self.max_bytes)
        async with self.locks.hold(ids):
            with self.ledger.writing(ids):
                return await self._commit(writes, keys, traceparent)

    async def _plan(self, write: Write, key: bytes) -> _Planned:
        local = self.local.get(write.session_id)
        if local is not None:
            local_precondition(write, local.version)
            return _Planned(write, key, REPLICATE, 0, local.record, local=True,
                            floor=local.floor, guard_floor=local.floor)
        entry = self.ledger.cache.get(write.session_id)
        mode, expected_revision = await self.ledger.expectation(write, key,
                                                       entry.revision if entry else 0)
        return _Planned(write, key, mode, expected_revision, entry.record if entry else None)

    async def _commit(self, writes: Sequence[Write], keys: list[bytes],
                      traceparent: str | None) -> Transacted:
        planned = await asyncio.gather(*(self._plan(w, k) for w, k in
                                         zip(writes, keys, strict=True)),
                                       return_exceptions=True)
        refused: dict[int, MeshxlError] = {}
        plans: list[_Planned] = []
        for i, outcome in enumerate(planned):
            if isinstance(outcome, MeshxlError):
                refused[i] = outcome
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                plans.append(outcome)
        if refused:
            return self._aborted(refused)
        # A session kept only here and deleted: forgotten on commit, nothing in etcd.
        sent = [p for p in plans if not (p.local and p.write.op == DELETE)]
        index = {id(p): i for i, p in enumerate(plans)}
        failed: list[int] = []
        member = self.ledger.member
        recorded: dict[tuple[int, int], int] = {}
        """Deletion records found there already (an etcd restored from an older backup
        gave the number again), by plan: replaced."""
        for _ in range(BLIND_RETRIES):
            now = time.time()
            records = [None if p.write.op == DELETE else SessionRecord(
                owner=member, content_type=p.write.content_type,
                created=p.prior.created if p.prior else now, updated=now,
                data=p.write.data, traceparent=p.write.traceparent or traceparent,
                ttl=p.write.ttl)
                for p in plans]
            revision = 0
            if sent:
                record_of = {id(p): r for p, r in zip(plans, records, strict=True)}
                marks = [(i, p) for i, p in enumerate(sent)
                         if p.write.op == DELETE and p.expected_revision]
                marked = [self.ledger.deletion(p.write.session_id, p.expected_revision)
                          for _, p in marks]
                guarded = [p for p in sent if p.local]
                try:
                    result = await transact(self.store, [
                        (p.key, None if (r := record_of[id(p)]) is None else r.encode(),
                         p.expected_revision) for p in sent] + [
                        (key, value, recorded.get((i, p.expected_revision), 0))
                        for (i, p), (key, value, _) in zip(marks, marked, strict=True)],
                        [self.ledger.guard(p.write.session_id, p.guard_floor)
                         for p in guarded],
                        [None if (r := record_of[id(p)]) is None else r.ttl for p in sent])
                except EtcdUnavailable as exc:
                    self.metrics.transactions.labels("unavailable").inc()
                    raise Unavailable("etcd unavailable, transaction not acknowledged: "
                                      f"{exc}") from None
                if not result.ok:
                    undone = self._undone(guarded, result.deleted)
                    if undone:
                        return self._aborted({index[id(p)]: e for p, e in undone})
                    current = result.current[:len(sent)]
                    failed = [i for i, (p, now_at) in enumerate(zip(sent, current,
                                                                     strict=True))
                              if now_at.revision != p.expected_revision]
                    for (i, p), now_at in zip(marks, result.current[len(sent):],
                                              strict=True):
                        recorded[i, p.expected_revision] = now_at.revision
                    refused = await self._judge(sent, failed, current)
                    if refused:
                        return self._aborted({index[id(sent[i])]: e
                                              for i, e in refused.items()})
                    continue
                revision = result.revision
            return self._committed(plans, records, revision)
        if not failed:  # only deletion records moved, again and again
            raise Conflict("the deletion records of this transaction's deletes kept "
                           "changing under concurrent writers; try again")
        for i in failed:
            self.metrics.write(sent[i].write.op, "conflict").inc()
        return self._aborted({index[id(sent[i])]: Conflict(
            f"session {sent[i].write.session_id!r} kept changing under concurrent "
            "writers; read it and try again") for i in failed})

    def _undone(self, guarded: list[_Planned], deleted: Sequence[KeyState | None]
                ) -> list[tuple[_Planned, MeshxlError]]:
        """Kept sessions whose replication would undo a delete another member made
        meanwhile (:meth:`.ledger.Ledger.undone_delete`): refused, their copies given
        up; a guard that found a delete from before its copy is raised past it."""
        undone: list[tuple[_Planned, MeshxlError]] = []
        for plan, found in zip(guarded, deleted, strict=True):
            if found is None:
                continue
            assert plan.prior is not None
            session_id = plan.write.session_id
            verdict = self.ledger.undone_delete(plan.write.op, session_id, found, plan.prior,
                                                plan.floor is not None)
            if verdict is None:
                plan.guard_floor = found.revision
            else:
                self.local.give_up(session_id, str(verdict))
                undone.append((plan, verdict))
        return undone

    async def _judge(self, sent: list[_Planned], failed: list[int],
                     current: Sequence[KeyState]) -> dict[int, MeshxlError]:
        """The failures among ``failed`` operations (their compares failed), by index;
        the others get the revision to compare next time (the transaction is sent
        again). Whether a session moved to another member takes its record, read now
        (the failure branch reads revisions only)."""
        wanted = [i for i in failed
                  if current[i].revision and sent[i].mode in (OWNER, BLIND, REPLICATE)]
        try:
            fetched = dict(zip(wanted, await asyncio.gather(
                *(self.store.fetch(sent[i].key) for i in wanted)), strict=True))
        except EtcdUnavailable as exc:
            self.metrics.transactions.labels("unavailable").inc()
            raise Unavailable(f"etcd unavailable, transaction not acknowledged: {exc}") \
                from None
        ledger = self.ledger
        refused: dict[int, MeshxlError] = {}
        for i in failed:
            plan = sent[i]
            session_id = plan.write.session_id
            state = fetched.get(i, current[i])
            record = (ledger.decode(session_id, state.revision, state.value, "transaction")
                      if state.value else None)
            refusal = ledger.refusal(plan.write.op, session_id, plan.mode,
                                     plan.write.if_match, plan.expected_revision, state, record,
                                     plan.prior if plan.local else None)
            if refusal is not None:
                refused[i] = refusal
                if isinstance(refusal, Superseded):
                    self.local.give_up(session_id, str(refusal))
            elif plan.local:  # its copy, replicated over the record: created here
                plan.expected_revision = state.revision
            else:
                plan.expected_revision, plan.prior = state.revision, record
        return refused

    def _aborted(self, refused: dict[int, MeshxlError]) -> Transacted:
        self.metrics.transactions.labels(result_name(refused[min(refused)])).inc()
        return Transacted(committed=False, errors=refused)

    def _committed(self, plans: list[_Planned], records: list[SessionRecord | None],
                   revision: int) -> Transacted:
        stored: list[Stored | None] = []
        ledger = self.ledger
        for plan, record in zip(plans, records, strict=True):
            session_id = plan.write.session_id
            if plan.local:
                self.local.drop(session_id)
            if record is None:
                if plan.local:
                    self.metrics.write(DELETE, "ok").inc()
                else:
                    ledger.acknowledged(DELETE, session_id, WriteResult(True, revision), None,
                                        False, plan.prior)
                stored.append(None)
            else:
                stored.append(ledger.acknowledged(
                    PUT, session_id, WriteResult(True, revision), record,
                    plan.prior is None if plan.local else plan.expected_revision == 0, plan.prior))
        self.metrics.transactions.labels("committed").inc()
        return Transacted(committed=True, revision=revision, stored=tuple(stored))
