"""Where each virtual system's roles go on its pool (VSX VSLS), pure and deterministic.

Many virtual systems (tenants) share one pool of members. Each high-availability VS
has an active member, a standby on another member (on another site when the pool has
sites and a live member there), and ``backups`` more; the rest of the pool follows.

Two steps, both functions of the model and the set of live members only, so every
control-plane replica computes the same placement and a recompilation never moves a
role:

1. :func:`base_placement`: the pool as listed, every member live. Active roles go by
   weighted rendezvous hashing (HRW, a score per (VS, member) from a stable hash and the
   member's capacity) with bounded loads: all (VS, member) pairs are taken best score
   first, and a member takes active roles up to ``max(ceil(s), floor(1.1 s))`` of VS
   weight, ``s`` its fair share (total VS weight x its capacity / pool capacity).
   Standby roles are spread the same way over the members that are not the VS's active.
2. :func:`live_placement`: members lost (admin down, site offline) are taken out of
   each VS's order. A VS whose active was lost gets its standby as active; a VS whose
   standby was lost or promoted gets a new standby (another site first, then its HRW
   order). No other VS changes, and a member that comes back takes back exactly the
   roles it had.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["BALANCE", "PoolMember", "VirtualRoles", "base_placement", "live_placement",
           "active_shares", "score"]

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
    digest = hashlib.blake2b(f"{pool}\0{vs}\0{member.name}".encode(), digest_size=8).digest()
    unit = (int.from_bytes(digest, "big") + 0.5) / 2**64  # in (0, 1)
    return -member.capacity / math.log(unit)


def _caps(members: Sequence[PoolMember], total: int) -> dict[str, int]:
    capacity = sum(m.capacity for m in members)
    caps = {}
    for m in members:
        fair = total * m.capacity / capacity
        caps[m.name] = max(math.ceil(fair - 1e-9), math.floor(BALANCE * fair + 1e-9))
    return caps


def _bounded(pairs: list[tuple[float, str, str]], weight: Mapping[str, int],
             caps: Mapping[str, int], exclude: Mapping[str, set[str]],
             prefer: Mapping[str, set[str]]) -> dict[str, str]:
    """Best score first, each VS to a member with room (``caps`` in VS weight); a VS
    with a ``prefer`` set (members on another site) takes one of those whenever it has
    any, with room or not. A VS that finds no member with room goes where it overloads
    least."""
    load = dict.fromkeys(caps, 0)
    chosen: dict[str, str] = {}
    ranked = sorted(pairs, key=lambda p: (-p[0], p[1], p[2]))
    for _, vs, member in ranked:
        if vs in chosen or member in exclude.get(vs, ()):
            continue
        if prefer.get(vs) and member not in prefer[vs]:
            continue
        if load[member] + weight[vs] <= caps[member]:
            chosen[vs] = member
            load[member] += weight[vs]
    for vs in sorted(weight, key=lambda v: (-weight[v], v)):
        if vs in chosen:
            continue
        allowed = [m for m in caps if m not in exclude.get(vs, ())]
        if prefer.get(vs):
            allowed = [m for m in allowed if m in prefer[vs]] or allowed
        if not allowed:
            continue
        best = min(allowed, key=lambda m: ((load[m] + weight[vs]) / max(caps[m], 1), m))
        chosen[vs] = best
        load[best] += weight[vs]
    return chosen


def _actives(pool: str, members: Sequence[PoolMember], weight: Mapping[str, int],
             scores: Mapping[tuple[str, str], float]) -> dict[str, str]:
    """Active roles built member by member in the pool's order: the first member holds
    every VS, and each next member takes its fair share from the members furthest above
    theirs (the VSs that score best on it). So a member appended to the pool moves only
    the roles it takes, about its fair share, and the result depends on the model alone."""
    active = dict.fromkeys(weight, members[0].name)
    load = {members[0].name: sum(weight.values())}
    total = sum(weight.values())
    for k in range(1, len(members)):
        new = members[k]
        seen = members[:k + 1]
        capacity = sum(m.capacity for m in seen)
        fair = {m.name: total * m.capacity / capacity for m in seen}
        load[new.name] = 0
        held: dict[str, list[str]] = {}
        for vs, member in active.items():
            held.setdefault(member, []).append(vs)
        for vss in held.values():
            vss.sort(key=lambda v: (scores[(v, new.name)], v))  # best for `new` last
        while True:
            donors = sorted((m for m in held if held[m] and load[m] > fair[m] + 1e-9),
                            key=lambda m: (-load[m] / fair[m], m))
            moved = False
            for donor in donors:
                vs = held[donor][-1]
                w = weight[vs]
                # Take it when that brings the new member nearer its share than leaving it.
                if abs(load[new.name] + w - fair[new.name]) >= abs(load[new.name] - fair[new.name]):
                    continue
                held[donor].pop()
                active[vs] = new.name
                load[donor] -= w
                load[new.name] += w
                moved = True
                break
            if not moved:
                break
    return active


def base_placement(pool: str, members: Sequence[PoolMember],
                   systems: Sequence[tuple[str, int, int]]) -> dict[str, VirtualRoles]:
    """Every VS's order on the whole pool. ``systems``: (name, weight, backups)."""
    if not members or not systems:
        return {name: VirtualRoles(name, (), backups) for name, _, backups in systems}
    by_name = {m.name: m for m in members}
    sites = {m.site for m in members}
    weight = {name: w for name, w, _ in systems}
    total = sum(weight.values())
    scores = {(vs, m.name): score(pool, vs, m) for vs in weight for m in members}
    pairs = [(s, vs, m) for (vs, m), s in scores.items()]
    active = _actives(pool, members, weight, scores)
    exclude = {vs: {member} for vs, member in active.items()}
    prefer = {vs: {m.name for m in members if m.site != by_name[member].site}
              for vs, member in active.items()} if len(sites) > 1 else {}
    standby = _bounded([p for p in pairs if p[2] != active[p[1]]], weight,
                       _caps(members, total), exclude, prefer) if len(members) > 1 else {}
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
