"""An access log stream as Envoy sends it (``envoy.service.accesslog.v3``), from a
gRPC client: where only the protocol matters, a test feeds the control plane the
requests an Envoy would have logged, each member at the latency the test chooses."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field

import grpc
from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
from envoy.data.accesslog.v3.accesslog_pb2 import AccessLogType, HTTPAccessLogEntry
from envoy.service.accesslog.v3.als_pb2 import StreamAccessLogsMessage
from envoy.service.discovery.v3.ads_pb2_grpc import AggregatedDiscoveryServiceStub
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest, DiscoveryResponse

from meshxl.local.wait import wait_until
from meshxl.xds.types import ENDPOINT

__all__ = ["AlsFeed", "Endpoints", "entry", "subscribe"]

_METHOD = "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs"


@dataclass
class Endpoints:
    """What an ADS stream subscribed to some clusters' endpoints was last sent: per
    cluster, its serving tier (the lowest priority) as ``ip:port`` -> EDS weight."""

    tiers: dict[str, dict[str, int]] = field(default_factory=dict)
    responses: int = 0

    def take(self, response: DiscoveryResponse) -> None:
        for resource in response.resources:
            cla = ClusterLoadAssignment()
            resource.Unpack(cla)
            groups = sorted(cla.endpoints, key=lambda g: g.priority)
            first = groups[0].priority if groups else 0
            tier: dict[str, int] = {}
            for group in groups:
                if group.priority != first:
                    continue
                for lb in group.lb_endpoints:
                    sa = lb.endpoint.address.socket_address
                    tier[f"{sa.address}:{sa.port_value}"] = lb.load_balancing_weight.value or 1
            self.tiers[cla.cluster_name] = tier
        self.responses += 1


@asynccontextmanager
async def subscribe(target: str, node_id: str, clusters: Sequence[str]
                    ) -> AsyncIterator[Endpoints]:
    """An ADS stream of ``node_id`` subscribed to the endpoints of ``clusters``, as an
    Envoy routing to them keeps one (what its access log may report on:
    meshxl.xds.accesslog), open until the block ends; every response is ACKed and kept
    in the :class:`Endpoints` yielded."""
    requests: asyncio.Queue[DiscoveryRequest | None] = asyncio.Queue()
    seen = Endpoints()

    async def stream() -> AsyncIterator[DiscoveryRequest]:
        while (r := await requests.get()) is not None:
            yield r

    def request(version: str = "", nonce: str = "") -> DiscoveryRequest:
        r = DiscoveryRequest(type_url=ENDPOINT, resource_names=list(clusters),
                             version_info=version, response_nonce=nonce)
        r.node.id = node_id
        return r

    async with grpc.aio.insecure_channel(target) as channel:
        call = AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources(stream())

        async def read() -> None:
            async for response in call:
                seen.take(response)
                await requests.put(request(response.version_info, response.nonce))

        await requests.put(request())
        reader = asyncio.get_running_loop().create_task(read())
        try:
            await wait_until(lambda: seen.responses or reader.done(), timeout=10,
                             what=f"endpoints for {node_id} from {target}")
            assert seen.responses, f"no endpoints for {node_id} from {target}"
            yield seen
        finally:
            await requests.put(None)
            call.cancel()
            reader.cancel()
            with suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await reader


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
    plan: Callable[[], Iterable[tuple[str, str, int, float]]] | None = None
    """Instead of ``latency``: what each message carries, made when it is sent, as
    (cluster, host, entries, seconds)."""
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
            batch = self.plan() if self.plan is not None else (
                (cluster, host, self.per_host, seconds)
                for (cluster, host), seconds in self.latency.items())
            for cluster, host, count, seconds in batch:
                message.http_logs.log_entry.extend(
                    entry(cluster, host, seconds) for _ in range(count))
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
