"""Several etcd members behind one client: health checking and the choice of a member
for each request (used through :func:`meshxl.etcd.client`).

One gRPC channel to a list of addresses sticks to the first one that connects, and a
request sent to a member that lost its leader (or was cut off) waits for its whole
deadline. So a multi-member ``--etcd`` list becomes one channel *per member*, each
health-checked by a cheap ``Maintenance.Status`` probe with a short deadline (once a
second, every 100 ms while anything is wrong; the idea of etcd's clientv3 balancer
and its health checker). A member is *up* while it answers and reports a leader that
is not itself known to be gone; requests go to the member this client prefers (spread
over the members at random, then the nearest: a member whose probes answer
:data:`NEAR_MARGIN` faster is preferred, so a client in one site of a stretched cluster
uses a member of its own site), to another up member when it is not. :class:`Balancer`
also tells a caller when the member it sent a request to turned out gone or changed
leader (:meth:`Endpoint.changed`), so the request can be cancelled and sent again
elsewhere when that is safe (the session store decides what is: ``statesync/store.py``).

The aetcd client over these members is :class:`meshxl.etcd.balanced.BalancedClient`;
the watches that follow a member's health are in :mod:`meshxl.etcd.watch`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aetcd
import grpc
from aetcd import rpc

from meshxl import spread
from meshxl.errors import Unavailable, detached

log = logging.getLogger("meshxl.etcd")

T = TypeVar("T")

PROBE_INTERVAL = 1.0
"""Seconds between a member's health probes while every member is up."""
PROBE_INTERVAL_TROUBLE = 0.1
"""... and while a member is not up, or for a while after a request failed or lagged."""
PROBE_TIMEOUT = 0.5
"""A probe not answered within this long marks the member down."""
ATTEMPT_TIMEOUT = 2.0
"""Deadline of one attempt of a request (:meth:`Balancer.call`); a request as a whole
has the client's timeout."""
NEAR_MARGIN = 0.002
"""A member whose fastest recent probe answered this much sooner than the preferred
one's becomes preferred (loopback members differ by far less: they stay spread)."""
NEAR_SAMPLES = 8
"""Probe round trips kept per member; their minimum is its distance."""
SLOW_ATTEMPT = 0.1
"""An attempt outstanding this long makes the members be probed at once, then often."""
LAGGING = 0.15
"""A member whose probe has been outstanding this long while another member answered
a probe sent later is down: compared with its peers, not with a fixed deadline, so a
slow machine (every probe late) marks no member down for it."""
TROUBLE_HOLD = 3.0
"""Seconds of frequent probing after the last failed or slow request."""

UP, NO_LEADER, DOWN, UNKNOWN = "up", "no-leader", "down", "unknown"


class EtcdUnavailable(aetcd.exceptions.ConnectionFailedError, Unavailable):  # type: ignore[misc]
    """etcd did not take the request: no member answers, none has a leader in time, or
    the request went unanswered (in time). A write it carried was not acknowledged: it
    may or may not have applied."""


class Endpoint:
    """One etcd member as a client sees it: its channel and its health."""

    def __init__(self, name: str, client: aetcd.Client,
                 factory: Callable[[], aetcd.Client] | None = None):
        self.name = name
        self.client = client
        self._factory = factory
        self.renewed = 0.0
        self.state = UNKNOWN
        self.reason = "not probed yet"
        self.member_id = 0
        self.leader = 0
        self.term = 0
        self.answered = False    # the last probe (newest applied) got an answer
        self.suspect_since = 0.0  # monotonic: a request failed here (0: none)
        self.checked = 0.0
        self._probe_seq = 0
        self._applied_seq = 0
        self._probing = 0
        self._outstanding: dict[int, float] = {}  # probe seq -> monotonic time sent
        self.answered_sent = 0.0  # when the newest answered probe was sent
        self.round_trips: collections.deque[float] = collections.deque(maxlen=NEAR_SAMPLES)
        self._changed = asyncio.Event()

    @property
    def distance(self) -> float | None:
        """The fastest of the recent probes' round trips (None before three answers)."""
        trips = self.round_trips
        return min(trips) if len(trips) >= 3 else None

    def changed(self) -> asyncio.Event:
        """Set when this member stops being up or its leader changes: a request sent to
        it before then may wait for a leader that is gone."""
        return self._changed

    def _fire(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def renew(self) -> None:
        """A new channel: a connection whose packets went into a partition recovers only
        at TCP's next retransmission (seconds later), a new one at once."""
        if self._factory is None:
            return
        self.renewed = time.monotonic()
        old, self.client = self.client, self._factory()
        await self.client.connect()
        task = asyncio.get_running_loop().create_task(_close_later(old))
        _background.add(task)
        task.add_done_callback(_background.discard)

    def as_dict(self) -> dict[str, Any]:
        distance = self.distance
        return {"endpoint": self.name, "state": self.state, "reason": self.reason,
                "distance_ms": None if distance is None else round(distance * 1e3, 3),
                "member_id": f"{self.member_id:x}" if self.member_id else None,
                "leader": f"{self.leader:x}" if self.leader else None}

    def __repr__(self) -> str:
        return f"Endpoint({self.name}, {self.state})"


_background: set[asyncio.Task[None]] = set()
RENEW_AFTER = 0.3
"""A member whose probes time out gets a new channel this often."""


async def _close_later(client: aetcd.Client) -> None:
    await asyncio.sleep(ATTEMPT_TIMEOUT)  # requests still on it end by themselves first
    with contextlib.suppress(Exception):
        await client.close()


class Balancer:
    """Health of a list of etcd members and the choice of one for each request."""

    def __init__(self, endpoints: list[Endpoint], *, timeout: float | None = 5.0,
                 probing: bool = True):
        if not endpoints:
            raise ValueError("no etcd endpoint")
        self.endpoints = endpoints
        self.timeout = timeout if timeout is not None else 5.0
        self.probing = probing and len(endpoints) > 1
        # Spread clients over the members: each starts with one at random.
        self._preferred = spread.below(len(endpoints))
        self._trouble_until = 0.0
        self._wake = asyncio.Event()
        self._any_change = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._probes: set[asyncio.Task[None]] = set()
        self.switches = 0

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        if not self.probing or self._tasks:
            return
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._probe_loop(ep), name=f"etcd probe {ep.name}")
                       for ep in self.endpoints]

    async def stop(self) -> None:
        tasks, self._tasks = [*self._tasks, *self._probes], []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- choosing ------------------------------------------------------------------------

    @property
    def current(self) -> Endpoint:
        """The member requests go to now: the preferred one while it is up, else the
        first up member after it (which becomes preferred), else the preferred one."""
        n = len(self.endpoints)
        preferred = self.endpoints[self._preferred]
        if not self.probing:
            return preferred
        if preferred.state == UP:
            near = self._nearer(preferred)
            if near is None:
                return preferred
            self._switch(self.endpoints.index(near), "nearer")
            return near
        for i in range(1, n):
            index = (self._preferred + i) % n
            if self.endpoints[index].state == UP:
                self._switch(index)
                return self.endpoints[index]
        for rank in (UNKNOWN, NO_LEADER):
            for i in range(n):
                ep = self.endpoints[(self._preferred + i) % n]
                if ep.state == rank:
                    return ep
        return preferred

    def _nearer(self, preferred: Endpoint) -> Endpoint | None:
        """An up member nearer than ``preferred`` by :data:`NEAR_MARGIN`, if any."""
        mine = preferred.distance
        if mine is None:
            return None
        best, best_distance = None, mine - NEAR_MARGIN
        for ep in self.endpoints:
            distance = ep.distance
            if ep.state == UP and distance is not None and distance < best_distance:
                best, best_distance = ep, distance
        return best

    def _switch(self, index: int, why: str | None = None) -> None:
        if index != self._preferred:
            log.info("etcd: using %s (was %s: %s)", self.endpoints[index].name,
                     self.endpoints[self._preferred].name,
                     why or self.endpoints[self._preferred].reason)
            self._preferred = index
            self.switches += 1

    async def choose(self, deadline: float) -> Endpoint:
        """A member for the next attempt: an up one, waiting (until ``deadline``) while
        some answer but none has a leader; :class:`EtcdUnavailable` at once when no
        member answers at all (etcd down, or this client cut off)."""
        while True:
            ep = self.current
            if not self.probing or ep.state in (UP, UNKNOWN):
                return ep
            if all(e.state == DOWN for e in self.endpoints):
                raise EtcdUnavailable("no etcd member answers: " + "; ".join(
                    f"{e.name} {e.reason}" for e in self.endpoints))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise EtcdUnavailable("no etcd member has a leader: " + "; ".join(
                    f"{e.name} {e.state} ({e.reason})" for e in self.endpoints))
            self.trouble()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, PROBE_INTERVAL_TROUBLE)):
                    await self._any_change.wait()

    def trouble(self) -> None:
        """Probe often for a while (a request failed, lagged or found no leader)."""
        if not self.probing:
            return
        first = time.monotonic() >= self._trouble_until
        self._trouble_until = time.monotonic() + TROUBLE_HOLD
        if first:
            self._wake.set()

    def failed(self, ep: Endpoint, exc: BaseException) -> None:
        """A request to ``ep`` failed without an answer: do not send it more until a
        probe sent after now succeeds."""
        if not self.probing:
            return
        ep.suspect_since = time.monotonic()
        ep.reason = f"a request failed: {short_error(exc)}"
        self.trouble()
        self._evaluate()

    # -- calls ------------------------------------------------------------------------------

    async def call(self, fn: Callable[[Endpoint, float], Awaitable[T]], *,
                   timeout: float | None = None, attempt_timeout: float = ATTEMPT_TIMEOUT,
                   what: str = "etcd request") -> T:
        """``fn(endpoint, attempt_timeout)`` on a member that answers, again on another
        (or the same, once it has a leader) when an attempt fails without an answer or
        its member turned out gone. Only for requests that are safe to send twice (reads,
        lease grants and keepalives, unconditional puts)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        last: BaseException | None = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise EtcdUnavailable(f"{what}: no answer in time ({short_error(last)})")
            try:
                ep = await self.choose(deadline)
            except EtcdUnavailable:
                if last is not None and not self.probing:
                    raise last from None
                raise
            try:
                return await self.attempt(ep, fn(ep, min(attempt_timeout, remaining)),
                                          min(attempt_timeout, remaining))
            except (grpc.aio.AioRpcError, aetcd.exceptions.ConnectionFailedError,
                    aetcd.exceptions.ConnectionTimeoutError, aetcd.exceptions.InternalError,
                    TimeoutError, MemberChanged) as exc:
                if isinstance(exc, grpc.aio.AioRpcError) and not retryable(exc):
                    raise
                last = detached(exc)  # kept past this block (errors.detached)
                if not self.probing:
                    raise
                if not isinstance(exc, MemberChanged):
                    self.failed(ep, exc)

    async def attempt(self, ep: Endpoint, request: Awaitable[T], timeout: float) -> T:
        """Await one request to ``ep``: :class:`MemberChanged` if ``ep`` stops being up
        (or changes leader) first, TimeoutError after ``timeout``."""
        if not self.probing:  # one member: nothing to watch but the time
            async with asyncio.timeout(timeout):
                return await request
        changed = ep.changed()
        task = asyncio.ensure_future(request)
        started = time.monotonic()
        waiter = asyncio.ensure_future(changed.wait())
        try:
            done, _ = await asyncio.wait({task, waiter}, timeout=min(SLOW_ATTEMPT, timeout),
                                         return_when=asyncio.FIRST_COMPLETED)
            if not done:
                self.trouble()  # slow: find out soon whether its member is still there
                done, _ = await asyncio.wait(
                    {task, waiter}, timeout=timeout - (time.monotonic() - started),
                    return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                return task.result()
            if waiter in done:
                raise MemberChanged(f"{ep.name}: {ep.state} ({ep.reason})")
            raise TimeoutError(f"{ep.name}: no answer within {timeout:.2f} s")
        finally:
            for fut in (task, waiter):
                if not fut.done():
                    fut.cancel()
            if not task.done() or task.cancelled():
                with contextlib.suppress(BaseException):
                    await task

    # -- probing ------------------------------------------------------------------------

    async def _probe_loop(self, ep: Endpoint) -> None:
        while True:
            self._check_lagging(ep)
            if ep._probing < 3:  # overlapping probes: a healed member is seen at once
                ep._probing += 1
                task = asyncio.get_running_loop().create_task(self._probe(ep))
                self._probes.add(task)
                task.add_done_callback(self._probes.discard)
            trouble = time.monotonic() < self._trouble_until or any(
                e.state != UP for e in self.endpoints)
            interval = PROBE_INTERVAL_TROUBLE if trouble else PROBE_INTERVAL
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._wake.wait()
            self._wake.clear()

    def _check_lagging(self, ep: Endpoint) -> None:
        if not ep._outstanding or ep.state == DOWN:
            return
        oldest = min(ep._outstanding.values())
        if time.monotonic() - oldest > LAGGING and any(
                other.answered_sent > oldest for other in self.endpoints if other is not ep):
            self.failed(ep, TimeoutError(f"no answer for {time.monotonic() - oldest:.2f} s "
                                         "while other members answer"))

    async def _probe(self, ep: Endpoint) -> None:
        ep._probe_seq += 1
        seq = ep._probe_seq
        sent = time.monotonic()
        ep._outstanding[seq] = sent
        try:
            await ep.client.connect()
            reply = await ep.client.maintenancestub.Status(
                rpc.StatusRequest(), timeout=PROBE_TIMEOUT, metadata=ep.client.metadata)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            timed_out = isinstance(exc, TimeoutError) or (
                isinstance(exc, grpc.aio.AioRpcError)
                and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED)
            if timed_out and time.monotonic() - ep.renewed > RENEW_AFTER:
                await ep.renew()
            if seq > ep._applied_seq:
                ep._applied_seq = seq
                ep.answered = False
                ep.reason = f"no answer to a health probe: {short_error(exc)}"
                ep.checked = time.monotonic()
                self._evaluate()
        else:
            if seq > ep._applied_seq:
                ep._applied_seq = seq
                ep.answered = True
                ep.answered_sent = max(ep.answered_sent, sent)
                ep.round_trips.append(time.monotonic() - sent)
                ep.member_id = reply.header.member_id
                ep.term = reply.raftTerm
                if ep.suspect_since and sent >= ep.suspect_since:
                    ep.suspect_since = 0.0
                ep.checked = time.monotonic()
                leader_changed = reply.leader != ep.leader and ep.leader != 0
                ep.leader = reply.leader
                self._evaluate(leader_changed=ep if leader_changed else None)
        finally:
            ep._probing -= 1
            ep._outstanding.pop(seq, None)

    def _evaluate(self, leader_changed: Endpoint | None = None) -> None:
        """Each member's state from the latest probes (a member that reports a leader
        which itself does not answer, or is behind another member's term, has none)."""
        gone = {e.member_id for e in self.endpoints
                if e.member_id and (not e.answered or e.suspect_since)}
        newest = max((e.term for e in self.endpoints if e.answered), default=0)
        changed = False
        for ep in self.endpoints:
            if not ep.answered:
                state = DOWN if ep._applied_seq else UNKNOWN
            elif ep.suspect_since:
                state = DOWN
            elif ep.leader == 0:
                state, ep.reason = NO_LEADER, "reports no leader"
            elif ep.leader in gone:
                state, ep.reason = NO_LEADER, f"its leader {ep.leader:x} does not answer"
            elif ep.term < newest:
                state, ep.reason = NO_LEADER, f"behind term {newest} (at {ep.term})"
            else:
                state, ep.reason = UP, "ok"
            if state != ep.state:
                if ep.state == UP or state == DOWN:
                    ep._fire()
                log.log(logging.INFO if state == UP else logging.WARNING,
                        "etcd member %s: %s (%s)", ep.name, state, ep.reason)
                ep.state = state
                changed = True
            elif ep is leader_changed:
                ep._fire()
                changed = True
        if changed:
            self._any_change.set()
            self._any_change = asyncio.Event()

    def any_change(self) -> asyncio.Event:
        """Set when any member's state changes (each change then gets a new event)."""
        return self._any_change

    def status(self) -> list[dict[str, Any]]:
        """Each member's health, and which one requests go to (``current``)."""
        preferred = self.endpoints[self._preferred]
        return [{**ep.as_dict(), "current": ep is preferred} for ep in self.endpoints]


class MemberChanged(Unavailable):
    """The member a request was sent to stopped being up, or its leader changed."""


def retryable(exc: BaseException) -> bool:
    """An RPC error that is no answer (or no leader) rather than a refusal."""
    if isinstance(exc, grpc.aio.AioRpcError):
        if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                          grpc.StatusCode.CANCELLED):
            return True
        details = exc.details() or ""
        return any(text in details for text in _NO_LEADER)
    return isinstance(exc, TimeoutError | MemberChanged | OSError)


_NO_LEADER = ("leader changed", "no leader", "proposal dropped", "request timed out",
              "timed out, possibly due to", "not capable", "raft: stopped")


def short_error(exc: BaseException | None) -> str:
    if exc is None:
        return "-"
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}".rstrip(": ")


async def keepalive(client: aetcd.Client, lease: int, timeout: float | None) -> Any:
    """One keepalive of ``lease`` on ``client``'s member: etcd's answer, or None when
    the stream ended without one.

    The answer is read from the stream (``read``), not iterated: leaving an ``async
    for`` over it at the first answer leaves the call and its suspended response
    generator in a reference cycle that only the cyclic garbage collector frees, about
    19 KiB of gRPC's and Python's memory per keepalive (a sidecar's registration takes
    one a second; docs/performance.md, "Sidecar footprint"). The call is then
    cancelled, which does nothing once etcd ended it."""
    call = client.leasestub.LeaseKeepAlive([rpc.LeaseKeepAliveRequest(ID=lease)],
                                           timeout=timeout, metadata=client.metadata)
    try:
        reply = await call.read()
    finally:
        call.cancel()
    return None if reply is grpc.aio.EOF else reply


def balancer_of(client: aetcd.Client) -> Balancer:
    """The client's :class:`Balancer`; a plain one-member client gets one that never
    probes (there is nowhere else to send a request)."""
    balancer = getattr(client, "balancer", None)
    if isinstance(balancer, Balancer):
        return balancer
    balancer = Balancer([Endpoint("etcd", client)],
                        timeout=getattr(client, "_timeout", None), probing=False)
    with contextlib.suppress(AttributeError):
        client.balancer = balancer
    return balancer
