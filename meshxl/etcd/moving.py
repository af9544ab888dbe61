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

If the old key did change under a move, or the new shard holds another state (a writer
that did not follow the rule: a sidecar that had not yet taken the moving map), the
move is refused (:class:`~meshxl.errors.Conflict`) and the old key stays, so no
acknowledged write is dropped silently.

The copy keeps the session's expiry: its lease in the new shard ends when its lease in
the old one would have (rounded up to :data:`LEASE_STEP`), one lease per step shared by
the keys moved in it.
"""

from __future__ import annotations

import math
import time

import aetcd

from meshxl.errors import Conflict

__all__ = ["LEASE_STEP", "Mover"]

LEASE_STEP = 5.0
"""Copies whose leases end within one step share a lease in the new shard."""


class Mover:
    """Moves keys between etcd clusters; holds the leases it granted, by expiry step."""

    def __init__(self) -> None:
        self._source_leases: dict[tuple[int, int], tuple[float, float]] = {}
        """(source client, lease) -> (when read: monotonic, seconds it had left)."""
        self._target_leases: dict[tuple[int, int], int] = {}
        """(target client, expiry step) -> lease granted there."""
        self.moved = 0

    async def move(self, source: aetcd.Client, target: aetcd.Client, key: bytes) -> bool:
        """Move ``key`` from ``source`` to ``target`` (the module docstring): True if this
        call moved it, False if it was not (or no longer) in ``source``."""
        got = await source.get(key)
        if got is None:
            return False
        lease = await self._lease(source, target, got.lease)
        tx = target.transactions
        created, _ = await target.transaction(compare=[tx.version(key) == 0],
                                              success=[tx.put(key, got.value, lease)],
                                              failure=[])
        if not created:
            there = await target.get(key)
            if there is not None and there.value != got.value:
                raise Conflict(
                    f"session key {key.decode(errors='replace')[:200]} is in its old shard "
                    f"(revision {got.mod_revision}) and, different, in its new one "
                    f"(revision {there.mod_revision}): written on both sides by a sidecar "
                    "that had not taken the moving shard map; both stay for an operator "
                    "to choose")
        sx = source.transactions
        deleted, _ = await source.transaction(compare=[sx.mod(key) == got.mod_revision],
                                              success=[sx.delete(key)], failure=[])
        if deleted:
            self.moved += 1
            return True
        now = await source.get(key)
        if now is None:  # moved (or expired) meanwhile by someone else: the copy stands
            return False
        raise Conflict(f"session key {key.decode(errors='replace')[:200]} changed in its old "
                       f"shard while it moved (revision {got.mod_revision} -> "
                       f"{now.mod_revision}): a sidecar that has not taken the moving shard "
                       "map writes it; the key stays where it is")

    async def _lease(self, source: aetcd.Client, target: aetcd.Client, lease: int) -> int:
        """A lease of ``target`` that ends when ``lease`` of ``source`` does (0: none)."""
        if not lease:
            return 0
        now = time.monotonic()
        seen = self._source_leases.get((id(source), lease))
        if seen is None or now - seen[0] > LEASE_STEP:
            info = await source.get_lease_info(lease, keys=False)
            seen = self._source_leases[(id(source), lease)] = (now, float(info.TTL))
        left = seen[1] - (now - seen[0])
        if left <= 0:  # expiring now: the copy lives one step (it goes with its lease)
            left = 1.0
        step = math.ceil((time.time() + left) / LEASE_STEP)
        granted = self._target_leases.get((id(target), step))
        if granted is None:
            ttl = max(2, math.ceil(step * LEASE_STEP - time.time()))
            granted = (await target.lease(ttl)).id
            self._target_leases[(id(target), step)] = granted
            past = math.floor(time.time() / LEASE_STEP)
            for old in [k for k in self._target_leases if k[1] < past]:
                del self._target_leases[old]
        return granted
