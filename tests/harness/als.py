"""An access log stream as Envoy sends it (``envoy.service.accesslog.v3``), from a
gRPC client: where only the protocol matters, a test feeds the control plane the
requests an Envoy would have logged, each member at the latency the test chooses."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import grpc
from envoy.data.accesslog.v3.accesslog_pb2 import AccessLogType, HTTPAccessLogEntry
from envoy.service.accesslog.v3.als_pb2 import StreamAccessLogsMessage
from envoy.service.discovery.v3.ads_pb2_grpc import AggregatedDiscoveryServiceStub
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest

from meshxl.xds.types import ENDPOINT

__all__ = ["AlsFeed", "entry", "subscribe"]

_METHOD = "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs"


@asynccontextmanager
async def subscribe(target: str, node_id: str, clusters: Sequence[str]) -> AsyncIterator[None]:
    """An ADS stream of ``node_id`` subscribed to the endpoints of ``clusters``, as an
    Envoy routing to them keeps one, open until the block ends (what its access log may
    report on: meshxl.xds.accesslog)."""
    requests: asyncio.Queue[DiscoveryRequest | None] = asyncio.Queue()

    async def stream() -> AsyncIterator[DiscoveryRequest]:
        while (r := await requests.get()) is not None:
            yield r

    async with grpc.aio.insecure_channel(target) as channel:
        call = AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources(stream())
        request = DiscoveryRequest(type_url=ENDPOINT, resource_names=list(clusters))
        request.node.id = node_id
        await requests.put(request)
        try:
            await asyncio.wait_for(call.read(), 10)  # the endpoints: the stream is served
            yield
        finally:
            await requests.put(None)
            call.cancel()


def entry(cluster: str, host: str, seconds: float, code: int = 200) -> HTTPAccessLogEntry:
    """One upstream attempt to ``host`` (``ip:port``) of ``cluster``, answered after
    ``seconds``, as Envoy's upstream log writes it."""
    e = HTTPAccessLogEntry()
    common = e.common_properties
    common.upstream_cluster = cluster
    address, port = host.rsplit(":", 1)
    common.upstream_remote_address.socket_address.address = address
    common.upstream_remote_address.socket_address.port_value = int(port)
    common.access_log_type = AccessLogType.UpstreamEnd
    common.time_to_first_upstream_rx_byte.FromNanoseconds(round(seconds * 1e9))
    e.response.response_code.value = code
    return e


@dataclass
class AlsFeed:
    """One node's log stream to ``target``: every ``interval`` a message with ``per_host``
    entries for each (cluster, host) of ``latency`` (seconds), for at most ``seconds``
    (and ``max_messages``): bounded in count and time."""

    target: str
    node_id: str
    latency: Mapping[tuple[str, str], float]
    per_host: int = 5
    interval: float = 0.1
    seconds: float = 20.0
    max_messages: int = 400
    sent: int = 0
    metadata: Sequence[tuple[str, str]] = ()
    _task: asyncio.Task[None] | None = field(default=None, repr=False)
    error: BaseException | None = None

    async def _messages(self) -> AsyncIterator[StreamAccessLogsMessage]:
        deadline = time.monotonic() + self.seconds
        first = True
        while time.monotonic() < deadline and self.sent < self.max_messages:
            message = StreamAccessLogsMessage()
            if first:
                message.identifier.node.id = self.node_id
                message.identifier.log_name = "meshxl"
                first = False
            for (cluster, host), seconds in self.latency.items():
                message.http_logs.log_entry.extend(
                    entry(cluster, host, seconds) for _ in range(self.per_host))
            self.sent += 1
            yield message
            await asyncio.sleep(self.interval)

    async def _run(self) -> None:
        async with grpc.aio.insecure_channel(self.target) as channel:
            call = channel.stream_unary(_METHOD, request_serializer=(
                StreamAccessLogsMessage.SerializeToString),
                response_deserializer=lambda b: b)
            try:
                await call(self._messages(), metadata=tuple(self.metadata) or None)
            except grpc.aio.AioRpcError as exc:
                self.error = exc

    def start(self) -> AlsFeed:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
