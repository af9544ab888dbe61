"""Where each virtual system's roles go on its pool (VSX VSLS), pure and deterministic.

Many virtual systems (tenants) share one pool of members. Each high-availability VS
has an active member, a standby on another member (on another site when the pool has
sites and a live member there), and ``backups`` more; the rest of the pool follows.

The steps are functions of the model, the pool's stored placement and the set of live
members only, so every control-plane replica and sidecar computes the same placement
and a recompilation never moves a role:

0. :func:`.sticky.sticky_placement`: the pool's stored base placement (``pools/POOL/placement``
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

try:  # hashlib's blake2b itself, without hashlib's OpenSSL (the sidecar places too)
    from _blake2 import blake2b
except ImportError:  # pragma: no cover - an interpreter built without it
    from hashlib import blake2b

__all__ = ["BALANCE", "PoolMember", "VirtualRoles", "active_shares", "active_step",
           "base_placement", "eligible", "in_order", "join_budget", "live_placement",
           "priority_placement", "rebalance_standbys", "score", "site_rule_broken",
           "standby_shares", "standby_step"]

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


def active_step(seen: Sequence[PoolMember], active: dict[str, str],
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


def standby_step(seen: Sequence[PoolMember], active: Mapping[str, str],
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
        active_step(seen, active, weight, scores)
        actives = sum(1 for v in active if active[v] != before[0][v])
        budget = join_budget(seen, active, actives)
        # What the site rule forces (the standby of a VS whose active moved to the
        # joiner's site) is not the join's to spend; the other standby moves are.
        spent = standby_step(seen, active, standby, weight, scores, budget)
        rebalance_standbys(seen, active, standby, weight, budget - spent)
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


def rebalance_standbys(seen: Sequence[PoolMember], active: Mapping[str, str],
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
    return in_order(members, systems, active, standby, scores)


def in_order(members: Sequence[PoolMember], systems: Sequence[tuple[str, int, int]],
             active: Mapping[str, str], standby: Mapping[str, str],
             scores: Mapping[tuple[str, str], float]) -> dict[str, VirtualRoles]:
    """Each VS's order from its active and standby: the rest of the pool after them, by
    its rendezvous score."""
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
