"""The session store's batches, as data: the ops queued, their answers, which leave together.

An :class:`Op` is one serialized guarded op (:mod:`.wire`) and how its answer is parsed;
a :class:`Group` delivers the answers of ops queued together at once; :func:`may_send`
and :func:`take_batch` say when a batch leaves and what it holds; a :class:`Fencing`
makes every batch of a shard's store compare its map version fence
(:mod:`meshxl.etcd.fence`). Pure code, called by :mod:`.store` (which sends the batches)
and returning at once: what the ops are and why sending them again is safe is there.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["FENCE_RAISES", "FULL_EXTRA", "MAX_REQUEST_BYTES", "MAX_STALLED", "MAX_TXN_OPS",
           "PLANNED", "STALLED_AFTER", "UNFENCED", "Fencing", "Flight", "Group", "Op",
           "may_send", "stall_due", "take_batch"]

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

PLANNED: contextvars.ContextVar[int | None] = contextvars.ContextVar("planned_map_version",
                                                                     default=None)
"""The shard map version the request being served was planned under: what its reads
and writes compare at the shard (:class:`Fencing`); unset: the one served now. Set for
each request by :class:`.shards.ShardedSessions` (or by the shard's
:meth:`.sessions.Sessions.write` it hands a request to); the tasks a request starts
inherit it."""

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


class Group:
    """The answers of several ops queued together (a bulk save), delivered at once: one
    future for all, rather than a future, a callback and a wake-up each."""

    __slots__ = ("future", "pending", "results")

    def __init__(self, size: int, future: asyncio.Future[list[Any]]):
        self.future = future
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


class Flight:
    """A batch sent: when (the event loop's clock), and its place among the batches in
    flight (``holding``: it counts against ``max_inflight``, or beyond them once
    ``stalled``)."""

    __slots__ = ("checked", "holding", "sent", "stalled")

    def __init__(self, sent: float) -> None:
        self.sent = sent
        self.holding = True
        self.stalled = False
        self.checked = False
        """Looked at by :func:`stall_due` once it was old enough (stalled or not)."""


def stall_due(flights: deque[Flight], now: float, stalled: int,
              ) -> tuple[list[Flight], float | None]:
    """The batches of ``flights`` (oldest first; those answered at its head are dropped)
    to stall at ``now``: each unanswered for :data:`STALLED_AFTER` (its member may be
    gone) stops counting against ``max_inflight``, once, while fewer than
    :data:`MAX_STALLED` are (``stalled`` already), so the queue moves on without it; and
    when to look again (None: no batch in flight is young enough to stall later). Pure."""
    while flights and not flights[0].holding:
        flights.popleft()
    due: list[Flight] = []
    for flight in flights:
        if flight.sent + STALLED_AFTER > now:
            return due, flight.sent + STALLED_AFTER
        if flight.holding and not flight.checked:
            flight.checked = True
            if stalled + len(due) < MAX_STALLED:
                due.append(flight)
    return due, None
