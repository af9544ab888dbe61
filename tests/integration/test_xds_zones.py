"""A node's locality zone belongs to its stream, and credentials bind node ids and zones,
with real Envoys.

Two Envoys, one per site, get the ``site_affinity: local`` view of their own zone: their
own site's members at priority 0, the other site's at 1. A hostile ADS client opens a
stream under the east Envoy's node id claiming zone west: without authentication it is
served west's view on its own stream and changes nothing the east Envoy is served, while
it is connected and after it left (before, the zone was kept per node id and the east
Envoy was pushed west's priorities, which stayed after the hostile stream ended); with
site tokens it is refused (PERMISSION_DENIED) unless its token is east's, and then too it
changes nothing. Node records in etcd are bounded per credential.

The model has no listener (only EDS priorities are read), so the Envoys share the host.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aetcd
import grpc
import pytest
import yaml
from envoy.config.core.v3.base_pb2 import Node
from envoy.service.discovery.v3.ads_pb2_grpc import AggregatedDiscoveryServiceStub
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest, DiscoveryResponse

from meshxl.etcd.keys import Keys
from meshxl.local.wait import wait_until
from meshxl.xds.app import ControlPlane
from meshxl.xds.types import CLUSTER, ENDPOINT
from tests.harness import EnvoyFixture

pytestmark = pytest.mark.integration

SITE_OF = {"e1": "east", "e2": "east", "w1": "west", "w2": "west"}
EAST_TOKEN = "east-site-token-0123456789abcdef"
WEST_TOKEN = "west-site-token-0123456789abcdef"
EAST, WEST = "edge-east-1", "edge-west-1"


def write_model(path: Path, weight: int = 100) -> Path:
    """``weight``: member e1's weight; changing it changes every EDS variant (a push)."""
    model = {"clusters": [{
        "name": "shop", "mode": "load-sharing", "site_affinity": "local",
        "sites": [{"name": "east", "failover_rank": 0}, {"name": "west", "failover_rank": 0}],
        "health_check": {"enabled": False},
        "members": [{"name": name, "address": "127.0.0.1", "port": 9000 + i, "site": site,
                     "weight": weight if name == "e1" else 100}
                    for i, (name, site) in enumerate(SITE_OF.items())]}]}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(model, sort_keys=False))
    os.replace(tmp, path)
    return path


def sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def priorities(envoy: EnvoyFixture) -> dict[str, int]:
    """Site -> the priority the Envoy gives that site's members (one value per site)."""
    hosts = await envoy.hosts("shop")
    by_port = {9000 + i: site for i, site in enumerate(SITE_OF.values())}
    seen: dict[str, set[int]] = {}
    for host in hosts:
        seen.setdefault(by_port[host.port], set()).add(host.priority)
    assert all(len(p) == 1 for p in seen.values()), seen
    return {site: p.pop() for site, p in seen.items()}


async def serves_version(plane: ControlPlane, node_id: str, zone: str) -> None:
    """Wait until ``node_id`` ACKed the EDS version of ``zone``'s view of the current
    snapshot (the push reached it and it took it)."""
    def acked() -> bool:
        snapshot = plane.cache.snapshot
        status = plane.ads.node_status().get(node_id)
        return snapshot is not None and status is not None and status["types"].get(
            ENDPOINT, {}).get("acked_version") == snapshot.version(ENDPOINT, zone)

    await wait_until(acked, timeout=15.0, what=f"{node_id} ACKed {zone}'s EDS version")


async def push(plane: ControlPlane, model: Path, weight: int) -> None:
    before = plane.cache.snapshot
    write_model(model, weight)
    await wait_until(lambda: plane.cache.snapshot is not before, timeout=10.0,
                     what="the changed model built")


class Hostile:
    """A raw ADS client: one SotW stream for ``node_id`` in ``zone``, ACKing everything."""

    def __init__(self, target: str, node_id: str, zone: str, token: str | None = None):
        self.channel = grpc.aio.insecure_channel(target)
        stub = AggregatedDiscoveryServiceStub(self.channel)
        metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.requests: asyncio.Queue[DiscoveryRequest | None] = asyncio.Queue()
        self.call = stub.StreamAggregatedResources(self._outgoing(), metadata=metadata)
        self.node = Node(id=node_id)
        self.node.locality.zone = zone
        self.seen: list[DiscoveryResponse] = []

    async def _outgoing(self) -> AsyncIterator[DiscoveryRequest]:
        while (request := await self.requests.get()) is not None:
            yield request

    async def subscribe(self) -> dict[str, DiscoveryResponse]:
        """Ask for CDS and EDS, ACK both; the responses by type."""
        got: dict[str, DiscoveryResponse] = {}
        self.requests.put_nowait(DiscoveryRequest(node=self.node, type_url=CLUSTER))
        self.requests.put_nowait(DiscoveryRequest(type_url=ENDPOINT, resource_names=["shop"]))
        async for response in self.call:
            self.seen.append(response)
            self.requests.put_nowait(DiscoveryRequest(
                type_url=response.type_url, version_info=response.version_info,
                response_nonce=response.nonce,
                resource_names=["shop"] if response.type_url == ENDPOINT else []))
            got[response.type_url] = response
            if len(got) == 2:
                return got
        raise AssertionError("the stream ended")

    async def refused(self, *, request: bool = True) -> tuple[grpc.StatusCode, str]:
        """The status of a stream the server ends at its first request. Only that one
        request is sent: grpc.aio reports a write that fails because the server already
        ended the stream as INTERNAL, in place of the server's own status
        (grpc/grpc#36066), so a second request queued at once makes the code a race.
        ``request=False`` sends none, for a stream refused on its metadata alone (a
        missing or wrong token, before any request is read): there even the one
        request's write races the server's end (INTERNAL seen on a loaded machine)."""
        if request:
            self.requests.put_nowait(DiscoveryRequest(node=self.node, type_url=CLUSTER))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async with asyncio.timeout(5):
                await self._first_response()
        return info.value.code(), info.value.details() or ""

    async def _first_response(self) -> DiscoveryResponse:
        async for response in self.call:
            return response
        raise AssertionError("the stream ended without a status")

    async def close(self) -> None:
        self.requests.put_nowait(None)
        self.call.cancel()
        await self.channel.close()


async def two_sites(tmp_path: Path, start_control_plane: Any, start_envoy: Any,
                    **plane: Any) -> tuple[ControlPlane, Path, EnvoyFixture, EnvoyFixture]:
    model = write_model(tmp_path / "model.yaml")
    control = await start_control_plane(config_path=model, **plane)
    tokens = plane.get("credentials") is not None
    east = await start_envoy(EAST, control.port, zone="east",
                             xds_token=EAST_TOKEN if tokens else None)
    west = await start_envoy(WEST, control.port, zone="west",
                             xds_token=WEST_TOKEN if tokens else None)
    for envoy in (east, west):
        await envoy.wait_ready()
        await envoy.wait_hosts("shop", lambda hs: len(hs) == 4, timeout=20,
                               what="the four members")
    assert await priorities(east) == {"east": 0, "west": 1}
    assert await priorities(west) == {"east": 1, "west": 0}
    return control, model, east, west


async def east_keeps_its_view(plane: ControlPlane, model: Path, east: EnvoyFixture,
                              weight: int) -> None:
    """Push a change; the east Envoy takes east's view of it."""
    await push(plane, model, weight)
    await serves_version(plane, EAST, "east")
    assert await priorities(east) == {"east": 0, "west": 1}
    assert plane.ads.node_status()[EAST]["zone"] == "east"
    assert plane.ads.zones()[EAST] == "east"


async def test_a_stream_claiming_another_zone_changes_only_itself(
        tmp_path: Path, start_control_plane: Any, start_envoy: Any) -> None:
    plane, model, east, _ = await two_sites(tmp_path, start_control_plane, start_envoy)
    snapshot = plane.cache.snapshot
    assert snapshot is not None
    hostile = Hostile(f"127.0.0.1:{plane.port}", EAST, "west")
    try:
        got = await hostile.subscribe()
        # Its own stream is served what its zone is served...
        assert got[ENDPOINT].version_info == snapshot.version(ENDPOINT, "west")
        # ...and the east Envoy, pushed a change meanwhile, keeps east's view.
        await east_keeps_its_view(plane, model, east, 90)
    finally:
        await hostile.close()
    await wait_until(lambda: plane.ads.node_status()[EAST]["streams"] == 1, timeout=10.0,
                     what="the hostile stream gone")
    await east_keeps_its_view(plane, model, east, 80)


async def test_site_tokens_bind_node_ids_and_zones(
        tmp_path: Path, start_control_plane: Any, start_envoy: Any) -> None:
    credentials = tmp_path / "credentials.yaml"
    credentials.write_text(yaml.safe_dump({"credentials": [
        {"name": "site-east", "token_sha256": sha256(EAST_TOKEN), "nodes": ["edge-east-*"],
         "zones": ["east"]},
        {"name": "site-west", "token_sha256": sha256(WEST_TOKEN), "nodes": ["edge-west-*"],
         "zones": ["west"]}]}))
    plane, model, east, _ = await two_sites(tmp_path, start_control_plane, start_envoy,
                                            credentials=credentials)
    target = f"127.0.0.1:{plane.port}"
    for node_id, zone, token, words in (
            (EAST, "west", EAST_TOKEN, "may not declare zone 'west'"),
            (EAST, "west", WEST_TOKEN, "may not speak for node id 'edge-east-1'"),
            (EAST, "east", WEST_TOKEN, "may not speak for node id 'edge-east-1'"),
            (EAST, "", EAST_TOKEN, "may not declare zone ''")):
        hostile = Hostile(target, node_id, zone, token)
        try:
            code, details = await hostile.refused()
        finally:
            await hostile.close()
        assert code == grpc.StatusCode.PERMISSION_DENIED, (node_id, zone, details)
        assert words in details, details
    hostile = Hostile(target, EAST, "east", "wrong-token-0123456789abcdef")
    try:
        code, _ = await hostile.refused(request=False)
    finally:
        await hostile.close()
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert plane.ads.refused == {"permission_denied": 4, "unauthenticated": 1}
    await east_keeps_its_view(plane, model, east, 90)

    # East's own token, east's zone: allowed, and still changes nothing of the Envoy's.
    twin = Hostile(target, EAST, "east", EAST_TOKEN)
    try:
        await twin.subscribe()
        await east_keeps_its_view(plane, model, east, 80)
    finally:
        await twin.close()
    await east_keeps_its_view(plane, model, east, 70)


async def test_node_records_are_bounded_per_credential(
        tmp_path: Path, start_control_plane: Any, etcd: Any,
        etcd_client: aetcd.Client) -> None:
    from meshxl.operator.actions import apply_model

    keys = Keys()
    await apply_model(etcd_client, keys, write_model(tmp_path / "m.yaml").read_text(), "test")
    credentials = tmp_path / "credentials.yaml"
    credentials.write_text(yaml.safe_dump({"credentials": [
        {"name": "site-east", "token_sha256": sha256(EAST_TOKEN), "nodes": ["*"],
         "max_nodes": 3}]}))
    plane = await start_control_plane(etcd=etcd.url, credentials=credentials)
    target = f"127.0.0.1:{plane.port}"
    clients = [Hostile(target, f"invented-{i}", "", EAST_TOKEN) for i in range(8)]
    unauthenticated = Hostile(target, "no-token", "")
    try:
        for client in clients[:3]:
            await client.subscribe()
        for client in clients[3:]:
            code, details = await client.refused()
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
            assert "credential 'site-east'" in details and "3 node ids" in details
        code, _ = await unauthenticated.refused(request=False)
        assert code == grpc.StatusCode.UNAUTHENTICATED
        # A second stream of a node already counted is no new node.
        again = Hostile(target, "invented-0", "", EAST_TOKEN)
        clients.append(again)
        await again.subscribe()

        async def records() -> list[str]:
            found = await etcd_client.get_prefix(keys.nodes_prefix.encode())
            return sorted(keys.parse_node_key(kv.key.decode()) for kv in found)

        wanted = [f"invented-{i}" for i in range(3)]
        await wait_until(lambda: _equal(records(), wanted), timeout=10.0,
                         what="three node records")
        assert plane.ads.refused == {"too_many_nodes": 5, "unauthenticated": 1}
        assert plane.metrics.registry.get_sample_value(
            "meshxl_xds_streams_refused_total", {"reason": "too_many_nodes"}) == 5
        assert set(plane.ads.node_status()) == set(wanted)
        status = plane.status()
        assert status["credentials"]["site-east"] == {"nodes": 3, "max_nodes": 3}
    finally:
        for client in [*clients, unauthenticated]:
            await client.close()
    # Once a node left, a new one is admitted.
    await wait_until(lambda: not any(n["streams"] for n in plane.ads.node_status().values()),
                     timeout=10.0, what="every stream ended")
    late = Hostile(target, "invented-late", "", EAST_TOKEN)
    try:
        await late.subscribe()
    finally:
        await late.close()


async def _equal(found: Any, wanted: list[str]) -> bool:
    return bool(await found == wanted)


def test_node_status_json_is_unchanged_in_shape() -> None:
    """What other tools read of a node record keeps its fields."""
    from meshxl.xds.nodes import NodeStatus

    record = NodeStatus("n", zone="east").as_dict()
    assert {"node_id", "cluster", "zone", "streams", "types", "last_nack"} <= set(record)
    json.dumps(record)
