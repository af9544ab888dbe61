"""An ADS server in this process and scripted Envoy clients over a real gRPC channel on
loopback: the one harness of the xDS stream tests (SotW and delta).

``ads_server(protocol, **options)`` (``tests/conftest.py``: the ``xds``, ``delta_xds``
and ``ads_server`` fixtures) starts :class:`meshxl.xds.server.AdsServer` on a free
port with ``options``, opens a channel to it, and gives an :class:`AdsHarness`: its
cache, server, metrics, the answers it sent (``on_answer``), and clients that speak
like Envoy (node on the first request only, ACK/NACK with the response's nonce).
Everything is closed when the block ends. Deadlines are the suite's (``clock``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.core.v3.base_pb2 import Node
from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
from envoy.service.discovery.v3.ads_pb2_grpc import AggregatedDiscoveryServiceStub
from envoy.service.discovery.v3.discovery_pb2 import (
    DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
    DiscoveryRequest,
    DiscoveryResponse,
)
from google.protobuf.message import Message
from google.rpc.status_pb2 import Status

from meshxl.local.wait import wait_until
from meshxl.xds.cache import Snapshot, SnapshotCache
from meshxl.xds.delta import delta_resources
from meshxl.xds.metrics import XdsMetrics
from meshxl.xds.server import AdsServer
from meshxl.xds.types import CLUSTER, ENDPOINT
from tests.harness.clock import scaled

__all__ = ["QUIET", "WAIT", "AdsHarness", "DeltaEnvoy", "Envoy", "ads_server", "eventually",
           "names", "sent", "snap", "snapshot", "versions"]

#: The deadline of anything that must happen (a response, a state on the server).
WAIT = scaled(10.0)
#: The window in which nothing may arrive (:meth:`Envoy.silent`).
QUIET = scaled(0.3)


def snapshot(version: int = 1, clusters: Iterable[str] = ("a", "b")) -> Snapshot:
    """Clusters and their endpoints; ``version`` changes every resource."""
    return snap(dict.fromkeys(clusters, version), dict.fromkeys(clusters, 8000 + version))


def snap(clusters: Mapping[str, int], ports: Mapping[str, int] | None = None) -> Snapshot:
    """Clusters by name -> connect timeout (s); each has endpoints on ``ports[name]``
    (default 8000), so a test changes a cluster, its endpoints, or both."""
    resources: dict[str, dict[str, Message]] = {CLUSTER: {}, ENDPOINT: {}}
    for name, timeout in clusters.items():
        c = Cluster(name=name, type=Cluster.EDS)
        c.connect_timeout.seconds = timeout
        c.eds_cluster_config.eds_config.ads.SetInParent()
        resources[CLUSTER][name] = c
        cla = ClusterLoadAssignment(cluster_name=name)
        address = cla.endpoints.add().lb_endpoints.add().endpoint.address.socket_address
        address.address = "127.0.0.1"
        address.port_value = (ports or {}).get(name, 8000)
        resources[ENDPOINT][name] = cla
    return Snapshot.build(resources)


def names(response: DiscoveryResponse) -> list[str]:
    """The names of a SotW response's clusters or load assignments."""
    out = []
    for packed in response.resources:
        if packed.type_url == CLUSTER:
            c = Cluster()
            packed.Unpack(c)
            out.append(c.name)
        else:
            cla = ClusterLoadAssignment()
            packed.Unpack(cla)
            out.append(cla.cluster_name)
    return out


def versions(snapshot: Snapshot, type_url: str) -> dict[str, str]:
    """What a delta client holds after receiving all of ``type_url``."""
    return dict(delta_resources(snapshot.resources(type_url)).versions)


def sent(response: DeltaDiscoveryResponse) -> dict[str, str]:
    """A delta response's resources: name -> version."""
    return {r.name: r.version for r in response.resources}


async def eventually(condition: Callable[[], Any], within: float = 10.0) -> None:
    """Until a condition on the server's state holds (``within`` is scaled)."""
    await wait_until(condition, timeout=within, interval=0.005,
                     what="a condition on the ADS server's state")


class _Client:
    """What both scripted clients share: one reader for the call's life (cancelling a
    read would cancel the call), a queue of requests, and the deadlines."""

    call: Any

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self._requests: asyncio.Queue[Any] = asyncio.Queue()
        self._sent_node = False
        self._responses: asyncio.Queue[Any] = asyncio.Queue()

    def _start(self, call: Any) -> None:
        self.call = call
        self._reader = asyncio.create_task(self._incoming())

    async def _incoming(self) -> None:
        async for response in self.call:
            self._responses.put_nowait(response)

    async def _outgoing(self) -> AsyncIterator[Any]:
        while (request := await self._requests.get()) is not None:
            yield request

    async def recv(self, within: float = WAIT) -> Any:
        """The next response (a deadline: ``within`` seconds, already scaled)."""
        async with asyncio.timeout(within):
            return await self._responses.get()

    async def silent(self, window: float = QUIET) -> None:
        """Nothing arrives within ``window`` (already scaled)."""
        with pytest.raises(asyncio.TimeoutError):
            async with asyncio.timeout(window):
                response = await self._responses.get()
            pytest.fail(f"unexpected response: {response}")

    def close(self) -> None:
        self._requests.put_nowait(None)

    async def stop(self) -> None:
        self.call.cancel()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)


class Envoy(_Client):
    """A scripted state-of-the-world ADS client."""

    def __init__(self, stub: AggregatedDiscoveryServiceStub, node_id: str,
                 zone: str = "") -> None:
        super().__init__(node_id)
        self.zone = zone
        self._start(stub.StreamAggregatedResources(self._outgoing()))

    def request(self, type_url: str, resource_names: Iterable[str] = (), *,
                version: str = "", nonce: str = "", error: str | None = None) -> None:
        request = DiscoveryRequest(type_url=type_url, resource_names=list(resource_names),
                                   version_info=version, response_nonce=nonce)
        if not self._sent_node:
            request.node.CopyFrom(Node(id=self.node_id, cluster="test"))
            request.node.locality.zone = self.zone
            self._sent_node = True
        if error is not None:
            request.error_detail.CopyFrom(Status(code=3, message=error))
        self._requests.put_nowait(request)

    def ack(self, response: DiscoveryResponse, resource_names: Iterable[str] = ()) -> None:
        self.request(response.type_url, resource_names, version=response.version_info,
                     nonce=response.nonce)

    def nack(self, response: DiscoveryResponse, error: str, previous: str = "") -> None:
        self.request(response.type_url, version=previous, nonce=response.nonce, error=error)


class DeltaEnvoy(_Client):
    """A scripted delta ADS client (``initial_resource_versions`` on a new stream)."""

    def __init__(self, stub: AggregatedDiscoveryServiceStub, node_id: str) -> None:
        super().__init__(node_id)
        self._start(stub.DeltaAggregatedResources(self._outgoing()))

    def request(self, type_url: str, subscribe: Iterable[str] = (),
                unsubscribe: Iterable[str] = (), *, nonce: str = "",
                initial: Mapping[str, str] | None = None, error: str | None = None) -> None:
        request = DeltaDiscoveryRequest(
            type_url=type_url, resource_names_subscribe=list(subscribe),
            resource_names_unsubscribe=list(unsubscribe), response_nonce=nonce,
            initial_resource_versions=dict(initial or {}))
        if not self._sent_node:
            request.node.CopyFrom(Node(id=self.node_id, cluster="test"))
            self._sent_node = True
        if error is not None:
            request.error_detail.CopyFrom(Status(code=13, message=error))
        self._requests.put_nowait(request)

    def ack(self, response: DeltaDiscoveryResponse, subscribe: Iterable[str] = (),
            unsubscribe: Iterable[str] = ()) -> None:
        self.request(response.type_url, subscribe, unsubscribe, nonce=response.nonce)

    def nack(self, response: DeltaDiscoveryResponse, error: str) -> None:
        self.request(response.type_url, nonce=response.nonce, error=error)


class AdsHarness:
    """A served :class:`AdsServer` and its clients; ``envoy()`` speaks ``protocol``."""

    def __init__(self, snapshots: SnapshotCache, ads: AdsServer, metrics: XdsMetrics,
                 channel: grpc.aio.Channel, port: int, protocol: str) -> None:
        self.cache = snapshots
        self.ads = ads
        self.metrics = metrics
        self.port = port
        self.protocol = protocol
        self.stub = AggregatedDiscoveryServiceStub(channel)
        self.clients: list[Envoy | DeltaEnvoy] = []
        #: ``(node, type_url, version, nonce)`` of every answer sent (``on_answer``).
        self.answers: list[tuple[Any, ...]] = []

    @property
    def envoys(self) -> list[Envoy | DeltaEnvoy]:
        return self.clients

    def envoy(self, node_id: str = "envoy-1", zone: str = "") -> Any:
        """A client of this harness's protocol (``zone``: SotW only)."""
        return self.delta(node_id) if self.protocol == "delta" else self.sotw(node_id, zone)

    def sotw(self, node_id: str = "envoy-1", zone: str = "") -> Envoy:
        client = Envoy(self.stub, node_id, zone)
        self.clients.append(client)
        return client

    def delta(self, node_id: str = "envoy-1") -> DeltaEnvoy:
        client = DeltaEnvoy(self.stub, node_id)
        self.clients.append(client)
        return client

    def status(self, node_id: str = "envoy-1") -> dict[str, Any]:
        status: dict[str, Any] = self.ads.node_status()[node_id]
        return status

    def types(self, node_id: str) -> dict[str, Any]:
        types: dict[str, Any] = self.status(node_id)["types"]
        return types

    def acked(self, type_url: str, node_id: str = "envoy-1") -> str | None:
        acked: str | None = self.types(node_id).get(type_url, {}).get("acked_version")
        return acked

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


@asynccontextmanager
async def ads_server(protocol: str = "sotw", **options: Any) -> AsyncIterator[AdsHarness]:
    """An :class:`AdsServer` (``options``: its keyword arguments) served on a free
    loopback port with a channel to it; everything closed at the end."""
    if protocol not in ("sotw", "delta"):
        raise ValueError(f"protocol is 'sotw' or 'delta', got {protocol!r}")
    snapshots = options.pop("cache", None) or SnapshotCache()
    metrics = options.setdefault("metrics", XdsMetrics())
    answers: list[tuple[Any, ...]] = []
    options.setdefault("on_answer", lambda *a: answers.append(a))
    ads = AdsServer(snapshots, **options)
    server, port = await ads.serve("127.0.0.1:0")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    harness = AdsHarness(snapshots, ads, metrics, channel, port, protocol)
    harness.answers = answers
    try:
        yield harness
    finally:
        for client in harness.clients:
            await client.stop()
        await channel.close()
        await server.stop(None)
        await ads.close()
