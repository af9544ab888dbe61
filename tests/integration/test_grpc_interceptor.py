"""meshxl's gRPC session interceptors against a real ``meshxl serve statesync`` sidecar
on a real etcd: grpc.aio and the sync server load the call's session, save it when it
changed with the read's ETag, answer ABORTED when the session changed meanwhile (or
run the call again with ``retries``), UNAVAILABLE when the sidecar is gone and
INVALID_ARGUMENT for a bad session id; a streaming handler commits as it goes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from meshxl.addr import GRPC_SERVER_OPTIONS, bind_grpc
from meshxl.client import AsyncClient, Backoff, Client, ClientSettings
from meshxl.client.interceptor import (
    AsyncSessionInterceptor,
    SessionInterceptor,
    commit,
    commit_sync,
    current_session,
)
from meshxl.local import counter
from meshxl.local.ports import free_port
from tests.harness.sidecar import SidecarProcess

pytestmark = pytest.mark.integration

SETTINGS = ClientSettings(timeout=5.0, unavailable=Backoff(attempts=1))
SESSION = (("x-session-id", "g1"),)


@pytest.fixture
async def sidecar(start_sidecar: Any, etcd: Any) -> SidecarProcess:
    return await start_sidecar(cluster="grpc", member="m1", etcd=etcd.url,  # type: ignore[no-any-return]
                               app_port=free_port())


def _stubs(channel: Any) -> tuple[Any, Any]:
    increment = channel.unary_unary(
        counter.INCREMENT, request_serializer=counter.CounterRequest.SerializeToString,
        response_deserializer=counter.CounterReply.FromString)
    watch = channel.unary_stream(
        counter.WATCH, request_serializer=counter.WatchRequest.SerializeToString,
        response_deserializer=counter.CounterReply.FromString)
    return increment, watch


def _handlers(increment: Any, watch: Any) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(counter.SERVICE, {
        "Increment": grpc.unary_unary_rpc_method_handler(
            increment, request_deserializer=counter.CounterRequest.FromString,
            response_serializer=counter.CounterReply.SerializeToString),
        "Watch": grpc.unary_stream_rpc_method_handler(
            watch, request_deserializer=counter.WatchRequest.FromString,
            response_serializer=counter.CounterReply.SerializeToString),
    })


def _bump() -> int:
    session = current_session()
    seq = int(session.state.get("seq", 0)) + 1
    session.state = {"seq": seq}
    return seq


@pytest.fixture
async def aio_server(sidecar: SidecarProcess) -> AsyncIterator[tuple[str, AsyncClient, dict]]:
    """A grpc.aio server with the interceptor (retries=1); ``hooks['before_save']`` runs
    inside Increment (to write the session behind the handler's back)."""
    client = AsyncClient(sidecar.url, settings=SETTINGS)
    hooks: dict[str, Any] = {}

    async def increment(request: Any, context: Any) -> Any:
        seq = _bump()
        if "before_save" in hooks:
            await hooks["before_save"]()
        return counter.CounterReply(member="m1", session=current_session().id, seq=seq)

    async def watch(request: Any, context: Any) -> Any:
        for _ in range(request.count):
            seq = _bump()
            await commit()
            yield counter.CounterReply(member="m1", session=current_session().id, seq=seq)

    server = grpc.aio.server(interceptors=[AsyncSessionInterceptor(client, retries=1)],
                             options=GRPC_SERVER_OPTIONS)
    server.add_generic_rpc_handlers((_handlers(increment, watch),))
    port = bind_grpc(server, "127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", client, hooks
    finally:
        await server.stop(None)
        await client.close()


async def test_aio_interceptor_loads_saves_and_streams(
        aio_server: tuple[str, AsyncClient, dict], sidecar: SidecarProcess) -> None:
    target, client, _ = aio_server
    async with grpc.aio.insecure_channel(target) as channel:
        increment, watch = _stubs(channel)
        first = await increment(counter.CounterRequest(), metadata=SESSION, timeout=5)
        second = await increment(counter.CounterRequest(), metadata=SESSION, timeout=5)
        assert (first.seq, second.seq) == (1, 2)
        seen = []
        call = watch(counter.WatchRequest(count=3), metadata=SESSION)
        async for reply in call:
            # Committed before it was sent: the sidecar already has it (or a later one).
            seen.append((reply.seq, (await client.get("g1")).state["seq"]))
        assert [sent for sent, _ in seen] == [3, 4, 5]
        assert all(stored >= sent for sent, stored in seen), seen
        # No session metadata: the handler runs without one (and says so).
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await increment(counter.CounterRequest(), timeout=5)
        assert missing.value.code() == grpc.StatusCode.UNKNOWN
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await increment(counter.CounterRequest(), metadata=(("x-session-id", "a b"),),
                            timeout=5)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_aio_interceptor_conflicts_abort_or_run_again(
        aio_server: tuple[str, AsyncClient, dict], sidecar: SidecarProcess) -> None:
    target, client, hooks = aio_server
    writes = {"n": 0}

    async def concurrent_write() -> None:
        # Another member writes the session while this call runs, every time.
        writes["n"] += 1
        await client.put("g1", {"seq": 100 * writes["n"]})

    hooks["before_save"] = concurrent_write
    async with grpc.aio.insecure_channel(target) as channel:
        increment, _ = _stubs(channel)
        with pytest.raises(grpc.aio.AioRpcError) as lost:
            await increment(counter.CounterRequest(), metadata=SESSION, timeout=5)
    assert lost.value.code() == grpc.StatusCode.ABORTED
    assert writes["n"] == 2  # run again once (retries=1), then ABORTED
    # The concurrent write was never overwritten.
    assert (await client.get("g1")).state == {"seq": 200}

    del hooks["before_save"]
    async with grpc.aio.insecure_channel(target) as channel:
        increment, _ = _stubs(channel)
        reply = await increment(counter.CounterRequest(), metadata=SESSION, timeout=5)
    assert reply.seq == 201

    await sidecar.kill9()
    async with grpc.aio.insecure_channel(target) as channel:
        increment, _ = _stubs(channel)
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await increment(counter.CounterRequest(), metadata=SESSION, timeout=10)
    assert gone.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_sync_interceptor_loads_saves_and_streams(sidecar: SidecarProcess) -> None:
    client = Client(sidecar.url, settings=SETTINGS)

    def increment(request: Any, context: Any) -> Any:
        return counter.CounterReply(member="m1", session=current_session().id, seq=_bump())

    def watch(request: Any, context: Any) -> Any:
        for _ in range(request.count):
            seq = _bump()
            commit_sync()
            yield counter.CounterReply(member="m1", session=current_session().id, seq=seq)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                         interceptors=[SessionInterceptor(client)], options=GRPC_SERVER_OPTIONS)
    server.add_generic_rpc_handlers((_handlers(increment, watch),))
    port = bind_grpc(server, "127.0.0.1:0")
    server.start()

    def calls() -> list[int]:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            inc, stream = _stubs(channel)
            out = [inc(counter.CounterRequest(), metadata=SESSION, timeout=5).seq]
            out += [r.seq for r in stream(counter.WatchRequest(count=2), metadata=SESSION,
                                          timeout=5)]
            return out

    try:
        assert await asyncio.to_thread(calls) == [1, 2, 3]
        assert (await asyncio.to_thread(client.get, "g1")).state == {"seq": 3}
    finally:
        server.stop(None)
        client.close()
