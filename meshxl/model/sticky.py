"""A pool's stored (sticky) base placement: existing virtual systems stay where they are.

The base placement of :mod:`.placement` is built from the model alone, so adding,
removing or reweighting one VS reshuffled others. :func:`sticky_placement` takes the
pool's stored placement (``pools/POOL/placement`` in etcd, written by the control
plane: :class:`StoredPlacement`) as an input and keeps it where the model allows it, as
Kafka's sticky assignor does; with none stored it is :func:`.placement.base_placement`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from .placement import (
    BALANCE,
    PoolMember,
    VirtualRoles,
    active_step,
    base_placement,
    eligible,
    in_order,
    join_budget,
    rebalance_standbys,
    score,
    standby_shares,
    standby_step,
)
from .records import StoredPlacement  # beside the other stored records (loaded without this)

__all__ = ["StoredPlacement", "sticky_placement"]


def _balance(members: Sequence[PoolMember], active: dict[str, str],
             weight: Mapping[str, int], scores: Mapping[tuple[str, str], float],
             target: Mapping[str, float]) -> None:
    """Move active roles away from the members of ``target`` (the holders a change
    loaded: a VS made heavier, a removed member's actives handed over) while one holds
    more than its target load and more than the balance bound (``BALANCE`` x its fair
    share, or its share plus the lightest VS, what whole VSs need): one VS at a time,
    the move that most lowers the higher of the two members' ratios, to a member it
    leaves within the bound (so nothing cascades). Each move takes at least the
    lightest VS's weight off, so a target exceeded by ``x`` moves at most
    ceil(x / lightest) VSs; nobody else's roles move."""
    if not active or not target:
        return
    total = sum(weight[v] for v in active)
    capacity = sum(m.capacity for m in members)
    fair = {m.name: total * m.capacity / capacity for m in members}
    lightest = min(weight[v] for v in active)
    load = dict.fromkeys(fair, 0.0)
    for vs, member in active.items():
        load[member] += weight[vs]

    def above(m: str, held: float) -> bool:
        return held > BALANCE * fair[m] + 1e-9 and held >= fair[m] + lightest - 1e-9

    def over(m: str) -> bool:
        return load[m] > target[m] + 1e-9 and above(m, load[m])

    for _ in range(len(active) * len(members)):
        donors = [m for m in sorted(target) if m in fair and over(m)]
        if not donors:
            return
        best: tuple[float, float, str, str] | None = None
        for donor in sorted(donors, key=lambda m: (-load[m] / fair[m], m)):
            before = load[donor] / fair[donor]
            for vs in sorted(v for v in active if active[v] == donor):
                w = weight[vs]
                for to in fair:
                    if to == donor or above(to, load[to] + w):
                        continue
                    after = max((load[donor] - w) / fair[donor], (load[to] + w) / fair[to])
                    if after < before - 1e-9:
                        key = (after, -scores[(vs, to)], vs, to)
                        if best is None or key < best:
                            best = key
            if best is not None:
                break
        if best is None:
            return
        _, _, vs, to = best
        donor = active[vs]
        load[donor] -= weight[vs]
        load[to] += weight[vs]
        active[vs] = to


def _repair_standbys(members: Sequence[PoolMember], active: Mapping[str, str],
                     standby: dict[str, str], weight: Mapping[str, int],
                     scores: Mapping[tuple[str, str], float]) -> None:
    """A standby for each VS without a valid one (none, its active's member, or not
    allowed by the site rule: :func:`eligible`): the allowed member furthest below its
    fair share of standbys, heaviest VS first. Valid standbys stay."""
    placement = {v: VirtualRoles(v, (a,)) for v, a in active.items()}
    share = {m: f for m, (_, f) in standby_shares(placement, members, weight).items()}
    allowed = {m.name: eligible(m.name, members) for m in members}
    held = dict.fromkeys(share, 0.0)
    repair = []
    for vs, holder in active.items():
        if standby.get(vs) in allowed[holder]:
            held[standby[vs]] += weight[vs]
        else:
            standby.pop(vs, None)
            repair.append(vs)
    for vs in sorted(repair, key=lambda v: (-weight[v], v)):
        options = allowed[active[vs]]
        if options:
            best = min(options, key=lambda m: (
                (held[m] + weight[vs]) / share[m] if share[m] else math.inf,
                -scores[(vs, m)], m))
            standby[vs] = best
            held[best] += weight[vs]


def sticky_placement(pool: str, members: Sequence[PoolMember],
                     systems: Sequence[tuple[str, int, int]],
                     previous: StoredPlacement | None) -> dict[str, VirtualRoles]:
    """Every VS's order on the whole pool, keeping the ``previous`` (stored) placement
    where the model allows it: what Kafka's sticky assignor does, so one virtual
    system's life cycle fails no other over. ``previous`` empty: :func:`base_placement`
    (an installation storing its first placement sees no role move).

    - A VS of ``previous`` whose active (and standby) are still pool members keeps them;
      one whose active left the pool gets its standby as active; a new VS (or one none
      of whose members is left) goes to the member furthest below its fair share of
      active weight (ties: its rendezvous score). A removed VS moves nothing.
    - Then, only where the change loaded a member (a VS made heavier than its stored
      weight, a removed member's actives handed to their standbys) above both its load
      before and the balance bound, the fewest active roles move off it
      (:func:`_balance`): at most ceil(weight added / lightest VS weight).
    - A member new to the pool (holding no role in ``previous``) takes its fair share
      of active roles and standbys as it does in :func:`base_placement`: a member
      appended moves roles only to itself.
    - Standbys: a valid one stays; a VS without one (new, promoted, its standby gone or
      now on its active's site) gets the allowed member furthest below its fair share.

    So adding or removing one VS moves no other VS's active role, and reweighting one
    moves only what brings the members back within the bound. The result is a fixed
    point: placing again with it as ``previous`` returns it unchanged."""
    if previous is None or not previous.roles or not members or not systems:
        return base_placement(pool, members, systems)
    weight = {name: w for name, w, _ in systems}
    scores = {(vs, m.name): score(pool, vs, m) for vs in weight for m in members}
    holders = set(previous.members) & {m.name for m in members}
    old = [m for m in members if m.name in holders]
    if not old or not any(vs in weight for vs in previous.roles):
        return base_placement(pool, members, systems)
    joiners = [m for m in members if m.name not in holders]
    active: dict[str, str] = {}
    standby: dict[str, str] = {}
    fresh = []
    gained: dict[str, float] = {}  # member -> the load a change put on it
    for vs in weight:
        was = previous.roles.get(vs)
        kept = [m for m in (was[:2] if was else ()) if m in holders]
        if not kept:
            fresh.append(vs)
            continue
        active[vs] = kept[0]
        if len(kept) > 1 and kept[1] != kept[0]:
            standby[vs] = kept[1]
        assert was is not None
        if kept[0] != was[0]:  # its active left the pool: its standby took it
            gained[kept[0]] = gained.get(kept[0], 0) + weight[vs]
        elif weight[vs] > was[2]:
            gained[kept[0]] = gained.get(kept[0], 0) + weight[vs] - was[2]
    total = sum(weight.values())
    capacity = sum(m.capacity for m in old)
    fair = {m.name: total * m.capacity / capacity for m in old}
    load = dict.fromkeys(fair, 0.0)
    for vs, member in active.items():
        load[member] += weight[vs]
    for vs in sorted(fresh, key=lambda v: (-weight[v], v)):
        to = min(fair, key=lambda m: ((load[m] + weight[vs]) / fair[m],
                                      -scores[(vs, m)], m))
        active[vs] = to
        load[to] += weight[vs]
    _balance(old, active, weight, scores,
             {m: load[m] - extra for m, extra in gained.items()})
    seen = list(old)
    taken = {}
    for joiner in joiners:
        seen.append(joiner)
        before = dict(active)
        active_step(seen, active, weight, scores)
        taken[joiner.name] = sum(1 for v in active if active[v] != before[v])
    _repair_standbys(members, active, standby, weight, scores)
    for joiner in joiners:
        seen = [*(m for m in members if m.name != joiner.name), joiner]
        budget = join_budget(seen, active, taken[joiner.name])
        spent = standby_step(seen, active, standby, weight, scores, budget)
        rebalance_standbys(seen, active, standby, weight, budget - spent)
    return in_order(members, systems, active, standby, scores)
