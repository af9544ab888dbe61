"""A cluster's quotas (the model's ``sessions.quota``), enforced at the API's write path:
sessions the cluster holds, bytes of session state it holds, and session writes per
second. A write request beyond one is refused whole, before anything of it is written,
with 429, a ``Retry-After`` header and a JSON body naming the quota, its limit and the
current value (:class:`QuotaRefused`); reads and deletes are never refused, nor is a
write that keeps or shrinks what the cluster holds.

* **writes_per_second**: a token bucket per sidecar (:class:`TokenBucket`), holding
  ``writes_burst`` (default one second's worth, at least one write). A request writing
  ``n`` sessions (a bulk save, a transaction) takes ``n`` tokens; it is admitted once
  the bucket holds ``min(n, burst)``, so a request larger than the burst passes when
  the bucket is full and leaves it in debt. Each sidecar of the cluster has its own
  bucket: the cluster's limit is the per-sidecar rate times its sidecars taking writes.
  Past the rate, the writes still admitted wait a little for one another before they
  go to etcd (:meth:`QuotaGuard.linger`), so they cost etcd fewer transactions.
* **sessions** and **bytes**: counted from what the sidecar holds (:func:`held`): its
  session cache (every session of the cluster with ``replication: all``; with
  ``narrow``, only those the member holds, so the limit then applies per member) and
  the sessions delayed sync keeps on this member only, not yet in etcd (each session
  once: one both kept and cached counts as cached), recounted when a second old, plus
  what this sidecar admitted since. Writes other members admitted in that second are
  seen at the next recount, and sessions other members keep by delayed sync once they
  are replicated: the cluster can pass a limit by at most about one second of the
  other members' new sessions and bytes, plus what they keep (at most ``sync_delay``
  of their new sessions); what one member acknowledged, replicated or not, never
  passes it.

:class:`QuotaGuard` is per cluster: a process hosting several clusters keeps one each.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from meshxl.model.spec import SessionQuota

from .http import RequestRefused, Response, error
from .http.admission import MAX_HOLD
from .metrics import StatesyncMetrics
from .record import SessionRecord
from .writes import DELETE, PATCH, Write

__all__ = ["RECOUNT_AFTER", "SPACE_RETRY_AFTER", "THROTTLED_FOR", "THROTTLED_LINGER",
           "QuotaGuard", "QuotaRefused", "TokenBucket", "Usage", "held", "held_size"]

THROTTLED_LINGER = 0.02
"""Seconds the writes a cluster past its rate quota is still admitted wait in its write
batcher for others to join them (:meth:`QuotaGuard.linger`). Past the rate, the bucket
admits a write each time a token is minted, 1/rate apart: each found the batcher idle
and went to etcd alone, so a tenant flooding past its quota made etcd commit more
transactions than the same writes at its quota (batch size 1.0 against 1.4-1.7 at a
quota of 200 a second, and a third more of etcd's CPU, which every tenant shares).
Waiting, they leave together: at most about 1/THROTTLED_LINGER transactions a second
besides full batches, for at most this much more latency on writes that are already
past their tenant's quota."""
THROTTLED_FOR = 1.0
"""Seconds after a refusal for the rate that a cluster counts as past it."""
RECOUNT_AFTER = 1.0
"""Seconds a count of the cluster's sessions and bytes is used before it is made anew."""
SPACE_RETRY_AFTER = 5
"""``Retry-After`` (seconds) of a refusal for sessions or bytes: room is made only as
sessions are deleted or expire."""


class QuotaRefused(RequestRefused):
    """A write beyond a quota: 429 with ``Retry-After``."""

    def __init__(self, quota: str, limit: float, current: float, retry_after: float):
        seconds = max(1, math.ceil(retry_after))
        super().__init__(429, f"over the cluster's {quota} quota: the limit is {limit:g}, "
                              f"now {current:g}; retry in {seconds} s",
                         [("Retry-After", str(seconds))], quota=quota, limit=limit,
                         current=current, retry_after=seconds)
        self.quota = quota
        self.wait = retry_after
        """Seconds until the write could be admitted (``Retry-After`` rounds it up)."""


class TokenBucket:
    """``rate`` tokens a second, holding at most ``burst`` (default: one second's worth,
    at least 1)."""

    def __init__(self, rate: float, burst: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if rate <= 0:
            raise ValueError(f"a token bucket's rate must be above 0, got {rate}")
        self.rate = rate
        self.burst = max(1.0, rate if burst is None else burst)
        self.tokens = self.burst
        self._clock = clock
        self._at = clock()

    def _refill(self) -> None:
        now = self._clock()
        self.tokens = min(self.burst, self.tokens + (now - self._at) * self.rate)
        self._at = now

    def wait(self, n: int = 1) -> float:
        """The seconds until ``n`` tokens can be taken (0.0: now); nothing is taken."""
        self._refill()
        need = min(float(n), self.burst)
        return 0.0 if self.tokens >= need else (need - self.tokens) / self.rate

    def take(self, n: int = 1) -> float:
        """Take ``n`` tokens: 0.0 when taken, else the seconds until they can be (and
        nothing is taken)."""
        wait = self.wait(n)
        if wait == 0.0:
            self.tokens -= n
        return wait

    def level(self) -> float:
        self._refill()
        return self.tokens


@dataclass
class Usage:
    """What the cluster holds, as a sidecar counts it."""

    sessions: int = 0
    bytes: int = 0


class Held(Protocol):
    """A session as a sidecar holds it: a cache entry, or a copy kept by delayed sync."""

    @property
    def record(self) -> SessionRecord: ...


def held(cached: Sequence[Mapping[str, Held]], kept: Sequence[Mapping[str, Held]]) -> Usage:
    """The sessions and bytes a sidecar holds: those of its caches (one per etcd
    cluster: the main one, or each shard's) and those delayed sync keeps on this member
    only, each session once (one kept and already cached, replicated but its copy not
    yet let go, counts as cached)."""
    usage = Usage(sum(len(c) for c in cached),
                  sum(len(e.record.data) for c in cached for e in c.values()))
    for copies in kept:
        for session_id, local in copies.items():
            if not any(session_id in c for c in cached):
                usage.sessions += 1
                usage.bytes += len(local.record.data)
    return usage


def held_size(session_id: str, cached: Sequence[Mapping[str, Held]],
              kept: Sequence[Mapping[str, Held]]) -> int | None:
    """The size of ``session_id``'s state as the sidecar holds it (its copy kept here
    first: the newest this member has), None if it holds none."""
    for holding in (*kept, *cached):
        found = holding.get(session_id)
        if found is not None:
            return len(found.record.data)
    return None


class _Rate:
    """Writes admitted per second, over the last whole second (for the status and the
    refusal's ``current``)."""

    def __init__(self, clock: Callable[[], float]):
        self._clock = clock
        self._second = math.floor(clock())
        self._now = 0
        self._last = 0

    def add(self, n: int) -> None:
        self._roll()
        self._now += n

    def value(self) -> int:
        self._roll()
        return self._last

    def _roll(self) -> None:
        second = math.floor(self._clock())
        if second != self._second:
            self._last = self._now if second == self._second + 1 else 0
            self._now = 0
            self._second = second


class QuotaGuard:
    """One cluster's quotas. ``count``: the cluster's sessions and bytes as the sidecar
    holds them (an O(sessions) walk, made at most once per :data:`RECOUNT_AFTER`);
    ``size_of``: the stored size of a session, None if the sidecar knows of none."""

    def __init__(self, limits: SessionQuota, count: Callable[[], Usage],
                 size_of: Callable[[str], int | None], metrics: StatesyncMetrics | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.limits = limits
        self._count = count
        self._size_of = size_of
        self._metrics = metrics
        self._clock = clock
        rate = limits.writes_per_second
        self.bucket = (TokenBucket(rate, limits.writes_burst, clock=clock)
                       if rate is not None else None)
        self._rate = _Rate(clock)
        self._usage: Usage | None = None
        self._counted_at = -math.inf
        self._admitted: dict[str, int] = {}
        """Sessions this sidecar admitted since the last count, with their new size."""
        self.refused: dict[str, int] = {}
        self._held_until = -math.inf
        """When the last refusal held (:meth:`hold`) is answered."""
        self._rate_refused_at = -math.inf
        """When a write was last refused for the rate (:meth:`linger`)."""
        self.enabled = (limits.sessions is not None or limits.bytes is not None
                        or rate is not None)

    @classmethod
    def unlimited(cls) -> QuotaGuard:
        """A guard without any quota (admits everything, counts nothing)."""
        return cls(SessionQuota(), Usage, lambda _: None)


    def usage(self) -> Usage:
        """The cluster's sessions and bytes: the last count (made anew when older than
        :data:`RECOUNT_AFTER`) with what this sidecar admitted since."""
        now = self._clock()
        if self._usage is None or now - self._counted_at >= RECOUNT_AFTER:
            self._usage = self._count()
            self._counted_at = now
            self._admitted.clear()
        return self._usage

    def _known_size(self, session_id: str) -> int | None:
        size = self._admitted.get(session_id)
        return size if size is not None else self._size_of(session_id)

    def admit(self, writes: Sequence[Write]) -> None:
        """Admit ``writes`` (one request's) or raise :class:`QuotaRefused`, counting the
        refusal. Deletes take nothing."""
        if not self.enabled:
            return
        puts = [w for w in writes if w.op != DELETE]
        if not puts:
            return
        limits = self.limits
        grown: dict[str, int] = {}
        new_sessions = 0
        growth = 0
        if limits.sessions is not None or limits.bytes is not None:
            usage = self.usage()
            for write in puts:
                sid = write.session_id
                before = grown.get(sid, self._known_size(sid))
                if before is None and sid not in grown:
                    new_sessions += 1
                size = (before or 0) + len(_patch_bytes(write)) if write.op == PATCH \
                    else len(write.data)
                growth += size - (before or 0)
                grown[sid] = size
            if (limits.sessions is not None and new_sessions
                    and usage.sessions + new_sessions > limits.sessions):
                self._refuse("sessions", limits.sessions, usage.sessions, SPACE_RETRY_AFTER)
            if limits.bytes is not None and growth > 0 and usage.bytes + growth > limits.bytes:
                self._refuse("bytes", limits.bytes, usage.bytes, SPACE_RETRY_AFTER)
        if self.bucket is not None:
            wait = self.bucket.take(len(puts))
            if wait > 0:
                assert limits.writes_per_second is not None
                self._refuse("writes_per_second", limits.writes_per_second,
                             self._rate.value(), wait)
        self._rate.add(len(puts))
        if grown:
            usage = self.usage()
            usage.sessions += new_sessions
            usage.bytes += growth
            self._admitted.update(grown)

    def rate_refusal(self) -> QuotaRefused | None:
        """The refusal of a one-session write when the rate quota has no token for it
        now (counted as :meth:`admit` counts one), or None; nothing is taken. Decided
        from the request's head, before its body is read: a tenant writing past its
        rate costs its sidecar as little as a request can."""
        bucket = self.bucket
        if bucket is None:
            return None
        wait = bucket.wait(1)
        if wait == 0.0:
            return None
        assert self.limits.writes_per_second is not None
        return self._refusal("writes_per_second", self.limits.writes_per_second,
                             self._rate.value(), wait)

    def linger(self) -> float:
        """Seconds a write batch of this cluster may wait for more writes before it goes
        to etcd: :data:`THROTTLED_LINGER` while the cluster is past its rate quota (a
        write refused for it within :data:`THROTTLED_FOR`), else 0 (at once)."""
        if self.bucket is None or self._clock() - self._rate_refused_at >= THROTTLED_FOR:
            return 0.0
        return THROTTLED_LINGER

    def hold(self, refused: QuotaRefused) -> float:
        """Seconds the answer to a write ``refused`` for the rate is held: until the
        bucket would hold a token for it after one for each refusal held before it
        (1/rate apart, as a rate limit that delays would let them through), at most
        :data:`~.http.admission.MAX_HOLD`. So the refused writes of clients that wait
        for their answers come back about as often as the rate mints tokens, however
        many connections they use (until each is held the most)."""
        assert self.bucket is not None
        now = self._clock()
        end = min(max(now + refused.wait, self._held_until + 1.0 / self.bucket.rate),
                  now + MAX_HOLD)
        self._held_until = end
        return end - now

    def _refusal(self, quota: str, limit: float, current: float,
                 retry_after: float) -> QuotaRefused:
        """A refusal, counted (``refused`` and the metric)."""
        self.refused[quota] = self.refused.get(quota, 0) + 1
        if quota == "writes_per_second":
            self._rate_refused_at = self._clock()
        if self._metrics is not None:
            self._metrics.quota_refused.labels(quota).inc()
        return QuotaRefused(quota, limit, current, retry_after)

    def _refuse(self, quota: str, limit: float, current: float, retry_after: float) -> None:
        raise self._refusal(quota, limit, current, retry_after)

    def status(self) -> dict[str, Any] | None:
        """``/v1/status``' ``quota``: each limit and its use (None: no quota set)."""
        if not self.enabled:
            return None
        limits = self.limits
        usage = self.usage() if limits.sessions is not None or limits.bytes is not None \
            else None
        return {
            "sessions": None if limits.sessions is None else {
                "limit": limits.sessions, "used": usage.sessions if usage else None},
            "bytes": None if limits.bytes is None else {
                "limit": limits.bytes, "used": usage.bytes if usage else None},
            "writes_per_second": None if limits.writes_per_second is None else {
                "limit": limits.writes_per_second, "last_second": self._rate.value(),
                "tokens": round(self.bucket.level(), 3) if self.bucket else None,
                "burst": self.bucket.burst if self.bucket else None},
            "refused": dict(self.refused),
        }


def _patch_bytes(write: Write) -> bytes:
    """A merge patch's size as an upper bound of what it adds (its JSON text)."""
    import json

    return json.dumps(write.patch, separators=(",", ":")).encode()


class HeadRefusal:
    """A PUT's or PATCH's 429 from its head when its cluster's rate quota has no token
    for it now (:meth:`QuotaGuard.rate_refusal`): the body is then neither kept nor
    parsed, and no handler runs; None: it goes on (to :meth:`QuotaGuard.admit`, which
    takes the token). With the quota's ``hold_refused`` (the default), the answer may be
    held until the bucket would hold a token for it (``request.hold``:
    :meth:`QuotaGuard.hold`, http/admission.py), so clients that ignore
    ``Retry-After`` but wait for their answers send refused writes about as often as
    the rate mints tokens. A route's ``refuse``
    (http/routing.py); ``owner``: what holds the cluster's sidecar
    (``owner.sidecar.quota``), read when a request comes."""

    __slots__ = ("owner",)

    def __init__(self, owner: Any) -> None:
        self.owner = owner

    def __call__(self, request: Any) -> Response | None:
        quota = self.owner.sidecar.quota
        refused = quota.rate_refusal()
        if refused is None:
            return None
        if quota.limits.hold_refused:
            request.hold = quota.hold(refused)
        return error(refused.status, str(refused), refused.headers, **refused.details)
