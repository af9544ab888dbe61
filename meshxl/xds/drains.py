"""Which drains have outlasted their window (pure): the input that makes Envoy close a
drained member's long-lived connections.

``meshxl member down`` and ``site offline`` keep a member in EDS as ``DRAINING``: Envoy
sends it no new requests or connections, but the ones it has (gRPC streams, WebSockets,
TCP connections) stay there for as long as they live, since neither ``DRAINING`` nor the
removal of a host closes a connection in Envoy. Once a drained member's cluster
``drain_window`` has passed (counted from the admin record's time, so every replica and
a restarted one agree; under delayed sync from when the drain went ahead, after its
member replicated its young sessions: :mod:`meshxl.model.moves`), the control plane
changes the drain generation of the listeners of that cluster
(:func:`meshxl.xds.protocols.drain_generation`): Envoy then drains those listeners'
connections in place (HTTP/2 clients get a GOAWAY, the rest is closed at the end of
Envoy's ``--drain-time-s``), and the clients' new connections go to the new owner.
The listener's plain HTTP/1.1 keep-alive connections are drained too: a request sent on
an idle one as Envoy closes it fails (docs/model.md, "Drains"). Clusters of plain
HTTP/1.1 requests have nothing to close.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from meshxl.model import AdminAction, ModelSpec, RuntimeState, cluster_view
from meshxl.model.moves import down_token, offline_token
from meshxl.model.runtime import DRAINING, MemberState

__all__ = ["Drains", "drain_started", "expired_drains"]


@dataclass(frozen=True)
class Drains:
    expired: frozenset[tuple[str, str]]
    """(cluster, member) drained for at least the cluster's drain window."""
    next_expiry: float | None
    """Unix time when the next drain's window ends (None: none is pending)."""


def drain_started(action: AdminAction) -> float:
    """When the operator drained (the record's ``at``); a record without a readable time
    counts as drained long ago, so its window never holds connections back."""
    try:
        started = datetime.fromisoformat(action.at).timestamp()
    except (ValueError, TypeError, OverflowError):
        return -math.inf
    return started if math.isfinite(started) else -math.inf


def expired_drains(model: ModelSpec, state: RuntimeState, now: float,
                   went: Mapping[str, float] | None = None) -> Drains:
    """The drains of clusters with long-lived connections whose window has passed at
    ``now`` (Unix seconds), and when the next one will. ``went``: when each planned
    move held back for delayed sync went ahead (by token, :class:`.moves.Held`): its
    window counts from then, not from the record's time."""
    expired: set[tuple[str, str]] = set()
    pending: list[float] = []
    for spec in model.clusters:
        if not spec.long_lived:
            continue
        down = state.members_down_of(spec.name)
        if not down and not state.sites_offline:
            continue
        for member in cluster_view(spec, state).members:
            if member.state not in DRAINING:
                continue
            admin = member.state is MemberState.ADMIN_DOWN
            action = down.get(member.name) if admin else state.sites_offline.get(member.site)
            started = drain_started(action) if action is not None else -math.inf
            if went and action is not None:
                token = down_token(action) if admin else offline_token(member.site or "",
                                                                        action)
                started = max(started, went.get(token, started))
            ends = started + spec.drain_window
            if ends <= now:
                expired.add((spec.name, member.name))
            else:
                pending.append(ends)
    return Drains(frozenset(expired), min(pending) if pending else None)
