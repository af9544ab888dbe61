"""A watch whose cancel never returns (aetcd's cancel takes its watcher's lock and
queues a request on a stream that may be going) must not hold up its owner: the mesh
mirror and the failover watch end with their cancellation all the same."""

from __future__ import annotations

import asyncio
import time

import pytest

from meshxl.etcd import watch as etcd_watch
from meshxl.etcd.watch import cancel_watch
from tests.harness.clock import scaled


class _Watch:
    def __init__(self, cancel: str) -> None:
        self.how = cancel
        self.cancelled = False

    async def cancel(self) -> None:
        self.cancelled = True
        if self.how == "hangs":
            await asyncio.Event().wait()
        if self.how == "fails":
            raise ConnectionError("stream removed")


@pytest.mark.parametrize("how", ["answers", "fails", "hangs"])
async def test_a_stopping_owner_ends_with_its_cancellation(
        how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(etcd_watch, "CANCEL_TIMEOUT", 0.2)
    watch = _Watch(how)
    running = asyncio.Event()

    async def owner() -> None:
        try:
            running.set()
            await asyncio.Event().wait()  # the watch's events
        finally:
            await cancel_watch(watch)

    task = asyncio.get_running_loop().create_task(owner())
    await running.wait()
    started = time.monotonic()
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=5)
    assert done, f"the owner did not end: its watch's cancel {how}"
    assert task.cancelled() and watch.cancelled
    assert time.monotonic() - started < scaled(2.0)
