"""A pool's live roles, from plain data: the members out of the placement and the
operator's priority lists applied to the base placement (:mod:`.placement`).

Used by :mod:`.vsls` (the control plane's placement, and a statesync sidecar's roles of
its virtual systems, :func:`~.vsls.vs_roles`), and by what reads plain data of a pool;
nothing here imports the model's declaration.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from .placement import PoolMember, VirtualRoles, live_placement, priority_placement
from .runtime import RuntimeState

__all__ = ["live_roles", "lost_members", "priority_lists", "unproven_members"]


def priority_lists(state: RuntimeState | None) -> dict[str, tuple[str, ...]]:
    """VS -> the operator's priority list (``meshxl vs priority``, ``vs move``): its
    :class:`~.records.PriorityList`'s order, or the key's member alone for a bare
    record. One a VS: etcd holds one key under a VS's ``preferred/``; should it hold
    more, the first by member name counts, on every replica alike."""
    if state is None or not state.preferred:
        return {}
    out: dict[str, tuple[str, ...]] = {}
    for (vs, member), action in sorted(state.preferred.items()):
        if vs not in out:
            out[vs] = getattr(action, "order", ()) or (member,)
    return out


def lost_members(pool: str, members: Sequence[PoolMember], registered: bool,
                 state: RuntimeState | None, systems: Iterable[str] = ()) -> dict[str, str]:
    """Pool members out of the placement, each with why: ``admin-down`` on the pool
    (``meshxl member down POOL MEMBER``), ``site-offline``, or, in a pool with
    ``membership: registered``, ``unregistered``: not proved live by the member itself.

    A member proves it with its pool-level key (``pools/POOL/members/MEMBER``) under a
    live lease: its own sidecar writes it with the pool's etcd credential, which no
    tenant holds (a tenant's role may write registrations under its own VS, leased by a
    lease it keeps alive itself). A member whose sidecar never wrote a pool key (no
    ``keyed`` mark: a sidecar older than the key, during an upgrade) is live while it
    has a registration under a live lease (ready or not) in any of ``systems``, the
    pool's virtual systems, until the pool is marked ``liveness`` (every listed member
    was keyed once: the upgrade is over). A registration etcd holds under no lease
    keeps no member live. ``members`` carry their sites with the pool's default
    applied."""
    if state is None:
        return {}
    down = state.members_down_of(pool)
    offline = state.sites_offline
    present: set[str] = set()
    if registered:
        present.update(state.pool_live_of(pool))
        keyed = state.pool_keyed_of(pool)
        for system in systems if pool not in state.pools_by_key else ():
            present.update(m for m in state.leased_registrations_of(system)
                           if m not in keyed)
    out = {}
    for m in members:
        if m.name in down:
            out[m.name] = "admin-down"
        elif m.site in offline:
            out[m.name] = "site-offline"
        elif registered and m.name not in present:
            out[m.name] = "unregistered"
    return out


def unproven_members(pool: str, state: RuntimeState | None,
                     systems: Iterable[str] = ()) -> frozenset[str]:
    """The members of ``pool`` live only by their VS registrations (:func:`lost_members`:
    sidecars older than the pool-level liveness key, during an upgrade), which a
    tenant's etcd credential can write too: what the control plane warns about."""
    if state is None or pool in state.pools_by_key:
        return frozenset()
    keyed = state.pool_keyed_of(pool)
    found: set[str] = set()
    for system in systems:
        found.update(m for m in state.leased_registrations_of(system) if m not in keyed)
    return frozenset(found)


def live_roles(base: Mapping[str, VirtualRoles], members: Sequence[PoolMember],
               lost: frozenset[str], state: RuntimeState | None
               ) -> tuple[dict[str, VirtualRoles], dict[str, tuple[str, ...]], dict[str, str]]:
    """The high-availability VSs' roles with ``lost`` members out and the operator's
    priority lists applied, the lists of this pool's VSs, and per listed VS the active
    its list gives it (the list's first live member, where one is live)."""
    roles = live_placement(base, members, lost)
    lists = {vs: order for vs, order in priority_lists(state).items() if vs in roles}
    chosen: dict[str, str] = {}
    if lists:
        roles = priority_placement(roles, [m for m in members if m.name not in lost], lists)
        for vs, order in lists.items():
            head = next((m for m in order if m in roles[vs].order), None)
            if head is not None:
                chosen[vs] = head
    return dict(roles), lists, chosen
