"""Sessions in etcd: revision-compared writes, batched; linearizable reads; shared leases.

Writes
    Every write is a small transaction of its own: *if the key's mod_revision is still
    what the writer expects, put (or delete); otherwise return the key as it is now*.
    Under load, waiting writes are sent together as nested transactions inside one
    etcd transaction (etcd >= 3.3): one round trip and one raft entry for the batch,
    while each write still succeeds or fails on its own compare. A write is
    acknowledged only from etcd's answer, so an acknowledged write is committed.

Faults
    A batch is sent to an etcd member that answers (``meshxl/etcd.py``), with a short
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
    answer that could exceed gRPC's message limit. An unanswered attempt is settled as
    a single write is: every key it puts holds its exact bytes at one revision (read
    back one by one) and every key it deletes is gone, or 503.

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
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aetcd
from aetcd import rpc

from meshxl import etcd
from meshxl.errors import detached
from meshxl.etcd import EtcdUnavailable, MemberChanged, retryable

from . import wire
from .errors import LeaseLost, StoreUnavailable
from .leases import Leases

log = logging.getLogger(__name__)

# etcd refuses more than 128 operations per transaction level (--max-txn-ops) and
# requests above 1.5 MiB (--max-request-bytes). A nested level's limit is what the levels
# above it left: a batch of n ops may hold nested transactions of at most 128 - n ops.
MAX_TXN_OPS = 128
MAX_TXN_WRITES = MAX_TXN_OPS - 1
"""Keys of one :meth:`SessionStore.transact`: it travels nested in a batch of at least
itself, so etcd leaves it 127 of its 128 operations."""
MAX_REQUEST_BYTES = 1_400_000
STALLED_AFTER = 0.25
"""Seconds after which a batch in flight no longer counts against ``max_inflight``."""
MAX_STALLED = 16
"""Batches in flight beyond ``max_inflight`` (stalled ones) at most."""
FULL_EXTRA = 3
"""Full batches in flight beyond ``max_inflight`` at most: a batch that cannot grow gains
nothing by waiting for the ones in flight (bulk saves from many writers gain from full
batches leaving at once, docs/performance.md; single writes never fill a batch and are
unchanged)."""


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


_PENDING: Any = object()


class _Group:
    """The answers of several ops queued together (a bulk save), delivered at once: one
    future for all, rather than a future, a callback and a wake-up each."""

    __slots__ = ("future", "pending", "results")

    def __init__(self, size: int):
        self.future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self.results: list[Any] = [_PENDING] * size
        self.pending = size

    def settle(self, index: int, value: Any) -> None:
        if self.results[index] is not _PENDING:
            return
        self.results[index] = value
        self.pending -= 1
        if not self.pending and not self.future.done():
            self.future.set_result(self.results)


@dataclass(slots=True)
class _Op:
    request: bytes
    """A serialized ``RequestOp`` (:mod:`.wire`)."""
    size: int
    parse: Callable[[Any, int, bool], Any]
    """(response, revision, uncertain): ``uncertain`` when an earlier attempt of this op
    went unanswered (it may have applied)."""
    future: asyncio.Future[Any] | None
    """Its answer; None for an op of a :class:`_Group`."""
    resend: bool = True
    """Safe to send again after an unanswered attempt."""
    uncertain: bool = False
    group: _Group | None = None
    index: int = 0
    width: int = 1
    """Operations of its nested transaction (0: not a transaction, a plain read)."""

    def answered(self) -> bool:
        if self.group is not None:
            return self.group.results[self.index] is not _PENDING
        assert self.future is not None
        return self.future.done()

    def settle(self, value: Any) -> None:
        """Deliver the answer (an exception: as the op's failure)."""
        if self.group is not None:
            self.group.settle(self.index, value)
        elif self.future is not None and not self.future.done():
            if isinstance(value, BaseException):
                self.future.set_exception(value)
            else:
                self.future.set_result(value)


def may_send(queued: int, inflight: int, max_inflight: int, max_ops: int) -> bool:
    """Whether the next batch leaves now: while fewer than ``max_inflight`` are out, or
    when it is full (``max_ops`` ops queued) and fewer than ``max_inflight`` +
    :data:`FULL_EXTRA` are. Pure."""
    return queued > 0 and (inflight < max_inflight or (
        queued >= max_ops and inflight < max_inflight + FULL_EXTRA))


def take_batch(queue: deque[_Op], max_ops: int, max_bytes: int) -> list[_Op]:
    """Take the next batch off a non-empty ``queue``: its head and the ops behind it, in
    order, while the batch holds at most ``max_ops`` ops and ``max_bytes`` bytes (the
    head alone may exceed them) and etcd takes it: a batch of n ops whose widest nested
    transaction holds w ops is refused unless n + w <= 128 (``--max-txn-ops`` counts the
    outer level against the nested one). Pure; ``tests/unit/test_statesync_pure.py``."""
    first = queue.popleft()
    batch = [first]
    size = first.size
    widest = first.width
    while queue and len(batch) < max_ops:
        op = queue[0]
        wide = op.width if op.width > widest else widest
        if size + op.size > max_bytes or len(batch) + 1 + wide > MAX_TXN_OPS:
            break
        queue.popleft()
        size += op.size
        widest = wide
        batch.append(op)
    return batch


def _range(key: bytes, keys_only: bool) -> rpc.RequestOp:
    return rpc.RequestOp(request_range=rpc.RangeRequest(key=key, keys_only=keys_only))


def _key_state(response: Any) -> KeyState:
    kvs = response.response_range.kvs
    if not kvs:
        return KeyState(0)
    return KeyState(kvs[0].mod_revision, kvs[0].value or None)


class _Batcher:
    """Queue of transaction ops sent as few etcd transactions as the load allows.

    An op waits only while ``max_inflight`` transactions are already out; whatever
    queued meanwhile (up to the op and byte bounds) leaves in the next one, so the
    delay a batch adds is bounded by one etcd round trip. A full batch does not wait
    (:func:`may_send`): under a load that fills batches, etcd gets the next one while
    it commits the last.
    """

    def __init__(self, client: aetcd.Client, name: str, *, max_ops: int, max_bytes: int,
                 max_inflight: int, timeout: float,
                 on_batch: Callable[[str, int, float], None] | None = None,
                 on_lease_lost: Callable[[], None] | None = None):
        self._client = client
        self._on_lease_lost = on_lease_lost
        self.name = name
        self._max_ops = min(max_ops, MAX_TXN_OPS)
        self._max_bytes = min(max_bytes, MAX_REQUEST_BYTES)
        self._max_inflight = max_inflight
        self._timeout = timeout
        self._queue: deque[_Op] = deque()
        self._inflight = 0
        self._stalled = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._on_batch = on_batch

    async def submit(self, request: bytes | rpc.RequestOp,
                     parse: Callable[[Any, int, bool], Any], size: int = 64, *,
                     resend: bool = True, width: int = 1) -> Any:
        future = self.enqueue(request, parse, size, resend=resend, width=width)
        self._kick()
        return await future

    def enqueue(self, request: bytes | rpc.RequestOp, parse: Callable[[Any, int, bool], Any],
                size: int = 64, *, resend: bool = True, width: int = 1) -> asyncio.Future[Any]:
        """Queue an op (serialized, or a message serialized here) without sending:
        :meth:`kick` after the last of several, so they leave together. ``width``: the
        operations of the op's nested transaction (1: a guarded single-key write; 0:
        a plain read)."""
        if not isinstance(request, bytes):
            request = request.SerializeToString()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append(_Op(request, size, parse, future, resend, width=width))
        return future

    def enqueue_group(self, ops: Sequence[tuple[bytes, Callable[[Any, int, bool], Any], int,
                                                bool]]) -> asyncio.Future[list[Any]]:
        """Queue ``(request, parse, size, resend)`` ops together (no send: :meth:`kick`):
        one future for their answers, in order, each a result or an exception."""
        group = _Group(len(ops))
        append = self._queue.append
        for index, (request, parse, size, resend) in enumerate(ops):
            append(_Op(request, size, parse, None, resend, group=group, index=index))
        if not ops:
            group.future.set_result([])
        return group.future

    def kick(self) -> None:
        self._kick()

    def _kick(self) -> None:
        queue = self._queue
        while queue and may_send(len(queue), self._inflight, self._max_inflight,
                                 self._max_ops):
            batch = take_batch(queue, self._max_ops, self._max_bytes)
            self._inflight += 1
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[_Op]) -> None:
        started = time.perf_counter()
        holding = True  # a place among the batches in flight (stalled: beyond them)
        stalled = False

        def stall() -> None:
            # Slow (its member may be gone): let the queue move on without it.
            nonlocal stalled
            if holding and not stalled and self._stalled < MAX_STALLED:
                stalled = True
                self._stalled += 1
                self._inflight -= 1
                self._kick()

        def leave() -> None:
            # Answered: the next batch goes while this one's answers are taken up.
            nonlocal holding
            if holding:
                holding = False
                if stalled:
                    self._stalled -= 1
                else:
                    self._inflight -= 1
                self._kick()

        timer = asyncio.get_running_loop().call_later(STALLED_AFTER, stall)
        try:
            await self._attempts(batch, leave)
            if self._on_batch is not None:
                self._on_batch(self.name, len(batch), time.perf_counter() - started)
        finally:
            timer.cancel()
            leave()

    async def _attempts(self, batch: list[_Op], answered: Callable[[], None]) -> None:
        """Send the batch until every op has its answer: again (the ops that may be sent
        twice) after an attempt without one, to a member that answers. ``answered`` is
        called when etcd's answer is in, before the ops take it up."""
        balancer = etcd.balancer_of(self._client)
        deadline = time.monotonic() + self._timeout
        pending = batch
        last = "no attempt"

        def fail(ops: list[_Op], error: Exception) -> None:
            for op in ops:
                op.settle(error)

        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                fail(pending, StoreUnavailable(f"etcd did not answer in time ({last})"))
                return
            try:
                ep = await balancer.choose(deadline)
            except EtcdUnavailable as exc:
                fail(pending, StoreUnavailable(str(exc)))
                return
            request = wire.txn_request([op.request for op in pending])
            # One member and nowhere else to go: one attempt, the whole deadline.
            timeout = min(etcd.ATTEMPT_TIMEOUT, remaining) if balancer.probing else remaining
            try:
                response = await balancer.attempt(ep, _txn(ep.client)(
                    request, timeout=timeout, metadata=ep.client.metadata), timeout)
            except (rpc.AioRpcError, TimeoutError, MemberChanged) as exc:
                if isinstance(exc, rpc.AioRpcError):
                    last = f"etcd {exc.code().name}: {exc.details()}"
                    if "lease not found" in last:
                        # Refused whole (nothing applied) for a lease etcd lost.
                        if self._on_lease_lost is not None:
                            self._on_lease_lost()
                        fail(pending, LeaseLost(last))
                        return
                    if not retryable(exc) or not balancer.probing:
                        fail(pending, StoreUnavailable(last))
                        return
                else:
                    last = f"{type(exc).__name__}: {exc}"
                    if not balancer.probing:
                        fail(pending, StoreUnavailable(f"etcd did not answer: {last}"))
                        return
                if not isinstance(exc, MemberChanged):
                    balancer.failed(ep, exc)
                again = []
                for op in pending:
                    op.uncertain = True
                    if op.resend:
                        again.append(op)
                    else:
                        fail([op], StoreUnavailable(
                            f"etcd did not answer ({last}); the write may or may not have "
                            "applied"))
                pending = again
                continue
            answered()
            revision = response.header.revision
            for op, result in zip(pending, response.responses, strict=True):
                if not op.answered():
                    try:
                        op.settle(op.parse(result, revision, op.uncertain))
                    except Exception as exc:  # a parse bug must not strand the others
                        if not isinstance(exc, StoreUnavailable):
                            log.exception("etcd's answer to a write could not be taken up")
                        op.settle(detached(exc))
            return

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        while self._queue:
            self._queue.popleft().settle(StoreUnavailable("the store is closing"))


def _unknown() -> StoreUnavailable:
    """A transaction of :meth:`SessionStore._settle` that may or may not have applied."""
    return StoreUnavailable("etcd did not answer an earlier attempt of this transaction, "
                            "and whether it applied cannot be told now: not acknowledged")


def _txn(client: aetcd.Client) -> Any:
    """``KV.Txn`` on the client's channel taking a serialized request (:mod:`.wire`),
    made once per channel."""
    made = client.__dict__.get("_meshxl_txn")
    if made is None or made[0] is not client.channel:
        call = client.channel.unary_unary("/etcdserverpb.KV/Txn", request_serializer=None,
                                          response_deserializer=rpc.TxnResponse.FromString)
        made = client.__dict__["_meshxl_txn"] = (client.channel, call)
    return made[1]


class SessionStore:
    """One cluster's sessions in etcd, for one member's sidecar."""

    def __init__(self, client: aetcd.Client, *, ttl: float, max_batch_ops: int = MAX_TXN_WRITES,
                 max_batch_bytes: int = 1_000_000, max_inflight: int = 2,
                 timeout: float = 5.0,
                 on_batch: Callable[[str, int, float], None] | None = None):
        self._client = client
        self.leases = Leases(client, ttl)
        self._writes = _Batcher(client, "write", max_ops=max_batch_ops,
                                max_bytes=max_batch_bytes, max_inflight=max_inflight,
                                timeout=timeout, on_batch=on_batch,
                                on_lease_lost=self.leases.forget)
        self._reads = _Batcher(client, "read", max_ops=MAX_TXN_OPS, max_bytes=MAX_REQUEST_BYTES,
                               max_inflight=max_inflight, timeout=timeout, on_batch=on_batch)

    async def close(self) -> None:
        await self._writes.close()
        await self._reads.close()

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
        (StoreUnavailable without etcd); :meth:`lease_now` when it was granted already."""
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
                    # A creation is never sent twice (see the module docstring): a
                    # transaction is sent again only if every compare expects an
                    # existing key.
                    resend=all(expected != 0 for _, _, expected in writes),
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
        raise StoreUnavailable("etcd did not answer an earlier attempt of this write, and "
                               "whether it applied cannot be told now: not acknowledged")
    return WriteResult(False, 0, current)
