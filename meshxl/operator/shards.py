"""``meshxl shards``: the session shards' map in the main etcd cluster, shown and set.

Setting a map first counts, shard by shard, every session of every cluster and where
the new map puts it (``--dry-run`` stops there): with rendezvous hashing, adding a
shard moves about 1/K of the sessions, removing one moves only its own.

Changing the shards of a sharded installation is an online reshard, under load:

1. the map is stored *moving* (its ``previous`` shards named) at the stage
   ``prepare``: every sidecar takes it within a second (it reads the map every second)
   and says so in its registration; the sessions that move are read where they are,
   and their writes answer 503 meanwhile;
2. once every registered sidecar has (or the command stops, saying which have not,
   with nothing moved: run it again to go on), the map is stored at the stage
   ``move``: each session whose shard changed is moved (:mod:`meshxl.etcd.moving`) by
   this command or by the first sidecar that serves it, whichever comes first; a
   moving session is always served from one shard. No sidecar then still writes them
   where they were, which is what makes a move exact;
3. the map is stored again without ``previous``: the sidecars close the shards it no
   longer names. A removed shard's etcd can go once that version is taken.

An interrupted reshard (the command stopped) leaves the map moving and every session
served; the same command again finishes it. The first map of an installation is set
only while no sidecar runs and no session is stored in the main cluster (sidecars that
started unsharded keep their sessions there): refused otherwise, nothing written.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aetcd

from meshxl.errors import Conflict
from meshxl.etcd.keys import MEMBERS, Keys
from meshxl.etcd.moving import Mover
from meshxl.etcd.shards import MOVE, PREPARE, Shard, ShardMap, parse_shard_map, winner

__all__ = ["MAIN", "ShardPlan", "plan", "read_map", "same_shards", "set_map",
           "shard_clients", "waiting_sidecars"]

Progress = Callable[[str], None]

MAIN = "(main)"
"""Where sessions live while none is sharded: the main etcd cluster."""


async def read_map(client: aetcd.Client, keys: Keys) -> tuple[ShardMap | None, int]:
    """The stored map (None: sessions are not sharded) and its key's mod revision."""
    got = await client.get(keys.shards.encode())
    if got is None:
        return None, 0
    return parse_shard_map(got.value), got.mod_revision


@contextlib.asynccontextmanager
async def shard_clients(shards: Iterable[Shard], connect: Callable[[str], Any]
                        ) -> AsyncIterator[dict[str, aetcd.Client]]:
    """An etcd client per shard, by name, all closed on leaving. ``connect(urls)``: an
    etcd client (an async context manager); the commands give theirs, so every shard
    is dialled with the main cluster's TLS and credential options."""
    async with contextlib.AsyncExitStack() as stack:
        yield {shard.name: await stack.enter_async_context(connect(shard.etcd))
               for shard in shards}


@dataclass
class ShardPlan:
    """What a new map does to the sessions stored now."""

    sessions: int = 0
    moves: Counter[tuple[str, str]] = field(default_factory=Counter)
    """(from, to) -> sessions; only those whose shard changes."""
    per_shard: Counter[str] = field(default_factory=Counter)
    """Sessions per shard of the new map."""
    sidecars: list[str] = field(default_factory=list)
    """Registered sidecars (cluster/member)."""
    moved_now: int = 0
    """Sessions this reshard moved (the rest of :attr:`moved` went with their first
    access, by a sidecar, or expired meanwhile)."""
    moved_before: int = 0
    unchanged: bool = False
    """The map stored already places sessions on these shards: nothing was read,
    written or moved."""

    @property
    def moved(self) -> int:
        return sum(self.moves.values())

    def as_dict(self) -> dict[str, Any]:
        return {"sessions": self.sessions, "moved": self.moved,
                "moves": [{"from": a, "to": b, "sessions": n}
                          for (a, b), n in sorted(self.moves.items())],
                "per_shard": dict(sorted(self.per_shard.items())),
                "sidecars": self.sidecars, "moved_now": self.moved_now,
                "moved_by_sidecars": self.moved_before, "unchanged": self.unchanged}


def same_shards(a: ShardMap, b: ShardMap) -> bool:
    """The same shards (names and members), in any order: placement is rendezvous
    hashing over the names, so the order of the list moves no session. Pure."""
    return sorted(a.shards, key=lambda s: s.name) == sorted(b.shards, key=lambda s: s.name)


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
        for shard in current.every:
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


async def _store(client: aetcd.Client, keys: Keys, new: ShardMap, revision: int) -> int:
    """Put ``new`` if the map's key is still at ``revision`` (0: absent); its new
    revision, or Conflict (two operators never both set one)."""
    tx, key = client.transactions, keys.shards.encode()
    compare = [tx.mod(key) == revision] if revision else [tx.version(key) == 0]
    ok, _ = await client.transaction(compare=compare, success=[tx.put(key, new.encode())],
                                     failure=[])
    if not ok:
        raise Conflict("the shard map changed while it was being set: show it and try again")
    _, stored = await read_map(client, keys)
    return stored


async def waiting_sidecars(client: aetcd.Client, keys: Keys, version: int) -> list[str]:
    """Registered sidecars (cluster/member) whose registration does not yet say they
    serve shard map ``version`` or later."""
    behind = []
    for kv in await client.get_prefix(keys.clusters_prefix.encode()):
        parsed = keys.parse_cluster_key(kv.key.decode())
        if parsed is None or parsed[1] != MEMBERS:
            continue
        try:
            served = json.loads(kv.value).get("shard_map")
        except (ValueError, AttributeError):
            served = None
        if not isinstance(served, int) or served < version:
            behind.append(f"{parsed[0]}/{parsed[2]}")
    return behind


async def _acknowledged(client: aetcd.Client, keys: Keys, version: int, timeout: float,
                        progress: Progress) -> None:
    """Until every registered sidecar serves ``version`` (Conflict after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        behind = await waiting_sidecars(client, keys, version)
        if not behind:
            return
        if time.monotonic() > deadline:
            raise Conflict(
                f"{len(behind)} sidecars have not taken shard map version {version} within "
                f"{timeout:g} s ({', '.join(behind[:5])}{', ...' if len(behind) > 5 else ''})"
                ": no session was moved; the map stays moving (sidecars check both shards), "
                "run the same command again to go on")
        progress(f"waiting for {len(behind)} sidecars to take shard map version {version}")
        await asyncio.sleep(0.5)


async def _migrate(keys: Keys, moving: ShardMap, connect: Callable[[str], Any],
                   progress: Progress, parallel: int = 32) -> tuple[int, int]:
    """Move every session whose shard changed (:class:`meshxl.etcd.moving.Mover`): the
    sessions moved by this call, and those found already moved (by a sidecar)."""
    prefix = f"{keys.base}/sessions/".encode()
    mover = Mover()
    moved = found_moved = 0
    async with shard_clients(moving.every, connect) as clients:
        for shard in moving.previous:
            source = clients[shard.name]
            work = []
            for kv in await source.get_prefix(prefix, keys_only=True):
                _, _, session = kv.key[len(prefix):].decode().partition("/")
                from_shard = moving.source_of(session)
                if from_shard is not None and from_shard.name == shard.name:
                    work.append((kv.key, clients[moving.of(session).name]))
            last = time.monotonic()
            for start in range(0, len(work), parallel):
                done = await asyncio.gather(*(mover.move(source, target, key)
                                              for key, target in work[start:start + parallel]))
                moved += sum(done)
                found_moved += len(done) - sum(done)
                if time.monotonic() - last > 1.0:
                    last = time.monotonic()
                    progress(f"shard {shard.name}: {start + len(done)} of {len(work)} "
                             "sessions moved")
            progress(f"shard {shard.name}: {len(work)} sessions moved out")
    return moved, found_moved


async def set_map(client: aetcd.Client, keys: Keys, new: ShardMap,
                  connect: Callable[[str], Any], *, ack_timeout: float = 60.0,
                  progress: Progress = lambda line: None) -> tuple[ShardMap, ShardPlan]:
    """Store ``new`` and move the sessions it moves (the module docstring); Conflict
    saying why not. ``connect(urls)``: an etcd client (an async context manager)."""
    current, revision = await read_map(client, keys)
    if current is not None and not current.moving and same_shards(current, new):
        return current, ShardPlan(unchanged=True)  # run again (a Job): reads nothing
    checked = await plan(client, keys, new, connect)
    if current is None:
        reasons = []
        if checked.sidecars:
            reasons.append(
                f"{len(checked.sidecars)} sidecars are registered "
                f"({', '.join(checked.sidecars[:5])}{', ...' if len(checked.sidecars) > 5 else ''})"
                ": sidecars that started without shards keep their sessions in the main "
                "cluster; stop them, set the first map, start them")
        if checked.moved:
            reasons.append(f"{checked.moved} of {checked.sessions} sessions are stored in "
                           "the main cluster, and the first map moves none: let them expire "
                           "(or delete them) first")
        if reasons:
            raise Conflict("; ".join(reasons))
        stored = ShardMap(1, new.shards)
        await _store(client, keys, stored, 0)
        return stored, checked
    if current.moving:
        if not same_shards(current, new):
            raise Conflict(
                f"a reshard to {', '.join(current.names)} is under way (map version "
                f"{current.version}): run it again with those shards to finish it first")
        moving = current
        progress(f"going on with the reshard of map version {moving.version} "
                 f"({moving.stage})")
    else:
        moving = ShardMap(current.version + 1, new.shards, current.shards, PREPARE)
        revision = await _store(client, keys, moving, revision)
        progress(f"shard map version {moving.version} stored: {', '.join(current.names)} "
                 f"-> {', '.join(moving.names)}, writes of the sessions that move wait")
    if moving.stage == PREPARE:
        await _acknowledged(client, keys, moving.version, ack_timeout, progress)
        moving = dataclasses.replace(moving, version=moving.version + 1, stage=MOVE)
        revision = await _store(client, keys, moving, revision)
        progress(f"shard map version {moving.version} stored: sessions move")
    await _acknowledged(client, keys, moving.version, ack_timeout, progress)
    checked.moved_now, checked.moved_before = await _migrate(keys, moving, connect, progress)
    stable = ShardMap(moving.version + 1, new.shards)
    await _store(client, keys, stable, revision)
    progress(f"shard map version {stable.version} stored: sessions in "
             f"{', '.join(stable.names)}")
    return stable, checked
