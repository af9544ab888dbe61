"""``meshxl shards``: the session shards' map in the main etcd cluster, shown and set.

Setting a list of shards first checks it whole, before anything is written: every
shard named answers within ``probe_timeout`` seconds, with its etcd cluster id (a
shard *is* its cluster: :mod:`meshxl.etcd.shards`), no two of the list are one
cluster, a name already in the map still reaches the cluster it did, and the list can
be reached from the stage the map is at (:func:`meshxl.etcd.shards.next_map`). Then it
counts, shard by shard, every session and where the new map puts it (``--dry-run``
stops there): with rendezvous hashing, adding a shard moves about 1/K of the sessions,
removing one moves only its own, renaming one moves only those the new name wins over
the others' (none when it is the only one).

New URLs of the same clusters are an update in place: nothing moves. Any other change
is an online reshard, under load:

1. the map is stored *moving* (its ``previous`` shards named) at the stage
   ``prepare``: every sidecar takes it within milliseconds (it watches the map) and
   says so in its registration; the sessions that move are read where they are, and
   their writes answer 503 meanwhile;
2. once every registered sidecar has (or the command stops, saying which have not,
   with nothing moved: run it again to go on, or go back), the map is stored at the
   stage ``move``: each session whose cluster changes is moved
   (:mod:`meshxl.etcd.moving`) by this command or by the first sidecar that serves it,
   whichever comes first; a moving session is always served from one shard;
3. the map is stored again without ``previous``: the sidecars close the shards it no
   longer names. A removed shard's etcd can go once that version is taken.

Right after it stores each version, the command raises the map version *fence* in
every shard of the old and the new map (:mod:`meshxl.etcd.fence`): from then on a
sidecar still on an older map, one cut off from the main cluster included, has every
read and write refused at the shard (503), never acknowledged where the map no longer
puts it.

Every stage can be resumed forwards or backwards: the same list again goes on; the
list the reshard started from goes back. From ``prepare`` (nothing moved yet) going
back stores the old map again; from ``move`` it is the reverse reshard by the same
stages, which needs every shard sessions may have moved into: one that does not
answer is named and nothing is written. The first map of an installation is set only
while no sidecar runs and no session is stored in the main cluster (sidecars that
started unsharded keep their sessions there): refused otherwise, nothing written.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aetcd

from meshxl.errors import Conflict, InputError, MeshxlError, Unavailable
from meshxl.etcd.fence import Fenced, Probe, probe, raise_fence
from meshxl.etcd.keys import MEMBERS, Keys
from meshxl.etcd.moving import Mover
from meshxl.etcd.shards import (
    BACK,
    FIRST,
    MOVE,
    PREPARE,
    Shard,
    ShardMap,
    Step,
    next_map,
    parse_shard_map,
    same_cluster,
)

__all__ = ["MAIN", "PROBE_TIMEOUT", "ShardPlan", "plan", "read_map", "same_shards", "set_map",
           "shard_clients", "waiting_sidecars"]

Progress = Callable[[str], None]
Connect = Callable[[str], Any]
"""``connect(urls)``: an etcd client (an async context manager); the commands give
theirs, so every shard is dialled with the main cluster's TLS and credential options."""

MAIN = "(main)"
"""Where sessions live while none is sharded: the main etcd cluster."""
PROBE_TIMEOUT = 5.0
"""Seconds a shard has to answer the checks before anything is written."""


async def read_map(client: aetcd.Client, keys: Keys) -> tuple[ShardMap | None, int]:
    """The stored map (None: sessions are not sharded) and its key's mod revision;
    InputError naming what is wrong with a stored map that cannot be used."""
    got = await client.get(keys.shards.encode())
    if got is None:
        return None, 0
    return parse_shard_map(got.value), got.mod_revision


@contextlib.asynccontextmanager
async def shard_clients(shards: Iterable[Shard], connect: Connect
                        ) -> AsyncIterator[dict[str, aetcd.Client]]:
    """An etcd client per shard, by name, all closed on leaving."""
    async with contextlib.AsyncExitStack() as stack:
        yield {shard.name: await stack.enter_async_context(connect(shard.etcd))
               for shard in shards}


@dataclass
class ShardPlan:
    """What a new map does to the sessions stored now."""

    sessions: int = 0
    moves: Counter[tuple[str, str]] = field(default_factory=Counter)
    """(from, to) -> sessions; only those whose cluster changes."""
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
    step: str = ""
    """What the command did (:class:`meshxl.etcd.shards.Step`)."""
    clusters: dict[str, str] = field(default_factory=dict)
    """Each shard of the list given: the etcd cluster id it answered with."""

    @property
    def moved(self) -> int:
        return sum(self.moves.values())

    def as_dict(self) -> dict[str, Any]:
        return {"sessions": self.sessions, "moved": self.moved,
                "moves": [{"from": a, "to": b, "sessions": n}
                          for (a, b), n in sorted(self.moves.items())],
                "per_shard": dict(sorted(self.per_shard.items())),
                "sidecars": self.sidecars, "moved_now": self.moved_now,
                "moved_by_sidecars": self.moved_before, "unchanged": self.unchanged,
                "step": self.step, "clusters": dict(sorted(self.clusters.items()))}


def same_shards(a: ShardMap, b: ShardMap) -> bool:
    """The same shards (names and URLs), in any order: placement is rendezvous hashing
    over the names, so the order of the list moves no session. Pure."""
    return (sorted((s.name, s.etcd) for s in a.shards)
            == sorted((s.name, s.etcd) for s in b.shards))


async def _session_ids(client: aetcd.Client, keys: Keys) -> list[tuple[str, str]]:
    """(cluster, session) of every session stored in one etcd cluster (keys only)."""
    prefix = f"{keys.base}/sessions/".encode()
    found = []
    for kv in await client.get_prefix(prefix, keys_only=True):
        cluster, _, session = kv.key[len(prefix):].decode().partition("/")
        found.append((cluster, session))
    return found


async def _sidecars(client: aetcd.Client, keys: Keys) -> list[str]:
    found = []
    for kv in await client.get_prefix(keys.clusters_prefix.encode(), keys_only=True):
        parsed = keys.parse_cluster_key(kv.key.decode())
        if parsed is not None and parsed[1] == MEMBERS:
            found.append(f"{parsed[0]}/{parsed[2]}")
    return found


async def plan(client: aetcd.Client, keys: Keys, new: ShardMap, connect: Connect,
               sources: Sequence[Shard] | None = None) -> ShardPlan:
    """Where ``new`` puts every stored session, and who runs now. ``sources``: the
    shards sessions are in now (by default the stored map's; none stored: the main
    cluster), each etcd cluster read once."""
    if sources is None:
        current, _ = await read_map(client, keys)
        sources = current.every if current is not None else None
    result = ShardPlan(sidecars=await _sidecars(client, keys))
    places: list[tuple[Shard | None, list[tuple[str, str]]]] = []
    if sources is None:
        places.append((None, await _session_ids(client, keys)))
    else:
        read: list[Shard] = []
        for shard in sources:
            if any(same_cluster(shard, other) for other in read):
                continue  # one cluster under two names (a rename): its sessions once
            read.append(shard)
            async with connect(shard.etcd) as shard_client:
                places.append((shard, await _session_ids(shard_client, keys)))
    for where, ids in places:
        for _, session in ids:
            target = new.of(session)
            result.sessions += 1
            result.per_shard[target.name] += 1
            if where is None or not same_cluster(where, target):
                result.moves[(where.name if where is not None else MAIN, target.name)] += 1
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
                ": no session was moved since; the map stays moving (sidecars check both "
                "shards): run the same command again to go on, or set the previous list "
                "to go back")
        progress(f"waiting for {len(behind)} sidecars to take shard map version {version}")
        await asyncio.sleep(0.5)


# -- the shards, asked before anything is written ------------------------------------------

async def _probe_all(shards: Iterable[Shard], connect: Connect, fence_key: bytes,
                     timeout: float) -> dict[tuple[str, str], Probe | Exception]:
    """Each shard's cluster id and fence, side by side, by (name, URLs): an answer, or
    why none came within ``timeout``."""
    async def one(shard: Shard) -> Probe | Exception:
        try:
            async with asyncio.timeout(timeout):
                async with connect(shard.etcd) as client:
                    return await probe(client, fence_key, timeout)
        except TimeoutError:
            return TimeoutError(f"no answer within {timeout:g} s")
        except Exception as exc:  # reported with the shard's name
            return exc

    wanted = list({(s.name, s.etcd): s for s in shards}.values())
    answers = await asyncio.gather(*(one(s) for s in wanted))
    return {(s.name, s.etcd): a for s, a in zip(wanted, answers, strict=True)}


def _why(exc: Exception) -> str:
    text = getattr(exc, "details", None)
    detail = text() if callable(text) else str(exc)
    return f"{type(exc).__name__}: {detail}"[:300]


def _with_ids(shards: Sequence[Shard], probes: dict[tuple[str, str], Probe | Exception]
              ) -> tuple[Shard, ...]:
    """``shards`` with the cluster ids their probes found where they had none."""
    out = []
    for shard in shards:
        found = probes.get((shard.name, shard.etcd))
        if not shard.cluster_id and isinstance(found, Probe):
            shard = dataclasses.replace(shard, cluster_id=found.cluster_id)
        out.append(shard)
    return tuple(out)


def _needed(step: Step, current: ShardMap | None, shard: Shard) -> str:
    """Why ``shard`` must answer for ``step`` (for the refusal when it does not)."""
    if current is not None and current.moving and (current.stage == MOVE or current.spread) \
            and any(s.name == shard.name for s in current.every):
        return (f"sessions may have moved into or out of it since the reshard under way "
                f"reached the stage move (map version {current.version}), and they move "
                "again only with it")
    if step.kind == BACK:
        return "the list to go back to names it"
    if any(s.name == shard.name for s in step.map.shards):
        return "the list given names it"
    return "its sessions move out of it"


async def _checked(client: aetcd.Client, keys: Keys, new: ShardMap, connect: Connect,
                   timeout: float) -> tuple[ShardMap | None, int, Step, ShardPlan]:
    """Everything ``set_map`` checks before it writes (the module docstring): the
    stored map, its revision, the step and the sessions' plan; InputError, Conflict or
    Unavailable naming the problem, with nothing written."""
    try:
        current, revision = await read_map(client, keys)
    except InputError as exc:
        raise Conflict(f"the stored shard map cannot be used ({exc}): sidecars serve the "
                       "last map they could; `meshxl shards show` prints it; store a "
                       "usable one in its place by hand, the shards sessions are in") \
            from None
    fence_key = keys.shard_fence.encode()
    involved = [*new.shards, *(current.every if current is not None else ())]
    probes = await _probe_all(involved, connect, fence_key, timeout)
    for shard in new.shards:
        found = probes[(shard.name, shard.etcd)]
        if isinstance(found, Exception):
            raise Unavailable(f"shard {shard.name} does not answer at {shard.etcd} "
                              f"({_why(found)}): nothing was written")
    given = _with_ids(new.shards, probes)
    if current is not None:
        current = dataclasses.replace(current, shards=_with_ids(current.shards, probes),
                                      previous=_with_ids(current.previous, probes))
    floor = max([p.fence for p in probes.values() if isinstance(p, Probe)], default=0)
    step = next_map(current, given, floor)
    for shard in step.map.every:
        answer = probes.get((shard.name, shard.etcd))
        if isinstance(answer, Exception):
            raise Unavailable(f"shard {shard.name} does not answer at {shard.etcd} "
                              f"({_why(answer)}), and {_needed(step, current, shard)}: "
                              "nothing was written; run again when it answers")
    if step.kind == FIRST:
        checked = await plan(client, keys, step.map, connect, sources=None)
    else:
        checked = await plan(client, keys, step.map, connect, sources=step.map.every)
    checked.step = step.kind
    checked.clusters = {s.name: s.cluster_id for s in given}
    return current, revision, step, checked


async def _raise_fences(shards: Iterable[Shard], version: int, connect: Connect,
                        fence_key: bytes, timeout: float, required: set[tuple[str, str]],
                        progress: Progress) -> None:
    """The fence of every shard of ``shards`` raised to ``version``; Unavailable if one
    of ``required`` (name, URLs) does not answer (the map is stored: running again
    raises it)."""
    async def one(shard: Shard) -> Exception | None:
        try:
            async with asyncio.timeout(timeout):
                async with connect(shard.etcd) as client:
                    await raise_fence(client, fence_key, version, timeout)
        except TimeoutError:
            return TimeoutError(f"no answer within {timeout:g} s")
        except Exception as exc:  # reported with the shard's name
            return exc
        return None

    wanted = list({(s.name, s.etcd): s for s in shards}.values())
    raised = {s.cluster_id for s in wanted if (s.name, s.etcd) in required and s.cluster_id}
    wanted = [s for s in wanted  # one cluster at its old URLs too: raised at its new ones
              if (s.name, s.etcd) in required or s.cluster_id not in raised]
    failed = [(s, e) for s, e in zip(wanted, await asyncio.gather(*(one(s) for s in wanted)),
                                     strict=True) if e is not None]
    for shard, error in failed:
        if (shard.name, shard.etcd) in required:
            raise Unavailable(
                f"shard map version {version} is stored, but the fence of shard "
                f"{shard.name} could not be raised ({_why(error)}): a sidecar still on an "
                "older map may write there; run the same command again when it answers")
        progress(f"shard {shard.name} does not answer ({_why(error)}): its fence stays "
                 "where it was (the map stored no longer names it)")


async def _migrate(keys: Keys, moving: ShardMap, connect: Connect, progress: Progress,
                   parallel: int = 32) -> tuple[int, int]:
    """Move every session whose shard changed to another cluster
    (:class:`meshxl.etcd.moving.Mover`, under the fence of ``moving``): the sessions
    moved by this call, and those found already moved (by a sidecar)."""
    prefix = f"{keys.base}/sessions/".encode()
    mover = Mover(keys.shard_fence.encode())
    moved = found_moved = 0
    async with shard_clients(moving.every, connect) as clients:
        for shard in moving.previous:
            source = clients[shard.name]
            work = []
            for kv in await source.get_prefix(prefix, keys_only=True):
                _, _, session = kv.key[len(prefix):].decode().partition("/")
                from_shard = moving.source_of(session)
                if from_shard is not None and from_shard.name == shard.name:
                    target = moving.of(session)
                    work.append((kv.key, clients[target.name], target.name))
            last = time.monotonic()
            for start in range(0, len(work), parallel):
                done = await asyncio.gather(*(
                    mover.move(source, target, key, moving.version, (shard.name, name))
                    for key, target, name in work[start:start + parallel]))
                moved += sum(done)
                found_moved += len(done) - sum(done)
                if time.monotonic() - last > 1.0:
                    last = time.monotonic()
                    progress(f"shard {shard.name}: {start + len(done)} of {len(work)} "
                             "sessions moved")
            progress(f"shard {shard.name}: {len(work)} sessions moved out")
    return moved, found_moved


async def set_map(client: aetcd.Client, keys: Keys, new: ShardMap, connect: Connect, *,
                  ack_timeout: float = 60.0, probe_timeout: float = PROBE_TIMEOUT,
                  dry_run: bool = False, progress: Progress = lambda line: None
                  ) -> tuple[ShardMap | None, ShardPlan]:
    """Store the list ``new`` (its shards) and move the sessions it moves (the module
    docstring); InputError, Conflict or Unavailable saying why not. ``dry_run``: check
    and count only (None for the map)."""
    current, revision = None, 0
    with contextlib.suppress(InputError):
        current, revision = await read_map(client, keys)
    if current is not None and not current.moving and same_shards(current, new):
        return current, ShardPlan(unchanged=True)  # run again (a Job): reads no shard
    current, revision, step, checked = await _checked(client, keys, new, connect,
                                                      probe_timeout)
    if dry_run:
        return None, checked
    if step.kind == FIRST:
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
    fence_key = keys.shard_fence.encode()
    # Every shard of the old and the new map. Those only in the old one that the next
    # map drops are asked too, but may not answer: nothing moved into them (going
    # back from, or away from, the stage prepare).
    also = [*step.map.every, *(current.every if current is not None else ())]

    async def fenced(stored: ShardMap) -> None:
        await _raise_fences([*stored.every, *also], stored.version, connect, fence_key,
                            probe_timeout, {(s.name, s.etcd) for s in stored.every},
                            progress)

    moving = step.map
    if step.store:
        revision = await _store(client, keys, moving, revision)
        progress(f"shard map version {moving.version} stored ({step.kind}): "
                 + (f"{', '.join(s.name for s in moving.previous)} -> " if moving.moving else "")
                 + ", ".join(moving.names))
    await fenced(moving)  # also when resumed: a run stopped before it may not have
    if not moving.moving:
        return moving, checked
    if current is not None and current.moving and not step.store:
        progress(f"going on with the reshard of map version {moving.version} "
                 f"({moving.stage})")
    try:
        if moving.stage == PREPARE:
            await _acknowledged(client, keys, moving.version, ack_timeout, progress)
            moving = dataclasses.replace(moving, version=moving.version + 1, stage=MOVE,
                                         spread=False)
            revision = await _store(client, keys, moving, revision)
            await fenced(moving)
            progress(f"shard map version {moving.version} stored: sessions move")
        await _acknowledged(client, keys, moving.version, ack_timeout, progress)
        checked.moved_now, checked.moved_before = await _migrate(keys, moving, connect,
                                                                 progress)
    except Fenced as exc:
        raise Conflict(f"the shard map changed while sessions moved ({exc}): show it and "
                       "run again") from None
    except MeshxlError:
        raise
    except Exception as exc:
        raise Unavailable(f"the reshard stays at map version {moving.version} "
                          f"({moving.stage}): {_why(exc)}; run the same command again to "
                          "go on, or set the previous list to go back") from None
    stable = ShardMap(moving.version + 1, moving.shards)
    await _store(client, keys, stable, revision)
    await fenced(stable)
    progress(f"shard map version {stable.version} stored: sessions in "
             f"{', '.join(stable.names)}")
    return stable, checked
