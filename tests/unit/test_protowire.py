"""The one hand-written protobuf encoder (meshxl/protowire.py) writes exactly what
protobuf's own serializer writes, and type URLs are spelled once."""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from google.protobuf import any_pb2, wrappers_pb2
from hypothesis import given
from hypothesis import strategies as st

from meshxl import protowire
from meshxl.xds import types


@given(n=st.integers(0, (1 << 64) - 1))
def test_varint_is_protobufs_uint64(n: int) -> None:
    encoded = wrappers_pb2.UInt64Value(value=n).SerializeToString()
    assert encoded == (b"\x08" + protowire.varint(n) if n else b"")


def test_a_negative_varint_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        protowire.varint(-1)


@given(number=st.integers(1, (1 << 29) - 1), payload=st.binary(max_size=70_000))
def test_len_field_is_protobufs_bytes_field(number: int, payload: bytes) -> None:
    # BytesValue.value is field 1; any field number frames the same way.
    if number == 1 and payload:
        assert protowire.len_field(1, payload) == wrappers_pb2.BytesValue(
            value=payload).SerializeToString()
    tag = protowire.varint(number << 3 | 2)
    assert protowire.len_field(number, payload) == (
        tag + protowire.varint(len(payload)) + payload)


def test_type_urls_are_what_any_pack_writes() -> None:
    packed = any_pb2.Any()
    packed.Pack(cluster_pb2.Cluster())
    assert types.CLUSTER == packed.type_url == protowire.type_url(
        cluster_pb2.Cluster.DESCRIPTOR.full_name)
    assert protowire.type_name(types.CLUSTER) == "envoy.config.cluster.v3.Cluster"


def test_short_names_of_types() -> None:
    assert [types.short_type(t) for t in types.TYPE_ORDER] == ["CDS", "EDS", "LDS", "RDS"]
    assert types.type_label(types.ENDPOINT) == "ClusterLoadAssignment"
    assert types.short_type("type.googleapis.com/x.y.Secret") == "Secret"
