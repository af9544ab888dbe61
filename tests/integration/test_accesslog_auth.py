"""Who may stream access logs for a node, over a real grpc.aio server on loopback: with
a bearer token on the ADS port, a log stream carries none (Envoy's LDS cannot hold a
node's token), so it is admitted only while its node has an admitted ADS stream from
the same address; a wrong token, or a node without one, is refused. With mutual TLS,
the certificate must name the node, as for ADS (Istio's node ids included)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from envoy.service.accesslog.v3.als_pb2 import StreamAccessLogsMessage
from envoy.service.accesslog.v3.als_pb2_grpc import AccessLogServiceStub
from envoy.service.discovery.v3.ads_pb2_grpc import AggregatedDiscoveryServiceStub
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest

from meshxl.addr import bind_grpc
from meshxl.local.wait import wait_until
from meshxl.tls import ServerTls
from meshxl.xds.accesslog import AccessLogReceiver
from meshxl.xds.auth import AdsAuth
from meshxl.xds.cache import SnapshotCache
from meshxl.xds.metrics import XdsMetrics
from meshxl.xds.server import AdsServer
from meshxl.xds.types import CLUSTER
from meshxl.xds.upstream import UpstreamSignals
from tests.harness.clock import scaled
from tests.integration.test_xds_auth import Pki, credentials
from tests.unit.test_accesslog import http

TOKEN = "0123456789abcdef0123456789abcdef"


def log_messages(node_id: str, entries: int = 3) -> list[StreamAccessLogsMessage]:
    first = StreamAccessLogsMessage()
    first.identifier.node.id = node_id
    first.identifier.log_name = "meshxl"
    first.http_logs.log_entry.extend(http() for _ in range(entries))
    second = StreamAccessLogsMessage()
    second.http_logs.log_entry.extend(http(503) for _ in range(entries))
    return [first, second]


async def send_logs(channel: grpc.aio.Channel, node_id: str,
                    metadata: tuple[tuple[str, str], ...] = ()) -> grpc.StatusCode:
    async def messages() -> AsyncIterator[StreamAccessLogsMessage]:
        for m in log_messages(node_id):
            yield m

    try:
        # A deadline only against a hang: a starved machine must not turn a refusal
        # into DEADLINE_EXCEEDED.
        await AccessLogServiceStub(channel).StreamAccessLogs(messages(), metadata=metadata,
                                                             timeout=scaled(30))
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def test_a_log_stream_speaks_for_a_node_with_an_ads_stream_from_its_address() -> None:
    ads = AdsServer(SnapshotCache(), auth=AdsAuth(token=TOKEN))
    signals = UpstreamSignals()
    metrics = XdsMetrics()
    receiver = AccessLogReceiver(signals, ads.auth, metrics, connected_from=ads.connected_from)
    server = grpc.aio.server()
    ads.register(server)
    receiver.register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            # No ADS stream for the node yet: refused, its entries counted as refused.
            assert await send_logs(channel, "edge") == grpc.StatusCode.UNAUTHENTICATED
            assert receiver.counts["refused"] == 3 and receiver.counts["recorded"] == 0

            # The node's ADS stream, with the token, from this address.
            requests: asyncio.Queue[DiscoveryRequest | None] = asyncio.Queue()

            async def ads_requests() -> AsyncIterator[DiscoveryRequest]:
                while (r := await requests.get()) is not None:
                    yield r

            call = AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources(
                ads_requests(), metadata=(("authorization", f"Bearer {TOKEN}"),))
            request = DiscoveryRequest(type_url=CLUSTER)
            request.node.id = "edge"
            await requests.put(request)
            await wait_until(lambda: ads.connected_from("edge", "127.0.0.1"), interval=0.02,
                             what="the node's ADS stream from this address")

            assert await send_logs(channel, "edge") == grpc.StatusCode.OK
            assert receiver.counts["recorded"] == 6
            [sample] = signals.summary("web", time.time() - 10, time.time() + 1).values()
            assert (sample.requests, sample.errors) == (6, 3)
            # Another node id, a wrong token, an invalid node id: refused.
            assert await send_logs(channel, "edge-2") == grpc.StatusCode.UNAUTHENTICATED
            assert await send_logs(channel, "edge", (("authorization", "Bearer wrong"),)) \
                == grpc.StatusCode.UNAUTHENTICATED
            assert await send_logs(channel, "") == grpc.StatusCode.INVALID_ARGUMENT
            # The right token: admitted on its own.
            assert await send_logs(channel, "edge-3", (("authorization", f"Bearer {TOKEN}"),)) \
                == grpc.StatusCode.OK
            assert receiver.counts["recorded"] == 12

            # The ADS stream ends: the node's token-less log streams are refused again.
            await requests.put(None)
            call.cancel()
            await wait_until(lambda: not ads.connected_from("edge", "127.0.0.1"),
                             interval=0.02, what="the node's ADS stream gone")
            assert await send_logs(channel, "edge") == grpc.StatusCode.UNAUTHENTICATED
            refused = metrics.registry.get_sample_value("meshxl_xds_access_log_entries_total",
                                                        {"result": "refused"})
            assert refused == receiver.counts["refused"] > 3
    finally:
        await server.stop(None)


async def test_without_authentication_any_node_may_send() -> None:
    receiver = AccessLogReceiver(UpstreamSignals())
    server = grpc.aio.server()
    receiver.register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert await send_logs(channel, "anyone") == grpc.StatusCode.OK
        assert receiver.counts["recorded"] == 6
    finally:
        await server.stop(None)


@pytest.mark.parametrize("node_id", ["", "a" * 10_000, "bad id"])
async def test_bad_node_ids_are_refused(node_id: str) -> None:
    receiver = AccessLogReceiver(UpstreamSignals())
    server = grpc.aio.server()
    receiver.register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert await send_logs(channel, node_id) == grpc.StatusCode.INVALID_ARGUMENT
        assert receiver.counts["recorded"] == 0
    finally:
        await server.stop(None)


async def test_with_mutual_tls_the_certificate_must_name_the_node(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    ads = AdsServer(SnapshotCache(), auth=AdsAuth(binding="san"))
    receiver = AccessLogReceiver(UpstreamSignals(), ads.auth,
                                 connected_from=ads.connected_from)
    server = grpc.aio.server()
    receiver.register(server)
    tls = ServerTls(pki.server.cert, pki.server.key, pki.ca.cert)
    port = bind_grpc(server, "127.0.0.1:0", tls.credentials())
    await server.start()
    try:
        async with grpc.aio.secure_channel(f"localhost:{port}",
                                           credentials(pki.ca.cert, pki.edge)) as channel:
            assert await send_logs(channel, "edge-1") == grpc.StatusCode.OK
            # Not its node, though nothing else (no ADS stream) is asked of a certificate.
            assert await send_logs(channel, "edge-2") == grpc.StatusCode.PERMISSION_DENIED
        async with grpc.aio.secure_channel(f"localhost:{port}",
                                           credentials(pki.ca.cert, pki.shop)) as channel:
            assert await send_logs(channel, "cart-0.shop") == grpc.StatusCode.OK
            assert await send_logs(channel, "cart-0.other") == \
                grpc.StatusCode.PERMISSION_DENIED
            # An Istio sidecar's node id (Istio's access log provider) by its namespace.
            istio = "sidecar~10.4.0.7~web-5d8f7c.{}~{}.svc.cluster.local"
            assert await send_logs(channel, istio.format("shop", "shop")) == \
                grpc.StatusCode.OK
            assert await send_logs(channel, istio.format("other", "other")) == \
                grpc.StatusCode.PERMISSION_DENIED
        assert receiver.counts == {"recorded": 18, "dropped": 0, "unrouted": 0, "refused": 9}
    finally:
        await server.stop(None)
