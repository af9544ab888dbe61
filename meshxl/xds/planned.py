"""Planned moves wait for delayed sync: in a cluster with ``sessions.sync_delay`` above
0, a move the mesh makes on purpose (member down, site offline, a degraded member's
step-down, a probe, a handback, ``meshxl vs move``) is compiled only once the members
it moves sessions away from have replicated their young sessions and said so, or after
``sync_delay`` + 1 s (:mod:`meshxl.model.moves`). Clusters without delayed sync compile
as before, at no cost.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping

from meshxl.model import ModelSpec, RuntimeState, cluster_view
from meshxl.model.moves import Held, held_back
from meshxl.model.vsls import virtual_systems

from .metrics import XdsMetrics

log = logging.getLogger("meshxl.xds")

__all__ = ["MoveGate"]


class MoveGate:
    """This replica's view of the planned moves that wait (first seen, to bound a
    record written with a clock ahead of this one's)."""

    def __init__(self, metrics: XdsMetrics | None = None) -> None:
        self.metrics = metrics
        self.first_seen: dict[str, float] = {}
        self.started: dict[str, float] = {}
        """When each planned move present went ahead (its steps count from there)."""
        self.waiting: tuple[str, ...] = ()
        """The tokens of the moves held back at the last compile."""

    def began(self, token: str, at: float) -> float | None:
        """When the planned move ``token``, recorded at ``at``, went ahead: None while
        it waits for its members' sidecars; ``at`` for a move this gate does not hold
        (no delayed sync) or has not compiled yet."""
        if token in self.waiting:
            return None
        return self.started.get(token, at)

    def gate(self, model: ModelSpec, state: RuntimeState, now: float) -> Held:
        """``state`` to compile at ``now``: the unacknowledged planned moves left out."""
        if not (state.members_down or state.sites_offline or state.health
                or state.preferred):
            if self.waiting or self.first_seen or self.started:
                self.waiting, self.first_seen, self.started = (), {}, {}
                if self.metrics is not None:
                    self.metrics.planned_waiting.set(0)
            return Held(state, (), None)
        held = held_back(_delayed(model, state), state, now, self.first_seen, self.started)
        self.started = dict(held.started)  # the moves present only
        tokens = tuple(m.token for m in held.waiting)
        for token in tokens:
            self.first_seen.setdefault(token, now)
        if tokens != self.waiting:
            for move in held.waiting:
                if move.token not in self.waiting:
                    log.info("planned move %s of %s waits until %s replicated their young "
                             "sessions (delayed sync)", move.token, "/".join(move.key),
                             ", ".join(move.members))
            for token in self.waiting:
                if token in held.unacknowledged:
                    log.warning("planned move %s goes ahead unacknowledged after "
                                "sync_delay + 1 s (an old or unreachable sidecar)", token)
                    if self.metrics is not None:
                        self.metrics.planned_unacknowledged.inc()
                elif token not in tokens:
                    log.info("planned move %s goes ahead", token)
            self.waiting = tokens
            if self.metrics is not None:
                self.metrics.planned_waiting.set(len(tokens))
        if len(self.first_seen) > len(tokens) + 256:  # forget moves long gone
            self.first_seen = {t: self.first_seen[t] for t in tokens}
        return held


def _delayed(model: ModelSpec, state: RuntimeState
             ) -> Iterator[tuple[str, float, Mapping[str, str], str | None]]:
    """Each cluster with delayed sync, the model's or a registered sidecar's: its name,
    the longest ``sync_delay``, registered members with their sites, and its pool (a
    virtual system)."""
    pools = {name: pool.name for name, _, pool in virtual_systems(model)} \
        if model.virtual_systems else {}
    for spec in model.clusters:
        registered = state.registrations_of(spec.name)
        if not registered:
            continue
        # A sidecar started with --sync-delay keeps young sessions whatever the model says.
        delay = max([spec.sessions.sync_delay, *(r.sync_delay for r in registered.values())])
        if delay <= 0:
            continue
        yield spec.name, delay, {m.name: m.site for m in cluster_view(spec, state).members
                                 if m.name in registered}, pools.get(spec.name)
