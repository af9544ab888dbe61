"""etcd watches that end when their member stops being up, so their owner resumes them
on another member: aetcd's own watch on a :class:`~meshxl.etcd.balanced.BalancedClient`
(:func:`member_events`) and the lean watch the session cache reads
(:func:`watch_responses`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aetcd
import grpc
from aetcd import rpc

from meshxl.etcd import h2c
from meshxl.etcd.balancer import DOWN, UP, Balancer, Endpoint, balancer_of

__all__ = ["CANCEL_TIMEOUT", "cancel_watch", "member_events", "watch_responses"]

CANCEL_TIMEOUT = 1.0
"""Seconds a watch's cancel may take when its owner lets it go."""


async def cancel_watch(watch: Any) -> None:
    """Cancel aetcd's ``watch`` when its owner ends (stopping, or resuming elsewhere),
    within :data:`CANCEL_TIMEOUT`, raising nothing: a watch whose stream is going may
    fail to cancel, or wait for an answer that never comes (aetcd's cancel awaits
    etcd's reply on that stream), and neither may take the place of a cancellation in
    flight, nor of the watch's own error, nor hold up the owner's stop."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(CANCEL_TIMEOUT):
            await watch.cancel()


async def member_events(balancer: Balancer, ep: Endpoint, inner: Any) -> AsyncIterator[Any]:
    """aetcd's watch ``inner`` on member ``ep``, ended (``ConnectionFailedError``) when
    that member stops being up, so the watch's owner resumes it on another member."""
    events = inner.__aiter__()
    pending: asyncio.Future[Any] | None = None
    try:
        while True:
            changed = ep.changed()
            if ep.state == DOWN or (ep.state != UP and balancer.current is not ep):
                raise aetcd.exceptions.ConnectionFailedError(
                    f"etcd member {ep.name} of this watch is {ep.state} ({ep.reason})")
            if pending is None:
                pending = asyncio.ensure_future(events.__anext__())
            waiter = asyncio.ensure_future(changed.wait())
            try:
                await asyncio.wait({pending, waiter}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
            if pending.done():
                done, pending = pending, None
                try:
                    item = done.result()
                except StopAsyncIteration:
                    return
                yield item
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending


async def watch_responses(client: aetcd.Client, key: bytes, range_end: bytes,
                          start_revision: int) -> AsyncIterator[Any]:
    """etcd's watch of ``[key, range_end)`` from ``start_revision``, as etcd's own
    ``WatchResponse`` messages (a revision's events together), on one member.

    The lean path, for a watch that sees every write (the session cache): aetcd's
    watcher wraps each event in objects and passes it through a lock, a callback and a
    queue, which cost more than applying it; on a plain client it is a stream of
    :mod:`meshxl.etcd.h2c`, without grpcio's threads. Ends with ``RevisionCompactedError`` when
    ``start_revision`` is compacted, and with ``ConnectionFailedError`` when the stream
    ends, etcd cancels the watch, or (several members) its member stops being up: the
    caller resumes from the last revision it applied, elsewhere if need be. A watch etcd
    cancels with a reason (a token it forgot, missing permissions) also drops the
    member's token, so the resumed watch authenticates again.
    """
    await client.connect()
    balancer = balancer_of(client)
    ep = balancer.current
    member = ep.client
    create = rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
        key=key, range_end=range_end, start_revision=start_revision))
    call: Any
    if isinstance(member, h2c.Client):  # no TLS, no token: grpcio's threads left out
        call = member.channel_h2c().stream(h2c.WATCH, create.SerializeToString(),
                                           h2c.watch_parse)
    else:
        call = rpc.WatchStub(member.channel).Watch(metadata=member.metadata)
    gone: list[str] = []

    async def watchdog() -> None:
        while True:
            await ep.changed().wait()
            if ep.state == DOWN or (ep.state != UP and balancer.current is not ep):
                gone.append(f"etcd member {ep.name} of this watch is {ep.state} ({ep.reason})")
                call.cancel()
                return

    guard = asyncio.get_running_loop().create_task(watchdog()) if balancer.probing else None
    try:
        if not isinstance(call, h2c.StreamCall):
            await call.write(create)
        while True:
            try:
                response = await call.read()
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if gone and not (task and task.cancelling()):  # the watchdog's, not ours
                    raise aetcd.exceptions.ConnectionFailedError(gone[0]) from None
                raise
            if response is grpc.aio.EOF:
                raise aetcd.exceptions.ConnectionFailedError("the watch stream ended")
            if response.compact_revision:
                raise aetcd.exceptions.RevisionCompactedError(response.compact_revision)
            if response.canceled:
                if response.cancel_reason:  # refused for its token or its permissions
                    from meshxl.etcd.auth import watch_refused

                    watch_refused(member)
                raise aetcd.exceptions.ConnectionFailedError(
                    f"etcd canceled the watch: {response.cancel_reason or 'no reason given'}")
            if response.events:
                yield response
    finally:
        if guard is not None:
            guard.cancel()
        call.cancel()
