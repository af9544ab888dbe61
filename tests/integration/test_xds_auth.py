"""The refusals a real grpc.aio ADS server gives over mutual TLS on loopback (status
code, message, metric, log line); the rules and their configuration:
tests/unit/test_xds_auth.py."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.core.v3.base_pb2 import Node
from envoy.service.discovery.v3.ads_pb2_grpc import AggregatedDiscoveryServiceStub
from envoy.service.discovery.v3.discovery_pb2 import DeltaDiscoveryRequest, DiscoveryRequest

from meshxl.tls import ServerTls
from meshxl.xds.auth import (
    AdsAuth,
)
from meshxl.xds.cache import SnapshotCache
from meshxl.xds.metrics import XdsMetrics
from meshxl.xds.server import AdsServer
from meshxl.xds.types import CLUSTER
from tests.harness.ads import snapshot
from tests.harness.certs import CA, Leaf
from tests.unit.test_xds_auth import TOKEN


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_mutual_tls_binds_the_node_id(pki: Pki, serve: Serve, delta: bool,
                                            caplog: pytest.LogCaptureFixture) -> None:
    ads, port, metrics = await serve(AdsAuth(binding="san"))
    ca = pki.ca.cert
    assert await first_response(port, ca, "edge-1", pki.edge, delta=delta)
    assert await first_response(port, ca, "cart-0.shop", pki.shop, delta=delta)

    caplog.set_level(logging.WARNING, "meshxl.xds.server")
    code, details = await refused(port, ca, "edge-2", pki.edge, delta=delta)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "does not name node id 'edge-2'" in details and "DNS:edge-1" in details
    code, details = await refused(port, ca, "cart-0.other", pki.shop, delta=delta)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "URI:spiffe://cluster.local/ns/shop/sa/cart" in details

    assert set(ads.node_status()) == {"edge-1", "cart-0.shop"}  # the refused never count
    assert ads.refused == {"permission_denied": 2}
    sample = metrics.registry.get_sample_value
    assert sample("meshxl_xds_streams_refused_total", {"reason": "permission_denied"}) == 2
    assert sample("meshxl_xds_streams_refused_total", {"reason": "unauthenticated"}) == 0
    logged = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert any("(permission_denied)" in line and "'edge-2'" in line and "127.0.0.1" in line
               for line in logged), logged


async def test_token_on_every_stream(pki: Pki, serve: Serve) -> None:
    ads, port, metrics = await serve(AdsAuth(token=TOKEN), client_ca=False)
    ca = pki.ca.cert
    assert await first_response(port, ca, "edge-1", token=TOKEN)
    assert await first_response(port, ca, "edge-1", token=TOKEN, delta=True)
    code, details = await refused(port, ca, "edge-1", send=False)
    assert code == grpc.StatusCode.UNAUTHENTICATED and "needs a token" in details
    code, details = await refused(port, ca, "edge-1", token=TOKEN[::-1], delta=True,
                                  send=False)
    assert code == grpc.StatusCode.UNAUTHENTICATED and "invalid token" in details
    assert ads.refused == {"unauthenticated": 2}
    assert metrics.registry.get_sample_value("meshxl_xds_streams_refused_total",
                                             {"reason": "unauthenticated"}) == 2


async def test_token_and_binding_together(pki: Pki, serve: Serve) -> None:
    _, port, _ = await serve(AdsAuth(token=TOKEN, binding="san"))
    ca = pki.ca.cert
    assert await first_response(port, ca, "edge-1", pki.edge, token=TOKEN)
    code, _ = await refused(port, ca, "edge-1", pki.edge, send=False)
    assert code == grpc.StatusCode.UNAUTHENTICATED
    code, _ = await refused(port, ca, "edge-2", pki.edge, token=TOKEN)
    assert code == grpc.StatusCode.PERMISSION_DENIED


Serve = Any


@pytest.fixture
async def serve(pki: Pki) -> AsyncIterator[Serve]:
    servers: list[grpc.aio.Server] = []

    async def start(auth: AdsAuth, *, client_ca: bool = True) -> tuple[AdsServer, int,
                                                                         XdsMetrics]:
        cache = SnapshotCache()
        cache.set(snapshot(1))
        metrics = XdsMetrics()
        ads = AdsServer(cache, metrics=metrics, auth=auth)
        tls = ServerTls(pki.server.cert, pki.server.key, pki.ca.cert if client_ca else None)
        server, port = await ads.serve("127.0.0.1:0", tls=tls)
        servers.append(server)
        return ads, port, metrics

    yield start
    for server in servers:
        await server.stop(None)


def credentials(ca: Path, leaf: Leaf | None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=leaf.key.read_bytes() if leaf else None,
        certificate_chain=leaf.cert.read_bytes() if leaf else None)


async def first_response(port: int, ca: Path, node_id: str, leaf: Leaf | None = None,
                         token: str | None = None, delta: bool = False,
                         send: bool = True) -> Any:
    """The first response of a stream that sends one request, or none (``send=False``)
    for a stream refused on its metadata alone: there the request's write races the
    server's end of the stream, and grpc.aio reports the failed write as INTERNAL in
    place of the server's status (grpc/grpc#36066)."""
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    node = Node(id=node_id)
    request = (DeltaDiscoveryRequest(node=node, type_url=CLUSTER) if delta
               else DiscoveryRequest(node=node, type_url=CLUSTER))
    async with grpc.aio.secure_channel(f"localhost:{port}",
                                       credentials(ca, leaf)) as channel:
        stub = AggregatedDiscoveryServiceStub(channel)
        requests = iter([request]) if send else _silence()
        call = (stub.DeltaAggregatedResources(requests, timeout=3, metadata=metadata)
                if delta else
                stub.StreamAggregatedResources(requests, timeout=3, metadata=metadata))
        async for response in call:
            call.cancel()
            return response
    raise AssertionError("no response")


async def _silence() -> AsyncIterator[Any]:
    """A request stream that stays open and sends nothing."""
    await asyncio.Event().wait()
    yield None  # pragma: no cover - never reached


async def refused(*args: Any, **kwargs: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await first_response(*args, **kwargs)
    return info.value.code(), info.value.details() or ""


class Pki:
    def __init__(self, root: Path) -> None:
        self.ca = CA(root / "ca")
        self.server = self.ca.issue("xds", client=False)
        self.edge = self.ca.issue("edge-1", names=("edge-1",), server=False)
        self.shop = self.ca.issue("shop", names=("spiffe://cluster.local/ns/shop/sa/cart",),
                                  server=False)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)
