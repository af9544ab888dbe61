"""The Dapr API's gRPC messages read and written by hand (meshxl.statesync.dapr.wire)
equal the Dapr SDK's generated messages (PyPI ``dapr``, the test extra): whatever the
SDK writes is read field for field, and what the sidecar writes the SDK reads."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshxl.statesync.dapr import wire

common = pytest.importorskip("dapr.proto.common.v1.common_pb2")
state = pytest.importorskip("dapr.proto.runtime.v1.state_pb2")
metadata_pb2 = pytest.importorskip("dapr.proto.runtime.v1.metadata_pb2")

texts = st.text(max_size=30)
maps = st.dictionaries(texts, texts, max_size=4)
etags = st.none() | texts
concurrency = st.sampled_from([0, 1, 2])


def sdk_item(key: str, value: bytes, etag: str | None, meta: dict[str, str],
             conc: int) -> object:
    return common.StateItem(key=key, value=value,
                            etag=common.Etag(value=etag) if etag is not None else None,
                            metadata=meta, options=common.StateOptions(concurrency=conc)
                            if conc else None)


items = st.tuples(texts, st.binary(max_size=50), etags, maps, concurrency)


def check_item(read: wire.StateItem, key: str, value: bytes, etag: str | None,
               meta: dict[str, str], conc: int) -> None:
    assert (read.key, read.value, read.etag, read.metadata) == (key, value, etag, meta)
    assert read.concurrency == wire.CONCURRENCY[conc]


@settings(max_examples=200, deadline=None)
@given(texts, st.lists(items, max_size=5))
def test_save_and_delete_bulk_requests_read_back(store: str, given_items: list) -> None:
    for message in (state.SaveStateRequest, state.DeleteBulkStateRequest):
        raw = message(store_name=store, states=[sdk_item(*i) for i in given_items])
        read_store, read_items = wire.read_items(raw.SerializeToString())
        assert read_store == store and len(read_items) == len(given_items)
        for read, expected in zip(read_items, given_items, strict=True):
            check_item(read, *expected)


@settings(max_examples=200, deadline=None)
@given(texts, texts, maps, st.lists(texts, max_size=5), etags, concurrency)
def test_get_and_delete_requests_read_back(store: str, key: str, meta: dict[str, str],
                                           keys: list[str], etag: str | None,
                                           conc: int) -> None:
    one = wire.read_get(state.GetStateRequest(store_name=store, key=key, consistency=2,
                                              metadata=meta).SerializeToString())
    assert (one.store, one.key, one.metadata) == (store, key, meta)
    bulk = wire.read_get_bulk(state.GetBulkStateRequest(
        store_name=store, keys=keys, parallelism=3).SerializeToString())
    assert (bulk.store, bulk.keys) == (store, keys)
    delete = state.DeleteStateRequest(
        store_name=store, key=key, etag=common.Etag(value=etag) if etag is not None else None,
        options=common.StateOptions(concurrency=conc) if conc else None, metadata=meta)
    read_store, item = wire.read_delete(delete.SerializeToString())
    assert read_store == store
    check_item(item, key, b"", etag, meta, conc)


@settings(max_examples=100, deadline=None)
@given(texts, st.lists(st.tuples(st.sampled_from(["upsert", "delete"]), items), max_size=4),
       maps)
def test_transactions_read_back(store: str, ops: list, meta: dict[str, str]) -> None:
    raw = state.ExecuteStateTransactionRequest(storeName=store, metadata=meta, operations=[
        state.TransactionalStateOperation(operationType=kind, request=sdk_item(*item))
        for kind, item in ops])
    read = wire.read_transaction(raw.SerializeToString())
    assert read.store == store and read.metadata == meta
    for (kind, item), expected in zip(read.operations, ops, strict=True):
        assert kind == expected[0]
        check_item(item, *expected[1])


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=60), texts, maps,
       st.lists(st.tuples(texts, st.binary(max_size=20), texts, texts, maps), max_size=4))
def test_answers_read_back_in_the_sdk(data: bytes, etag: str, meta: dict[str, str],
                                      bulk: list) -> None:
    got = state.GetStateResponse.FromString(wire.get_answer(data, etag, meta))
    assert (got.data, got.etag, dict(got.metadata)) == (data, etag, meta)
    answers = [wire.ItemAnswer(*b) for b in bulk]
    read = state.GetBulkStateResponse.FromString(wire.bulk_answer(answers))
    assert [(i.key, i.data, i.etag, i.error, dict(i.metadata)) for i in read.items] == bulk


def test_metadata_answer_reads_back() -> None:
    raw = wire.metadata_answer("orders", [{"name": "statestore", "type": "state.meshxl",
                                           "version": "v1", "capabilities": ["ETAG", "TTL"]}],
                               {"k": "v"}, "meshxl-1")
    got = metadata_pb2.GetMetadataResponse.FromString(raw)
    assert got.id == "orders" and got.runtime_version == "meshxl-1"
    assert dict(got.extended_metadata) == {"k": "v"}
    [component] = got.registered_components
    assert (component.name, component.type, list(component.capabilities)) == (
        "statestore", "state.meshxl", ["ETAG", "TTL"])


@pytest.mark.parametrize("raw", [b"\x0a\x05ab", b"\x0a", b"\x12\x02\xff\xfe", b"\x0f",
                                 b"\x08" + b"\xff" * 11])
def test_broken_bytes_are_a_bad_message(raw: bytes) -> None:
    with pytest.raises(wire.BadMessage):
        wire.read_get(raw)
