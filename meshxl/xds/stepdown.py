"""What a judgement gives a sick member (:mod:`meshxl.xds.health`): its share of its
weight, step by step, and when its pinned sessions are let go.

**Shares.** A degraded load-sharing member's EDS weight is halved at the judgement and
again every ``degradation.step``, :data:`HALVINGS` times, then ``min_share``; a probed
high-availability standby gets ``probe_share``.

**Pins.** Envoy's stateful session filter sends a pinned session to its member while
that member's health status is one of the cluster's ``override_host_status``
(:mod:`meshxl.xds.resources`: ``UNKNOWN``, a member sent without a status, and
``DEGRADED``, an overloaded one). A member sent ``HEALTHY`` explicitly is a healthy
target of the load balancer like any other (Envoy treats ``HEALTHY`` and ``UNKNOWN``
alike there) but no pin to it is honoured: the session goes where the hash sends it
and the answer carries the new pin, its state following as in a takeover. Nothing in
flight is cut (the member's health did not change for Envoy). :func:`released` names
the members sent so: a degraded load-sharing member once its share is at its last
step (``min_share``: its hashed sessions have left, so the pinned ones go too, at
once: a pin is one Envoy cannot move by halves), and a degraded high-availability
member once the active role has moved from it. A warming member keeps its pins (the
ramp only gives it new sessions slowly).

**Pins in high availability.** Only the active serves, so every session is pinned to
it, and a probed standby would get new sessions only (none, where the sessions are
long-lived). While a probe runs the *active* is let go: each of its sessions'
requests is placed between the two by the load balancer (least request: the
standby's ``probe_share`` of the weight against the active's, each divided by its
requests in flight), and a session the standby answered stays there, pinned (one
takeover; its state is replicated there). The comparison then sees both serve the
same sessions. A probe that moves the role needs nothing more (the sick member,
degraded, is let go as above). One that moves nothing leaves the standby a
*handback* record for ``recover``: it keeps its place and its pins are let go, so
the sessions the probe gave it return to the active at their next request (a second
takeover). Outside a probe only the active's tier keeps pins:
:func:`meshxl.xds.resources.build_load_assignment` sends every member behind it
``HEALTHY`` (the standby, the backups, a member held behind after a predictive failover
with manual failback), so a session that was idle through a handback, or that moved to
a member that took over and then handed the role back, follows the role at its next
request.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from meshxl.model import ClusterSpec, ModelSpec, RuntimeState
from meshxl.model.records import DEGRADED_KIND, HANDBACK_KIND, HELD_KIND, PROBE_KIND

__all__ = ["HALVINGS", "cut", "released", "share", "shares"]

HALVINGS = 4
"""Steps of halving before a degraded member's share drops to ``min_share`` (1/2, 1/4,
1/8, 1/16, then the floor): each step moves at most half of what it still has."""


def share(spec: ClusterSpec, since: float, now: float) -> float:
    """The fraction of its weight a degraded load-sharing member gets at ``now``: half
    at the judgement, halved again every ``step`` :data:`HALVINGS` times, then
    ``min_share`` (a floor above a halving stops the halving there)."""
    d = spec.degradation
    steps = 1 + max(0, math.floor((now - since) / d.step))
    if steps > HALVINGS:
        return d.min_share
    return max(d.min_share, 0.5 ** steps)


def _next_step(spec: ClusterSpec, since: float, now: float) -> float | None:
    d = spec.degradation
    if share(spec, since, now) <= d.min_share:
        return None
    return since + (math.floor((now - since) / d.step) + 1) * d.step


def shares(model: ModelSpec, state: RuntimeState,
           now: float) -> tuple[dict[str, dict[str, float]], float | None]:
    """Per cluster, the fraction of their weight judged members get now (degraded
    load-sharing members, probed high-availability ones), and when the next step is
    due (None: no step to come)."""
    out: dict[str, dict[str, float]] = {}
    due: list[float] = []
    if not state.health:
        return out, None
    for spec in model.clusters:
        judged = state.health_of(spec.name)
        if not judged:
            continue
        for member, health in judged.items():
            if not health.moves:
                continue
            if health.kind == PROBE_KIND:
                out.setdefault(spec.name, {})[member] = spec.degradation.probe_share
            elif not spec.high_availability:
                out.setdefault(spec.name, {})[member] = share(spec, health.since, now)
                step = _next_step(spec, health.since, now)
                if step is not None:
                    due.append(step)
    return out, min(due) if due else None


def released(model: ModelSpec, state: RuntimeState, now: float) -> dict[str, frozenset[str]]:
    """Per cluster with pinned sessions (``stickiness.pin``), the members whose pins Envoy
    no longer honours now (see the module's docstring); for a degraded load-sharing
    member the time that is due is :func:`shares`' last step."""
    out: dict[str, frozenset[str]] = {}
    if not state.health:
        return out
    for spec in model.clusters:
        if spec.stickiness is None or spec.stickiness.pin is None:
            continue
        gone: set[str] = set()
        for member, health in state.health_of(spec.name).items():
            if not health.moves:
                continue
            if health.kind == DEGRADED_KIND and (
                    spec.high_availability or _next_step(spec, health.since, now) is None):
                gone.add(member)
            elif not spec.high_availability:
                continue
            elif health.kind in (HELD_KIND, HANDBACK_KIND):
                gone.add(member)
            elif health.kind == PROBE_KIND and health.behind:
                gone.add(health.behind)  # the active a probe runs beside
        if gone:
            out[spec.name] = frozenset(gone)
    return out


def cut(*parts: Mapping[str, Mapping[str, float]]) -> Mapping[str, Mapping[str, float]]:
    """Per cluster and member, the product of the fractions of their weight each part
    gives them (the warm-up ramp's, a degraded member's, a load-based share)."""
    live = [p for p in parts if p]
    if len(live) <= 1:
        return live[0] if live else {}
    out: dict[str, dict[str, float]] = {}
    for part in live:
        for cluster, members in part.items():
            mine = out.setdefault(cluster, {})
            for member, fraction in members.items():
                mine[member] = mine.get(member, 1.0) * fraction
    return out
