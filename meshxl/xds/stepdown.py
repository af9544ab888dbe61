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
"""

from __future__ import annotations

import math

from meshxl.model import ClusterSpec, ModelSpec, RuntimeState
from meshxl.model.runtime import DEGRADED_KIND, PROBE_KIND

__all__ = ["HALVINGS", "released", "share", "shares"]

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
    """Per cluster with pinned sessions (``stickiness.pin``), the degraded members whose
    pins Envoy no longer honours now (see the module's docstring); the time they are
    due is :func:`shares`' last step."""
    out: dict[str, frozenset[str]] = {}
    if not state.health:
        return out
    for spec in model.clusters:
        if spec.stickiness is None or spec.stickiness.pin is None:
            continue
        gone = frozenset(
            member for member, health in state.health_of(spec.name).items()
            if health.kind == DEGRADED_KIND and health.moves
            and (spec.high_availability or _next_step(spec, health.since, now) is None))
        if gone:
            out[spec.name] = gone
    return out
