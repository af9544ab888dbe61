"""Pools and their virtual systems as the statesync sidecar reads them: enough to place
the virtual systems' roles as the control plane does (:mod:`.light_roles`).

Read leniently, as the rest of the light model: the control plane validated the model
before it was stored; a pool or entry it would refuse is left out here (its VSs then
have no roles on the sidecar, which holds only what it uses: slower takeovers, never
wrong answers).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .basics import DEFAULT_SITE, MODES, Mode
from .lax import Unfit, in_range
from .placement import PoolMember

__all__ = ["LightPool", "read_pools", "vs_settings"]

MAX_WEIGHT = 10_000
MAX_BACKUPS = 20


@dataclass(frozen=True, slots=True)
class LightPool:
    name: str
    members: tuple[PoolMember, ...]
    """In the model's order, each with its site (the pool's first site by default) and
    its weight (its capacity for active roles)."""
    registered: bool = False
    """``membership: registered``: a member is live only while registered in a VS."""


def _whole(data: Mapping[str, Any], key: str, low: int, high: int, default: int) -> int | None:
    """``data[key]`` read as the model reads an integer in ``low..high`` (``default``
    when absent), None when the control plane would refuse it."""
    if key not in data:
        return default
    try:
        return in_range(low, high)(data[key])
    except Unfit:
        return None


def _pool(data: Any) -> tuple[str, tuple[str, ...], LightPool | None] | None:
    """(name, member names, the pool for placement or None) of one pool entry."""
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) \
            or not isinstance(data.get("members"), list):
        return None
    listed = [m for m in data["members"] if isinstance(m, dict) and isinstance(m.get("name"), str)]
    names = tuple(m["name"] for m in listed)
    sites = data.get("sites") or []
    first = sites[0].get("name") if isinstance(sites, list) and sites \
        and isinstance(sites[0], dict) else DEFAULT_SITE
    members = []
    for m in listed:
        weight = _whole(m, "weight", 1, MAX_WEIGHT, 100)
        site = m.get("site") or first
        if weight is None or not isinstance(site, str):
            return data["name"], names, None
        members.append(PoolMember(m["name"], site, weight))
    if len(members) != len(data["members"]) or not isinstance(first, str):
        return data["name"], names, None
    return data["name"], names, LightPool(data["name"], tuple(members),
                                          data.get("membership") == "registered")


def read_pools(data: Any) -> tuple[tuple[tuple[str, tuple[str, ...]], ...],
                                   tuple[LightPool, ...]]:
    """Each pool's name and members' names (entries the control plane would refuse:
    out), and the pools complete enough to place virtual systems on."""
    names, placed = [], []
    for entry in data if isinstance(data, list) else []:
        read = _pool(entry)
        if read is not None:
            names.append(read[:2])
            if read[2] is not None:
                placed.append(read[2])
    return tuple(names), tuple(placed)


def vs_settings(entry: Mapping[str, Any]) -> tuple[Mode, int, int] | None:
    """A virtual systems entry's mode, weight and backups (None: refused by the model)."""
    mode = next((m for m in MODES if m == entry.get("mode", MODES[0])), None)
    weight = _whole(entry, "weight", 1, MAX_WEIGHT, 1)
    backups = _whole(entry, "backups", 0, MAX_BACKUPS, 0)
    if mode is None or weight is None or backups is None:
        return None
    return mode, weight, backups
