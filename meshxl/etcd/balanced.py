"""An aetcd client over several etcd members, one health-checked channel each (made by
:func:`meshxl.etcd.client` for a multi-member ``--etcd`` list).

aetcd's own methods (``get``, ``put``, ``lease``, ``watch`` ...) keep working on it:
its stubs are those of the preferred member at the moment of the call (unary calls
sent again elsewhere after no answer, through :meth:`Balancer.call`), and a watch ends
(its owner resumes it elsewhere) when its member stops answering.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

import aetcd
import grpc
from aetcd import rtypes

from meshxl.etcd.balancer import (
    PROBE_TIMEOUT,
    UNKNOWN,
    UP,
    Balancer,
    Endpoint,
    retryable,
)
from meshxl.etcd.watch import member_events

__all__ = ["BalancedClient"]

T = TypeVar("T")


class BalancedClient(aetcd.Client):  # type: ignore[misc]
    """An aetcd client over several etcd members, one health-checked channel each.

    aetcd's methods use the stubs of :attr:`Balancer.current` at the time of the call;
    :attr:`balancer` offers retries on another member and the news that a member went.
    A watch ends when its member stops answering, so its owner resumes it elsewhere.
    """

    def __init__(self, endpoints: list[Endpoint], *, timeout: float | None):
        super().__init__(host=endpoints[0].name, port=0,
                         timeout=timeout)
        self.balancer = Balancer(endpoints, timeout=timeout)

    def _init_channel_attrs(self) -> None:  # the members' clients hold the channels
        pass

    @property
    def _member(self) -> aetcd.Client:
        return self.balancer.current.client

    channel = property(lambda self: self._member.channel)
    metadata = property(lambda self: self._member.metadata)
    kvstub = property(lambda self: _Stub(self.balancer, "kvstub"))
    leasestub = property(lambda self: _Stub(self.balancer, "leasestub"))
    clusterstub = property(lambda self: _Stub(self.balancer, "clusterstub"))
    maintenancestub = property(lambda self: _Stub(self.balancer, "maintenancestub"))
    _watcher = property(lambda self: self._member._watcher)

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        for ep in self.balancer.endpoints:
            await ep.client.connect()
        self.balancer.start()
        self._connected.set()
        # The first probes' answers, so that the first request goes to a member that
        # answers (bounded: a member cut off is found out by the requests' own retries).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(PROBE_TIMEOUT):
                while not any(ep.state == UP for ep in self.balancer.endpoints) and any(
                        ep.state == UNKNOWN for ep in self.balancer.endpoints):
                    await self.balancer.any_change().wait()

    async def close(self) -> None:
        await self.balancer.stop()
        for ep in self.balancer.endpoints:
            with contextlib.suppress(Exception):
                await ep.client.close()
        self._connected.clear()

    async def watch(self, key: bytes, **kwargs: Any) -> Any:
        await self.connect()
        ep = self.balancer.current
        inner = await ep.client.watch(key, **kwargs)
        return rtypes.Watch(partial(member_events, self.balancer, ep, inner), inner.cancel,
                            inner.watch_id)


class _Stub:
    """A gRPC stub of whichever member answers: unary calls go through
    :meth:`Balancer.call` (sent again elsewhere after no answer), except ``Txn``, whose
    compares may not make a second application harmless: it gets one attempt, on an up
    member. Streams go to the current member."""

    _STREAMS = frozenset({"LeaseKeepAlive", "Snapshot", "Watch"})

    def __init__(self, balancer: Balancer, attr: str):
        self._balancer = balancer
        self._attr = attr

    def __getattr__(self, method: str) -> Any:
        balancer, attr = self._balancer, self._attr
        if method in self._STREAMS:
            return getattr(getattr(balancer.current.client, attr), method)

        def invoke(request: Any, timeout: float | None = None, metadata: Any = None,
                   **kwargs: Any) -> Awaitable[Any]:
            def send(ep: Endpoint, attempt_timeout: float) -> Awaitable[Any]:
                # aetcd's stubs are untyped: the call's awaitable is named as such here.
                call: Awaitable[Any] = getattr(getattr(ep.client, attr), method)(
                    request, timeout=attempt_timeout, metadata=ep.client.metadata, **kwargs)
                return call

            if method == "Txn":
                return _once(balancer, send, timeout)
            return balancer.call(send, timeout=timeout, what=f"etcd {method}")

        return invoke


async def _once(balancer: Balancer, send: Callable[[Endpoint, float], Awaitable[T]],
                timeout: float | None) -> T:
    deadline = time.monotonic() + (balancer.timeout if timeout is None else timeout)
    ep = await balancer.choose(deadline)
    try:
        return await send(ep, max(deadline - time.monotonic(), 0.01))
    except grpc.aio.AioRpcError as exc:
        if retryable(exc):
            balancer.failed(ep, exc)
        raise
