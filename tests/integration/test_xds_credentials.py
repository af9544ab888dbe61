"""Per-node and per-site ADS credentials over a real grpc.aio server on loopback: the
zone as a stream's own, fallbacks within a zone, the node-id bound per credential
(the file's format and the rules: tests/unit/test_xds_credentials.py)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
from google.protobuf.message import Message

from meshxl.xds.auth import AdsAuth
from meshxl.xds.cache import Snapshot
from meshxl.xds.credentials import (
    CredentialsFile,
)
from meshxl.xds.types import CLUSTER, ENDPOINT
from tests.harness.ads import Envoy, eventually
from tests.unit.test_xds_credentials import (
    EAST,
    SITES,
    WEST,
    bearer,
)


async def test_a_zone_is_its_streams_own_and_leaves_with_it(ads_server: Any) -> None:
    xds = await ads_server()
    xds.cache.set(zoned_snapshot(1))
    east = xds.envoy("edge-1", zone="east")
    assert zone_of(await eds(east)) == "east"
    hostile = xds.envoy("edge-1", zone="west")
    assert zone_of(await eds(hostile)) == "west"  # its own stream: its own zone
    xds.cache.set(zoned_snapshot(2))
    assert zone_of(await next_eds(east)) == "east"
    assert zone_of(await next_eds(hostile)) == "west"
    status = xds.ads.node_status()["edge-1"]
    assert (status["zone"], status["zones"], status["streams"]) == ("east", ["east", "west"], 2)
    await hostile.stop()
    await eventually(lambda: xds.ads.node_status()["edge-1"]["streams"] == 1)
    xds.cache.set(zoned_snapshot(3))
    assert zone_of(await next_eds(east)) == "east"
    assert xds.ads.zones() == {"edge-1": "east"}


async def test_a_fallback_never_crosses_zones(ads_server: Any) -> None:
    """The node's east stream ACKs east's view, then a west stream of it west's; another
    east stream rejects east's version: east falls back to what east accepted (the same
    version: an ACK outweighs), never to west's view, the node's last ACK."""
    xds = await ads_server()
    xds.cache.set(zoned_snapshot(1))
    east = xds.envoy("edge-1", zone="east")
    assert zone_of(await eds(east)) == "east"
    west = xds.envoy("edge-1", zone="west")
    assert zone_of(await eds(west)) == "west"
    await eventually(lambda: xds.ads.node_status()["edge-1"]["types"][ENDPOINT][
        "acked_version"] == zoned_snapshot(1).version(ENDPOINT, "west"))
    rejecter = xds.envoy("edge-1", zone="east")
    rejecter.request(CLUSTER)
    rejecter.ack(await rejecter.recv())
    rejecter.request(ENDPOINT, ["shop"])
    current = await rejecter.recv()
    assert zone_of(current) == "east"
    rejecter.nack(current, "forged rejection")
    await eventually(lambda: xds.ads.nacks >= 1)
    east.request(ENDPOINT, ["shop"])  # asks again (a re-subscription)
    again = await east.recv()
    assert zone_of(again) == "east"
    assert again.version_info == zoned_snapshot(1).version(ENDPOINT, "east")


async def test_new_node_ids_past_the_bound_are_refused(
        ads_server: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "meshxl.xds.server")
    changes: list[str] = []

    async def record(batch: Iterable[tuple[str, dict[str, Any]]]) -> None:
        changes.extend(node for node, _ in batch)

    xds = await ads_server(max_nodes=3, max_nodes_per_credential=2, on_status_change=record)
    xds.cache.set(zoned_snapshot(1))
    first = [xds.envoy(f"node-{i}") for i in range(3)]
    for envoy in first:
        await eds(envoy)
    code, details = await refused_with(xds.envoy("node-3"))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "3 node ids" in details and "--max-nodes" in details and "'node-3'" in details
    await eds(xds.envoy("node-0"))  # another stream of a node already counted
    await first[0].stop()
    await eventually(lambda: xds.ads.node_status()["node-0"]["streams"] == 1)
    code, _ = await refused_with(xds.envoy("node-4"))  # node-0 still has a stream
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    await first[1].stop()
    await eventually(lambda: xds.ads.node_status()["node-1"]["streams"] == 0)
    await eds(xds.envoy("node-5"))
    assert xds.ads.refused == {"too_many_nodes": 2}
    await eventually(lambda: "node-5" in changes)
    assert "node-3" not in changes and "node-4" not in changes
    assert set(xds.ads.node_status()) == {f"node-{i}" for i in (0, 1, 2, 5)}
    sample = xds.metrics.registry.get_sample_value
    assert sample("meshxl_xds_streams_refused_total", {"reason": "too_many_nodes"}) == 2
    # Invented node ids do not each make a log line: one per credential and minute.
    logged = [r for r in caplog.records if "(too_many_nodes)" in r.getMessage()]
    assert len(logged) == 1, [r.getMessage() for r in logged]


async def test_the_bound_per_credential(ads_server: Any, tmp_path: Path) -> None:
    path = tmp_path / "credentials.yaml"
    path.write_text(SITES)
    auth = AdsAuth(credentials=CredentialsFile(path))
    xds = await ads_server(auth=auth, max_nodes_per_credential=100)
    xds.cache.set(zoned_snapshot(1))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{xds.port}")
    try:
        west = [Envoy(AuthStub(channel, WEST), f"edge-west-{i}", zone="west")
                for i in range(3)]
        xds.envoys.extend(west)
        for envoy in west[:2]:
            assert zone_of(await eds(envoy)) == "west"
        code, details = await refused_with(west[2])
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "credential 'site-west'" in details and "2 node ids" in details
        # Another credential has its own count.
        east = Envoy(AuthStub(channel, EAST), "edge-east-1", zone="east")
        xds.envoys.append(east)
        assert zone_of(await eds(east)) == "east"
        assert xds.ads.credential_counts() == {
            "site-west": {"nodes": 2, "max_nodes": 2},
            "site-east": {"nodes": 1, "max_nodes": 100}}
    finally:
        await channel.close()


def zoned_snapshot(version: int) -> Snapshot:
    """One cluster with a global EDS and an east and a west variant (each names its
    zone in the endpoint's address), all changing with ``version``."""
    def cla(zone: str) -> ClusterLoadAssignment:
        out = ClusterLoadAssignment(cluster_name="shop")
        address = out.endpoints.add().lb_endpoints.add().endpoint.address.socket_address
        address.address = {"": "127.0.0.1", "east": "127.0.0.2", "west": "127.0.0.3"}[zone]
        address.port_value = 8000 + version
        return out

    cluster = Cluster(name="shop", type=Cluster.EDS)
    cluster.eds_cluster_config.eds_config.ads.SetInParent()
    resources: dict[str, dict[str, Message]] = {CLUSTER: {"shop": cluster},
                                               ENDPOINT: {"shop": cla("")}}
    return Snapshot.build(resources, zones={z: {ENDPOINT: {"shop": cla(z)}}
                                            for z in ("east", "west")})


def zone_of(response: Any) -> str:
    cla = ClusterLoadAssignment()
    response.resources[0].Unpack(cla)
    address = cla.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address
    return {"127.0.0.1": "", "127.0.0.2": "east", "127.0.0.3": "west"}[address]


async def eds(envoy: Envoy) -> Any:
    """Ask for CDS and EDS, ACK both; the EDS response."""
    envoy.request(CLUSTER)
    envoy.ack(await envoy.recv())
    envoy.request(ENDPOINT, ["shop"])
    response = await envoy.recv()
    envoy.ack(response, ["shop"])
    return response


async def next_eds(envoy: Envoy) -> Any:
    """After a push: the CDS response ACKed, the EDS one returned (and ACKed)."""
    while True:
        response = await envoy.recv()
        if response.type_url == ENDPOINT:
            envoy.ack(response, ["shop"])
            return response
        envoy.ack(response)
        envoy.request(ENDPOINT, ["shop"], version="", nonce=response.nonce)


async def refused_with(envoy: Envoy) -> tuple[grpc.StatusCode, str]:
    envoy.request(CLUSTER)
    async with asyncio.timeout(3):
        code = await envoy.call.code()
    return code, await envoy.call.details()


class AuthStub:
    """The ADS stub, sending ``token`` on every call (as Envoy's initial_metadata)."""

    def __init__(self, channel: grpc.aio.Channel, token: str) -> None:
        from envoy.service.discovery.v3.ads_pb2_grpc import AggregatedDiscoveryServiceStub

        self._stub = AggregatedDiscoveryServiceStub(channel)
        self._metadata = tuple(bearer(token))

    def StreamAggregatedResources(self, requests: Any) -> Any:  # noqa: N802 (gRPC's name)
        return self._stub.StreamAggregatedResources(requests, metadata=self._metadata)
