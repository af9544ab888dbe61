"""Snapshot versions, encode-once and pre-encoded responses."""

from __future__ import annotations

import asyncio

import pytest
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
from envoy.config.listener.v3.listener_pb2 import Listener
from envoy.config.route.v3.route_pb2 import RouteConfiguration
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryResponse
from google.protobuf.any_pb2 import Any
from google.protobuf.message import Message

from meshxl.xds import cache
from meshxl.xds.cache import Snapshot, SnapshotCache, with_nonce
from meshxl.xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE, TYPE_ORDER


def cluster(name: str, timeout_s: int = 1) -> Cluster:
    c = Cluster(name=name, type=Cluster.EDS)
    c.connect_timeout.seconds = timeout_s
    c.eds_cluster_config.eds_config.ads.SetInParent()
    return c


def assignment(name: str, *ports: int) -> ClusterLoadAssignment:
    cla = ClusterLoadAssignment(cluster_name=name)
    group = cla.endpoints.add()
    for port in ports:
        address = group.lb_endpoints.add().endpoint.address.socket_address
        address.address = "127.0.0.1"
        address.port_value = port
    return cla


def model(ports: tuple[int, ...] = (8001, 8002)) -> dict[str, dict[str, Message]]:
    return {
        CLUSTER: {"a": cluster("a"), "b": cluster("b")},
        ENDPOINT: {"a": assignment("a", *ports), "b": assignment("b", 9001)},
        LISTENER: {"http": Listener(name="http")},
        ROUTE: {"local": RouteConfiguration(name="local")},
    }


def expected(type_url: str, version: str, messages: list[Message], nonce: str) -> bytes:
    resources = []
    for message in messages:
        packed = Any()
        packed.Pack(message)
        resources.append(packed)
    response = DiscoveryResponse(
        version_info=version, resources=resources, type_url=type_url, nonce=nonce
    )
    return response.SerializeToString(deterministic=True)


def test_versions_are_content_hashes() -> None:
    first = Snapshot.build(model())
    reordered = {t: dict(reversed(list(m.items()))) for t, m in reversed(model().items())}
    second = Snapshot.build(reordered)
    assert first.versions == second.versions  # another replica, same model
    assert len(set(first.versions.values())) == 4
    assert all(len(v) == 16 for v in first.versions.values())

    changed = Snapshot.build(model(ports=(8001, 8003)))
    assert changed.version(ENDPOINT) != first.version(ENDPOINT)
    for type_url in (CLUSTER, LISTENER, ROUTE):
        assert changed.version(type_url) == first.version(type_url)


def test_missing_types_are_served_empty() -> None:
    snapshot = Snapshot.build({CLUSTER: {"a": cluster("a")}})
    assert snapshot.type_urls == TYPE_ORDER
    listeners = DiscoveryResponse.FromString(with_nonce(snapshot.resources(LISTENER).response, "1"))
    assert listeners.type_url == LISTENER
    assert list(listeners.resources) == []
    assert listeners.version_info == snapshot.version(LISTENER)


def test_each_resource_encoded_once_per_build() -> None:
    before = cache.stats.resources_encoded
    snapshot = Snapshot.build(model())
    assert cache.stats.resources_encoded - before == 6
    for nonce in range(100):  # serving, whole or in part, encodes nothing
        with_nonce(snapshot.resources(CLUSTER).response, str(nonce))
        snapshot.resources(ENDPOINT).subset(frozenset({"a"}))
    assert cache.stats.resources_encoded - before == 6


def test_response_bytes_decode_like_envoy() -> None:
    resources = model()
    snapshot = Snapshot.build(resources)
    for type_url in TYPE_ORDER:
        version = snapshot.version(type_url)
        raw = with_nonce(snapshot.resources(type_url).response, "n7")
        messages = [resources[type_url][n] for n in sorted(resources[type_url])]
        assert raw == expected(type_url, version, messages, "n7")
        decoded = DiscoveryResponse.FromString(raw)
        assert decoded.nonce == "n7"
        assert decoded.version_info == version
        first = type(messages[0])()
        assert decoded.resources[0].Unpack(first)
        assert first == messages[0]


def test_subset_carries_only_asked_names() -> None:
    resources = model()
    snapshot = Snapshot.build(resources)
    endpoints = snapshot.resources(ENDPOINT)
    version = snapshot.version(ENDPOINT)

    only_b = with_nonce(endpoints.subset(frozenset({"b", "unknown"})), "3")
    assert only_b == expected(ENDPOINT, version, [resources[ENDPOINT]["b"]], "3")
    assert endpoints.subset(frozenset({"a", "b"})) is endpoints.response
    assert DiscoveryResponse.FromString(endpoints.subset(frozenset({"zz"}))).resources == []


def test_wrong_message_type_is_rejected() -> None:
    with pytest.raises(ValueError, match="ClusterLoadAssignment"):
        Snapshot.build({CLUSTER: {"a": assignment("a", 1)}})


async def test_cache_wait_returns_newer_snapshot() -> None:
    snapshots = SnapshotCache()
    assert snapshots.snapshot is None
    waiter = asyncio.create_task(snapshots.wait())
    await asyncio.sleep(0)
    assert not waiter.done()  # nothing to serve yet
    first = Snapshot.build(model())
    snapshots.set(first)
    async with asyncio.timeout(1):
        assert await waiter is first

    generation = snapshots.generation
    waiter = asyncio.create_task(snapshots.wait(generation))
    second = Snapshot.build(model(ports=(1,)))
    snapshots.set(second)
    async with asyncio.timeout(1):
        assert await waiter is second


def test_one_message_per_nonce_is_shared_by_every_stream() -> None:
    """A push to N Envoys builds one message per (names, nonce), not N copies."""
    snap = Snapshot.build({CLUSTER: {"a": Cluster(name="a"), "b": Cluster(name="b")}})
    resources = snap.resources(CLUSTER)
    nonce = f"{resources.version}.0"
    first = resources.message(None, nonce)
    assert resources.message(None, nonce) is first
    parsed = DiscoveryResponse.FromString(first)
    assert parsed.nonce == nonce and len(parsed.resources) == 2
    subset = resources.message(frozenset({"a"}), nonce)
    assert resources.message(frozenset({"a"}), nonce) is subset
    assert len(DiscoveryResponse.FromString(subset).resources) == 1
    assert DiscoveryResponse.FromString(resources.message(None, "other")).nonce == "other"
