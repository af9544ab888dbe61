"""Dapr's Python SDK (PyPI ``dapr``, its ``DaprClient`` over gRPC) against a real sidecar
on real etcd: the behaviours Dapr's state-store conformance suite checks
(components-contrib, tests/conformance/state), reproduced through the SDK: values of
every type it uses, bulk reads, ETag mismatches failing saves and deletes, first-write,
TTL expiry and ``ttlExpireTime``, transactions; the errors daprd gives; and what meshxl
does not serve answering at once."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any, TypeVar

import pytest

from meshxl.local.ports import free_port
from meshxl.local.wait import wait_until
from tests.harness import EtcdServer

pytestmark = pytest.mark.integration
dapr_clients = pytest.importorskip("dapr.clients")
grpc = pytest.importorskip("grpc")

T = TypeVar("T")
STORE = "statestore"


async def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """The SDK is synchronous: each call on a thread, the test's loop free."""
    return await asyncio.to_thread(fn, *args, **kwargs)


@pytest.fixture
async def client(etcd: EtcdServer, start_sidecar: Any,
                 monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    http_port, grpc_port = free_port(), free_port()
    await start_sidecar(cluster="orders", member="a", etcd=etcd.url, app_port=free_port(),
                        dapr="on", dapr_http_port=http_port, dapr_grpc_port=grpc_port)
    # Where the SDK looks for its sidecar: the variables daprd's injector sets.
    monkeypatch.setenv("DAPR_HTTP_PORT", str(http_port))
    monkeypatch.setenv("DAPR_GRPC_PORT", str(grpc_port))
    monkeypatch.setenv("DAPR_HEALTH_TIMEOUT", "30")
    sdk = await call(dapr_clients.DaprClient)
    try:
        yield sdk
    finally:
        await call(sdk.close)


def code_of(exc: BaseException) -> Any:
    return exc.code() if hasattr(exc, "code") else None


async def test_values_of_every_type_round_trip(client: Any) -> None:
    """The conformance suite's scenarios: strings, numbers, booleans, JSON objects and
    arrays, raw bytes, unicode keys and values."""
    values: dict[str, bytes] = {
        "str": b"hello world", "int": b"42", "float": b"3.14", "bool": b"true",
        "json": json.dumps({"a": [1, 2, {"b": None}], "c": "\u00e9"}).encode(),
        "array": b"[1,2,3]", "bytes": bytes(range(256)), "empty-ish": b" ",
        "\u00fcnicode key/with spaces": "\u2603 snow".encode(),
    }
    for key, value in values.items():
        await call(client.save_state, STORE, key, value)
    for key, value in values.items():
        got = await call(client.get_state, STORE, key)
        assert got.data == value, key
        assert got.etag
    missing = await call(client.get_state, STORE, "never-written")
    assert missing.data == b"" and missing.etag == ""


async def test_bulk_get_and_bulk_save(client: Any) -> None:
    from dapr.clients.grpc._state import StateItem

    await call(client.save_bulk_state, STORE, [StateItem(key=f"bulk-{i}", value=f"v{i}")
                                               for i in range(10)])
    keys = [f"bulk-{i}" for i in range(10)] + ["bulk-missing"]
    got = await call(client.get_bulk_state, STORE, keys, parallelism=4)
    assert [i.key for i in got.items] == keys
    assert [i.data for i in got.items] == [f"v{i}".encode() for i in range(10)] + [b""]
    assert all(i.etag for i in got.items[:10]) and got.items[10].etag == ""
    from dapr.proto.common.v1 import common_pb2
    from dapr.proto.runtime.v1 import state_pb2

    # The SDK has no method for it: its own generated stub.
    await call(client._stub.DeleteBulkState, state_pb2.DeleteBulkStateRequest(
        store_name=STORE, states=[common_pb2.StateItem(key=k) for k in keys[:5]]))
    got = await call(client.get_bulk_state, STORE, keys[:6])
    assert [i.data for i in got.items] == [b""] * 5 + [b"v5"]


async def test_etag_mismatch_fails_save_and_delete(client: Any) -> None:
    """Conformance "etag": a wrong ETag fails a save and a delete (ABORTED, daprd's
    code for an ETag mismatch; a value that is no ETag: INVALID_ARGUMENT), the right
    one passes, and each save gives a new ETag."""
    await call(client.delete_state, STORE, "etag-key")  # absent: deleted already
    await call(client.save_state, STORE, "etag-key", b"one")
    first = await call(client.get_state, STORE, "etag-key")
    with pytest.raises(grpc.RpcError) as wrong:
        await call(client.save_state, STORE, "etag-key", b"two", etag="not-an-etag")
    assert code_of(wrong.value) == grpc.StatusCode.INVALID_ARGUMENT
    await call(client.save_state, STORE, "etag-key", b"two", etag=first.etag)
    second = await call(client.get_state, STORE, "etag-key")
    assert second.data == b"two" and second.etag != first.etag
    with pytest.raises(grpc.RpcError) as stale:
        await call(client.save_state, STORE, "etag-key", b"three", etag=first.etag)
    assert code_of(stale.value) == grpc.StatusCode.ABORTED
    with pytest.raises(grpc.RpcError) as stale_delete:
        await call(client.delete_state, STORE, "etag-key", etag=first.etag)
    assert code_of(stale_delete.value) == grpc.StatusCode.ABORTED
    assert (await call(client.get_state, STORE, "etag-key")).data == b"two"
    await call(client.delete_state, STORE, "etag-key", etag=second.etag)
    assert (await call(client.get_state, STORE, "etag-key")).data == b""


async def test_first_write(client: Any) -> None:
    """Conformance "first-write": without an ETag (or with an empty one) the second
    first-write save of a key fails; with the read's ETag it passes once."""
    from dapr.clients.grpc._state import Concurrency, Consistency, StateOptions

    first_write = StateOptions(concurrency=Concurrency.first_write,
                               consistency=Consistency.strong)
    for etag in (None, ""):
        await call(client.delete_state, STORE, "fw")
        await call(client.save_state, STORE, "fw", b"first", etag=etag, options=first_write)
        assert (await call(client.get_state, STORE, "fw")).data == b"first"
        with pytest.raises(grpc.RpcError) as second:
            await call(client.save_state, STORE, "fw", b"second", etag=etag,
                       options=first_write)
        assert code_of(second.value) == grpc.StatusCode.ABORTED
    read = await call(client.get_state, STORE, "fw")
    await call(client.save_state, STORE, "fw", b"second", etag=read.etag, options=first_write)
    with pytest.raises(grpc.RpcError):
        await call(client.save_state, STORE, "fw", b"third", etag=read.etag,
                   options=first_write)
    assert (await call(client.get_state, STORE, "fw")).data == b"second"


async def test_ttl_expires_and_ttl_expire_time_is_reported(client: Any) -> None:
    """Conformance "ttl": a save with ttlInSeconds 2 reads back at once and is gone
    within 3 s (the suite's bound); ttlExpireTime of a 3600 s TTL is an hour from now;
    -1 keeps a key past the cluster's TTL rules (no ttlExpireTime)."""
    from dapr.proto.runtime.v1 import state_pb2

    asked = time.time()
    await call(client.save_state, STORE, "ttl-2", b"soon gone",
               state_metadata={"ttlInSeconds": "2"})
    assert (await call(client.get_state, STORE, "ttl-2")).data == b"soon gone"

    async def gone() -> bool:
        return (await call(client.get_state, STORE, "ttl-2")).data == b""

    await wait_until(gone, timeout=3.0 + 2.0, what="the key with a 2 s TTL expired")
    assert time.time() - asked >= 2.0  # never before its TTL (a correctness bound)

    before = time.time()
    await call(client.save_state, STORE, "ttl-hour", b"x",
               state_metadata={"ttlInSeconds": "3600"})
    raw = await call(client._stub.GetState,  # the SDK's own generated stub: metadata
                     state_pb2.GetStateRequest(store_name=STORE, key="ttl-hour"))
    expires = datetime.fromisoformat(raw.metadata["ttlExpireTime"].replace("Z", "+00:00"))
    assert abs(expires.timestamp() - (before + 3600)) < 10
    await call(client.save_state, STORE, "ttl-never", b"kept",
               state_metadata={"ttlInSeconds": "-1"})
    raw = await call(client._stub.GetState,
                     state_pb2.GetStateRequest(store_name=STORE, key="ttl-never"))
    assert raw.data == b"kept" and "ttlExpireTime" not in raw.metadata
    with pytest.raises(grpc.RpcError) as bad:
        await call(client.save_state, STORE, "ttl-bad", b"x",
                   state_metadata={"ttlInSeconds": "soon"})
    assert code_of(bad.value) == grpc.StatusCode.INVALID_ARGUMENT


async def test_transactions(client: Any) -> None:
    """Conformance "transaction" and "transaction-order": upserts and deletes in one
    commit, several operations on one key applied in order; a failing one applies
    nothing."""
    from dapr.clients.grpc._request import TransactionalStateOperation, TransactionOperationType

    await call(client.save_state, STORE, "tx-old", b"old")
    await call(client.execute_state_transaction, STORE, [
        TransactionalStateOperation(key="tx-a", data=b"a"),
        TransactionalStateOperation(key="tx-b", data=b'{"b":1}'),
        TransactionalStateOperation(key="tx-old",
                                    operation_type=TransactionOperationType.delete),
        TransactionalStateOperation(key="tx-never",
                                    operation_type=TransactionOperationType.delete)])
    got = await call(client.get_bulk_state, STORE, ["tx-a", "tx-b", "tx-old"])
    assert [i.data for i in got.items] == [b"a", b'{"b":1}', b""]
    upsert, delete = TransactionOperationType.upsert, TransactionOperationType.delete
    await call(client.execute_state_transaction, STORE, [
        TransactionalStateOperation(key="tx-order", data=b"value1", operation_type=upsert),
        TransactionalStateOperation(key="tx-order", operation_type=delete),
        TransactionalStateOperation(key="tx-order", data=b"value2", operation_type=upsert),
        TransactionalStateOperation(key="tx-order", operation_type=delete),
        TransactionalStateOperation(key="tx-order", data=b"value3", operation_type=upsert)])
    assert (await call(client.get_state, STORE, "tx-order")).data == b"value3"
    with pytest.raises(grpc.RpcError) as failed:
        await call(client.execute_state_transaction, STORE, [
            TransactionalStateOperation(key="tx-c", data=b"c"),
            TransactionalStateOperation(key="tx-a", data=b"a2", etag="1")])
    assert code_of(failed.value) == grpc.StatusCode.INTERNAL  # daprd's for a transaction
    assert (await call(client.get_state, STORE, "tx-c")).data == b""
    assert (await call(client.get_state, STORE, "tx-a")).data == b"a"


async def test_errors_are_daprds(client: Any) -> None:
    """An unknown store is daprd's ERR_STATE_STORE_NOT_FOUND (INVALID_ARGUMENT); a key
    with ``||`` is refused as daprd refuses it; pub/sub, secrets and the rest answer at
    once as daprd does without their components, never a hang."""
    with pytest.raises(grpc.RpcError) as unknown:
        await call(client.get_state, "no-such-store", "k")
    assert code_of(unknown.value) == grpc.StatusCode.INVALID_ARGUMENT
    assert "no-such-store is not found" in unknown.value.details()
    with pytest.raises(grpc.RpcError) as bad_key:
        await call(client.save_state, STORE, "a||b", b"x")
    assert code_of(bad_key.value) == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as pubsub:
        await call(client.publish_event, "pubsub", "topic", b"x")
    assert code_of(pubsub.value) == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as secret:
        await call(client.get_secret, "vault", "db")
    assert code_of(secret.value) == grpc.StatusCode.FAILED_PRECONDITION
    # A stream (pub/sub's subscription) whose requests never end is answered at once.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{os.environ['DAPR_GRPC_PORT']}") as ch:
        subscribe = ch.stream_stream(
            "/dapr.proto.runtime.v1.Dapr/SubscribeTopicEventsAlpha1")
        never = asyncio.Event()

        async def requests() -> Any:
            yield b""
            await never.wait()  # the client never ends its side
            yield b""

        with pytest.raises(grpc.aio.AioRpcError) as stream:
            async for _ in subscribe(requests(), timeout=10):
                pass
        assert stream.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    metadata = await call(client.get_metadata)
    assert metadata.application_id == "orders"
    assert {c.name for c in metadata.registered_components} == {STORE, "orders"}


async def test_a_token_is_daprs_api_token(etcd: EtcdServer, start_sidecar: Any,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``--token-file`` every Dapr call but health and metadata needs
    ``dapr-api-token`` (what the SDKs send from DAPR_API_TOKEN); without it the call is
    refused, UNAUTHENTICATED over gRPC, 401 over HTTP."""
    import aiohttp

    http_port, grpc_port = free_port(), free_port()
    await start_sidecar(cluster="orders", member="a", etcd=etcd.url, app_port=free_port(),
                        token="s3cret-token-of-32-characters-ok", dapr="on",
                        dapr_http_port=http_port, dapr_grpc_port=grpc_port)
    monkeypatch.setenv("DAPR_HTTP_PORT", str(http_port))
    monkeypatch.setenv("DAPR_GRPC_PORT", str(grpc_port))
    sdk = await call(dapr_clients.DaprClient)  # its health wait needs no token
    with pytest.raises(grpc.RpcError) as refused:
        await call(sdk.save_state, STORE, "k", b"v")
    assert code_of(refused.value) == grpc.StatusCode.UNAUTHENTICATED
    await call(sdk.close)
    monkeypatch.setenv("DAPR_API_TOKEN", "s3cret-token-of-32-characters-ok")
    sdk = await call(dapr_clients.DaprClient)
    try:
        await call(sdk.save_state, STORE, "k", b"v")
        assert (await call(sdk.get_state, STORE, "k")).data == b"v"
    finally:
        await call(sdk.close)
    async with aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{http_port}/v1.0/state/{STORE}/k"
        async with http.get(url) as resp:
            assert resp.status == 401
            assert (await resp.json())["errorCode"] == "ERR_UNAUTHORIZED"
        async with http.get(url, headers={"dapr-api-token":
                                          "s3cret-token-of-32-characters-ok"}) as resp:
            assert resp.status == 200 and await resp.read() == b"v"


async def test_before_etcd_answers_dapr_says_not_ready(start_sidecar: Any) -> None:
    """Until the sidecar has started (etcd not answering yet), Dapr's health is 500
    (daprd's ERR_HEALTH_NOT_READY, what the SDKs wait on) and calls UNAVAILABLE, never a
    hang or a refused connection."""
    import aiohttp

    http_port, grpc_port = free_port(), free_port()
    sidecar = await start_sidecar(cluster="orders", member="a",
                                  etcd=f"http://127.0.0.1:{free_port()}", app_port=free_port(),
                                  wait_ready=False, dapr="on", dapr_http_port=http_port,
                                  dapr_grpc_port=grpc_port)
    await sidecar.wait_listening()

    async def health() -> int:
        async with aiohttp.ClientSession() as http, \
                http.get(f"http://127.0.0.1:{http_port}/v1.0/healthz/outbound") as resp:
            assert resp.status == 500
            return (await resp.json())["errorCode"] == "ERR_OUTBOUND_HEALTH_NOT_READY"

    await wait_until(health, timeout=15, what="Dapr's health answers not ready")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        get = channel.unary_unary("/dapr.proto.runtime.v1.Dapr/GetState")
        with pytest.raises(grpc.aio.AioRpcError) as starting:
            await get(b"\x0a\x0astatestore\x12\x01k", timeout=10)
    assert starting.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_sidecar_of_several_clusters_serves_each_as_a_store(
        etcd: EtcdServer, start_sidecar: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--cluster t1 --cluster t2`` (or ``--pool``): each cluster is a state store by its
    name, their keys apart; no store is the default there."""
    http_port, grpc_port = free_port(), free_port()
    await start_sidecar(cluster=["t1", "t2"], member="a", etcd=etcd.url,
                        app_port=free_port(), dapr="on", dapr_http_port=http_port,
                        dapr_grpc_port=grpc_port)
    monkeypatch.setenv("DAPR_HTTP_PORT", str(http_port))
    monkeypatch.setenv("DAPR_GRPC_PORT", str(grpc_port))
    sdk = await call(dapr_clients.DaprClient)
    try:
        await call(sdk.save_state, "t1", "cart", b"in t1")
        await call(sdk.save_state, "t2", "cart", b"in t2")
        assert (await call(sdk.get_state, "t1", "cart")).data == b"in t1"
        assert (await call(sdk.get_state, "t2", "cart")).data == b"in t2"
        with pytest.raises(grpc.RpcError) as unknown:
            await call(sdk.get_state, STORE, "cart")
        assert code_of(unknown.value) == grpc.StatusCode.INVALID_ARGUMENT
        names = {c.name for c in (await call(sdk.get_metadata)).registered_components}
        assert names == {"t1", "t2"}
    finally:
        await call(sdk.close)
