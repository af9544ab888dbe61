"""``meshxl shards``: the session shards' map in the main etcd cluster, shown and set.

Setting a map first counts, shard by shard, every session of every cluster and where
the new map puts it (``--dry-run`` stops there): with rendezvous hashing, adding a
shard moves about 1/K of the sessions, removing one moves only its own. Sidecars read
the map when they start, and moving sessions between shards while they are served is
not built (docs/scaling.md): so a map is set only while no sidecar is registered, and
only when no session would move (a new installation, or shards added before sessions
exist). Anything else is refused, saying why; nothing is written then.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aetcd

from meshxl.errors import Conflict
from meshxl.etcd.keys import MEMBERS, Keys
from meshxl.etcd.shards import ShardMap, parse_shard_map, winner

__all__ = ["MAIN", "ShardPlan", "plan", "read_map", "set_map"]

MAIN = "(main)"
"""Where sessions live while none is sharded: the main etcd cluster."""


async def read_map(client: aetcd.Client, keys: Keys) -> tuple[ShardMap | None, int]:
    """The stored map (None: sessions are not sharded) and its key's mod revision."""
    got = await client.get(keys.shards.encode())
    if got is None:
        return None, 0
    return parse_shard_map(got.value), got.mod_revision


@dataclass
class ShardPlan:
    """What a new map does to the sessions stored now."""

    sessions: int = 0
    moves: Counter[tuple[str, str]] = field(default_factory=Counter)
    """(from, to) -> sessions; only those whose shard changes."""
    per_shard: Counter[str] = field(default_factory=Counter)
    """Sessions per shard of the new map."""
    sidecars: list[str] = field(default_factory=list)
    """Registered sidecars (cluster/member): they read the map only when they start."""

    @property
    def moved(self) -> int:
        return sum(self.moves.values())

    def as_dict(self) -> dict[str, Any]:
        return {"sessions": self.sessions, "moved": self.moved,
                "moves": [{"from": a, "to": b, "sessions": n}
                          for (a, b), n in sorted(self.moves.items())],
                "per_shard": dict(sorted(self.per_shard.items())),
                "sidecars": self.sidecars}


async def _session_ids(client: aetcd.Client, keys: Keys) -> list[tuple[str, str]]:
    """(cluster, session) of every session stored in one etcd cluster (keys only)."""
    prefix = f"{keys.base}/sessions/".encode()
    found = []
    for kv in await client.get_prefix(prefix, keys_only=True):
        cluster, _, session = kv.key[len(prefix):].decode().partition("/")
        found.append((cluster, session))
    return found


async def plan(client: aetcd.Client, keys: Keys, new: ShardMap,
               connect: Callable[[str], Any]) -> ShardPlan:
    """Where ``new`` puts every stored session, and who runs now. ``connect(urls)``: an
    etcd client (an async context manager) for a shard of the current map."""
    current, _ = await read_map(client, keys)
    result = ShardPlan()
    for kv in await client.get_prefix(keys.clusters_prefix.encode(), keys_only=True):
        parsed = keys.parse_cluster_key(kv.key.decode())
        if parsed is not None and parsed[1] == MEMBERS:
            result.sidecars.append(f"{parsed[0]}/{parsed[2]}")
    places: list[tuple[str, list[tuple[str, str]]]] = []
    if current is None:
        places.append((MAIN, await _session_ids(client, keys)))
    else:
        for shard in current.shards:
            async with connect(shard.etcd) as shard_client:
                places.append((shard.name, await _session_ids(shard_client, keys)))
    names = new.names
    for where, ids in places:
        for _, session in ids:
            target = winner(names, session)
            result.sessions += 1
            result.per_shard[target] += 1
            if target != where:
                result.moves[(where, target)] += 1
    return result


async def set_map(client: aetcd.Client, keys: Keys, new: ShardMap,
                  connect: Callable[[str], Any]) -> tuple[ShardMap, ShardPlan]:
    """Store ``new`` (its version one above the stored map's), or Conflict saying why
    not (the module docstring). Compared with the map read, so two operators never
    both set one."""
    current, revision = await read_map(client, keys)
    checked = await plan(client, keys, new, connect)
    reasons = []
    if checked.sidecars:
        reasons.append(f"{len(checked.sidecars)} sidecars are registered "
                       f"({', '.join(checked.sidecars[:5])}"
                       f"{', ...' if len(checked.sidecars) > 5 else ''}): they read the map "
                       "only when they start; stop them, set the map, start them")
    if checked.moved:
        reasons.append(f"{checked.moved} of {checked.sessions} sessions would move to "
                       "another shard, and moving sessions between shards is not built: "
                       "let them expire (or delete them) first, or keep the shards")
    if reasons:
        raise Conflict("; ".join(reasons))
    stored = ShardMap((current.version if current else 0) + 1, new.shards)
    tx, key = client.transactions, keys.shards.encode()
    compare = [tx.mod(key) == revision] if revision else [tx.version(key) == 0]
    ok, _ = await client.transaction(compare=compare, success=[tx.put(key, stored.encode())],
                                     failure=[])
    if not ok:
        raise Conflict("the shard map changed while it was being set: show it and try again")
    return stored, checked
