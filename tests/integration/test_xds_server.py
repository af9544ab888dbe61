"""SotW ADS against a real grpc.aio server and client on loopback."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
from envoy.service.discovery.v3.ads_pb2_grpc import AggregatedDiscoveryServiceStub
from google.protobuf.message import Message

from meshxl.xds import cache
from meshxl.xds.cache import Snapshot, SnapshotCache
from meshxl.xds.server import AdsServer
from meshxl.xds.types import CLUSTER, ENDPOINT, LISTENER
from tests.harness.ads import AdsHarness, Envoy, eventually, names, snapshot


async def test_initial_request_gets_clusters_and_ack_is_recorded(xds: AdsHarness) -> None:
    snap = snapshot()
    xds.cache.set(snap)
    envoy = xds.envoy()
    envoy.request(CLUSTER)
    response = await envoy.recv()
    assert response.type_url == CLUSTER
    assert response.version_info == snap.version(CLUSTER)
    assert response.nonce
    assert names(response) == ["a", "b"]

    envoy.ack(response)
    await eventually(lambda: xds.types("envoy-1")[CLUSTER]["acked_version"] is not None)
    status = xds.ads.node_status()["envoy-1"]
    assert status["streams"] == 1
    assert status["cluster"] == "test"
    assert status["types"][CLUSTER]["acked_version"] == snap.version(CLUSTER)
    assert status["types"][CLUSTER]["responses"] == 1
    assert status["last_nack"] is None
    await envoy.silent()  # an ACK is not answered


async def test_first_request_answered_even_when_version_matches(xds: AdsHarness) -> None:
    snap = snapshot()
    xds.cache.set(snap)
    envoy = xds.envoy()  # e.g. reconnecting from another control-plane replica
    envoy.request(CLUSTER, version=snap.version(CLUSTER), nonce="from-another-replica")
    assert (await envoy.recv()).version_info == snap.version(CLUSTER)


async def test_requests_wait_for_the_first_snapshot(xds: AdsHarness) -> None:
    envoy = xds.envoy()
    envoy.request(CLUSTER)
    await envoy.silent()
    xds.cache.set(snapshot())
    assert names(await envoy.recv()) == ["a", "b"]


async def test_endpoints_by_name(xds: AdsHarness) -> None:
    xds.cache.set(snapshot(clusters=("a", "b", "c")))
    envoy = xds.envoy()
    envoy.request(ENDPOINT, ["b"])
    response = await envoy.recv()
    assert names(response) == ["b"]

    envoy.ack(response, ["b", "c"])  # a new cluster arrived: names change
    response = await envoy.recv()
    assert names(response) == ["b", "c"]


async def test_snapshot_change_pushes_clusters_then_endpoints(xds: AdsHarness) -> None:
    xds.cache.set(snapshot(1))
    envoy = xds.envoy()
    envoy.request(CLUSTER)
    clusters = await envoy.recv()
    envoy.ack(clusters)
    envoy.request(ENDPOINT, ["a", "b"])
    endpoints = await envoy.recv()
    envoy.ack(endpoints, ["a", "b"])
    await eventually(lambda: xds.types("envoy-1")[ENDPOINT]["acked_version"] is not None)

    new = snapshot(2)
    xds.cache.set(new)
    first, second = await envoy.recv(), await envoy.recv()
    assert (first.type_url, second.type_url) == (CLUSTER, ENDPOINT)
    assert first.version_info == new.version(CLUSTER)
    assert second.version_info == new.version(ENDPOINT)
    assert len({clusters.nonce, endpoints.nonce, first.nonce, second.nonce}) == 4


async def test_cluster_only_change_answers_the_rewarming_endpoint_request(xds: AdsHarness) -> None:
    """After a CDS push Envoy re-warms the changed clusters and asks for their EDS again
    with the current nonce (it looks like an ACK): it must get an answer, or the cluster
    stays warming although its endpoints did not change."""
    base = snapshot(1)
    xds.cache.set(base)
    envoy = xds.envoy()
    envoy.request(CLUSTER)
    clusters = await envoy.recv()
    envoy.ack(clusters)
    envoy.request(ENDPOINT, ["a", "b"])
    endpoints = await envoy.recv()
    envoy.ack(endpoints, ["a", "b"])
    await eventually(lambda: xds.types("envoy-1")[ENDPOINT]["acked_version"] is not None)

    # New clusters, same endpoints: only CDS changes.
    resources: dict[str, dict[str, Message]] = {CLUSTER: {}, ENDPOINT: {}}
    for name in ("a", "b"):
        c = Cluster(name=name, type=Cluster.EDS)
        c.connect_timeout.seconds = 9
        c.eds_cluster_config.eds_config.ads.SetInParent()
        resources[CLUSTER][name] = c
    for packed in endpoints.resources:
        cla = ClusterLoadAssignment()
        packed.Unpack(cla)
        resources[ENDPOINT][cla.cluster_name] = cla
    changed = Snapshot.build(resources)
    assert changed.version(ENDPOINT) == base.version(ENDPOINT)
    xds.cache.set(changed)
    pushed = await envoy.recv()
    assert pushed.type_url == CLUSTER
    envoy.ack(pushed)
    envoy.ack(endpoints, ["a", "b"])  # the re-warming request: same names, current nonce
    again = await envoy.recv()
    assert again.type_url == ENDPOINT
    assert again.version_info == base.version(ENDPOINT)
    assert sorted(names(again)) == ["a", "b"]
    envoy.ack(again, ["a", "b"])
    await envoy.silent()  # answered once, not in a loop


async def test_unchanged_type_is_not_pushed_again(xds: AdsHarness) -> None:
    xds.cache.set(snapshot(1))
    envoy = xds.envoy()
    envoy.request(CLUSTER)
    envoy.ack(await envoy.recv())
    await eventually(lambda: xds.types("envoy-1")[CLUSTER]["acked_version"] is not None)
    xds.cache.set(snapshot(1))  # rebuilt from the same model: same versions
    await envoy.silent()


async def test_nack_is_recorded_and_never_looped(xds: AdsHarness) -> None:
    good, bad = snapshot(1), snapshot(2)
    xds.cache.set(good)
    envoy = xds.envoy()
    envoy.request(CLUSTER)
    accepted = await envoy.recv()
    envoy.ack(accepted)
    await eventually(lambda: xds.types("envoy-1")[CLUSTER]["acked_version"] is not None)

    xds.cache.set(bad)
    rejected = await envoy.recv()
    assert rejected.version_info == bad.version(CLUSTER)
    envoy.nack(rejected, "cluster a: bad timeout", previous=accepted.version_info)
    await eventually(lambda: xds.ads.nacks == 1)

    status = xds.ads.node_status()["envoy-1"]
    assert status["last_nack"]["error"] == "cluster a: bad timeout"
    assert status["last_nack"]["version"] == bad.version(CLUSTER)
    assert status["last_nack"]["type_url"] == CLUSTER
    assert status["types"][CLUSTER]["acked_version"] == good.version(CLUSTER)

    sent = xds.ads.responses_sent[CLUSTER]
    xds.cache.set(snapshot(2))  # the same bad model again: same version
    await envoy.silent()
    assert xds.ads.responses_sent[CLUSTER] == sent

    # A reconnect of the same node does not get the rejected version either, but the
    # one it accepted last (it may have restarted with nothing), once.
    again = xds.envoy()
    again.request(CLUSTER)
    fallback = await again.recv()
    assert fallback.version_info == good.version(CLUSTER)
    assert names(fallback) == ["a", "b"]
    again.ack(fallback)
    await again.silent()
    assert xds.ads.responses_sent[CLUSTER] == sent + 1

    fixed = snapshot(3)
    xds.cache.set(fixed)
    for client in (envoy, again):
        response = await client.recv()
        assert response.version_info == fixed.version(CLUSTER)
        client.ack(response)
    await eventually(
        lambda: xds.types("envoy-1")[CLUSTER]["acked_version"] == fixed.version(CLUSTER)
    )


async def test_stale_nonce_is_ignored(xds: AdsHarness) -> None:
    xds.cache.set(snapshot(1))
    envoy = xds.envoy()
    envoy.request(CLUSTER)
    old = await envoy.recv()
    new_snapshot = snapshot(2)
    xds.cache.set(new_snapshot)
    new = await envoy.recv()

    envoy.nack(old, "late complaint about an old response")  # stale: ignored
    envoy.ack(new)
    await eventually(
        lambda: xds.types("envoy-1")[CLUSTER]["acked_version"] == new_snapshot.version(CLUSTER)
    )
    assert xds.ads.stale_requests == 1
    assert xds.ads.nacks == 0
    assert xds.ads.node_status()["envoy-1"]["last_nack"] is None
    await envoy.silent()


async def test_two_nodes_converge(xds: AdsHarness) -> None:
    snap = snapshot()
    xds.cache.set(snap)
    envoys = [xds.envoy("front"), xds.envoy("back")]
    for envoy in envoys:
        envoy.request(CLUSTER)
        envoy.ack(await envoy.recv())
        envoy.request(ENDPOINT, ["a"])
        envoy.ack(await envoy.recv(), ["a"])

    def converged() -> bool:
        status = xds.ads.node_status()
        return all(
            status[n]["types"][t]["acked_version"] == snap.version(t)
            for n in ("front", "back")
            for t in (CLUSTER, ENDPOINT)
        )

    await eventually(converged)


async def test_encoding_does_not_grow_with_streams(xds: AdsHarness) -> None:
    xds.cache.set(snapshot(1))
    envoys = [xds.envoy(f"envoy-{i}") for i in range(20)]
    for envoy in envoys:
        envoy.request(CLUSTER)
        envoy.request(ENDPOINT, ["a", "b"])
    for envoy in envoys:
        envoy.ack(await envoy.recv())
        envoy.ack(await envoy.recv(), ["a", "b"])

    before = cache.stats.resources_encoded
    new = snapshot(2)  # 2 clusters + 2 assignments
    assert cache.stats.resources_encoded - before == 4
    xds.cache.set(new)
    for envoy in envoys:
        assert (await envoy.recv()).version_info == new.version(CLUSTER)
        assert (await envoy.recv()).version_info == new.version(ENDPOINT)
    assert cache.stats.resources_encoded - before == 4


async def test_disconnect_cleans_up(xds: AdsHarness) -> None:
    xds.cache.set(snapshot())
    cancelled, closed = xds.envoy("gone"), xds.envoy("gone")
    for envoy in (cancelled, closed):
        envoy.request(CLUSTER)
        await envoy.recv()
    assert xds.ads.node_status()["gone"]["streams"] == 2

    cancelled.call.cancel()
    await eventually(lambda: xds.ads.node_status()["gone"]["streams"] == 1)
    closed.close()  # half-close: the server ends the stream
    assert await closed.call.code() == grpc.StatusCode.OK
    await eventually(lambda: xds.ads.node_status()["gone"]["streams"] == 0)
    assert xds.ads.node_status()["gone"]["disconnected_at"] is not None

    xds.ads.forget("gone")
    assert "gone" not in xds.ads.node_status()
    tasks = {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}
    assert not [t for t in tasks if "_read" in repr(t.get_coro())]


async def test_missing_type_url_is_invalid(xds: AdsHarness) -> None:
    xds.cache.set(snapshot())
    envoy = xds.envoy()
    envoy.request("")
    assert await envoy.call.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_unknown_type_is_served_empty(xds: AdsHarness) -> None:
    xds.cache.set(snapshot())
    envoy = xds.envoy()
    envoy.request(LISTENER)
    response = await envoy.recv()
    assert response.type_url == LISTENER
    assert list(response.resources) == []


async def test_status_callback_gets_latest_status() -> None:
    seen: list[tuple[str, dict[str, Any]]] = []

    async def persist(batch: list[tuple[str, dict[str, Any]]]) -> None:
        await asyncio.sleep(0)  # like an etcd transaction
        seen.extend(batch)

    snapshots = SnapshotCache()
    ads = AdsServer(snapshots, on_status_change=persist)
    server, port = await ads.serve("127.0.0.1:0")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        snap = snapshot()
        snapshots.set(snap)
        envoy = Envoy(AggregatedDiscoveryServiceStub(channel), "cb")
        envoy.request(CLUSTER)
        envoy.ack(await envoy.recv())
        await eventually(
            lambda: bool(seen) and seen[-1][1]["types"][CLUSTER]["acked_version"] is not None
        )
        assert ads.acked() == {"cb": {CLUSTER: snap.version(CLUSTER)}}
        await envoy.stop()
        await eventually(lambda: seen[-1][1]["streams"] == 0)
    await server.stop(None)
    await ads.close()
    assert {node_id for node_id, _ in seen} == {"cb"}
    assert ads.acked() == {}  # disconnected nodes are not waited for
    assert seen[-1][1]["types"][CLUSTER]["acked_version"] == snap.version(CLUSTER)


async def test_disconnected_node_records_are_bounded(
    xds: AdsHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    import meshxl.xds.server as server_module

    monkeypatch.setattr(server_module, "DISCONNECTED_NODES_MAX", 2)
    xds.cache.set(snapshot(1))
    for i in range(4):
        envoy = xds.envoy(f"churn-{i}")
        envoy.request(CLUSTER)
        envoy.ack(await envoy.recv())
        node = f"churn-{i}"

        def acked(node: str = node) -> Any:
            return xds.types(node)[CLUSTER]["acked_version"]

        def gone(node: str = node) -> bool:
            return bool(xds.ads.node_status()[node]["streams"] == 0)

        await eventually(acked)
        envoy.close()
        await eventually(gone)
    live = xds.envoy("live")
    live.request(CLUSTER)
    await live.recv()
    # The two most recently disconnected nodes are kept, the older two dropped; the
    # connected one is never dropped.
    assert set(xds.ads.node_status()) == {"churn-2", "churn-3", "live"}
