"""A control-plane replica's node statuses outlive the loss of its status lease.

A replica paused or cut off past its lease's TTL comes back to a lease etcd no longer
has: etcd answers its refresh with TTL 0 (no error), and the statuses written under it
are gone. The replica takes a new lease and writes the statuses of the Envoys still
connected to it again; before, it went on refreshing the dead lease and every write
failed ("requested lease not found"), so ``meshxl status`` and ``meshxl verify`` saw
its Envoys connected to no replica until each one's next ACK (a drill that froze the
control plane failed its final verify on a busy machine).
"""

from __future__ import annotations

import asyncio
import json

import aetcd
import pytest

from meshxl.etcd.keys import Keys
from meshxl.local.wait import wait_until
from meshxl.xds.nodestatus import NodeStatuses

pytestmark = pytest.mark.integration


async def test_statuses_are_written_again_under_a_new_lease(etcd_client: aetcd.Client) -> None:
    keys = Keys()
    statuses = NodeStatuses(keys, "xds-0", ttl=2)
    statuses.client = etcd_client
    keeper = asyncio.create_task(statuses.keep_lease())
    key = keys.node("edge-1").encode()

    async def stored() -> dict[str, object] | None:
        got = await etcd_client.get(key)
        return json.loads(got.value) if got is not None and got.value else None

    try:
        await statuses.publish([("edge-1", {"streams": 1, "acked": "v1"})])
        first = await wait_until(stored, what="the node's status")
        assert first == {"streams": 1, "acked": "v1", "replica": "xds-0"}
        lost = statuses.lease
        await etcd_client.revoke_lease(lost.id)  # as if it had expired
        assert await stored() is None
        await wait_until(stored, timeout=15, what="the node's status written again")
        assert statuses.lease is not lost and await stored() == first
    finally:
        keeper.cancel()
        await asyncio.gather(keeper, return_exceptions=True)
        await statuses.revoke()
