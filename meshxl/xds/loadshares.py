"""Load-based shares (``shares: load``): a load-sharing cluster's members get shares that
follow their capacity, not only their weights (pure, but for the controller's memory;
the clock is passed in).

Every ``degradation.step`` the controller compares each first-tier member's p90 latency
over the last :data:`SPAN` seconds, as the Envoys saw it, with the fastest of its tier,
and moves its share toward that ratio (the fastest p90 over its own, never below a
tenth, or ``degradation.min_share`` when higher), by at most :data:`MAX_CHANGE` per
step either way (bounded movement: a step moves at most a fifth of a member's
sessions). A member whose target is within :data:`DEADBAND` of its share keeps it, so
jitter moves nothing. The fixed
point is the share proportional to capacity: with every member equally utilized, a
member with half the CPU answers in twice the time (a queue's latency is its service
time over its idle fraction), so its target is half, and half is what keeps it equally
utilized (a test holds this on simulated queues). Shares are relative: the largest is
1 (its full weight).

Degraded members are left to :mod:`meshxl.xds.health` (their share steps down there);
a member that leaves the tier forgets its share, and one that joins starts at 1 (the
warm-up ramp gives it its share first). The shares live in this replica's memory: each
replica steers the Envoys connected to it by what they saw.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from meshxl.model import ModelSpec, RuntimeState, cluster_view
from meshxl.model.runtime import MemberState

from .health import Samples, member_samples

__all__ = ["DEADBAND", "MAX_CHANGE", "SPAN", "LoadShares"]

SPAN = 2.0
"""Seconds of requests each step reads (four windows)."""
MAX_CHANGE = 1.25
"""The most a share changes in one step (times or divided by)."""
FLOOR = 0.1
"""The least share a member keeps (or ``degradation.min_share`` when higher): a member at
no share would send no samples to judge it by again."""
DEADBAND = 1.25
"""A member whose target is within this ratio of its share keeps it (a 2 s p90 varies by
a tenth or so between spans of a steady member)."""


class LoadShares:
    """The shares of ``shares: load`` clusters, stepped by :meth:`update`."""

    def __init__(self) -> None:
        self._shares: dict[str, dict[str, float]] = {}
        self._stepped: dict[str, float] = {}

    def update(self, model: ModelSpec, state: RuntimeState, samples: Samples, now: float,
               hosts: Mapping[str, Iterable[str]] | None = None) -> dict[str, dict[str, float]]:
        """Step the clusters whose step is due; every share below 1, per cluster."""
        live = set()
        for spec in model.clusters:
            if spec.high_availability or spec.shares != "load":
                continue
            name = spec.name
            live.add(name)
            if now - self._stepped.get(name, -math.inf) < spec.degradation.step:
                continue
            self._stepped[name] = now
            tier = [m for m in cluster_view(spec, state).members
                    if m.priority == 0 and m.state in (MemberState.READY, MemberState.ATTENTION)]
            old = self._shares.get(name, {})
            current = {m.name: old.get(m.name, 1.0) for m in tier}
            seen = member_samples(tier, samples.summary(name, now - SPAN, now), hosts or {})
            fewest = max(1, spec.degradation.min_requests // 4)
            latencies = {m: s.p90 for m, s in seen.items()
                         if s.p90 is not None and s.requests >= fewest}
            if len(latencies) >= 2:
                fastest = min(latencies.values())
                floor = max(FLOOR, spec.degradation.min_share)
                for member, p90 in latencies.items():
                    # The target relative to the fastest member's, so the fastest is 1.
                    target = max(floor, min(1.0, fastest / p90)) if p90 > 0 else 1.0
                    now_at = current[member]
                    if now_at / DEADBAND <= target <= now_at * DEADBAND:
                        continue
                    current[member] = min(now_at * MAX_CHANGE, max(now_at / MAX_CHANGE, target))
                top = max(current.values(), default=1.0)
                current = {m: max(floor, min(1.0, f / top)) for m, f in current.items()}
            self._shares[name] = current
        for gone in [c for c in self._shares if c not in live]:
            self._shares.pop(gone, None)
            self._stepped.pop(gone, None)
        return {c: {m: round(f, 4) for m, f in shares.items() if f < 0.9999}
                for c, shares in self._shares.items()
                if any(f < 0.9999 for f in shares.values())}

    def next_step(self, model: ModelSpec) -> float | None:
        """When the next step of any ``shares: load`` cluster is due."""
        due = [self._stepped[s.name] + s.degradation.step for s in model.clusters
               if s.name in self._stepped]
        return min(due) if due else None
