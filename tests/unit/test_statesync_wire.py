"""The session store's hand-written etcd requests (meshxl/statesync/wire.py) are exactly
what etcd's generated messages serialize to, and parse back to the same messages."""

from __future__ import annotations

from aetcd import rpc
from hypothesis import given, settings
from hypothesis import strategies as st

from meshxl.statesync import wire

INT64 = st.integers(0, (1 << 63) - 1)
_small_or_big = st.one_of(st.integers(0, 300), INT64)


def _reference(key: bytes, value: bytes, expected: int, lease: int) -> rpc.RequestOp:
    return rpc.RequestOp(request_txn=rpc.TxnRequest(
        compare=[rpc.Compare(key=key, target=rpc.Compare.MOD, result=rpc.Compare.EQUAL,
                             mod_revision=expected)],
        success=[rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value,
                                                          lease=lease))],
        failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=key))]))


@settings(max_examples=300)
@given(key=st.binary(min_size=1, max_size=300), value=st.binary(max_size=20_000),
       expected=_small_or_big, lease=_small_or_big)
def test_guarded_put_is_etcds_message(key: bytes, value: bytes, expected: int,
                                      lease: int) -> None:
    encoded = wire.guarded_put(key, value, expected, lease)
    reference = _reference(key, value, expected, lease)
    assert encoded == reference.SerializeToString()
    assert rpc.RequestOp.FromString(encoded) == reference


@settings(max_examples=300)
@given(key=st.binary(min_size=1, max_size=300), expected=_small_or_big)
def test_guarded_delete_is_etcds_message(key: bytes, expected: int) -> None:
    encoded = wire.guarded_delete(key, expected)
    reference = rpc.RequestOp(request_txn=rpc.TxnRequest(
        compare=[rpc.Compare(key=key, target=rpc.Compare.MOD, result=rpc.Compare.EQUAL,
                             mod_revision=expected)],
        success=[rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key))],
        failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=key))]))
    assert encoded == reference.SerializeToString()
    assert rpc.RequestOp.FromString(encoded) == reference


@settings(max_examples=100)
@given(ops=st.lists(st.tuples(st.binary(min_size=1, max_size=40), st.binary(max_size=3000),
                              _small_or_big, _small_or_big), max_size=20))
def test_a_batch_is_etcds_txn_request(ops: list[tuple[bytes, bytes, int, int]]) -> None:
    encoded = wire.txn_request(wire.guarded_put(*op) for op in ops)
    reference = rpc.TxnRequest(success=[_reference(*op) for op in ops])
    assert encoded == reference.SerializeToString()
    assert rpc.TxnRequest.FromString(encoded) == reference


def test_out_of_range_numbers_are_refused() -> None:
    for expected, lease in ((-1, 0), (0, -1), (1 << 63, 0), (0, 1 << 63)):
        try:
            wire.guarded_put(b"k", b"v", expected, lease)
        except ValueError:
            continue
        raise AssertionError(f"{expected}, {lease} accepted")
    for expected in (-1, 1 << 63):
        try:
            wire.guarded_delete(b"k", expected)
        except ValueError:
            continue
        raise AssertionError(f"{expected} accepted")


@settings(max_examples=200)
@given(key=st.binary(min_size=1, max_size=200), version=st.integers(0, 10 ** 19),
       ops=st.lists(st.binary(min_size=1, max_size=40), max_size=5))
def test_a_fenced_batch_is_etcds_message(key: bytes, version: int, ops: list[bytes]) -> None:
    """A batch with the shard map fence: ``value(fence) == version`` compared at its
    outer level, the fence read in its failure branch (meshxl/etcd/fence.py builds the
    same with etcd's messages for the moves)."""
    from meshxl.etcd.fence import fence_compare, fence_read

    puts = [wire.guarded_put(op, b"v", 0, 0) for op in ops]
    encoded = wire.txn_request(puts, wire.fence_parts(key, version))
    reference = rpc.TxnRequest(compare=[fence_compare(key, version)],
                               success=[rpc.RequestOp.FromString(p) for p in puts],
                               failure=[fence_read(key)])
    assert encoded == reference.SerializeToString()
    assert rpc.TxnRequest.FromString(encoded) == reference
    assert wire.txn_request(puts) == rpc.TxnRequest(
        success=reference.success).SerializeToString()
