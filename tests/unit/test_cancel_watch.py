"""A watch whose cancel never returns (aetcd's cancel takes its watcher's lock and
queues a request on a stream that may be going) must not hold up its owner: the mesh
mirror and the failover watch end with their cancellation all the same."""

from __future__ import annotations

import asyncio
import time

import aetcd
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


class _Call:
    """A Watch stream that answers nothing until cancelled."""

    def __init__(self) -> None:
        self._cancelled = asyncio.Event()

    async def write(self, _request: object) -> None:
        return None

    async def read(self) -> object:
        await self._cancelled.wait()
        raise asyncio.CancelledError

    def cancel(self) -> bool:
        self._cancelled.set()
        return True


class _Endpoint:
    name = "etcd-1"
    reason = "no answer"

    def __init__(self) -> None:
        self.state = etcd_watch.UP
        self.client = type("Member", (), {"channel": None, "metadata": None})()
        self._changed = asyncio.Event()

    def changed(self) -> asyncio.Event:
        return self._changed

    def down(self) -> None:
        self.state = etcd_watch.DOWN
        self._changed.set()


class _Client:
    def __init__(self, ep: _Endpoint) -> None:
        self.balancer = type("Balancer", (), {"current": ep, "probing": True})()

    async def connect(self) -> None:
        return None


async def test_a_watch_cancelled_as_its_member_goes_down_ends_cancelled(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The watchdog's cancel of a watch whose member went down becomes
    ConnectionFailedError, which its owner's loop resumes from; a cancellation of the
    owner that arrives in the same turn must stay a cancellation, or the owner (the
    session cache, the mesh mirror) outlives its stop."""
    ep = _Endpoint()
    monkeypatch.setattr(etcd_watch, "balancer_of", lambda client: client.balancer)
    monkeypatch.setattr(etcd_watch.rpc, "WatchStub",
                        lambda _channel: type("Stub", (), {"Watch": lambda *_a, **_k: call})())
    call = _Call()

    async def owner() -> None:
        async for _ in etcd_watch.watch_responses(_Client(ep), b"k", b"l", 1):  # type: ignore[arg-type]
            pass

    task = asyncio.create_task(owner())
    for _ in range(5):
        await asyncio.sleep(0)
    ep.down()
    await asyncio.sleep(0)  # the watchdog cancels the call
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    # Without the owner's cancel, the same going-down is the resumable error.
    ep, call = _Endpoint(), _Call()
    task = asyncio.create_task(owner())
    for _ in range(5):
        await asyncio.sleep(0)
    ep.down()
    with pytest.raises(aetcd.exceptions.ConnectionFailedError, match="DOWN|down"):
        await task
