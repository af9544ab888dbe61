"""Moving a session's key from one etcd cluster (shard) to another while it is served.

An online reshard (docs/scaling.md, "Online resharding") moves each session whose shard
changed, one key at a time, by :meth:`Mover.move`: the key is read in its old shard,
created in its new shard (only if absent there: a copy left by a move that stopped
half-way is the same state), then deleted from the old shard with a compare on the
revision copied. Everyone who serves sessions during a reshard follows one rule
(``meshxl.statesync.shards``): a moving session is in its old shard while the key is
there, and is moved before it is read or written; only once the old key is gone is the
new shard's copy written. So the old shard's key never changes during the move (it is
only copied, then deleted), the copy is exact, and nothing written is lost.

Every read and write of a move compares the map version fence of its shard
(:mod:`meshxl.etcd.fence`), so no move planned under a map that was replaced applies,
and no writer on an older map runs beside it. If the old key did change under a move
all the same, or the new shard holds another state, the move is refused
(:class:`~meshxl.errors.Conflict`) and the old key stays, so no acknowledged write is
dropped silently.

A shard is its etcd cluster: when the two shards of a move are one cluster (a shard
renamed), the key is already where it belongs, and the move does nothing, never a
delete (the copy *is* the key).

The copy keeps the session's expiry: its lease in the new shard ends when its lease in
the old one would have (rounded up to :data:`LEASE_STEP`), one lease per step shared by
the keys moved in it.
"""

from __future__ import annotations

import math
import time
import weakref

import aetcd
from aetcd import rpc

from meshxl.errors import Conflict

from .fence import cluster_hex, probe, under_fence

__all__ = ["LEASE_STEP", "Mover"]

LEASE_STEP = 5.0
"""Copies whose leases end within one step share a lease in the new shard."""


class Mover:
    """Moves keys between etcd clusters under one map version's fence (every read and
    write of a move compares the shards' fences: :mod:`meshxl.etcd.fence`); holds the
    leases it granted, by expiry step, and the cluster each client reaches."""

    def __init__(self, fence_key: bytes) -> None:
        self._fence_key = fence_key
        # By client (weakly: a client closed and collected is forgotten, never mistaken
        # for another made later).
        self._source_leases: weakref.WeakKeyDictionary[
            aetcd.Client, dict[int, tuple[float, float]]] = weakref.WeakKeyDictionary()
        """Source client -> its lease -> (when read: monotonic, seconds it had left)."""
        self._target_leases: weakref.WeakKeyDictionary[
            aetcd.Client, dict[int, int]] = weakref.WeakKeyDictionary()
        """Target client -> expiry step -> lease granted there."""
        self._clusters: weakref.WeakKeyDictionary[aetcd.Client, str] = \
            weakref.WeakKeyDictionary()
        """Client -> the etcd cluster it reaches (from an answer's header)."""
        self.moved = 0

    async def _cluster(self, client: aetcd.Client) -> str:
        known = self._clusters.get(client)
        if known is None:
            known = self._clusters[client] = (await probe(client, self._fence_key)).cluster_id
        return known

    async def move(self, source: aetcd.Client, target: aetcd.Client, key: bytes,
                   version: int, names: tuple[str, str] = ("", "")) -> bool:
        """Move ``key`` from ``source`` to ``target`` (the module docstring) under shard
        map ``version`` (``names``: the two shards', for messages): True if this call
        moved it, False if it was not (or no longer) in ``source``, or if ``source``
        and ``target`` are one etcd cluster: then the key is where it belongs, and is
        never deleted. :class:`~meshxl.etcd.fence.Fenced` once a newer map was stored."""
        fence = self._fence_key
        read = await under_fence(source, fence, version, [], [_get(key)], [], where=names[0])
        self._clusters[source] = cluster_hex(read.header.cluster_id)
        kvs = read.responses[0].response_range.kvs
        if not kvs:
            return False
        got = kvs[0]
        if await self._cluster(target) == self._clusters[source]:
            return False  # one cluster under two names: nothing to move, nothing to delete
        lease = await self._lease(source, target, got.lease)
        created = await under_fence(
            target, fence, version,
            [rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.VERSION, key=key,
                         version=0)],
            [rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=got.value, lease=lease))],
            [_get(key)], where=names[1])
        if not created.succeeded:
            there = created.responses[0].response_range.kvs
            if there and there[0].value != got.value:
                again = await under_fence(source, fence, version, [], [_get(key)], [],
                                          where=names[0])
                if not again.responses[0].response_range.kvs:
                    return False  # moved meanwhile by another (and written since): done
                raise Conflict(
                    f"session key {key.decode(errors='replace')[:200]} is in its old shard "
                    f"(revision {got.mod_revision}) and, different, in its new one "
                    f"(revision {there[0].mod_revision}): written on both sides; both stay "
                    "for an operator to choose")
        deleted = await under_fence(
            source, fence, version,
            [rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.MOD, key=key,
                         mod_revision=got.mod_revision)],
            [rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key))],
            [_get(key)], where=names[0])
        if deleted.succeeded:
            self.moved += 1
            return True
        now = deleted.responses[0].response_range.kvs
        if not now:  # moved (or expired) meanwhile by someone else: the copy stands
            return False
        raise Conflict(f"session key {key.decode(errors='replace')[:200]} changed in its old "
                       f"shard while it moved (revision {got.mod_revision} -> "
                       f"{now[0].mod_revision}); the key stays where it is")

    async def _lease(self, source: aetcd.Client, target: aetcd.Client, lease: int) -> int:
        """A lease of ``target`` that ends when ``lease`` of ``source`` does (0: none)."""
        if not lease:
            return 0
        now = time.monotonic()
        leases = self._source_leases.setdefault(source, {})
        seen = leases.get(lease)
        if seen is None or now - seen[0] > LEASE_STEP:
            info = await source.get_lease_info(lease, keys=False)
            seen = leases[lease] = (now, float(info.TTL))
        left = seen[1] - (now - seen[0])
        if left <= 0:  # expiring now: the copy lives one step (it goes with its lease)
            left = 1.0
        step = math.ceil((time.time() + left) / LEASE_STEP)
        steps = self._target_leases.setdefault(target, {})
        granted = steps.get(step)
        if granted is None:
            ttl = max(2, math.ceil(step * LEASE_STEP - time.time()))
            granted = (await target.lease(ttl)).id
            steps[step] = granted
            past = math.floor(time.time() / LEASE_STEP)
            for old in [k for k in steps if k < past]:
                del steps[old]
        return granted


def _get(key: bytes) -> rpc.RequestOp:
    return rpc.RequestOp(request_range=rpc.RangeRequest(key=key))
