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

Transactions and replication guards (:mod:`.txns`)
    Writes of several keys all or none, and a kept session's replication guarded
    against undoing a delete, travel in the same batches, each as one nested
    transaction; a batch holding one holds at most 128 minus its width ops
    (:func:`take_batch`).

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
    Every put carries the session lease of its time bucket (:mod:`.leases`), or, for a
    record with a TTL of its own, that TTL's lease (:meth:`SessionStore.lease_of`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aetcd
from aetcd import rpc

from meshxl import etcd
from meshxl.errors import detached
from meshxl.etcd import EtcdUnavailable, MemberChanged, h2c, retryable
from meshxl.etcd.fence import Fenced, raise_fence
from meshxl.etcd.shards import parse_fence

from . import wire
from .batches import (
    FENCE_RAISES,
    FULL_EXTRA,
    MAX_REQUEST_BYTES,
    MAX_TXN_OPS,
    STALLED_AFTER,
    UNFENCED,
    Fencing,
    Flight,
    Group,
    Op,
    may_send,
    stall_due,
    take_batch,
)
from .errors import LeaseLost
from .history import History
from .leases import Leases

log = logging.getLogger(__name__)

__all__ = ["FULL_EXTRA", "MAX_REQUEST_BYTES", "MAX_TXN_OPS", "MAX_TXN_WRITES", "Batcher",
           "Fencing", "KeyState", "KeyWrite", "SessionStore", "WriteResult", "key_state",
           "may_send", "take_batch", "write_result"]

MAX_TXN_WRITES = MAX_TXN_OPS - 1
"""Keys of one transaction (:func:`.txns.transact`): it travels nested in a batch of at least
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
    deleted: KeyState | None = None
    """When a replication's guard failed: the newest deletion record of the session
    above its floor (``revision`` is the record's create revision)."""


KeyWrite = tuple[bytes, bytes | None, int]
"""``(key, value, expected_revision)``: put ``value`` at ``key`` (None: delete the key)
if the key's mod_revision is ``expected_revision`` (0: the key must not exist). A plain
tuple: one is made for every session written."""


def _range(key: bytes, keys_only: bool) -> rpc.RequestOp:
    return rpc.RequestOp(request_range=rpc.RangeRequest(key=key, keys_only=keys_only))


def key_state(response: rpc.ResponseOp) -> KeyState:
    """A range answer's first key as a :class:`KeyState` (absent: revision 0)."""
    kvs = response.response_range.kvs
    if not kvs:
        return KeyState(0)
    return KeyState(kvs[0].mod_revision, kvs[0].value or None)


class SessionStore:
    """One cluster's sessions in etcd, for one member's sidecar."""

    def __init__(self, client: aetcd.Client, *, ttl: float, max_batch_ops: int = MAX_TXN_WRITES,
                 max_batch_bytes: int = 1_000_000, max_inflight: int = 2,
                 timeout: float = 5.0,
                 on_batch: Callable[[str, int, float], None] | None = None,
                 linger: Callable[[], float] | None = None):
        self._client = client
        self.leases = Leases(client, ttl)
        self.history = History()  # of this etcd cluster, as every answer shows it
        self.writer = Batcher(client, "write", max_ops=max_batch_ops,
                                max_bytes=max_batch_bytes, max_inflight=max_inflight,
                                timeout=timeout, on_batch=on_batch,
                                on_lease_lost=self.leases.forget, history=self.history,
                                linger=linger)
        self._reads = Batcher(client, "read", max_ops=MAX_TXN_OPS, max_bytes=MAX_REQUEST_BYTES,
                               max_inflight=max_inflight, timeout=timeout, on_batch=on_batch,
                               history=self.history)

    async def close(self) -> None:
        await self.writer.close()
        await self._reads.close()

    def fence(self, fencing: Fencing | None) -> None:
        """Compare ``fencing`` in every batch from now on (the module docstring)."""
        self.writer.fencing = self._reads.fencing = fencing

    # -- reads ----------------------------------------------------------------------------

    async def check(self, key: bytes) -> int:
        """The key's current mod_revision (0: absent), linearizable, without its value."""
        state: KeyState = await self._reads.submit(
            _range(key, keys_only=True), _read_result, len(key) + 16, width=0)
        return state.revision

    async def check_at(self, key: bytes) -> tuple[int, int]:
        """The key's current mod_revision (0: absent) and etcd's revision when it was
        read (a replication guard's floor), linearizable."""
        found: tuple[int, int] = await self._reads.submit(
            _range(key, keys_only=True), _read_at, len(key) + 16, width=0)
        return found

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

    async def lease_of(self, ttl: int | None) -> int:
        """The lease of a put whose record has ``ttl`` (None: the cluster's, :meth:`lease`;
        a TTL of its own: :meth:`.leases.Leases.for_ttl`)."""
        if ttl is None:
            return self.leases.cached() or await self.leases.current()
        return await self.leases.for_ttl(ttl)

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
        batcher = self.writer
        future = batcher.enqueue_group([
            (wire.guarded_put(key, value, expected_revision, lease),
             functools.partial(_put_result, value), len(key) + len(value) + 64,
             expected_revision != 0) if value is not None else
            (wire.guarded_delete(key, expected_revision), _delete_result, len(key) + 64,
             expected_revision != 0)
            for key, value, expected_revision in writes])
        batcher.kick()
        return future

_Answer = TypeVar("_Answer")
"""What an op's ``parse`` makes of its answer: the op's result."""


class Batcher:
    """Queue of transaction ops sent as few etcd transactions as the load allows.

    An op waits only while ``max_inflight`` transactions are already out; whatever
    queued meanwhile (up to the op and byte bounds) leaves in the next one, so the
    delay a batch adds is bounded by one etcd round trip. A full batch does not wait
    (:func:`may_send`): under a load that fills batches, etcd gets the next one while
    it commits the last.

    ``linger``: how long a batch that is not full may wait for more ops before it
    leaves, asked when an op finds the queue empty (0: it does not wait). A cluster
    past its rate quota waits (:meth:`meshxl.statesync.quota.QuotaGuard.linger`): its
    admitted writes, spread 1/rate apart by the bucket, go together instead of one
    transaction each.
    """

    def __init__(self, client: aetcd.Client, name: str, *, max_ops: int, max_bytes: int,
                 max_inflight: int, timeout: float,
                 on_batch: Callable[[str, int, float], None] | None = None,
                 on_lease_lost: Callable[[], None] | None = None,
                 history: History | None = None,
                 linger: Callable[[], float] | None = None):
        self._client = client
        self._linger = linger
        self._lingering: asyncio.TimerHandle | None = None
        self._lingered = False
        """The ops queued waited their linger (or needed none): they leave as
        ``max_inflight`` allows, and so do those that join them until the queue is
        empty again."""
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
        self._flights: deque[Flight] = deque()
        """The batches sent, oldest first, each until it is answered and older ones
        are: what the stall check (:meth:`_check_stalls`) looks at."""
        self._stall_check: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._on_batch = on_batch
        self.fencing: Fencing | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        """The loop its batches run on, kept: on Python 3.11 each
        ``asyncio.get_running_loop()`` is a ``getpid`` system call."""
        self._balancer: etcd.Balancer | None = None
        """The client's (:func:`meshxl.etcd.balancer_of`, one for the client's life),
        kept: looked up for every batch otherwise."""

    def _bind(self) -> asyncio.AbstractEventLoop:
        loop = self._loop = asyncio.get_running_loop()
        return loop

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
        future: asyncio.Future[_Answer] = (self._loop or self._bind()).create_future()
        fencing = self.fencing
        self._queue.append(Op(request, size, parse, future, resend, width=width,
                               fence=fencing.version() if fencing is not None else UNFENCED))
        return future

    def enqueue_group(self, ops: Sequence[tuple[bytes, Callable[[Any, int, bool], Any], int,
                                                bool]]) -> asyncio.Future[list[Any]]:
        """Queue ``(request, parse, size, resend)`` ops together (no send: :meth:`kick`):
        one future for their answers, in order, each a result or an exception."""
        group = Group(len(ops), (self._loop or self._bind()).create_future())
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

    @property
    def in_flight(self) -> tuple[int, int, int]:
        """(batches in flight counting against ``max_inflight``, stalled ones beyond them,
        ops queued): what :meth:`_kick` decides from, for ``/v1/status`` and tests."""
        return self._inflight, self._stalled, len(self._queue)

    def _kick(self) -> None:
        queue = self._queue
        if self._linger is not None and self._waits(len(queue)):
            return
        while queue and may_send(len(queue), self._inflight, self._max_inflight,
                                 self._max_ops):
            batch = take_batch(queue, self._max_ops, self._max_bytes)
            self._inflight += 1
            task = (self._loop or self._bind()).create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if not queue:
            self._lingered = False

    def _waits(self, queued: int) -> bool:
        """Whether the ``queued`` ops wait (``linger``) for more to join them: not once
        they waited, nor when they fill a batch."""
        if self._lingering is not None:
            if queued < self._max_ops:
                return True
            self._lingering.cancel()
            self._lingering = None
            self._lingered = True
            return False
        if self._lingered or not queued or queued >= self._max_ops:
            return False
        assert self._linger is not None
        seconds = self._linger()
        if seconds <= 0:
            self._lingered = True
            return False
        self._lingering = (self._loop or self._bind()).call_later(seconds, self._lingered_out)
        return True

    def _lingered_out(self) -> None:
        self._lingering = None
        self._lingered = True
        self._kick()

    async def _send(self, batch: list[Op]) -> None:
        started = time.perf_counter()
        loop = self._loop or self._bind()
        flight = Flight(loop.time())
        self._flights.append(flight)
        if self._stall_check is None:
            self._stall_check = loop.call_at(flight.sent + STALLED_AFTER, self._check_stalls)
        try:
            await self._attempts(batch, flight)
            if self._on_batch is not None:
                self._on_batch(self.name, len(batch), time.perf_counter() - started)
        finally:
            self._leave(flight)

    def _leave(self, flight: Flight) -> None:
        """``flight`` answered (or given up): the next batch goes while its answers are
        taken up."""
        if not flight.holding:
            return
        flight.holding = False
        if flight.stalled:
            self._stalled -= 1
        else:
            self._inflight -= 1
        flights = self._flights
        while flights and not flights[0].holding:
            flights.popleft()
        self._kick()

    def _check_stalls(self) -> None:
        """Stall the batches unanswered for :data:`STALLED_AFTER` (:func:`stall_due`):
        one timer for all the batches in flight, at the oldest one's time (a timer per
        batch cost about a tenth of a write's CPU when each was a transaction)."""
        loop = asyncio.get_running_loop()
        due, later = stall_due(self._flights, loop.time(), self._stalled)
        self._stall_check = None if later is None else loop.call_at(later, self._check_stalls)
        for flight in due:
            flight.stalled = True
            self._stalled += 1
            self._inflight -= 1
        if due:
            self._kick()

    async def _attempts(self, batch: list[Op], flight: Flight) -> None:
        """Send the batch until every op has its answer: again (the ops that may be sent
        twice) after an attempt without one, to a member that answers. ``flight`` leaves
        its place when etcd's answer is in, before the ops take it up.

        With one etcd member (nowhere else to go) an attempt is the gRPC call alone,
        bounded by its own deadline: no member to watch, and an asyncio timeout around
        it cost about a tenth of a single write's CPU."""
        balancer = self._balancer
        if balancer is None:
            balancer = self._balancer = etcd.balancer_of(self._client)
        deadline = time.monotonic() + self._timeout
        pending = batch
        last = "no attempt"
        version = batch[0].fence
        fencing = self.fencing if version != UNFENCED else None
        fence = wire.fence_parts(fencing.key, version) if fencing is not None else None
        raises = 0
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                _fail(pending, EtcdUnavailable(f"etcd did not answer in time ({last})"))
                return
            probing = balancer.probing
            try:
                ep = await balancer.choose(deadline) if probing else balancer.current
            except EtcdUnavailable as exc:
                _fail(pending, EtcdUnavailable(str(exc)))
                return
            request = wire.txn_request([op.request for op in pending], fence)
            # One member and nowhere else to go: one attempt, the whole deadline.
            timeout = min(etcd.ATTEMPT_TIMEOUT, remaining) if probing else remaining
            floor = self._history.floor()
            call = _txn(ep.client)(request, timeout)
            try:
                response = await (balancer.attempt(ep, call, timeout) if probing else call)
            except (rpc.AioRpcError, TimeoutError, MemberChanged) as exc:
                if not probing and isinstance(exc, rpc.AioRpcError) and \
                        exc.code() == rpc.StatusCode.DEADLINE_EXCEEDED:
                    exc = TimeoutError(f"{ep.name}: no answer within {timeout:.2f} s")
                if isinstance(exc, rpc.AioRpcError):
                    last = f"etcd {exc.code().name}: {exc.details()}"
                    if "lease not found" in last:
                        # Refused whole (nothing applied) for a lease etcd lost.
                        if self._on_lease_lost is not None:
                            self._on_lease_lost()
                        _fail(pending, LeaseLost(last))
                        return
                    if not retryable(exc) or not balancer.probing:
                        _fail(pending, EtcdUnavailable(last))
                        return
                else:
                    last = f"{type(exc).__name__}: {exc}"
                    if not balancer.probing:
                        _fail(pending, EtcdUnavailable(f"etcd did not answer: {last}"))
                        return
                if not isinstance(exc, MemberChanged):
                    balancer.failed(ep, exc)
                again = []
                for op in pending:
                    op.uncertain = True
                    if op.resend:
                        again.append(op)
                    else:
                        _fail([op], EtcdUnavailable(
                            f"etcd did not answer ({last}); the write may or may not have "
                            "applied"))
                pending = again
                continue
            self._history.answered(response.header, floor)  # a rewind: told before the ops
            if fencing is not None and not response.succeeded:
                now = _fence_of(response)
                if now > version:
                    self._leave(flight)
                    fencing.fenced(now)
                    _fail(pending, Fenced(version, now, fencing.shard))
                    return
                raises += 1
                try:
                    if raises > FENCE_RAISES:
                        raise RuntimeError(f"raised {FENCE_RAISES} times, still {now}")
                    await raise_fence(self._client, fencing.key, version,
                                      max(deadline - time.monotonic(), 0.01))
                except Exception as exc:  # nothing of the batch applied
                    _fail(pending, EtcdUnavailable(
                        f"the shard map fence could not be raised to {version}: "
                        f"{type(exc).__name__}: {str(exc)[:200]}"))
                    return
                continue  # nothing applied: the same ops again, under the raised fence
            self._leave(flight)
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
        if self._stall_check is not None:
            self._stall_check.cancel()
            self._stall_check = None
        if self._lingering is not None:
            self._lingering.cancel()
            self._lingering = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        while self._queue:
            self._queue.popleft().settle(EtcdUnavailable("the store is closing"))


def _fail(ops: list[Op], error: Exception) -> None:
    for op in ops:
        op.settle(error)


_Txn = Callable[[bytes, float], Awaitable[Any]]


def _txn(client: aetcd.Client) -> _Txn:
    """``KV.Txn`` taking a serialized request (:mod:`.wire`) and a timeout: over the
    client's own HTTP/2 connection (:mod:`meshxl.etcd.h2c`, a plain client's), else on
    its grpcio channel (TLS, credentials); made once per channel."""
    made = client.__dict__.get("_meshxl_txn")
    if made is None or made[0] is not client.channel:
        if isinstance(client, h2c.Client):
            channel = client.channel_h2c()

            def call(request: bytes, timeout: float) -> Awaitable[Any]:
                return channel.call(h2c.TXN, request, timeout, h2c.txn_parse)
        else:
            unary = client.channel.unary_unary(
                h2c.TXN, request_serializer=None,
                response_deserializer=rpc.TxnResponse.FromString)

            def call(request: bytes, timeout: float) -> Awaitable[Any]:
                return unary(request, timeout=timeout,  # type: ignore[no-any-return]
                             metadata=client.metadata)
        made = client.__dict__["_meshxl_txn"] = (client.channel, call)
    return made[1]  # type: ignore[no-any-return]


def _fence_of(response: Any) -> int:
    """The fence a fenced batch's failure branch read (0: none)."""
    kvs = response.responses[0].response_range.kvs
    return parse_fence(kvs[0].value if kvs else None)


def _read_result(response: Any, _revision: int, _uncertain: bool) -> KeyState:
    return key_state(response)


def _read_at(response: Any, revision: int, _uncertain: bool) -> tuple[int, int]:
    return key_state(response).revision, revision


def _put_result(value: bytes, response: Any, revision: int, uncertain: bool) -> WriteResult:
    return write_result(response, revision, uncertain, value)


def _delete_result(response: Any, revision: int, uncertain: bool) -> WriteResult:
    return write_result(response, revision, uncertain, None)


def write_result(response: rpc.ResponseOp, revision: int, uncertain: bool,
                  value: bytes | None) -> WriteResult:
    """The answer to one guarded write. ``uncertain``: an earlier attempt went
    unanswered, so a failed compare may be that attempt's own success (see the module
    docstring)."""
    txn = response.response_txn
    if txn.succeeded:
        return WriteResult(True, revision)
    current = key_state(txn.responses[0])
    if uncertain:
        if value is not None and current.revision and current.value == value:
            return WriteResult(True, current.revision)
        raise EtcdUnavailable("etcd did not answer an earlier attempt of this write, and "
                               "whether it applied cannot be told now: not acknowledged")
    return WriteResult(False, 0, current)
