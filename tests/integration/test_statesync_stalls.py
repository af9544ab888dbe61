"""The session store's batches when etcd does not answer one: after ``STALLED_AFTER`` it
stops holding its place among the batches in flight, so the writes queued behind it
leave instead of waiting for its deadline (``meshxl/statesync/store.py``), on a real
etcd paused with SIGSTOP (its connections stay open and nothing answers)."""

from __future__ import annotations

import os
import signal

import pytest

from meshxl import etcd as metcd
from meshxl.local.wait import wait_until
from meshxl.statesync.store import SessionStore, WriteResult
from tests.harness import EtcdServer

pytestmark = pytest.mark.integration


async def test_an_unanswered_batch_stops_holding_the_queue(etcd: EtcdServer) -> None:
    client = metcd.client(etcd.url)
    await client.connect()
    # Batches of up to 2: a batch of one is not full, so it waits its turn (a full one
    # would leave beside the one in flight).
    store = SessionStore(client, ttl=60.0, max_batch_ops=2, max_inflight=1, timeout=30.0)
    batcher = store.writer
    pid = etcd.process.pid
    assert pid is not None
    try:
        lease = await store.lease()
        os.kill(pid, signal.SIGSTOP)
        try:
            first = store.write([(b"/stall/one", b"1", 0)], lease)
            # Unanswered: stalled, beyond the one batch allowed in flight.
            await wait_until(lambda: batcher.in_flight == (0, 1, 0), timeout=10,
                             what="the unanswered batch to stall", interval=0.02,
                             explain=lambda: f"in flight {batcher.in_flight}, "
                                             f"answered {first.done() and first.result()}")
            second = store.write([(b"/stall/two", b"2", 0)], lease)
            third = store.write([(b"/stall/three", b"3", 0)], lease)
            # The second left at once (the first stalled), the third waits behind it,
            # until the second stalls too: none waited for a deadline.
            assert batcher.in_flight == (1, 1, 1)
            await wait_until(lambda: batcher.in_flight == (0, 3, 0), timeout=10,
                             what="the second and third batches to stall too",
                             interval=0.02, explain=lambda: f"in flight {batcher.in_flight}")
        finally:
            os.kill(pid, signal.SIGCONT)
        results = [await first, await second, await third]
    finally:
        await store.close()
        await client.close()
    assert all(isinstance(r[0], WriteResult) and r[0].ok for r in results), results
    assert batcher.in_flight == (0, 0, 0)
