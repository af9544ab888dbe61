"""Sessions in etcd: revision-compared writes, batched; linearizable reads; shared leases.

Writes
    Every write is a small transaction of its own: *if the key's mod_revision is still
    what the writer expects, put (or delete); otherwise return the key as it is now*.
    Under load, waiting writes are sent together as nested transactions inside one
    etcd transaction (etcd >= 3.3): one round trip and one raft entry for the batch,
    while each write still succeeds or fails on its own compare. A write is
    acknowledged only from etcd's answer, so an acknowledged write is committed.

Faults
    A batch is sent to an etcd member that answers (``meshxl/etcd/balancer.py``), with a short
    deadline per attempt. An attempt whose member stops answering or changes leader is
    cancelled and the batch sent again elsewhere, as soon as a member has a leader.
    Sending a write twice is safe because of its compare: once one attempt applied,
    the key's mod_revision is no longer the expected one, so no later attempt applies
    it again (a revision never comes back). What a retried attempt cannot tell by
    itself is whether an earlier one applied: its compare fails either way. It reads
    the key in the same transaction, and the key holding exactly the bytes this write
    put (each record carries its writer and a timestamp) means the earlier attempt
    applied: acknowledged, at that revision. Anything else leaves the outcome unknown:
    503, never a 2xx and never a 409/412 the app would take for "not applied". A
    creation (expected revision 0) is never sent twice: a key deleted meanwhile would
    let a second attempt apply too, so it answers 503 when its attempt went unanswered.
    A batch whose attempt is slow stops holding its place in the queue: the writes
    behind it leave in the next batch rather than wait for its deadline.

Transactions
    ``transact`` writes several keys all or none: one guarded op like a single write,
    with a compare per key (at most 127: it joins a batch as one nested transaction,
    and etcd's ``--max-txn-ops``, 128, counts the batch's level against it; each key
    once; the whole under etcd's 1.5 MiB request limit). A batch holding it holds at
    most 128 minus its width ops (:func:`take_batch`). Its failure branch reads every
    key's revision, keys only, so the caller can tell which compare failed without an
    answer that could exceed gRPC's message limit. It is sent again after an unanswered
    attempt if one compare expects an existing key (that compare holds once at most),
    and settled as a single write is: every key it puts holds its exact bytes at one
    revision (read back one by one) and every key it deletes is gone, or 503.

The map version fence
    With session shards, every batch (writes and reads alike) carries, at its outer
    level, the compare ``value(fence) == the map version its ops were planned under``
    (:class:`Fencing`, :mod:`meshxl.etcd.fence`); its failure branch reads the fence.
    A lower fence (no request of this version reached the shard yet) is raised and the
    batch sent again: nothing of it applied. A higher one fails every op with
    :class:`~meshxl.etcd.fence.Fenced` (503: a newer map was stored, the sidecar reads
    it at once). Ops planned under different versions never share a batch.

Reads
    ``check`` is a linearizable, keys-only range: the key's current mod_revision, no
    value. Concurrent checks share one transaction. With it a sidecar proves its
    watch-fed cache current for a session before serving it (etcd's own ReadIndex idea,
    per key).

TTL
    Every put carries the session lease of its time bucket (:mod:`.leases`).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aetcd
from aetcd import rpc

from meshxl.etcd import EtcdUnavailable

from . import wire
from .batcher import (
    FULL_EXTRA,
    MAX_REQUEST_BYTES,
    MAX_TXN_OPS,
    Batcher,
    Fencing,
    may_send,
    take_batch,
)
from .errors import LeaseLost
from .history import History
from .leases import Leases

__all__ = ["FULL_EXTRA", "MAX_REQUEST_BYTES", "MAX_TXN_OPS", "MAX_TXN_WRITES", "Fencing",
           "KeyState", "KeyWrite", "SessionStore", "TxnResult", "WriteResult", "may_send",
           "take_batch"]

MAX_TXN_WRITES = MAX_TXN_OPS - 1
"""Keys of one :meth:`SessionStore.transact`: it travels nested in a batch of at least
itself, so etcd leaves it 127 of its 128 operations."""


@dataclass(frozen=True, slots=True)
class KeyState:
    """A key as etcd has it now: ``revision`` 0 means it does not exist."""

    revision: int
    value: bytes | None = None


@dataclass(slots=True)
class WriteResult:
    ok: bool
    revision: int
    """Commit revision (the key's new mod_revision) when ok."""
    current: KeyState | None = None
    """When not ok: the key as it is, so the caller can tell 409 from 412."""


KeyWrite = tuple[bytes, bytes | None, int]
"""``(key, value, expected)``: put ``value`` at ``key`` (None: delete the key) if the
key's mod_revision is ``expected`` (0: the key must not exist). A plain tuple: one is made
for every session written."""


@dataclass(frozen=True, slots=True)
class TxnResult:
    ok: bool
    revision: int
    """Commit revision when ok (every key put has it as its mod_revision)."""
    current: tuple[KeyState, ...] = ()
    """When not ok: every key's revision now (values not read), in the writes' order."""
    uncertain: bool = False
    """Not ok after an unanswered attempt: that attempt may be what moved the keys."""


def _range(key: bytes, keys_only: bool) -> rpc.RequestOp:
    return rpc.RequestOp(request_range=rpc.RangeRequest(key=key, keys_only=keys_only))


def _key_state(response: Any) -> KeyState:
    kvs = response.response_range.kvs
    if not kvs:
        return KeyState(0)
    return KeyState(kvs[0].mod_revision, kvs[0].value or None)


def _unknown() -> EtcdUnavailable:
    """A transaction of :meth:`SessionStore._settle` that may or may not have applied."""
    return EtcdUnavailable("etcd did not answer an earlier attempt of this transaction, "
                            "and whether it applied cannot be told now: not acknowledged")


class SessionStore:
    """One cluster's sessions in etcd, for one member's sidecar."""

    def __init__(self, client: aetcd.Client, *, ttl: float, max_batch_ops: int = MAX_TXN_WRITES,
                 max_batch_bytes: int = 1_000_000, max_inflight: int = 2,
                 timeout: float = 5.0,
                 on_batch: Callable[[str, int, float], None] | None = None):
        self._client = client
        self.leases = Leases(client, ttl)
        self.history = History()  # of this etcd cluster, as every answer shows it
        self._writes = Batcher(client, "write", max_ops=max_batch_ops,
                                max_bytes=max_batch_bytes, max_inflight=max_inflight,
                                timeout=timeout, on_batch=on_batch,
                                on_lease_lost=self.leases.forget, history=self.history)
        self._reads = Batcher(client, "read", max_ops=MAX_TXN_OPS, max_bytes=MAX_REQUEST_BYTES,
                               max_inflight=max_inflight, timeout=timeout, on_batch=on_batch,
                               history=self.history)

    async def close(self) -> None:
        await self._writes.close()
        await self._reads.close()

    def fence(self, fencing: Fencing | None) -> None:
        """Compare ``fencing`` in every batch from now on (the module docstring)."""
        self._writes.fencing = self._reads.fencing = fencing

    # -- reads ----------------------------------------------------------------------------

    async def check(self, key: bytes) -> int:
        """The key's current mod_revision (0: absent), linearizable, without its value."""
        state: KeyState = await self._reads.submit(
            _range(key, keys_only=True), _read_result, len(key) + 16, width=0)
        return state.revision

    async def fetch(self, key: bytes) -> KeyState:
        """The key with its value, linearizable."""
        state: KeyState = await self._reads.submit(
            _range(key, keys_only=False), _read_result, len(key) + 16, width=0)
        return state

    # -- writes ---------------------------------------------------------------------------

    async def lease(self) -> int:
        """The session lease of the current TTL bucket, granted if need be
        (EtcdUnavailable without etcd); :meth:`lease_now` when it was granted already."""
        return self.leases.cached() or await self.leases.current()

    def lease_now(self) -> int | None:
        """The current TTL bucket's session lease, if granted already (no await)."""
        return self.leases.cached()

    def write(self, writes: Sequence[KeyWrite],
              lease: int) -> asyncio.Future[list[WriteResult | BaseException]]:
        """Each of ``writes`` on its own, guarded by its compare, puts with ``lease``:
        queued together now, so they leave in the same transactions, with no coroutine
        between the caller and etcd's answer. One future for every answer, in order,
        each a :class:`WriteResult` or the exception it failed with (:class:`LeaseLost`:
        nothing applied, send it again)."""
        batcher = self._writes
        future = batcher.enqueue_group([
            (wire.guarded_put(key, value, expected, lease), functools.partial(_put_result, value),
             len(key) + len(value) + 64, expected != 0) if value is not None else
            (wire.guarded_delete(key, expected), _delete_result, len(key) + 64, expected != 0)
            for key, value, expected in writes])
        batcher.kick()
        return future

    async def transact(self, writes: Sequence[KeyWrite]) -> TxnResult:
        """All of ``writes`` or none: one guarded op whose compares cover every key.

        Success puts (with the session lease) and deletes every key; failure reads every
        key's revision (keys only: the values of up to 128 sessions could exceed what
        one answer may carry), so the caller can tell which compare failed. It travels
        in a batch like any single write, as one nested transaction.
        """
        if not 0 < len(writes) <= MAX_TXN_WRITES:
            raise ValueError(f"a transaction holds 1 to {MAX_TXN_WRITES} writes, "
                             f"not {len(writes)}")
        if len({key for key, _, _ in writes}) != len(writes):
            raise ValueError("a transaction names each key once (etcd refuses duplicates)")
        size = sum(len(key) + len(value or b"") + 96 for key, value, _ in writes)
        if size > MAX_REQUEST_BYTES:
            raise ValueError(f"the transaction is {size} bytes; etcd takes at most "
                             f"{MAX_REQUEST_BYTES} in one request")
        leased = any(value is not None for _, value, _ in writes)
        for attempt in (1, 2):
            lease = await self.lease() if leased else 0
            request = rpc.RequestOp(request_txn={
                "compare": [{"key": key, "target": rpc.Compare.MOD,
                             "result": rpc.Compare.EQUAL, "mod_revision": expected}
                            for key, _, expected in writes],
                "success": [{"request_put": {"key": key, "value": value, "lease": lease}}
                            if value is not None else
                            {"request_delete_range": {"key": key}} for key, value, _ in writes],
                "failure": [{"request_range": {"key": key, "keys_only": True}}
                            for key, _, _ in writes]})
            try:
                result: TxnResult = await self._writes.submit(
                    request, _txn_result, size,
                    # Sent again only if a compare expects an existing key, which it
                    # puts or deletes: once applied, that compare never holds again
                    # (a revision never comes back), whatever it creates beside it.
                    resend=any(expected != 0 for _, _, expected in writes),
                    width=len(writes))
            except LeaseLost:
                if attempt == 1:
                    continue  # nothing applied: again, with a new lease
                raise
            if result.uncertain:
                return await self._settle(writes, result)
            return result
        raise AssertionError("unreachable")

    async def _settle(self, writes: Sequence[KeyWrite], result: TxnResult) -> TxnResult:
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
            state = await self.fetch(key)
            if state.value != value:
                raise _unknown()
        return TxnResult(True, revisions.pop())


def _read_result(response: Any, _revision: int, _uncertain: bool) -> KeyState:
    return _key_state(response)


def _txn_result(response: Any, revision: int, uncertain: bool) -> TxnResult:
    txn = response.response_txn
    if txn.succeeded:
        return TxnResult(True, revision)
    return TxnResult(False, 0, tuple(_key_state(r) for r in txn.responses), uncertain)


def _put_result(value: bytes, response: Any, revision: int, uncertain: bool) -> WriteResult:
    return _write_result(response, revision, uncertain, value)


def _delete_result(response: Any, revision: int, uncertain: bool) -> WriteResult:
    return _write_result(response, revision, uncertain, None)


def _write_result(response: Any, revision: int, uncertain: bool,
                  value: bytes | None) -> WriteResult:
    """The answer to one guarded write. ``uncertain``: an earlier attempt went
    unanswered, so a failed compare may be that attempt's own success (see the module
    docstring)."""
    txn = response.response_txn
    if txn.succeeded:
        return WriteResult(True, revision)
    current = _key_state(txn.responses[0])
    if uncertain:
        if value is not None and current.revision and current.value == value:
            return WriteResult(True, current.revision)
        raise EtcdUnavailable("etcd did not answer an earlier attempt of this write, and "
                               "whether it applied cannot be told now: not acknowledged")
    return WriteResult(False, 0, current)
