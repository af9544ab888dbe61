"""The session store's batches: etcd transactions carrying many guarded ops at once.

:class:`Batcher` queues serialized ops (:mod:`.wire`) and sends them as few etcd
transactions as the load allows, to a member that answers, again after an attempt
without an answer where that is safe, each op's answer parsed by the op's own parser;
with a :class:`Fencing`, every batch compares the shard's map version fence
(:mod:`meshxl.etcd.fence`). What the ops are and why sending them again is safe:
:mod:`.store`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aetcd
from aetcd import rpc

from meshxl import etcd
from meshxl.errors import detached
from meshxl.etcd import EtcdUnavailable, MemberChanged, retryable
from meshxl.etcd.fence import Fenced, raise_fence
from meshxl.etcd.shards import parse_fence

from . import wire
from .errors import LeaseLost
from .history import History

log = logging.getLogger("meshxl.statesync.store")

__all__ = ["FULL_EXTRA", "MAX_REQUEST_BYTES", "MAX_TXN_OPS", "UNFENCED", "Batcher",
           "Fencing", "Group", "Op", "may_send", "take_batch"]

# etcd refuses more than 128 operations per transaction level (--max-txn-ops) and
# requests above 1.5 MiB (--max-request-bytes). A nested level's limit is what the levels
# above it left: a batch of n ops may hold nested transactions of at most 128 - n ops.
MAX_TXN_OPS = 128
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



_PENDING: Any = object()

UNFENCED = -1
"""An op's map version where the store has no fence (sessions not sharded)."""
FENCE_RAISES = 3
"""Raises of a shard's fence one batch may ask for before it gives up (503)."""


@dataclass(slots=True)
class Fencing:
    """A shard store's map version fence (the module docstring)."""

    key: bytes
    """The fence's key in the shard's etcd."""
    version: Callable[[], int]
    """The map version the request being queued was planned under."""
    fenced: Callable[[int], None]
    """Told the fence a batch found above its version (the map changed)."""
    shard: str = ""


_Answer = TypeVar("_Answer")
"""What an op's ``parse`` makes of its answer: the op's result."""


class Group:
    """The answers of several ops queued together (a bulk save), delivered at once: one
    future for all, rather than a future, a callback and a wake-up each."""

    __slots__ = ("future", "pending", "results")

    def __init__(self, size: int):
        self.future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self.results: list[Any] = [_PENDING] * size
        self.pending = size

    def settle(self, index: int, value: object) -> None:
        if self.results[index] is not _PENDING:
            return
        self.results[index] = value
        self.pending -= 1
        if not self.pending and not self.future.done():
            self.future.set_result(self.results)


@dataclass(slots=True)
class Op:
    request: bytes
    """A serialized ``RequestOp`` (:mod:`.wire`)."""
    size: int
    parse: Callable[[Any, int, bool], Any]
    """(response, revision, uncertain): ``uncertain`` when an earlier attempt of this op
    went unanswered (it may have applied)."""
    future: asyncio.Future[Any] | None
    """Its answer; None for an op of a :class:`Group`."""
    resend: bool = True
    """Safe to send again after an unanswered attempt."""
    uncertain: bool = False
    group: Group | None = None
    index: int = 0
    width: int = 1
    """Operations of its nested transaction (0: not a transaction, a plain read)."""
    fence: int = UNFENCED
    """The map version it was planned under (:class:`Fencing`)."""

    def answered(self) -> bool:
        if self.group is not None:
            return self.group.results[self.index] is not _PENDING
        assert self.future is not None
        return self.future.done()

    def settle(self, value: object) -> None:
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


def take_batch(queue: deque[Op], max_ops: int, max_bytes: int) -> list[Op]:
    """Take the next batch off a non-empty ``queue``: its head and the ops behind it, in
    order, while the batch holds at most ``max_ops`` ops and ``max_bytes`` bytes (the
    head alone may exceed them) and etcd takes it: a batch of n ops whose widest nested
    transaction holds w ops is refused unless n + w <= 128 (``--max-txn-ops`` counts the
    outer level against the nested one), all planned under one map version (:class:`Fencing`).
    Pure; ``tests/unit/test_statesync_pure.py``."""
    first = queue.popleft()
    batch = [first]
    size = first.size
    widest = first.width
    fence = first.fence
    while queue and len(batch) < max_ops:
        op = queue[0]
        if op.fence != fence:  # planned under another map version: its own batch
            break
        wide = op.width if op.width > widest else widest
        if size + op.size > max_bytes or len(batch) + 1 + wide > MAX_TXN_OPS:
            break
        queue.popleft()
        size += op.size
        widest = wide
        batch.append(op)
    return batch


class Batcher:
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
                 on_lease_lost: Callable[[], None] | None = None,
                 history: History | None = None):
        self._client = client
        self._on_lease_lost = on_lease_lost
        self._history = history or History()
        self.name = name
        self._max_ops = min(max_ops, MAX_TXN_OPS)
        self._max_bytes = min(max_bytes, MAX_REQUEST_BYTES)
        self._max_inflight = max_inflight
        self._timeout = timeout
        self._queue: deque[Op] = deque()
        self._inflight = 0
        self._stalled = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._on_batch = on_batch
        self.fencing: Fencing | None = None

    async def submit(self, request: bytes | rpc.RequestOp,
                     parse: Callable[[Any, int, bool], _Answer], size: int = 64, *,
                     resend: bool = True, width: int = 1) -> _Answer:
        future = self.enqueue(request, parse, size, resend=resend, width=width)
        self._kick()
        return await future

    def enqueue(self, request: bytes | rpc.RequestOp,
                parse: Callable[[Any, int, bool], _Answer], size: int = 64, *,
                resend: bool = True, width: int = 1) -> asyncio.Future[_Answer]:
        """Queue an op (serialized, or a message serialized here) without sending:
        :meth:`kick` after the last of several, so they leave together. ``width``: the
        operations of the op's nested transaction (1: a guarded single-key write; 0:
        a plain read)."""
        if not isinstance(request, bytes):
            request = request.SerializeToString()
        future: asyncio.Future[_Answer] = asyncio.get_running_loop().create_future()
        fencing = self.fencing
        self._queue.append(Op(request, size, parse, future, resend, width=width,
                               fence=fencing.version() if fencing is not None else UNFENCED))
        return future

    def enqueue_group(self, ops: Sequence[tuple[bytes, Callable[[Any, int, bool], Any], int,
                                                bool]]) -> asyncio.Future[list[Any]]:
        """Queue ``(request, parse, size, resend)`` ops together (no send: :meth:`kick`):
        one future for their answers, in order, each a result or an exception."""
        group = Group(len(ops))
        append = self._queue.append
        fencing = self.fencing
        fence = fencing.version() if fencing is not None else UNFENCED
        for index, (request, parse, size, resend) in enumerate(ops):
            append(Op(request, size, parse, None, resend, group=group, index=index,
                       fence=fence))
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

    async def _send(self, batch: list[Op]) -> None:
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

    async def _attempts(self, batch: list[Op], answered: Callable[[], None]) -> None:
        """Send the batch until every op has its answer: again (the ops that may be sent
        twice) after an attempt without one, to a member that answers. ``answered`` is
        called when etcd's answer is in, before the ops take it up."""
        balancer = etcd.balancer_of(self._client)
        deadline = time.monotonic() + self._timeout
        pending = batch
        last = "no attempt"
        version = batch[0].fence
        fencing = self.fencing if version != UNFENCED else None
        fence = wire.fence_parts(fencing.key, version) if fencing is not None else None
        raises = 0

        def fail(ops: list[Op], error: Exception) -> None:
            for op in ops:
                op.settle(error)

        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                fail(pending, EtcdUnavailable(f"etcd did not answer in time ({last})"))
                return
            try:
                ep = await balancer.choose(deadline)
            except EtcdUnavailable as exc:
                fail(pending, EtcdUnavailable(str(exc)))
                return
            request = wire.txn_request([op.request for op in pending], fence)
            # One member and nowhere else to go: one attempt, the whole deadline.
            timeout = min(etcd.ATTEMPT_TIMEOUT, remaining) if balancer.probing else remaining
            floor = self._history.floor()
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
                        fail(pending, EtcdUnavailable(last))
                        return
                else:
                    last = f"{type(exc).__name__}: {exc}"
                    if not balancer.probing:
                        fail(pending, EtcdUnavailable(f"etcd did not answer: {last}"))
                        return
                if not isinstance(exc, MemberChanged):
                    balancer.failed(ep, exc)
                again = []
                for op in pending:
                    op.uncertain = True
                    if op.resend:
                        again.append(op)
                    else:
                        fail([op], EtcdUnavailable(
                            f"etcd did not answer ({last}); the write may or may not have "
                            "applied"))
                pending = again
                continue
            self._history.answered(response.header, floor)  # a rewind: told before the ops
            if fencing is not None and not response.succeeded:
                now = _fence_of(response)
                if now > version:
                    answered()
                    fencing.fenced(now)
                    fail(pending, Fenced(version, now, fencing.shard))
                    return
                raises += 1
                try:
                    if raises > FENCE_RAISES:
                        raise RuntimeError(f"raised {FENCE_RAISES} times, still {now}")
                    await raise_fence(self._client, fencing.key, version,
                                      max(deadline - time.monotonic(), 0.01))
                except Exception as exc:  # nothing of the batch applied
                    fail(pending, EtcdUnavailable(
                        f"the shard map fence could not be raised to {version}: "
                        f"{type(exc).__name__}: {str(exc)[:200]}"))
                    return
                continue  # nothing applied: the same ops again, under the raised fence
            answered()
            revision = response.header.revision
            for op, result in zip(pending, response.responses, strict=True):
                if not op.answered():
                    try:
                        op.settle(op.parse(result, revision, op.uncertain))
                    except Exception as exc:  # a parse bug must not strand the others
                        if not isinstance(exc, EtcdUnavailable):
                            log.exception("etcd's answer to a write could not be taken up")
                        op.settle(detached(exc))
            return

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        while self._queue:
            self._queue.popleft().settle(EtcdUnavailable("the store is closing"))


def _txn(client: aetcd.Client) -> Any:
    """``KV.Txn`` on the client's channel taking a serialized request (:mod:`.wire`),
    made once per channel."""
    made = client.__dict__.get("_meshxl_txn")
    if made is None or made[0] is not client.channel:
        call = client.channel.unary_unary("/etcdserverpb.KV/Txn", request_serializer=None,
                                          response_deserializer=rpc.TxnResponse.FromString)
        made = client.__dict__["_meshxl_txn"] = (client.channel, call)
    return made[1]


def _fence_of(response: Any) -> int:
    """The fence a fenced batch's failure branch read (0: none)."""
    kvs = response.responses[0].response_range.kvs
    return parse_fence(kvs[0].value if kvs else None)
