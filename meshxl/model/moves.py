"""Planned moves and delayed sync (pure): which records move sessions away from which
member, and which of them the control plane holds back until that member's sidecar has
replicated its young sessions.

With ``sessions.sync_delay`` above 0 a session younger than the delay lives on its
member only. A move the mesh makes on purpose (``meshxl member down``, ``site
offline``, a degraded member's step-down, a high-availability probe or handback, ``meshxl
vs move``) would lose those sessions as a member's death does, though nothing forced it
to. So each such record names the members it moves sessions away from (:func:`moves`);
their sidecars see it in the mesh they follow, replicate every session they keep at
once, write through while it lasts, and acknowledge it under ``clusters/C/flushed/M``
(:class:`~meshxl.model.runtime.RuntimeState`'s ``flushed``); the control plane applies
the record only once every member it names has acknowledged it, or after
``sync_delay`` + :data:`GRACE` seconds (:func:`held_back`): by then every session that
existed when the record was written is older than the delay and replicated by the
periodic flush, so an old or dead sidecar holds no move back for longer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime

from .records import DEGRADED_KIND, HANDBACK_KIND, PROBE_KIND, AdminAction, Health
from .runtime import RuntimeState

__all__ = ["GRACE", "Held", "Move", "down_token", "health_token", "held_back", "moves",
           "moves_away_from", "offline_token", "record_time"]

GRACE = 1.0
"""Seconds past ``sync_delay`` after which a move goes ahead unacknowledged (the
periodic flush runs at least every second)."""


@dataclass(frozen=True)
class Move:
    """One record that moves sessions away from ``members`` (their sidecars flush)."""

    token: str
    """Names the record and its version (its time): what a sidecar acknowledges."""
    kind: str
    """Where the record is: ``admin``, ``site``, ``health`` or ``preferred``."""
    key: tuple[str, str]
    """The record's key in :class:`RuntimeState` (for a site: ``(site, "")``)."""
    members: tuple[str, ...]
    at: float
    """When the record was written (Unix seconds, the writer's clock)."""


def record_time(at: str) -> float:
    """An admin record's time (ISO 8601) in Unix seconds; unreadable: long ago."""
    try:
        found = datetime.fromisoformat(at).timestamp()
    except (ValueError, TypeError, OverflowError):
        return -math.inf
    return found if math.isfinite(found) else -math.inf


def down_token(action: AdminAction) -> str:
    """The token of a ``member down`` record (what its member's sidecar acknowledges)."""
    return f"down@{action.at}"


def offline_token(site: str, action: AdminAction) -> str:
    """The token of a ``site offline`` record."""
    return f"offline:{site}@{action.at}"


def health_token(kind: str, member: str, since: float) -> str:
    """The token of a judgement's record (``kind`` of ``member`` since ``since``)."""
    return f"{kind}:{member}@{since!r}"


def moves(cluster: str, sites: Mapping[str, str], state: RuntimeState,
          pool: str | None = None) -> list[Move]:
    """The planned moves in ``state`` away from members of ``cluster``; ``sites``: the
    members that could flush (registered), each with its site; ``pool``: a virtual
    system's pool (``meshxl member down POOL MEMBER`` re-places its virtual systems)."""
    found: list[Move] = []
    for where in (cluster, pool) if pool else (cluster,):
        for member, action in state.members_down_of(where).items():
            if member in sites:
                found.append(Move(down_token(action), "admin", (where, member), (member,),
                                  record_time(action.at)))
    for site, action in state.sites_offline.items():
        members = tuple(sorted(m for m, s in sites.items() if s == site))
        if members:
            found.append(Move(offline_token(site, action), "site", (site, ""), members,
                              record_time(action.at)))
    for member, health in state.health_of(cluster).items():
        away = tuple(m for m in _away(member, health) if m in sites)
        if away:
            found.append(Move(health_token(health.kind, member, health.since), "health",
                              (cluster, member), away, health.since))
    for (vs, chosen), action in state.preferred.items():
        if vs == cluster:
            members = tuple(sorted(m for m in sites if m != chosen))
            if members:
                found.append(Move(f"preferred:{chosen}@{action.at}", "preferred",
                                  (vs, chosen), members, record_time(action.at)))
    return found


def _away(member: str, health: Health) -> tuple[str, ...]:
    """The members a judgement of ``member`` moves sessions away from. A probe gives the
    probed member a share of the active's (``behind``) sessions and may hand them back:
    both replicate, and both write through while it runs, so the two it compares pay
    the same etcd commit on every write (one keeping young sessions in memory beside
    one writing through would look faster for that alone: with a slow etcd, a probe
    failed an active over for the cost of its own write-through)."""
    if not health.moves:
        return ()
    if health.kind in (DEGRADED_KIND, HANDBACK_KIND):
        return (member,)
    if health.kind == PROBE_KIND:
        return tuple(m for m in (health.behind, member) if m)
    return ()  # held: it serves nothing already


def moves_away_from(cluster: str, member: str, site: str | None, state: RuntimeState,
                    pool: str | None = None) -> tuple[str, ...]:
    """The tokens of the planned moves away from ``member`` (its sidecar's view)."""
    return tuple(sorted(m.token for m in moves(cluster, {member: site or ""}, state, pool)))


@dataclass(frozen=True)
class Held:
    """What :func:`held_back` decided."""

    state: RuntimeState
    """The runtime state to compile: the moves not yet acknowledged left out."""
    waiting: tuple[Move, ...]
    next_release: float | None
    """When the first waiting move goes ahead unacknowledged (Unix seconds)."""
    unacknowledged: frozenset[str] = frozenset()
    """The tokens of the moves that went ahead after the wait, unacknowledged."""
    started: Mapping[str, float] = field(default_factory=dict)
    """When each move that went ahead did (by token): its caller keeps them, so a
    sidecar that restarts (its acknowledgement gone with its lease) moves no step."""


def held_back(clusters: Iterable[tuple[str, float, Mapping[str, str], str | None]],
              state: RuntimeState, now: float,
              first_seen: Mapping[str, float] | None = None,
              started: Mapping[str, float] | None = None) -> Held:
    """``state`` with the planned moves left out whose members have not all
    acknowledged them, for ``clusters`` (name, ``sync_delay`` above 0, registered
    members and their sites, a virtual system's pool). A move waits at most
    ``sync_delay`` + :data:`GRACE` from its record's time, or from when this replica
    first saw it (``first_seen`` by token: a record written with a clock ahead of this
    one's). A degraded member's step-down starts when the move goes ahead: its
    acknowledgement's time, or the end of the wait (or as ``started`` remembers)."""
    if not (state.members_down or state.sites_offline or state.health or state.preferred):
        return Held(state, (), None)
    seen, went = first_seen or {}, started or {}
    waiting: list[Move] = []
    starts: dict[tuple[str, str], float] = {}
    begun: dict[str, float] = {}
    deadlines: list[float] = []
    late: set[str] = set()
    for cluster, delay, sites, pool in clusters:
        for move in moves(cluster, sites, state, pool):
            bound = min(move.at, seen.get(move.token, move.at)) + delay + GRACE
            acks = [state.flushed.get((cluster, m), {}).get(move.token) for m in move.members]
            if move.token in went:
                start = went[move.token]
            elif all(a is not None for a in acks):
                start = min(bound, max([move.at, *(a for a in acks if a is not None)]))
            elif now >= bound:
                start = bound
                late.add(move.token)
            else:
                waiting.append(move)
                deadlines.append(bound)
                continue
            begun[move.token] = start
            if move.kind == "health" and move.token.startswith(DEGRADED_KIND):
                starts[move.key] = start
    if not waiting and not starts:
        return Held(state, (), None, frozenset(late), begun)
    drop = {(m.kind, m.key) for m in waiting}
    health = {k: replace(h, since=max(h.since, starts[k])) if k in starts else h
              for k, h in state.health.items() if ("health", k) not in drop}
    gated = replace(
        state,
        members_down={k: v for k, v in state.members_down.items() if ("admin", k) not in drop},
        sites_offline={k: v for k, v in state.sites_offline.items()
                       if ("site", (k, "")) not in drop},
        health=health,
        preferred={k: v for k, v in state.preferred.items() if ("preferred", k) not in drop})
    return Held(gated, tuple(waiting), min(deadlines) if deadlines else None,
                frozenset(late), begun)
