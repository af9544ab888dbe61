"""Warm-up (slow start) for hashed clusters: a member that joins or comes back gets its
share over the cluster's ``warmup`` window, through its EDS weight (pure, but for the
tracker's clock, which its caller passes in).

Envoy's own ``slow_start_config`` works for round robin and least request only, not for
ring hash or maglev, so for those the control plane ramps the member's
``load_balancing_weight`` itself: both hash tables honour EDS weights, so the
member's share of the hash space (and thus of new sessions) follows the weight.
Clusters without stickiness (round robin) get Envoy's slow start with the same window
instead (:func:`meshxl.xds.resources.build_cluster`).

The ramp is Envoy's linear one (the weight times the time since the start over the
window, at least :data:`MIN_FRACTION`), sampled in at most :data:`MAX_STEPS` steps of
at least :data:`STEP_SECONDS` each. The steps are counted on one clock shared by every
member of the cluster (multiples of the step since the epoch), so members that ramp at
the same time change weight at the same instants: one EDS push carries them all, and
a ramp costs at most ``steps`` pushes of its cluster however many members ramp.
Nothing moves a pinned session: the ramping member stays healthy in EDS, and Envoy's
stateful session filter keeps every pin on a healthy host whatever its weight.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from meshxl.model import ClusterSpec, ModelSpec, RuntimeState, cluster_view
from meshxl.model.runtime import ClusterView, MemberState

__all__ = ["MAX_STEPS", "MIN_FRACTION", "STEP_SECONDS", "WARMS", "Warming", "WarmUp",
           "fraction", "next_change", "ramped", "ramps", "report", "steps", "warmed_view"]

MIN_FRACTION = 0.1
"""The weight a ramp starts from, as a fraction of the member's weight (Envoy's slow
start ``min_weight_percent`` default, 10 %)."""
STEP_SECONDS = 1.0
"""The shortest step: at most one EDS push per second per ramping cluster."""
MAX_STEPS = 10
"""The most steps of one ramp: each moves at most a tenth of the member's weight, and a
long window costs no more pushes than a 10 s one."""

WARMS = frozenset({MemberState.READY, MemberState.ATTENTION})
"""Member states in which a member takes new sessions at its own place (a ``returning``
member held behind the serving ones takes none yet: its ramp starts at failback)."""


def steps(window: float) -> int:
    """How many steps a ramp of ``window`` seconds takes (1 to :data:`MAX_STEPS`)."""
    return max(1, min(MAX_STEPS, round(window / STEP_SECONDS)))


def _tick(window: float, at: float) -> int:
    return math.floor(at * steps(window) / window)


def fraction(window: float, started: float, now: float) -> float:
    """The fraction of its weight a member whose ramp started at ``started`` gets at
    ``now`` (Unix seconds): :data:`MIN_FRACTION` in the step it started in, then
    ``k / steps`` in the k-th step after it, 1 from the last on (and when ``window`` is
    0: warm-up off)."""
    if window <= 0:
        return 1.0
    n = steps(window)
    k = _tick(window, now) - _tick(window, started)
    if k >= n:
        return 1.0
    return max(MIN_FRACTION, k / n)


def next_change(window: float, started: float, now: float) -> float | None:
    """When the fraction next changes (Unix seconds); None once the ramp is over."""
    if window <= 0 or fraction(window, started, now) >= 1.0:
        return None
    n = steps(window)
    return (_tick(window, now) + 1) * window / n


def ramped(weight: int, share: float) -> int:
    """An EDS weight scaled by a ramp's fraction (never below 1, Envoy's minimum)."""
    return max(1, round(weight * share))


def warmed_view(view: ClusterView[ClusterSpec],
                fractions: Mapping[str, float]) -> ClusterView[ClusterSpec]:
    """``view`` with the ramping members' EDS weights scaled by their fraction."""
    if not fractions:
        return view
    members = tuple(m._replace(lb_weight=ramped(m.lb_weight, fractions[m.name]))
                    if m.name in fractions else m for m in view.members)
    return ClusterView(spec=view.spec, members=members)


def ramps(spec: ClusterSpec) -> bool:
    """The control plane ramps this cluster's EDS weights (a hashed cluster with a
    warm-up window); a cluster without stickiness uses Envoy's slow start instead."""
    return spec.warmup > 0 and spec.stickiness is not None


@dataclass(frozen=True)
class Warming:
    """The ramps under way at one instant."""

    fractions: dict[str, dict[str, float]] = field(default_factory=dict)
    """cluster -> member -> fraction of its weight it gets now (ramping members only)."""
    starts: dict[str, dict[str, float]] = field(default_factory=dict)
    """cluster -> member -> when its ramp started (Unix seconds)."""
    next_change: float | None = None
    """When the next step of any ramp is due (None: no ramp under way)."""


def _warm_members(spec: ClusterSpec, state: RuntimeState) -> frozenset[str]:
    return frozenset(m.name for m in cluster_view(spec, state).members if m.state in WARMS)


class WarmUp:
    """Which members ramp, and since when: a member starts a ramp when it takes new
    sessions and did not at the last rebuild (it joined, or came back after being lost,
    withdrawn by a problem, syncing, overloaded, drained or held behind), while another
    member of its cluster did (with nobody serving, there is no one to spare).

    The first rebuild starts none: after a restart of the control plane, every member
    already serving keeps its full weight (a ramp under way at the restart ends then).
    The starts live in this replica's memory; replicas that see a change within the same
    step publish the same weights (the steps are on a shared clock).
    """

    def __init__(self) -> None:
        self._warm: dict[str, frozenset[str]] | None = None
        self._inputs: dict[str, tuple[object, ...]] = {}
        self._starts: dict[tuple[str, str], float] = {}

    def update(self, model: ModelSpec, state: RuntimeState, now: float) -> Warming:
        """Note who serves now (after a change) and return the ramps under way."""
        first = self._warm is None
        previous = self._warm or {}
        warm: dict[str, frozenset[str]] = {}
        inputs: dict[str, tuple[object, ...]] = {}
        for spec in model.clusters:
            if not ramps(spec):
                continue
            name = spec.name
            key = (spec, state.registrations_of(name), state.members_down_of(name),
                   state.sites_offline)
            old = previous.get(name)
            if old is not None and self._inputs.get(name) == key:
                warm[name], inputs[name] = old, key
                continue
            now_warm = warm[name] = _warm_members(spec, state)
            inputs[name] = key
            if first or not old:
                continue  # a restart, a cluster new to the ramp, or nobody serving yet
            for member in now_warm - old:
                self._starts[(name, member)] = now
            for member in old - now_warm:
                self._starts.pop((name, member), None)
        self._warm, self._inputs = warm, inputs
        return self.at(model, now)

    def at(self, model: ModelSpec, now: float) -> Warming:
        """The ramps under way at ``now``; finished ones are forgotten."""
        fractions: dict[str, dict[str, float]] = {}
        starts: dict[str, dict[str, float]] = {}
        due: list[float] = []
        specs = {s.name: s for s in model.clusters if ramps(s)}
        for (cluster, member), started in list(self._starts.items()):
            spec = specs.get(cluster)
            if spec is None or member not in (self._warm or {}).get(cluster, ()):
                del self._starts[(cluster, member)]
                continue
            share = fraction(spec.warmup, started, now)
            if share >= 1.0:
                del self._starts[(cluster, member)]
                continue
            fractions.setdefault(cluster, {})[member] = share
            starts.setdefault(cluster, {})[member] = started
            change = next_change(spec.warmup, started, now)
            if change is not None:
                due.append(change)
        return Warming(fractions, starts, min(due) if due else None)


def report(warming: Warming, clusters: Iterable[str] | None = None) -> dict[str, object]:
    """The ramps under way as the control plane's ``/v1/status`` shows them."""
    names = set(clusters) if clusters is not None else None
    return {cluster: {member: {"fraction": round(share, 4),
                               "since": warming.starts[cluster][member]}
                      for member, share in sorted(members.items())}
            for cluster, members in sorted(warming.fractions.items())
            if names is None or cluster in names}
