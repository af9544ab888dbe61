"""The shard map version fence and the moves it guards, on real etcd servers.

* the session store compares the fence in the same transaction as every batch of
  writes and reads: a batch planned under a replaced map is refused whole (nothing
  applied) and the sidecar told; a batch of a newer version raises a lower (or
  missing) fence first; the fence is never lowered;
* a move between two names of one etcd cluster (a renamed shard) deletes nothing;
* a move raced by another mover that finished first, and a write since, is no
  conflict: the first mover's copy stands;
* a move planned under a replaced map is refused at the shard, nothing copied.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import aetcd
import pytest
from aetcd import rpc

from meshxl.etcd.fence import Fenced, probe, raise_fence, under_fence
from meshxl.etcd.moving import Mover
from meshxl.etcd.shards import fence_value
from meshxl.statesync.store import Fencing, SessionStore, WriteResult
from meshxl.statesync.txns import transact
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
            await transact(store, [(KEY, b"two", done.revision)])

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


class _ThenRun:
    """An etcd client whose first transaction's answer is held until ``hook`` ran: the
    window between a mover's read of the old shard and its copy."""

    def __init__(self, client: aetcd.Client, hook: Callable[[], Awaitable[None]]) -> None:
        self._client, self._hook = client, hook
        self.metadata, self.kvstub = client.metadata, self

    async def Txn(self, request: Any, **options: Any) -> Any:  # noqa: N802
        answer = await self._client.kvstub.Txn(request, **options)
        hook, self._hook = self._hook, None
        if hook is not None:
            await hook()
        return answer

    async def Range(self, request: Any, **options: Any) -> Any:  # noqa: N802
        return await self._client.kvstub.Range(request, **options)


async def test_a_move_raced_by_one_that_finished_and_a_write_since_is_no_conflict(
        harness: Any, etcd: EtcdServer) -> None:
    other = await start_etcd(harness, "shard-2")
    async with etcd.client() as old, other.client() as new:
        await old.put(KEY, b"state")
        for client in (old, new):  # the map's version 1 stored: its fences raised
            await raise_fence(client, FENCE, 1)

        async def the_other_mover_first() -> None:
            assert await Mover(FENCE).move(old, new, KEY, 1) is True
            await under_fence(new, FENCE, 1, [], [rpc.RequestOp(
                request_put=rpc.PutRequest(key=KEY, value=b"written since"))], [])

        slow = Mover(FENCE)
        assert await slow.move(_ThenRun(old, the_other_mover_first), new, KEY, 1) is False
        assert await old.get(KEY) is None
        assert (await new.get(KEY)).value == b"written since"


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
