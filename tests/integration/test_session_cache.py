"""The session cache against real etcd faults: it resumes its watch from the last
applied revision after a lost connection, and reads everything again when that
revision was compacted meanwhile. Nothing is missed, nothing applied twice."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from meshxl import etcd as etcd_client
from meshxl.etcd.keys import Keys
from meshxl.local.wait import wait_until
from meshxl.statesync.cache import SessionCache
from meshxl.statesync.record import SessionRecord
from tests.harness import EtcdCluster, EtcdServer

pytestmark = pytest.mark.integration

PREFIX = Keys().sessions_prefix("c")


def value(n: int) -> bytes:
    return SessionRecord(owner="a", content_type="application/json", created=1.0, updated=1.0,
                         data=str(n).encode()).encode()


@asynccontextmanager
async def running_cache(url: str) -> AsyncIterator[SessionCache]:
    client = etcd_client.client(url, timeout=2)
    await client.connect()
    cache = SessionCache(client, PREFIX)
    task = asyncio.create_task(cache.run())
    try:
        async with asyncio.timeout(10):
            await cache.synced.wait()
        yield cache
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.close()


def contents(cache: SessionCache) -> dict[str, bytes]:
    return {s: cache.entries[s].record.data for s in cache.ids()}


async def test_watch_resumes_after_etcd_restarts(etcd: EtcdServer) -> None:
    async with etcd.client() as writer:
        for i in range(5):
            await writer.put(f"{PREFIX}s{i}".encode(), value(i))
    async with running_cache(etcd.url) as cache:
        assert len(cache) == 5 and cache.full_syncs == 1
        await etcd.kill()
        await etcd.start()  # same data: revisions continue, nothing compacted
        async with etcd.client() as writer:
            await writer.put(f"{PREFIX}s1".encode(), value(100))
            await writer.delete(f"{PREFIX}s2".encode())
            for i in range(5, 8):
                await writer.put(f"{PREFIX}s{i}".encode(), value(i))
            last = (await writer.get(f"{PREFIX}s7".encode())).mod_revision
        await wait_until(lambda: cache.applied >= last, timeout=15,
                         what="cache resumed and caught up after the restart")
        assert cache.errors >= 1
        assert cache.full_syncs == 1, "resumed from its revision, not re-read"
        assert contents(cache) == {"s0": b"0", "s1": b"100", "s3": b"3", "s4": b"4",
                                   "s5": b"5", "s6": b"6", "s7": b"7"}


async def test_compaction_while_away_forces_a_full_read(etcd_cluster: EtcdCluster) -> None:
    first = etcd_cluster[0]
    async with first.client() as writer:
        for i in range(3):
            await writer.put(f"{PREFIX}s{i}".encode(), value(i))
    async with running_cache(first.url) as cache:  # pinned to member 0 only
        assert len(cache) == 3
        await etcd_cluster.kill(0)
        async with etcd_cluster.client(timeout=1) as writer:
            # The survivors may be electing a leader: retry each request until it lands.
            await wait_until(lambda: writer.put(f"{PREFIX}s0".encode(), value(10)), timeout=20,
                             what="a write to the surviving members")
            await writer.delete(f"{PREFIX}s1".encode())
            await writer.put(f"{PREFIX}s9".encode(), value(9))
            put = await writer.put(f"{PREFIX}s9".encode(), value(99))
            await writer.compact(put.header.revision, physical=True)
        await first.start()  # rejoins, catches up, and has compacted past the cache
        await wait_until(lambda: cache.full_syncs >= 2 and cache.synced.is_set(), timeout=20,
                         what="a full re-read after the compaction")
        assert contents(cache) == {"s0": b"10", "s2": b"2", "s9": b"99"}
        assert cache.applied >= put.header.revision
