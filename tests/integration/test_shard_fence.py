"""The shard map version fence and the moves it guards, on real etcd servers.

* the session store compares the fence in the same transaction as every batch of
  writes and reads: a batch planned under a replaced map is refused whole (nothing
  applied) and the sidecar told; a batch of a newer version raises a lower (or
  missing) fence first; the fence is never lowered;
* a move between two names of one etcd cluster (a renamed shard) deletes nothing;
* a move planned under a replaced map is refused at the shard, nothing copied.
"""

from __future__ import annotations

from typing import Any

import aetcd
import pytest

from meshxl.etcd.fence import Fenced, probe, raise_fence
from meshxl.etcd.moving import Mover
from meshxl.etcd.shards import fence_value
from meshxl.statesync.store import Fencing, SessionStore, WriteResult
from tests.harness import EtcdServer
from tests.harness.etcd import start_etcd

pytestmark = pytest.mark.integration

FENCE = b"/meshxl/v1/shard-fence"
KEY = b"/meshxl/v1/sessions/shop/u1"


async def test_a_batch_carries_its_map_version_to_the_shard(etcd: EtcdServer,
                                                            etcd_client: aetcd.Client) -> None:
    planned = [1]
    told: list[int] = []
    store = SessionStore(etcd_client, ttl=60.0)
    store.fence(Fencing(FENCE, lambda: planned[0], told.append, "s1"))
    try:
        # No fence yet (a shard before fences): created by the first batch.
        [done] = await store.write([(KEY, b"one", 0)], 0)
        assert isinstance(done, WriteResult) and done.ok
        assert (await etcd_client.get(FENCE)).value == fence_value(1)
        assert await store.check(KEY) == done.revision

        # A newer map stored: the fence raised past the version the sidecar plans under.
        await raise_fence(etcd_client, FENCE, 3)
        [refused] = await store.write([(KEY, b"two", done.revision)], 0)
        assert isinstance(refused, Fenced) and refused.fence == 3, refused
        assert told == [3]
        assert (await etcd_client.get(KEY)).value == b"one"  # nothing applied
        with pytest.raises(Fenced):
            await store.check(KEY)
        with pytest.raises(Fenced):
            await store.transact([(KEY, b"two", done.revision)])

        # The sidecar on a newer map than the fence: raised first, then applied.
        planned[0] = 5
        [again] = await store.write([(KEY, b"three", done.revision)], 0)
        assert isinstance(again, WriteResult) and again.ok
        assert (await etcd_client.get(FENCE)).value == fence_value(5)
        assert (await etcd_client.get(KEY)).value == b"three"
        assert await raise_fence(etcd_client, FENCE, 4) == 5  # never lowered
        assert (await probe(etcd_client, FENCE)).fence == 5
    finally:
        await store.close()


async def test_a_move_within_one_cluster_deletes_nothing(etcd: EtcdServer) -> None:
    """Two clients of one etcd cluster, as a shard and its new name: the key is where
    it belongs; before shards were known by their clusters, the move's delete removed
    the only copy."""
    async with etcd.client() as old, etcd.client() as new:
        await old.put(KEY, b"state")
        assert await Mover(FENCE).move(old, new, KEY, 1, ("s1", "s9")) is False
        assert (await new.get(KEY)).value == b"state"


async def test_a_move_planned_under_a_replaced_map_is_refused(harness: Any,
                                                               etcd: EtcdServer) -> None:
    other = await start_etcd(harness, "shard-2")
    async with etcd.client() as old, other.client() as new:
        await old.put(KEY, b"state")
        await raise_fence(new, FENCE, 4)
        with pytest.raises(Fenced):
            await Mover(FENCE).move(old, new, KEY, 3)
        assert await new.get(KEY) is None and (await old.get(KEY)).value == b"state"
        assert await Mover(FENCE).move(old, new, KEY, 4) is True
        assert (await old.get(FENCE)).value == fence_value(4)  # raised on the way
