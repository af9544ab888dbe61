"""Writes of several keys at once, and guarded replications: etcd transactions built as
messages, off the hot path of a single session's write (:mod:`.store`, whose batches
they travel in, each as one nested transaction).

Transactions
    :func:`transact` writes several keys all or none: a compare per key (at most 127:
    it joins a batch as one nested transaction, and etcd's ``--max-txn-ops``, 128,
    counts the batch's level against it; each key once; the whole under etcd's 1.5 MiB
    request limit). Its failure branch reads every key's revision, keys only, so the
    caller can tell which compare failed without an answer that could exceed gRPC's
    message limit. It is sent again after an unanswered attempt if one compare expects
    an existing key (that compare holds once at most), and settled as a single write
    is: every key it puts holds its exact bytes at one revision (read back one by one)
    and every key it deletes is gone, or 503.

Replication guards
    A session kept on one member only (delayed sync, :mod:`.delayed`) is replicated by
    :func:`replicate`, or in a transaction, with a :data:`Guard`: it applies only while
    no deletion record of the session (:mod:`.deletions`) was created after the revision
    at which etcd was known not to hold it (its *floor*), so a delete that another
    member committed meanwhile is never undone by the late copy. The compare is etcd's
    over a key range (``create_revision < floor + 1`` for every key under the session's
    deletion records; an empty range holds). Its failure branch reads the newest such
    record, with its value (who deleted it, and when).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aetcd import rpc

from meshxl.etcd import EtcdUnavailable
from meshxl.etcd.keys import prefix_end

from . import wire
from .batches import MAX_REQUEST_BYTES
from .errors import LeaseLost
from .store import (
    MAX_TXN_WRITES,
    KeyState,
    KeyWrite,
    SessionStore,
    WriteResult,
    key_state,
    write_result,
)

__all__ = ["Guard", "TxnResult", "replicate", "transact"]

Guard = tuple[bytes, int]
"""``(prefix, floor)``: the prefix of one session's deletion records, and the revision
at which etcd was known not to hold the session. A write so guarded applies only while
no deletion record under ``prefix`` was created after ``floor``."""


@dataclass(frozen=True, slots=True)
class TxnResult:
    ok: bool
    revision: int
    """Commit revision when ok (every key put has it as its mod_revision)."""
    current: tuple[KeyState, ...] = ()
    """When not ok: every key's revision now (values not read), in the writes' order."""
    deleted: tuple[KeyState | None, ...] = ()
    """When not ok: for each guard, in order, the newest deletion record above its
    floor (None: its guard held)."""
    uncertain: bool = False
    """Not ok after an unanswered attempt: that attempt may be what moved the keys."""


def _guard_compare(guard: Guard) -> dict[str, Any]:
    """No key under the guard's prefix created after its floor (an empty range holds:
    etcd compares a missing key as create revision 0)."""
    prefix, floor = guard
    return {"key": prefix, "range_end": prefix_end(prefix), "target": rpc.Compare.CREATE,
            "result": rpc.Compare.LESS, "create_revision": floor + 1}


def _guard_read(guard: Guard) -> dict[str, Any]:
    """The newest key under the guard's prefix created after its floor, with its value."""
    prefix, floor = guard
    return {"request_range": {"key": prefix, "range_end": prefix_end(prefix),
                              "min_create_revision": floor + 1, "limit": 1,
                              "sort_order": rpc.RangeRequest.DESCEND,
                              "sort_target": rpc.RangeRequest.CREATE}}


def _newest(response: Any) -> KeyState | None:
    kvs = response.response_range.kvs
    return KeyState(kvs[0].create_revision, kvs[0].value) if kvs else None


def _unknown() -> EtcdUnavailable:
    """A transaction of :func:`_settle` that may or may not have applied."""
    return EtcdUnavailable("etcd did not answer an earlier attempt of this transaction, "
                            "and whether it applied cannot be told now: not acknowledged")


async def replicate(store: SessionStore, key: bytes, value: bytes, expected_revision: int,
                    lease: int, guard: Guard) -> WriteResult:
    """A session kept on this member put at ``key`` if its mod_revision is
    ``expected_revision`` (0: absent) and ``guard`` holds (the module docstring);
    otherwise the key as it is and the newest deletion record above the floor."""
    if not (0 <= expected_revision <= wire.INT64_MAX and 0 <= lease <= wire.INT64_MAX
            and 0 <= guard[1] < wire.INT64_MAX):
        raise ValueError(f"revision {expected_revision}, lease {lease} or floor "
                         f"{guard[1]} out of etcd's range")
    request = rpc.RequestOp(request_txn={
        "compare": [{"key": key, "target": rpc.Compare.MOD, "result": rpc.Compare.EQUAL,
                     "mod_revision": expected_revision}, _guard_compare(guard)],
        "success": [{"request_put": {"key": key, "value": value, "lease": lease}}],
        "failure": [{"request_range": {"key": key}}, _guard_read(guard)]})
    result: WriteResult = await store.writer.submit(
        request, functools.partial(_replicated, value), len(key) + len(value) + 128,
        resend=expected_revision != 0, width=1)
    return result


async def transact(store: SessionStore, writes: Sequence[KeyWrite],
                   guards: Sequence[Guard] = (),
                   ttls: Sequence[int | None] = ()) -> TxnResult:
    """All of ``writes`` or none: one guarded op whose compares cover every key
    (and ``guards``: the module docstring).

    Success puts (with the session lease, or the lease of the put's own TTL in
    ``ttls``, by index: :meth:`.store.SessionStore.lease_of`) and deletes every key;
    failure reads every key's revision (keys only: the values of up to 128 sessions
    could exceed what one answer may carry), so the caller can tell which compare failed. It travels
    in a batch like any single write, as one nested transaction.
    """
    if not 0 < len(writes) <= MAX_TXN_WRITES:
        raise ValueError(f"a transaction holds 1 to {MAX_TXN_WRITES} writes, "
                         f"not {len(writes)}")
    if len({key for key, _, _ in writes}) != len(writes):
        raise ValueError("a transaction names each key once (etcd refuses duplicates)")
    size = (sum(len(key) + len(value or b"") + 96 for key, value, _ in writes)
            + sum(2 * len(prefix) + 64 for prefix, _ in guards))
    if size > MAX_REQUEST_BYTES:
        raise ValueError(f"the transaction is {size} bytes; etcd takes at most "
                         f"{MAX_REQUEST_BYTES} in one request")
    leased = any(value is not None for _, value, _ in writes)
    for attempt in (1, 2):
        lease = await store.lease() if leased else 0
        own = {ttl: await store.lease_of(ttl) for ttl in set(ttls) if ttl is not None}
        leases = [own[ttl] if ttl is not None else lease for ttl in ttls]
        leases += [lease] * (len(writes) - len(leases))
        request = rpc.RequestOp(request_txn={
            "compare": [{"key": key, "target": rpc.Compare.MOD,
                         "result": rpc.Compare.EQUAL, "mod_revision": expected_revision}
                        for key, _, expected_revision in writes]
                       + [_guard_compare(guard) for guard in guards],
            "success": [{"request_put": {"key": key, "value": value, "lease": put_lease}}
                        if value is not None else
                        {"request_delete_range": {"key": key}}
                        for (key, value, _), put_lease in zip(writes, leases, strict=True)],
            "failure": [{"request_range": {"key": key, "keys_only": True}}
                        for key, _, _ in writes]
                       + [_guard_read(guard) for guard in guards]})
        try:
            result: TxnResult = await store.writer.submit(
                request, functools.partial(_txn_result, len(writes)), size,
                # Sent again only if a compare expects an existing key, which it
                # puts or deletes: once applied, that compare never holds again
                # (a revision never comes back), whatever it creates beside it.
                resend=any(expected_revision != 0 for _, _, expected_revision in writes),
                width=len(writes))
        except LeaseLost:
            if attempt == 1:
                continue  # nothing applied: again, with a new lease
            raise
        if result.uncertain:
            return await _settle(store, writes, result)
        return result
    raise AssertionError("unreachable")


async def _settle(store: SessionStore, writes: Sequence[KeyWrite],
                  result: TxnResult) -> TxnResult:
    """A transaction whose earlier attempt went unanswered and whose compares then
    failed: acknowledged if every key it puts holds exactly its bytes at one
    revision and every key it deletes is gone; anything else is not known."""
    puts = [(key, value) for key, value, _ in writes if value is not None]
    if not puts or any(now.revision != 0 for (_, value, _), now
                       in zip(writes, result.current, strict=True) if value is None):
        raise _unknown()
    revisions = {now.revision for (_, value, _), now
                 in zip(writes, result.current, strict=True) if value is not None}
    if len(revisions) != 1 or 0 in revisions:
        raise _unknown()
    for key, value in puts:
        state = await store.fetch(key)
        if state.value != value:
            raise _unknown()
    return TxnResult(True, revisions.pop())


def _txn_result(keys: int, response: Any, revision: int, uncertain: bool) -> TxnResult:
    txn = response.response_txn
    if txn.succeeded:
        return TxnResult(True, revision)
    answers = txn.responses
    return TxnResult(False, 0, tuple(key_state(r) for r in answers[:keys]),
                     tuple(_newest(r) for r in answers[keys:]), uncertain)


def _replicated(value: bytes, response: Any, revision: int, uncertain: bool) -> WriteResult:
    """The answer to :func:`replicate` (``uncertain``: as for any write)."""
    txn = response.response_txn
    if txn.succeeded:
        return WriteResult(True, revision)
    result = write_result(response, revision, uncertain, value)
    if not result.ok:
        result.deleted = _newest(txn.responses[1])
    return result
