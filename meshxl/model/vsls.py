"""Virtual systems compiled as clusters (VSX VSLS), pure.

Each virtual system of the model becomes an ordinary :class:`~.spec.ClusterSpec`, so
everything per cluster (priorities, failover, degradation, warm-up, statistics, the
operator views) applies per VS: its members are its pool's, each with an explicit EDS
priority from the placement (:mod:`.placement`): active 0, standby 1, backups 2, 3, ...,
then the rest of the pool by score, each on its own priority (they serve only when the
VS's active, standby and backups are all down, before the control plane has re-placed
it). The pool's sites are kept with one failover rank, so the placement, not the site
order, decides the tiers.

:func:`expand` runs when the model is validated (every pool member live);
:func:`placed` re-places for the runtime state (members admin down, sites offline,
unregistered in a ``membership: registered`` pool):
the xDS compiler and the operator views both call it, so they agree.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from msgspec.structs import force_setattr, replace

from .basics import DEFAULT_SITE
from .document import ModelSpec, Pool, VirtualSystem
from .placement import PoolMember, VirtualRoles, site_rule_broken
from .pool_roles import live_roles, lost_members, priority_lists, unproven_members
from .runtime import RuntimeState
from .spec import ClusterSpec, Route, SessionSync
from .sticky import StoredPlacement, sticky_placement

__all__ = ["PoolPlacement", "check_order", "check_priority", "expand", "expand_model",
           "lost_reasons", "placed", "placement_of", "pool_members", "pool_shares",
           "pool_systems", "priority_lists", "sessions_of", "site_rule_warnings",
           "stored_placements", "system_named", "unproven_warnings", "virtual_systems",
           "vs_roles"]


def virtual_systems(model: ModelSpec) -> Iterator[tuple[str, VirtualSystem, Pool]]:
    """(name, entry, pool) of every virtual system that is compiled: its pool exists and
    its name is not already a cluster's or an earlier VS's (check_model names those)."""
    taken = {c.name for c in model.clusters if c.name not in _expanded(model)}
    for vs in model.virtual_systems:
        pool = model.pool(vs.pool)
        if pool is None:
            continue
        for name in vs.all_names:
            if name in taken:
                continue
            taken.add(name)
            yield name, vs, pool


def system_named(model: ModelSpec, name: str) -> tuple[VirtualSystem, Pool] | None:
    """The entry and pool of the virtual system compiled as ``name`` (None: none is)."""
    by_name: dict[str, tuple[VirtualSystem, Pool]] | None = model._vsls.get("by_name")
    if by_name is None:
        by_name = {n: (vs, pool) for n, vs, pool in virtual_systems(model)}
        model._vsls["by_name"] = by_name
    return by_name.get(name)


def sessions_of(model: ModelSpec, name: str) -> SessionSync | None:
    """The ``sessions`` settings of cluster or virtual system ``name`` (None: neither is
    in the model), expanded or not (a statesync sidecar reads the model unexpanded)."""
    spec = model.cluster(name)
    if spec is not None:
        return spec.sessions
    found = system_named(model, name)
    return found[0].sessions if found is not None else None


def pool_systems(model: ModelSpec, pool: str) -> tuple[str, ...]:
    """The names of the virtual systems compiled on ``pool``, in the model's order."""
    found = model.pool(pool)
    return _systems_of(model, found) if found is not None else ()


def _expanded(model: ModelSpec) -> frozenset[str]:
    names: frozenset[str] | None = model._vsls.get("names")
    return names if names is not None else frozenset()


def pool_members(pool: Pool) -> list[PoolMember]:
    default = pool.sites[0].name if pool.sites else DEFAULT_SITE
    return [PoolMember(m.name, m.site or default, m.weight) for m in pool.members]


@dataclass(frozen=True)
class PoolPlacement:
    """One pool's placement under a runtime state."""

    pool: str
    members: tuple[PoolMember, ...]
    lost: frozenset[str]
    roles: Mapping[str, VirtualRoles]
    """High-availability VSs only (a load-sharing VS is served by every member)."""
    weights: Mapping[str, int]
    preferred: Mapping[str, str] = field(default_factory=dict)
    """VS -> the active its operator's priority list gives it (``meshxl vs priority``,
    ``vs move``): the list's first live member, where one is live."""
    listed: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """VS -> its operator's priority list, as stored (applied or not)."""
    why: Mapping[str, str] = field(default_factory=dict)
    """Lost member -> why (:func:`lost_reasons`)."""


def _stored_key(model: ModelSpec, state: RuntimeState | None) -> tuple[Any, ...]:
    """The stored placements (:attr:`RuntimeState.placements`) of the model's pools, as
    a key: () when there are none."""
    if state is None or not state.placements:
        return ()
    return tuple((name, stored.members, tuple(sorted(stored.roles.items())))
                 for name, stored in sorted(state.placements.items())
                 if model.pool(name) is not None)


def _base(model: ModelSpec, state: RuntimeState | None = None
          ) -> dict[str, dict[str, VirtualRoles]]:
    """Every pool's base placement: the stored one kept where the model allows it
    (:func:`.placement.sticky_placement`), the stateless one where none is stored."""
    origin: ModelSpec = model._vsls.get("origin", model)
    key = _stored_key(origin, state)
    cache: dict[tuple[Any, ...], dict[str, dict[str, VirtualRoles]]] = origin._vsls.setdefault(
        "bases", {})
    cached = cache.get(key)
    if cached is not None:
        return cached
    systems: dict[str, list[tuple[str, int, int]]] = {}
    for name, vs, pool in virtual_systems(origin):
        if vs.mode == "high-availability":
            systems.setdefault(pool.name, []).append((name, vs.weight, vs.backups))
    stored = state.placements if state is not None and key else {}
    base = {pool.name: sticky_placement(pool.name, pool_members(pool),
                                        systems.get(pool.name, []), stored.get(pool.name))
            for pool in origin.pools}
    if len(cache) > 8:
        cache.clear()
    cache[key] = base
    return base


def stored_placements(model: ModelSpec, state: RuntimeState | None
                      ) -> dict[str, StoredPlacement]:
    """Pool -> its base placement under ``state`` in the form stored in etcd, for the
    pools whose stored placement (if any) differs from it: what the control plane
    writes (``pools/POOL/placement``) so that the next placement keeps it."""
    origin: ModelSpec = model._vsls.get("origin", model)
    base = _base(origin, state)
    have = state.placements if state is not None else {}
    out = {}
    for pool in origin.pools:
        systems = [(name, vs.weight, vs.backups) for name, vs, p in virtual_systems(origin)
                   if p is pool and vs.mode == "high-availability"]
        if not systems:
            continue
        record = StoredPlacement.of(base.get(pool.name, {}), pool_members(pool), systems)
        if have.get(pool.name) != record:
            out[pool.name] = record
    return out


def lost_reasons(pool: Pool, state: RuntimeState | None,
                 clusters: Iterable[str] = ()) -> dict[str, str]:
    """Pool members out of the placement, each with why (:func:`.pool_roles.
    lost_members`): ``admin-down``, ``site-offline`` or ``unregistered``, this last in
    a pool with ``membership: registered`` whose member holds no registration in any of
    ``clusters``, the pool's virtual systems."""
    return lost_members(pool.name, pool_members(pool), pool.membership == "registered",
                        state, clusters)


def unproven_warnings(model: ModelSpec, state: RuntimeState | None) -> dict[str, str]:
    """Pool -> a warning for each ``membership: registered`` pool with members live only
    by their VS registrations (:func:`.pool_roles.unproven_members`)."""
    out = {}
    for pool in model.pools:
        if pool.membership != "registered":
            continue
        found = unproven_members(pool.name, state, _systems_of(model, pool))
        if found:
            out[pool.name] = (
                f"pool {pool.name}: member(s) {', '.join(sorted(found))} live only by "
                "their virtual systems' registrations (sidecars older than the pool "
                "liveness key), which a tenant's etcd credential can write too: upgrade "
                "their sidecars (docs/vsls.md, \"Registered membership\")")
    return out


def _lost(model: ModelSpec, pool: Pool, state: RuntimeState | None) -> frozenset[str]:
    """Pool members out of the placement (:func:`lost_reasons`)."""
    if state is None:
        return frozenset()
    names = _systems_of(model, pool) if pool.membership == "registered" else ()
    return frozenset(lost_reasons(pool, state, names))


def _systems_of(model: ModelSpec, pool: Pool) -> tuple[str, ...]:
    """The names of the pool's virtual systems (cached on the model as loaded)."""
    origin: ModelSpec = model._vsls.get("origin", model)
    cache: dict[str, tuple[str, ...]] | None = origin._vsls.get("systems")
    if cache is None:
        cache = {}
        for name, _, p in virtual_systems(origin):
            cache.setdefault(p.name, ())
            cache[p.name] += (name,)
        origin._vsls["systems"] = cache
    return cache.get(pool.name, ())


def check_order(order: Iterable[str]) -> tuple[str, ...]:
    """A priority list as given: at least one member, none twice (ValueError, one line)."""
    names = tuple(order)
    if not names:
        raise ValueError("give at least one MEMBER, the virtual system's active first")
    twice = sorted({m for m in names if names.count(m) > 1})
    if twice:
        raise ValueError(f"member {twice[0]!r} is listed twice (each member once, in order)")
    return names


def check_priority(model: ModelSpec, vs: str, order: Iterable[str] | None
                   ) -> tuple[VirtualSystem, Pool, tuple[str, ...]]:
    """A VS's priority list against the model (``meshxl vs priority``, ``vs move``): the
    VS, its pool and the list; ValueError with a one-line message for an unknown VS, a
    load-sharing one, an empty list, a member listed twice or not in the VS's pool.
    ``order`` None (``--clear``): the VS alone is checked."""
    found = {name: (spec, pool) for name, spec, pool in virtual_systems(model)}
    if vs not in found:
        known = sorted(found)
        shown = ", ".join(known[:10]) + (f", ... ({len(known)} in all)"
                                          if len(known) > 10 else "")
        raise ValueError(f"unknown virtual system {vs!r} (virtual systems: {shown or 'none'})")
    spec, pool = found[vs]
    if order is None:
        return spec, pool, ()
    names = check_order(order)
    if spec.mode != "high-availability":
        raise ValueError(f"virtual system {vs!r} is {spec.mode}: every member serves it, "
                         "it has no active or priority list")
    members = [m.name for m in pool.members]
    unknown = [m for m in names if m not in members]
    if unknown:
        raise ValueError(f"unknown member {unknown[0]!r} in pool {pool.name!r} of virtual "
                         f"system {vs!r} (members: {', '.join(members)})")
    return spec, pool, names


def placement_of(model: ModelSpec, pool: Pool,
                 state: RuntimeState | None = None, whole: bool = False) -> PoolPlacement:
    """The pool placed under ``state``; ``whole``: its base placement alone (every
    member listed, no priority list), the one kept when nothing is live."""
    members = pool_members(pool)
    why = {} if whole else lost_reasons(pool, state, _systems_of(model, pool))
    lost = frozenset(why)
    base = _base(model, state).get(pool.name, {})
    roles, lists, chosen = live_roles(base, members, lost, None if whole else state)
    weights = {name: vs.weight for name, vs, p in virtual_systems(model) if p is pool}
    return PoolPlacement(pool.name, tuple(members), lost, roles, weights, chosen,
                         listed=lists, why=why)


def pool_shares(placement: PoolPlacement) -> dict[str, tuple[int, int, int, float]]:
    """Per pool member: the active roles it holds, its standby roles, the active VS
    weight it holds, and its fair share of that weight (total x its capacity / the
    live members' capacity; 0 while it is out of the placement)."""
    live = [m for m in placement.members if m.name not in placement.lost]
    capacity = sum(m.capacity for m in live) or 1
    total = sum(placement.weights[vs] for vs, r in placement.roles.items()
                if r.active is not None)
    active: dict[str, list[str]] = {}
    standby: dict[str, int] = {}
    for vs, roles in placement.roles.items():
        if roles.active is not None:
            active.setdefault(roles.active, []).append(vs)
        if roles.standby is not None:
            standby[roles.standby] = standby.get(roles.standby, 0) + 1
    return {m.name: (len(active.get(m.name, ())), standby.get(m.name, 0),
                     sum(placement.weights[vs] for vs in active.get(m.name, ())),
                     0.0 if m.name in placement.lost else total * m.capacity / capacity)
            for m in placement.members}


def _cluster(name: str, vs: VirtualSystem, pool: Pool,
             roles: VirtualRoles | None, lost: frozenset[str]) -> ClusterSpec:
    if roles is not None:
        # One member per priority, the rest of the pool too (by score): every tier
        # holds one member, so the cluster is placed by tier and a retry moves on to
        # the next tier (meshxl.xds.resources.placed_by_tier).
        priority = {m: i for i, m in enumerate(roles.order)}
    else:
        priority = {}
    members = [replace(m, priority=priority.get(m.name, 0))
               for m in pool.members if m.name not in lost]
    members.sort(key=lambda m: (m.priority or 0, roles.order.index(m.name) if roles else 0))
    sites = [replace(s, failover_rank=0) for s in pool.sites]
    return ClusterSpec(
        name=name, mode=vs.mode, members=members, sites=sites,
        stickiness=vs.stickiness, sessions=vs.sessions, degradation=vs.degradation,
        health_check=pool.health_check, listener=pool.listener,
        route=Route(domains=vs.domains_of(name)))


def _placement(model: ModelSpec, pool: Pool, state: RuntimeState | None) -> PoolPlacement:
    """The pool's placement as its virtual systems' clusters get it: with nothing live,
    every member stays listed (the base placement)."""
    placement = placement_of(model, pool, state)
    if len(placement.lost) == len(pool.members):
        placement = placement_of(model, pool, state, whole=True)
    return placement


_LAST: list[tuple[ModelSpec, RuntimeState | None, str, PoolPlacement]] = []
"""The last pool placed by :func:`vs_roles`, with the model and state it was placed for
(held, so compared by identity): a sidecar of a pool asks once per VS on every change of
the mesh."""


def vs_roles(model: ModelSpec, state: RuntimeState | None, vs: str) -> VirtualRoles | None:
    """The roles of high-availability virtual system ``vs`` under ``state``, as its
    cluster's EDS priorities place them (None: not such a VS). What a statesync sidecar
    asks: a narrow one holds every session of the VSs it stands by for."""
    found = system_named(model, vs)
    if found is None or found[0].mode != "high-availability":
        return None
    pool = found[1]
    for last_model, last_state, name, placement in _LAST:
        if last_model is model and last_state is state and name == pool.name:
            return placement.roles.get(vs)
    placement = _placement(model, pool, state)
    _LAST[:] = [(model, state, pool.name, placement)]
    return placement.roles.get(vs)


def expand(model: ModelSpec, state: RuntimeState | None = None) -> list[ClusterSpec]:
    """The clusters of the model's virtual systems (placed for ``state``)."""
    placements = {p.name: _placement(model, p, state) for p in model.pools}
    out = []
    for name, vs, pool in virtual_systems(model):
        placement = placements[pool.name]
        out.append(_cluster(name, vs, pool, placement.roles.get(name), placement.lost))
    if state is None:
        model._vsls["names"] = frozenset(c.name for c in out)
    return out


def expand_model(model: ModelSpec) -> ModelSpec:
    """Append the virtual systems' clusters to the model's (in place, once, when the
    model is loaded: :func:`meshxl.model.load.parse_model`). Virtual systems with an
    unknown pool or a taken name are left out: check_model names them."""
    if model.virtual_systems and "names" not in model._vsls:
        force_setattr(model, "clusters", [*model.clusters, *expand(model)])
    return model


def placed(model: ModelSpec, state: RuntimeState | None) -> ModelSpec:
    """The model with its virtual systems placed for ``state``: the same object when
    no pool member is lost and no priority list set by the operator, else one copy per
    distinct set of lost members and priority lists (cached on the model, so a
    recompilation with the same state reuses it)."""
    if not model.virtual_systems or state is None:
        return model
    lost = tuple(sorted((p.name, m) for p in model.pools for m in _lost(model, p, state)))
    origin: ModelSpec = model._vsls.get("origin", model)
    # The stored placement counts where it places otherwise than the stateless one.
    stored = _stored_key(origin, state) if _base(origin, state) != _base(origin) else ()
    key = (lost, tuple(sorted(priority_lists(state).items())), stored)
    if model._vsls.get("key", ((), (), ())) == key:
        return model
    model = origin
    if key == ((), (), ()):
        return model
    cache: dict[tuple[Any, ...], ModelSpec] = model._vsls.setdefault("placed", {})
    found = cache.get(key)
    if found is None:
        virtual = _expanded(model)
        clusters = [c for c in model.clusters if c.name not in virtual]
        found = replace(model, clusters=[*clusters, *expand(model, state)])
        force_setattr(found, "_vsls", {"names": virtual, "key": key, "origin": model})
        if len(cache) > 64:
            cache.clear()
        cache[key] = found
    return found


def site_rule_warnings(model: ModelSpec, state: RuntimeState | None) -> list[str]:
    """Virtual systems whose operator's priority list puts the standby on the active's
    site while another site has a live member (the list is honoured; the placement
    never does this of its own), one line each."""
    out = []
    for pool in model.pools:
        placement = placement_of(model, pool, state)
        live = [m for m in placement.members if m.name not in placement.lost]
        site = {m.name: m.site for m in live}
        for vs in sorted(placement.listed):
            roles = placement.roles[vs]
            if roles.standby is not None and site_rule_broken(roles, live):
                out.append(f"virtual system {vs}: its priority list puts the standby "
                           f"{roles.standby} on site {site[roles.standby]} with its active "
                           f"{roles.active}, while another site has a live member (meshxl "
                           f"vs priority {vs} ... to change it)")
    return out
