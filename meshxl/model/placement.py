"""Where each virtual system's roles go on its pool (VSX VSLS), pure and deterministic.

Many virtual systems (tenants) share one pool of members. Each high-availability VS
has an active member, a standby on another member (on another site when the pool has
sites and a live member there), and ``backups`` more; the rest of the pool follows.

The steps are functions of the model, the pool's stored placement and the set of live
members only, so every control-plane replica and sidecar computes the same placement
and a recompilation never moves a role:

0. :func:`sticky_placement`: the pool's stored base placement (``pools/POOL/placement``
   in etcd, written by the control plane) kept where the model allows it: adding or
   removing a VS moves no other VS's active; without a stored one, step 1.

1. :func:`base_placement`: the pool as listed, every member live, built member by member
   in the pool's order. The first member holds every active role; each next one takes
   its fair share of active roles (VS weight x its capacity / the capacity so far) from
   the members furthest above theirs, choosing the VSs whose rendezvous (HRW) score on
   it is highest, and at most ``BALANCE`` x that share; then its fair share of each
   active holder's standbys (standbys go to members on another site than their active's
   when there are any, else to any other member, in proportion to capacity), and what is
   left of the join's budget (:func:`join_budget`: at most ``BALANCE`` x its share of
   standbys, and with its active moves ``BALANCE`` x its ideal share of roles) moves
   single standbys towards the balance. So a member appended to the pool moves at most
   about its ideal share of roles (of the pool's weight), beyond the standbys the site
   rule sends across.
2. :func:`live_placement`: members lost (admin down, site offline) are taken out of
   each VS's order. A VS whose active was lost gets its standby as active; a VS whose
   standby was lost or promoted gets a new standby (another site first, then its HRW
   order). No other VS changes, and a member that comes back takes back exactly the
   roles it had.
3. :func:`priority_placement`: a VS the operator ordered (``meshxl vs priority``, ``vs
   move``) has its listed live members first, in the operator's order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

try:  # hashlib's blake2b itself, without hashlib's OpenSSL (the sidecar places too)
    from _blake2 import blake2b
except ImportError:  # pragma: no cover - an interpreter built without it
    from hashlib import blake2b

__all__ = ["BALANCE", "PoolMember", "VirtualRoles", "active_shares", "base_placement",
           "eligible", "live_placement", "priority_placement", "score", "site_rule_broken",
           "standby_shares", "sticky_placement", "StoredPlacement"]

BALANCE = 1.1
"""A member holds at most this times its fair share of active roles (when whole VSs
allow it: a share of 1.25 VSs is held as 1 or 2)."""


@dataclass(frozen=True)
class PoolMember:
    name: str
    site: str
    capacity: int
    """The member's weight: its share of the pool's active roles."""


@dataclass(frozen=True)
class VirtualRoles:
    """One VS's members in order: active, standby, backups, then the rest of the pool."""

    name: str
    order: tuple[str, ...]
    backups: int = 0

    @property
    def active(self) -> str | None:
        return self.order[0] if self.order else None

    @property
    def standby(self) -> str | None:
        return self.order[1] if len(self.order) > 1 else None

    @property
    def backup(self) -> tuple[str, ...]:
        return self.order[2:2 + self.backups]

    @property
    def spare(self) -> tuple[str, ...]:
        return self.order[2 + self.backups:]


def score(pool: str, vs: str, member: PoolMember) -> float:
    """Weighted rendezvous score: higher wins; a member of twice the capacity wins
    twice as many VSs. A stable hash (not Python's per-process ``hash``)."""
    digest = blake2b(f"{pool}\0{vs}\0{member.name}".encode(), digest_size=8).digest()
    unit = (int.from_bytes(digest, "big") + 0.5) / 2**64  # in (0, 1)
    return -member.capacity / math.log(unit)


def _take(new: str, held: dict[str, list[str]], load: dict[str, float],
          fair: Mapping[str, float], weight: Mapping[str, int]) -> list[tuple[str, str]]:
    """The new member takes from the members furthest above their fair share (``held``:
    each one's VSs sorted best-for-``new`` last) while that brings it nearer its own
    share than leaving it, and at most to ``BALANCE`` x its share (or half the lightest
    VS beyond it, what whole VSs need): a join moves at most that share of the pool's
    weight, the load it takes. Each donor's best VS first; when none of those fits (a
    heavy VS would take it past that bound), the next best ones. Returns (VS, donor)
    taken."""
    bound = max(BALANCE * fair[new], fair[new] + min(weight.values()) / 2) + 1e-9

    def fits(w: int) -> bool:
        after = load[new] + w
        return abs(after - fair[new]) < abs(load[new] - fair[new]) and after <= bound

    taken: list[tuple[str, str]] = []
    while True:
        donors = sorted((m for m in held if m != new and held[m]
                         and load[m] > fair[m] + 1e-9),
                        key=lambda m: (-load[m] / fair[m], m))
        picks = ((donor, vs) for deep in (False, True) for donor in donors
                 for vs in (reversed(held[donor]) if deep else held[donor][-1:]))
        pick = next(((donor, vs) for donor, vs in picks if fits(weight[vs])), None)
        if pick is None:
            return taken
        donor, vs = pick
        held[donor].remove(vs)
        load[donor] -= weight[vs]
        load[new] += weight[vs]
        taken.append((vs, donor))


def eligible(holder: str, seen: Sequence[PoolMember]) -> list[str]:
    """Where the standby of an active on ``holder`` may go: the other members on
    another site than its, or every other member when no other site has one."""
    site = next(m.site for m in seen if m.name == holder)
    others = [m for m in seen if m.name != holder]
    return [m.name for m in ([m for m in others if m.site != site] or others)]


def _active_step(seen: Sequence[PoolMember], active: dict[str, str],
                 weight: Mapping[str, int], scores: Mapping[tuple[str, str], float]) -> None:
    """The last member of ``seen`` takes its fair share of active roles."""
    new = seen[-1].name
    total = sum(weight.values())
    capacity = sum(m.capacity for m in seen)
    fair = {m.name: total * m.capacity / capacity for m in seen}
    load: dict[str, float] = dict.fromkeys(fair, 0)
    held: dict[str, list[str]] = {}
    for vs, member in active.items():
        held.setdefault(member, []).append(vs)
        load[member] += weight[vs]
    for vss in held.values():
        vss.sort(key=lambda v: (scores[(v, new)], v))  # best for `new` last
    for vs, _ in _take(new, held, load, fair, weight):
        active[vs] = new


def _standby_step(seen: Sequence[PoolMember], active: Mapping[str, str],
                  standby: dict[str, str], weight: Mapping[str, int],
                  scores: Mapping[tuple[str, str], float], budget: int) -> int:
    """Standbys after the last member of ``seen`` joined, group by group (the VSs of
    one active holder): a standby no longer allowed (on its new active's site, or the
    joiner opened a site the group must use) goes to the allowed member furthest below
    its fair share of standbys; then the joiner, where allowed, takes its share of the
    group's standbys from the members furthest above theirs, at most ``budget`` with the
    repairs of VSs whose active stayed. Nothing else moves. Returns those moves."""
    new = seen[-1].name
    capacity = {m.name: m.capacity for m in seen}
    groups: dict[str, list[str]] = {}
    for vs in sorted(active):
        groups.setdefault(active[vs], []).append(vs)
    allowed = {m.name: eligible(m.name, seen) for m in seen}
    share = dict.fromkeys(capacity, 0.0)  # each member's fair share of standbys
    for holder, vss in groups.items():
        room = sum(capacity[m] for m in allowed[holder])
        for m in allowed[holder]:
            share[m] += sum(weight[v] for v in vss) * capacity[m] / room
    held = dict.fromkeys(capacity, 0.0)
    repair = []
    for vs, holder in active.items():
        if standby.get(vs) in allowed[holder]:
            held[standby[vs]] += weight[vs]
        else:
            repair.append(vs)

    def ratio(m: str, extra: float = 0) -> float:
        return (held[m] + extra) / share[m] if share[m] else math.inf

    took: list[str] = []  # repairs of VSs whose active stayed count as taken
    for vs in sorted(repair, key=lambda v: (-weight[v], v)):
        if allowed[active[vs]]:
            if active[vs] != new and vs in standby:
                took.append(vs)
            best = min(allowed[active[vs]], key=lambda m: (ratio(m, weight[vs]), m))
            standby[vs] = best
            held[best] += weight[vs]
    carry = 0.0
    for holder in (m.name for m in seen):
        group = groups.get(holder)
        if not group or new not in allowed[holder]:
            continue
        fair = sum(weight[v] for v in group) * capacity[new] / sum(
            capacity[m] for m in allowed[holder])
        load = 0.0
        lists: dict[str, list[str]] = {}
        for vs in group:
            if standby[vs] == new:
                load += weight[vs]
            else:
                lists.setdefault(standby[vs], []).append(vs)
        for lst in lists.values():
            lst.sort(key=lambda v: (scores[(v, new)], v))  # best for `new` last
        while len(took) < budget:
            for donor in sorted((m for m in lists if lists[m] and held[m] > share[m] + 1e-9),
                                key=lambda m: (-ratio(m), m)):
                vs = lists[donor][-1]
                w = weight[vs]
                if abs(load + w - fair + carry) >= abs(load - fair + carry):
                    continue
                lists[donor].pop()
                standby[vs] = new
                took.append(vs)
                held[donor] -= w
                held[new] += w
                load += w
                break
            else:
                break
        carry += load - fair
    return len(took)


def _build(members: Sequence[PoolMember], weight: Mapping[str, int],
           scores: Mapping[tuple[str, str], float]) -> tuple[dict[str, str], dict[str, str]]:
    """Active and standby roles built member by member in the pool's order: the first
    member holds every active; each next one takes its fair share of active roles (the
    VSs that score best on it) from the members furthest above theirs, then its share of
    each group's standbys. So a member appended to the pool moves only the roles it
    takes (and the standbys the site rule sends across), and the result depends on the
    model alone."""
    active = dict.fromkeys(weight, members[0].name)
    standby: dict[str, str] = {}
    for k in range(1, len(members)):
        seen = members[:k + 1]
        before = dict(active), dict(standby)
        _active_step(seen, active, weight, scores)
        actives = sum(1 for v in active if active[v] != before[0][v])
        budget = join_budget(seen, active, actives)
        # What the site rule forces (the standby of a VS whose active moved to the
        # joiner's site) is not the join's to spend; the other standby moves are.
        spent = _standby_step(seen, active, standby, weight, scores, budget)
        _rebalance(seen, active, standby, weight, budget - spent)
    return active, standby


def join_budget(seen: Sequence[PoolMember], active: Mapping[str, str],
                actives: int = 0) -> int:
    """The standbys a join may move, beyond those the site rule sends across, after it
    moved ``actives`` active roles: ``BALANCE`` x the joiner's ideal share of roles (its
    fair share of active roles plus its fair share of standbys where the actives are),
    less the actives, and at most ``BALANCE`` x its fair share of standbys, in whole
    VSs (at least that share rounded, where the whole-roles total allows)."""
    new = seen[-1]
    fair = len(active) * new.capacity / sum(m.capacity for m in seen)
    placement = {v: VirtualRoles(v, (a,)) for v, a in active.items()}
    standbys = standby_shares(placement, seen, dict.fromkeys(active, 1))[new.name][1]
    alone = max(math.floor(standbys + 0.5 - 1e-9), math.floor(BALANCE * standbys + 1e-9))
    return max(0, min(alone, math.floor(BALANCE * (fair + standbys) + 1e-9) - actives))


def _rebalance(seen: Sequence[PoolMember], active: Mapping[str, str],
               standby: dict[str, str], weight: Mapping[str, int], budget: int) -> None:
    """Spend what is left of a join's budget on the standby balance: move one standby
    at a time from the member furthest above its fair share to the allowed member it
    overloads least, while that lowers the higher of the two ratios."""
    allowed = {m.name: eligible(m.name, seen) for m in seen}

    def ratio(held: float, fair: float) -> float:
        return held / fair if fair else math.inf * held

    for _ in range(max(budget, 0)):
        placement = {v: VirtualRoles(v, (a, standby[v])) for v, a in active.items()
                     if v in standby}
        shares = standby_shares(placement, seen, weight)
        held = {m: h for m, (h, _) in shares.items()}
        fair = {m: f for m, (_, f) in shares.items()}
        best: tuple[float, str, str] | None = None
        for over in sorted(held, key=lambda m: (-ratio(held[m], fair[m]), m)):
            if held[over] <= fair[over] + 1e-9:
                break
            for vs in sorted(v for v in placement if standby[v] == over):
                w = weight[vs]
                for to in allowed[active[vs]]:
                    if to == over or not fair[to]:
                        continue
                    after = max(ratio(held[over] - w, fair[over]), ratio(held[to] + w, fair[to]))
                    if after < ratio(held[over], fair[over]) - 1e-9 and (
                            best is None or (after, vs, to) < best):
                        best = (after, vs, to)
            if best is not None:
                break
        if best is None:
            return
        standby[best[1]] = best[2]


def base_placement(pool: str, members: Sequence[PoolMember],
                   systems: Sequence[tuple[str, int, int]]) -> dict[str, VirtualRoles]:
    """Every VS's order on the whole pool. ``systems``: (name, weight, backups)."""
    if not members or not systems:
        return {name: VirtualRoles(name, (), backups) for name, _, backups in systems}
    weight = {name: w for name, w, _ in systems}
    scores = {(vs, m.name): score(pool, vs, m) for vs in weight for m in members}
    active, standby = _build(members, weight, scores)
    out = {}
    for name, _, backups in systems:
        first = [m for m in (active.get(name), standby.get(name)) if m is not None]
        rest = sorted((m.name for m in members if m.name not in first),
                      key=lambda m: (-scores[(name, m)], m))
        out[name] = VirtualRoles(name, (*first, *rest), backups)
    return out


@dataclass(frozen=True)
class StoredPlacement:
    """A pool's base placement as stored (:func:`sticky_placement` reads it back)."""

    members: tuple[str, ...]
    """The pool's members when it was stored, in order."""
    roles: Mapping[str, tuple[str, str | None, int]]
    """VS -> (active, standby, the VS's weight when stored)."""

    def to_record(self) -> dict[str, Any]:
        """The JSON form stored in etcd."""
        return {"members": list(self.members),
                "roles": {vs: list(roles) for vs, roles in sorted(self.roles.items())}}

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> StoredPlacement:
        """The stored form back (:meth:`to_record`); ValueError on another shape."""
        members = data.get("members")
        roles = data.get("roles")
        if not isinstance(members, list) or not all(isinstance(m, str) and m
                                                    for m in members):
            raise ValueError("a stored placement's members must be a list of names")
        if not isinstance(roles, dict):
            raise ValueError("a stored placement's roles must be an object")
        out: dict[str, tuple[str, str | None, int]] = {}
        for vs, entry in roles.items():
            if not (isinstance(entry, list) and len(entry) == 3
                    and isinstance(entry[0], str) and entry[0]
                    and (entry[1] is None or isinstance(entry[1], str))
                    and isinstance(entry[2], int) and not isinstance(entry[2], bool)
                    and entry[2] > 0):
                raise ValueError(f"a stored placement's roles of {vs!r} must be "
                                 "[active, standby or null, weight above 0]")
            out[str(vs)] = (entry[0], entry[1], entry[2])
        return cls(tuple(members), out)

    @classmethod
    def of(cls, placed: Mapping[str, VirtualRoles], members: Sequence[PoolMember],
           systems: Sequence[tuple[str, int, int]]) -> StoredPlacement:
        weight = {name: w for name, w, _ in systems}
        return cls(tuple(m.name for m in members),
                   {vs: (r.active, r.standby, weight[vs]) for vs, r in sorted(placed.items())
                    if r.active is not None and vs in weight})


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
        _active_step(seen, active, weight, scores)
        taken[joiner.name] = sum(1 for v in active if active[v] != before[v])
    _repair_standbys(members, active, standby, weight, scores)
    for joiner in joiners:
        seen = [*(m for m in members if m.name != joiner.name), joiner]
        budget = join_budget(seen, active, taken[joiner.name])
        spent = _standby_step(seen, active, standby, weight, scores, budget)
        _rebalance(seen, active, standby, weight, budget - spent)
    out = {}
    for name, _, backups in systems:
        first = [m for m in (active.get(name), standby.get(name)) if m is not None]
        rest = sorted((m.name for m in members if m.name not in first),
                      key=lambda m: (-scores[(name, m)], m))
        out[name] = VirtualRoles(name, (*first, *rest), backups)
    return out


def live_placement(base: Mapping[str, VirtualRoles], members: Sequence[PoolMember],
                   lost: Iterable[str]) -> dict[str, VirtualRoles]:
    """The base placement with ``lost`` members taken out (see the module docstring):
    only the active roles of lost members move, each to its VS's standby."""
    gone = set(lost)
    if not gone:
        return dict(base)
    site = {m.name: m.site for m in members}
    out = {}
    for name, roles in base.items():
        order = [m for m in roles.order if m not in gone]
        if len(order) > 2 and (roles.standby in gone or roles.active in gone):
            # A new standby: the first member in order on another site than the active,
            # or the next in order when no other site has a live member.
            other = [m for m in order[1:] if site.get(m) != site.get(order[0])]
            pick = other[0] if other else order[1]
            order.remove(pick)
            order.insert(1, pick)
        out[name] = VirtualRoles(name, tuple(order), roles.backups)
    return out


def priority_placement(placement: Mapping[str, VirtualRoles],
                       members: Sequence[PoolMember],
                       lists: Mapping[str, Sequence[str]]) -> dict[str, VirtualRoles]:
    """Each VS in ``lists`` ordered by the operator's priority list (``meshxl vs
    priority``; ``vs move`` is the one-member list): its listed live members first, in
    the list's order (the first is the active, the next the standby, then backups),
    then its other members in the placement's order. ``members``: the live ones; a VS's
    order in ``placement`` holds only live members.

    The operator's order is honoured as written, the site rule too (a standby on the
    active's site while another site has a live member: :func:`site_rule_broken` names
    it). When only one listed member is live, the list names the active alone and the
    placement picks the standby as it always does: the first other member in its order
    on another site than the active's, else the first (its former active, when that one
    is elsewhere). A VS none of whose listed members is live keeps the placement's
    order; one whose active is already the list's only live member is not changed."""
    site = {m.name: m.site for m in members}
    out = dict(placement)
    for vs, listed in lists.items():
        roles = out.get(vs)
        if roles is None:
            continue
        head = [m for m in dict.fromkeys(listed) if m in roles.order]
        if not head or (len(head) == 1 and roles.active == head[0]):
            continue
        rest = [m for m in roles.order if m not in head]
        if len(head) == 1 and rest:
            away = [m for m in rest if site.get(m) != site.get(head[0])]
            pick = (away or rest)[0]
            rest.remove(pick)
            head.append(pick)
        out[vs] = VirtualRoles(vs, (*head, *rest), roles.backups)
    return out


def site_rule_broken(roles: VirtualRoles, members: Sequence[PoolMember]) -> bool:
    """Whether the VS's standby is on its active's site while another site has a live
    member (``members``: the live ones): what the placement never does, and what an
    operator's priority list may ask for."""
    if roles.active is None or roles.standby is None:
        return False
    site = {m.name: m.site for m in members}
    here = site.get(roles.active)
    return site.get(roles.standby) == here and any(
        m.site != here for m in members if m.name in roles.order)


def active_shares(placement: Mapping[str, VirtualRoles], members: Sequence[PoolMember],
                  weight: Mapping[str, int]) -> dict[str, tuple[int, float]]:
    """Per member: (active VS weight it holds, that as a multiple of its fair share)."""
    live = list(members)
    capacity = sum(m.capacity for m in live) or 1
    total = sum(weight[vs] for vs, r in placement.items() if r.active is not None)
    held = dict.fromkeys((m.name for m in live), 0)
    for vs, roles in placement.items():
        if roles.active in held:
            held[roles.active] += weight[vs]
    return {m.name: (held[m.name], held[m.name] / (total * m.capacity / capacity)
                     if total else 0.0) for m in live}


def standby_shares(placement: Mapping[str, VirtualRoles], members: Sequence[PoolMember],
                   weight: Mapping[str, int]) -> dict[str, tuple[int, float]]:
    """Per member: (standby VS weight it holds, its fair share of standbys). The fair
    share is what a member can hold given where the actives are: each active holder's
    VSs' standbys spread over the members allowed to take them (another site first, see
    :func:`eligible`) in proportion to capacity; with one site and equal capacities it
    is total weight / members."""
    held = dict.fromkeys((m.name for m in members), 0)
    fair = dict.fromkeys(held, 0.0)
    by_holder: dict[str, int] = {}
    for vs, roles in placement.items():
        if roles.standby in held:
            held[roles.standby] += weight[vs]
        if roles.active in held:
            by_holder[roles.active] = by_holder.get(roles.active, 0) + weight[vs]
    capacity = {m.name: m.capacity for m in members}
    for holder, w in by_holder.items():
        allowed = eligible(holder, members)
        room = sum(capacity[m] for m in allowed)
        for m in allowed:
            fair[m] += w * capacity[m] / room
    return {m: (held[m], fair[m]) for m in held}
