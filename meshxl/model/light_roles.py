"""Virtual systems' roles as the statesync sidecar places them.

A sidecar that holds only the sessions it uses (``sessions.replication: narrow``) must
hold every session of the virtual systems it stands by for, as the standby of a
high-availability cluster does: it takes them over at once when their active goes. So
it places the pool's virtual systems itself, from the light model (:mod:`.light_pools`)
and the runtime state it follows, with the control plane's own functions
(:mod:`.placement`, :mod:`.pool_roles`): the same model and state give the same roles on
both sides (``tests/unit/test_light_pools.py`` compares them). A pool the light reader
could not read whole places nothing: its sidecars hold only what they use (slower
takeovers, never wrong answers).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from .light import LightModel
from .light_pools import LightPool
from .placement import VirtualRoles
from .pool_roles import live_roles, lost_members
from .runtime import RuntimeState
from .sticky import StoredPlacement, sticky_placement

__all__ = ["pool_roles", "vs_roles"]


@lru_cache(maxsize=32)
def _base(pool: LightPool, systems: tuple[tuple[str, int, int], ...],
          stored: tuple[Any, ...] | None) -> Mapping[str, VirtualRoles]:
    previous = StoredPlacement(stored[0], dict(stored[1])) if stored else None
    return sticky_placement(pool.name, pool.members, list(systems), previous)


def _stored(state: RuntimeState | None, pool: str) -> tuple[Any, ...] | None:
    """The pool's stored placement (:attr:`RuntimeState.placements`) as a cache key."""
    found = state.placements.get(pool) if state is not None else None
    return (found.members, tuple(sorted(found.roles.items()))) if found else None


_LAST: list[tuple[LightModel, RuntimeState | None, str, Mapping[str, VirtualRoles]]] = []
"""The last pool placed, with the model and state it was placed for (held, so compared
by identity): the sidecar of a pool asks once per VS on every change of the mesh."""


def vs_roles(model: LightModel, state: RuntimeState | None, vs: str) -> VirtualRoles | None:
    """The roles of high-availability virtual system ``vs`` under ``state``, as the
    control plane places them (None: not such a VS, or its pool is not readable)."""
    entry = model.virtual_system(vs)
    if entry is None or entry.mode != "high-availability":
        return None
    for last_model, last_state, pool_name, roles in _LAST:
        if last_model is model and last_state is state and pool_name == entry.pool:
            return roles.get(vs)
    pool = next((p for p in model.placed_pools if p.name == entry.pool), None)
    if pool is None:
        return None
    roles = pool_roles(model, state, pool)
    _LAST[:] = [(model, state, pool.name, roles)]
    return roles.get(vs)


def pool_roles(model: LightModel, state: RuntimeState | None,
               pool: LightPool) -> Mapping[str, VirtualRoles]:
    """Every high-availability VS of ``pool`` placed under ``state`` (vsls.expand's)."""
    systems = tuple((v.name, v.weight, v.backups) for v in model.virtual_systems
                    if v.pool == pool.name and v.mode == "high-availability")
    base = _base(pool, systems, _stored(state, pool.name))
    names = [v.name for v in model.virtual_systems if v.pool == pool.name]
    lost = frozenset(lost_members(pool.name, pool.members, pool.registered, state, names))
    if len(lost) == len(pool.members):
        lost, state = frozenset(), None  # nothing live: every member stays listed
    return live_roles(base, pool.members, lost, state)[0]
