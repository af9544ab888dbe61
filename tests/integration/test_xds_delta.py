"""Delta (incremental) ADS against a real grpc.aio server and client on loopback.

The client is scripted like Envoy's delta client: node on the first request only,
``initial_resource_versions`` on a new stream, ACK/NACK with the response's nonce.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterable
from typing import Any

import grpc
import pytest
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.service.discovery.v3.ads_pb2_grpc import AggregatedDiscoveryServiceStub
from envoy.service.discovery.v3.discovery_pb2 import (
    DeltaDiscoveryResponse,
    Resource,
)

from meshxl.xds import cache
from meshxl.xds.cache import SnapshotCache
from meshxl.xds.delta import _frame, delta_resources, resource_version
from meshxl.xds.server import AdsServer
from meshxl.xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE
from tests.harness.ads import (
    AdsHarness,
    DeltaEnvoy,
    eventually,
    sent,
    snap,
    versions,
)
from tests.harness.clock import window


@pytest.fixture
def xds(delta_xds: AdsHarness) -> AdsHarness:
    """This file's streams are delta ones."""
    return delta_xds


async def connect(xds: AdsHarness, node_id: str = "envoy-1",
                  endpoints: Iterable[str] = ("a", "b")) -> DeltaEnvoy:
    """A client that holds all clusters and ``endpoints``, everything ACKed."""
    envoy = xds.envoy(node_id)
    envoy.request(CLUSTER)
    envoy.ack(await envoy.recv())
    envoy.request(ENDPOINT, endpoints)
    envoy.ack(await envoy.recv())
    snapshot = xds.cache.snapshot
    assert snapshot is not None
    await eventually(lambda: xds.acked(ENDPOINT, node_id) == snapshot.version(ENDPOINT))
    return envoy


# -- subscriptions ------------------------------------------------------------------------


async def test_wildcard_clusters_carry_per_resource_versions(xds: AdsHarness) -> None:
    snapshot = snap({"a": 1, "b": 1})
    xds.cache.set(snapshot)
    envoy = xds.envoy()
    envoy.request(CLUSTER)  # no names on the first request: legacy wildcard
    response = await envoy.recv()
    assert response.type_url == CLUSTER
    assert response.system_version_info == snapshot.version(CLUSTER)
    assert response.nonce and not response.removed_resources
    assert sent(response) == versions(snapshot, CLUSTER)
    entries = snapshot.resources(CLUSTER).entries
    assert sent(response)["a"] == resource_version(entries["a"])
    decoded = Cluster()
    assert response.resources[0].resource.Unpack(decoded)
    assert decoded.name == "a" and decoded.connect_timeout.seconds == 1

    envoy.ack(response)
    await eventually(lambda: xds.acked(CLUSTER) == snapshot.version(CLUSTER))
    status = xds.status()
    assert status["streams"] == 1 and status["cluster"] == "test"
    assert status["types"][CLUSTER]["responses"] == 1
    await envoy.silent()  # an ACK is not answered


async def test_explicit_wildcard_and_names_that_do_not_exist(xds: AdsHarness) -> None:
    xds.cache.set(snap({"a": 1}))
    envoy = xds.envoy()
    envoy.request(LISTENER, ["*"])  # explicit wildcard of an empty type: empty answer
    response = await envoy.recv()
    assert (list(response.resources), list(response.removed_resources)) == ([], [])

    envoy.request(ENDPOINT, ["a", "ghost"])
    response = await envoy.recv()
    assert list(sent(response)) == ["a"]
    assert list(response.removed_resources) == ["ghost"]  # "does not exist", at once
    envoy.ack(response)

    appeared = snap({"a": 1, "ghost": 1})
    xds.cache.set(appeared)
    response = await envoy.recv()  # listeners did not change: nothing for them
    assert response.type_url == ENDPOINT
    assert list(sent(response)) == ["ghost"] and not response.removed_resources
    await envoy.silent()


async def test_subscribe_and_unsubscribe_endpoints(xds: AdsHarness) -> None:
    base = snap({"a": 1, "b": 1, "c": 1})
    xds.cache.set(base)
    envoy = xds.envoy()
    envoy.request(ENDPOINT, ["a"])
    response = await envoy.recv()
    assert list(sent(response)) == ["a"]

    envoy.ack(response, subscribe=["b"])  # a new cluster arrived: only b is sent
    response = await envoy.recv()
    assert list(sent(response)) == ["b"]
    assert response.system_version_info == base.version(ENDPOINT)
    envoy.ack(response, unsubscribe=["a"])
    await envoy.silent()  # an unsubscription needs no answer

    # a (no longer subscribed) changes: a version-only response, so the node's status
    # still follows the snapshot.
    moved = snap({"a": 1, "b": 1, "c": 1}, ports={"a": 9000})
    xds.cache.set(moved)
    response = await envoy.recv()
    assert response.system_version_info == moved.version(ENDPOINT)
    assert (list(response.resources), list(response.removed_resources)) == ([], [])
    envoy.ack(response)
    await eventually(lambda: xds.acked(ENDPOINT) == moved.version(ENDPOINT))

    envoy.request(ENDPOINT, ["a"])  # subscribing again sends it again
    assert sent(await envoy.recv()) == {"a": versions(moved, ENDPOINT)["a"]}
    envoy.request(ENDPOINT, ["a"])  # even if the client should hold it: it may not
    assert list(sent(await envoy.recv())) == ["a"]


async def test_removed_resources(xds: AdsHarness) -> None:
    xds.cache.set(snap({"a": 1, "b": 1}))
    envoy = await connect(xds)

    xds.cache.set(snap({"a": 1}))
    clusters, endpoints = await envoy.recv(), await envoy.recv()
    assert (clusters.type_url, list(clusters.resources)) == (CLUSTER, [])
    assert list(clusters.removed_resources) == ["b"]
    assert list(endpoints.removed_resources) == ["b"]
    assert list(endpoints.resources) == []
    envoy.ack(clusters)
    envoy.ack(endpoints, unsubscribe=["b"])  # Envoy drops the cluster's EDS interest
    await envoy.silent()


async def test_unsubscribing_a_name_also_under_the_wildcard_resends_it(xds: AdsHarness) -> None:
    snapshot = snap({"a": 1, "b": 1})
    xds.cache.set(snapshot)
    envoy = xds.envoy()
    envoy.request(CLUSTER, ["*", "a"])
    response = await envoy.recv()
    assert set(sent(response)) == {"a", "b"}
    envoy.ack(response, unsubscribe=["a"])
    # The wildcard still carries a: say so, or the client cannot tell whether to keep it.
    response = await envoy.recv()
    assert list(sent(response)) == ["a"]
    envoy.ack(response, unsubscribe=["*"])
    await envoy.silent()


# -- reconnects --------------------------------------------------------------------------


async def test_initial_resource_versions_are_not_resent(xds: AdsHarness) -> None:
    """A reconnecting Envoy (to this or another replica) gets only what it lacks."""
    before = snap({"a": 1, "b": 1, "old": 1})
    held_clusters, held_endpoints = versions(before, CLUSTER), versions(before, ENDPOINT)
    now = snap({"a": 1, "b": 2})  # b changed, old removed
    xds.cache.set(now)
    envoy = xds.envoy()
    envoy.request(CLUSTER, initial=held_clusters)
    envoy.request(ENDPOINT, ["a", "b", "old"], initial=held_endpoints)
    clusters, endpoints = await envoy.recv(), await envoy.recv()
    assert sent(clusters) == {"b": versions(now, CLUSTER)["b"]}
    assert list(clusters.removed_resources) == ["old"]
    assert list(sent(endpoints)) == ["b"]  # re-warming the changed cluster b
    assert list(endpoints.removed_resources) == ["old"]

    # In step with the snapshot: a version-only answer, no resource.
    again = xds.envoy("envoy-2")
    again.request(CLUSTER, initial=versions(now, CLUSTER))
    again.request(ENDPOINT, ["a", "b"], initial=versions(now, ENDPOINT))
    for type_url in (CLUSTER, ENDPOINT):
        response = await again.recv()
        assert response.type_url == type_url
        assert response.system_version_info == now.version(type_url)
        assert (list(response.resources), list(response.removed_resources)) == ([], [])
        again.ack(response)
    await eventually(lambda: xds.acked(ENDPOINT, "envoy-2") == now.version(ENDPOINT))
    assert xds.acked(CLUSTER, "envoy-2") == now.version(CLUSTER)


async def test_versions_agree_between_replicas() -> None:
    """Two control planes built from the same model give every resource one version."""
    first, second = snap({"a": 1, "b": 2}), snap({"b": 2, "a": 1})
    for type_url in (CLUSTER, ENDPOINT):
        assert versions(first, type_url) == versions(second, type_url)
    assert versions(first, CLUSTER)["a"] != versions(snap({"a": 3}), CLUSTER)["a"]


# -- re-warming ----------------------------------------------------------------------------


async def test_changed_cluster_gets_its_endpoints_again(xds: AdsHarness) -> None:
    """An updated cluster warms until its endpoints arrive, and Envoy (already subscribed)
    asks for nothing: the unchanged ClusterLoadAssignment is pushed after it."""
    base = snap({"a": 1, "b": 1})
    xds.cache.set(base)
    envoy = await connect(xds)

    changed = snap({"a": 5, "b": 1})
    assert changed.version(ENDPOINT) == base.version(ENDPOINT)
    xds.cache.set(changed)
    clusters, endpoints = await envoy.recv(), await envoy.recv()
    assert list(sent(clusters)) == ["a"]
    assert endpoints.type_url == ENDPOINT
    assert sent(endpoints) == {"a": versions(base, ENDPOINT)["a"]}
    envoy.ack(clusters)
    envoy.ack(endpoints)
    await envoy.silent()  # once, not in a loop


async def test_unchanged_snapshot_is_not_pushed(xds: AdsHarness) -> None:
    xds.cache.set(snap({"a": 1, "b": 1}))
    envoy = await connect(xds)
    responses = dict(xds.ads.responses_sent)
    xds.cache.set(snap({"a": 1, "b": 1}))  # rebuilt from the same model
    await envoy.silent()
    assert xds.ads.responses_sent == responses


# -- NACK and nonces ------------------------------------------------------------------------


async def test_nack_is_recorded_quarantined_and_fixed(xds: AdsHarness) -> None:
    good, bad, fixed = snap({"a": 1, "b": 1}), snap({"a": 2, "b": 1}), snap({"a": 3, "b": 1})
    xds.cache.set(good)
    envoy = await connect(xds)

    xds.cache.set(bad)
    rejected = await envoy.recv()
    assert list(sent(rejected)) == ["a"]
    rewarm = await envoy.recv()  # the endpoints of a, sent after it
    envoy.nack(rejected, "cluster a: bad timeout")
    envoy.ack(rewarm)
    await eventually(lambda: xds.ads.nacks == 1)
    status = xds.status()
    assert status["last_nack"]["error"] == "cluster a: bad timeout"
    assert status["last_nack"]["version"] == bad.version(CLUSTER)
    assert status["last_nack"]["type_url"] == CLUSTER
    assert status["types"][CLUSTER]["acked_version"] == good.version(CLUSTER)

    sent_before = xds.ads.responses_sent[CLUSTER]
    xds.cache.set(snap({"a": 2, "b": 1}))  # the same bad model again
    await envoy.silent()
    # A reconnect of the same node, holding the good version, is not sent a either,
    # and gets no version-only answer (it does not hold that version).
    again = xds.envoy()
    again.request(CLUSTER, initial=versions(good, CLUSTER))
    await again.silent()
    assert xds.ads.responses_sent[CLUSTER] == sent_before
    assert xds.acked(CLUSTER) == good.version(CLUSTER)

    xds.cache.set(fixed)
    for client in (envoy, again):
        response = await client.recv()
        assert sent(response) == {"a": versions(fixed, CLUSTER)["a"]}
        client.ack(response)
    await eventually(lambda: xds.acked(CLUSTER) == fixed.version(CLUSTER))


async def test_a_large_rejected_response_stays_quarantined(xds: AdsHarness) -> None:
    """One quarantine entry per rejected response: 100 rejected clusters do not push
    each other (or anything else) out of the node's bounded quarantine, so a reconnect
    gets all 100 at the version the node accepted, none at the rejected one."""
    accepted = snap({f"c{i:03}": 1 for i in range(100)})
    xds.cache.set(accepted)
    envoy = xds.envoy()
    envoy.request(CLUSTER)
    envoy.ack(await envoy.recv())
    await eventually(lambda: xds.acked(CLUSTER) == accepted.version(CLUSTER))
    xds.cache.set(snap({f"c{i:03}": 2 for i in range(100)}))
    response = await envoy.recv()
    assert len(response.resources) == 100
    envoy.nack(response, "rejected")
    await eventually(lambda: xds.ads.nacks == 1)
    await envoy.stop()

    again = xds.envoy()  # reconnects holding nothing: the accepted versions come back
    again.request(CLUSTER)
    fallback = await again.recv()
    assert sent(fallback) == versions(accepted, CLUSTER)
    again.ack(fallback)
    await again.silent()
    # That ACK does not claim the node holds the version it rejected.
    assert xds.acked(CLUSTER) == accepted.version(CLUSTER)


async def test_ack_of_a_response_that_left_a_rejected_resource_out(xds: AdsHarness) -> None:
    """b changes while a is still the version Envoy rejected: b is sent, and its ACK does
    not claim the node holds the new snapshot version."""
    xds.cache.set(snap({"a": 1, "b": 1}))
    envoy = xds.envoy()
    envoy.request(CLUSTER)
    envoy.ack(await envoy.recv())
    xds.cache.set(snap({"a": 2, "b": 1}))
    envoy.nack(await envoy.recv(), "bad a")
    await eventually(lambda: xds.ads.nacks == 1)
    acked = xds.acked(CLUSTER)

    later = snap({"a": 2, "b": 7})
    xds.cache.set(later)
    response = await envoy.recv()
    assert list(sent(response)) == ["b"]
    envoy.ack(response)
    await eventually(lambda: xds.status()["types"][CLUSTER]["ack_time"] is not None)
    await window(0.05, "no other ACK is recorded")
    assert xds.acked(CLUSTER) == acked != later.version(CLUSTER)


async def test_unknown_nonce_acknowledges_nothing_but_subscriptions_apply(
    xds: AdsHarness,
) -> None:
    xds.cache.set(snap({"a": 1, "b": 1}))
    envoy = xds.envoy()
    envoy.request(ENDPOINT, ["a"])
    envoy.ack(await envoy.recv())
    await eventually(lambda: xds.acked(ENDPOINT) is not None)

    envoy.request(ENDPOINT, ["b"], nonce="no-such-nonce", error="late complaint")
    response = await envoy.recv()
    assert list(sent(response)) == ["b"]  # the subscription counted
    await eventually(lambda: xds.ads.stale_requests == 1)
    assert xds.ads.nacks == 0 and xds.status()["last_nack"] is None


async def test_nonces_pair_answers_with_responses_in_flight(xds: AdsHarness) -> None:
    xds.cache.set(snap({"a": 1}))
    envoy = xds.envoy()
    envoy.request(CLUSTER)
    first = await envoy.recv()
    second_snapshot = snap({"a": 2})
    xds.cache.set(second_snapshot)
    second = await envoy.recv()  # sent before the first was answered
    assert first.nonce != second.nonce
    envoy.ack(first)
    envoy.ack(second)
    await eventually(lambda: xds.acked(CLUSTER) == second_snapshot.version(CLUSTER))
    assert xds.ads.stale_requests == 0


async def test_missing_type_url_is_invalid(xds: AdsHarness) -> None:
    xds.cache.set(snap({"a": 1}))
    envoy = xds.envoy()
    envoy.request("")
    assert await envoy.call.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_requests_wait_for_the_first_snapshot(xds: AdsHarness) -> None:
    envoy = xds.envoy()
    envoy.request(CLUSTER)
    await envoy.silent()
    xds.cache.set(snap({"a": 1}))
    assert list(sent(await envoy.recv())) == ["a"]


# -- encoding -------------------------------------------------------------------------------


def test_response_bytes_equal_protobufs_own_encoding() -> None:
    snapshot = snap({"a": 1, "b": 2})
    memo = delta_resources(snapshot.resources(CLUSTER))
    assert delta_resources(snapshot.resources(CLUSTER)) is memo  # once per snapshot
    messages = snapshot.resources(CLUSTER).sources
    resources = []
    for name in ("a", "b"):
        packed = Resource(name=name, version=memo.versions[name])
        packed.resource.Pack(messages[name])
        resources.append(packed)
    expected = DeltaDiscoveryResponse(
        system_version_info=memo.version, resources=resources, type_url=CLUSTER, nonce="n7",
        removed_resources=["gone", "old"])
    raw = _frame(CLUSTER, memo.version, memo.body(("a", "b")), ["gone", "old"], "n7")
    assert raw == expected.SerializeToString(deterministic=True)


def test_delta_entries_live_as_long_as_their_snapshot() -> None:
    snapshot = snap({"a": 1})
    memo = weakref.ref(delta_resources(snapshot.resources(CLUSTER)))
    replaced = snap({"a": 2})  # the next build of the type is remembered instead
    delta_resources(replaced.resources(CLUSTER))
    del snapshot
    gc.collect()
    assert memo() is None


async def test_encoding_does_not_grow_with_streams(xds: AdsHarness) -> None:
    xds.cache.set(snap({"a": 1, "b": 1}))
    envoys = [await connect(xds, f"envoy-{i}") for i in range(10)]
    before = cache.stats.resources_encoded
    new = snap({"a": 2, "b": 2})
    assert cache.stats.resources_encoded - before == 4
    xds.cache.set(new)
    for envoy in envoys:
        assert set(sent(await envoy.recv())) == {"a", "b"}
    assert cache.stats.resources_encoded - before == 4


# -- metrics ----------------------------------------------------------------------------------


async def test_metrics_count_streams_pushes_and_answers(xds: AdsHarness) -> None:
    xds.cache.set(snap({"a": 1}))
    delta, sotw = xds.envoy("d"), xds.sotw("s")
    delta.request(CLUSTER)
    sotw.request(CLUSTER)
    delta.ack(await delta.recv())
    sotw.ack(await sotw.recv())
    await eventually(lambda: bool(xds.acked(CLUSTER, "d") and xds.acked(CLUSTER, "s")))
    xds.cache.set(snap({"a": 2}))
    delta.nack(await delta.recv(), "no")
    sotw.nack(await sotw.recv(), "no")
    await eventually(lambda: xds.ads.nacks == 2)

    m = xds.sample
    for protocol in ("delta", "sotw"):
        assert m("meshxl_xds_connected_streams", protocol=protocol) == 1
        assert m("meshxl_xds_streams_opened_total", protocol=protocol) == 1
        assert m("meshxl_xds_pushes_total", type="Cluster", protocol=protocol) == 2
    # Push latency: only the second snapshot was published while the streams were open
    # (the first answer to a connecting Envoy is no push).
    assert m("meshxl_xds_push_duration_seconds_count", type="Cluster") == 2
    assert m("meshxl_xds_ack_duration_seconds_count", type="Cluster") == 4
    assert m("meshxl_xds_nacks_total", type="Cluster") == 2

    await delta.stop()
    await sotw.stop()
    await eventually(lambda: m("meshxl_xds_connected_streams", protocol="delta") == 0)
    await eventually(lambda: m("meshxl_xds_connected_streams", protocol="sotw") == 0)


async def test_delivery_hooks_get_the_snapshot_version() -> None:
    """The failover tracer's hooks see delta streams like SotW ones."""
    calls: list[tuple[str, str, str, str | None]] = []

    def record(kind: str) -> Any:
        return lambda node, type_url, version, error: calls.append(
            (kind, type_url, version, error))

    snapshots = SnapshotCache()
    ads = AdsServer(snapshots, on_sent=record("sent"), on_answer=record("answer"))
    server, port = await ads.serve("127.0.0.1:0")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        first = snap({"a": 1})
        snapshots.set(first)
        envoy = DeltaEnvoy(AggregatedDiscoveryServiceStub(channel), "hooks")
        envoy.request(ENDPOINT, ["a"])
        envoy.ack(await envoy.recv())
        await eventually(lambda: len(calls) == 2)
        second = snap({"a": 1}, ports={"a": 9})
        snapshots.set(second)
        envoy.nack(await envoy.recv(), "no")
        await eventually(lambda: len(calls) == 4)
        await envoy.stop()
    await server.stop(None)
    await ads.close()
    v1, v2 = first.version(ENDPOINT), second.version(ENDPOINT)
    assert calls == [("sent", ENDPOINT, v1, None), ("answer", ENDPOINT, v1, None),
                     ("sent", ENDPOINT, v2, None), ("answer", ENDPOINT, v2, "no")]


async def test_route_type_is_served_like_any_other(xds: AdsHarness) -> None:
    xds.cache.set(snap({"a": 1}))
    envoy = xds.envoy()
    envoy.request(ROUTE, ["local"])  # not in the snapshot: it does not exist
    response = await envoy.recv()
    assert list(response.removed_resources) == ["local"]
    envoy.ack(response)
    await envoy.silent()
