"""ADS streams: nonces, ACK/NACK and per-node status, for state of the world and delta.

Resources and versions live in :mod:`meshxl.xds.cache`; this module only runs the
protocol (go-control-plane keeps the same split). Both ADS methods are served on one
gRPC service: ``StreamAggregatedResources`` (state of the world, :mod:`meshxl.xds.sotw`)
and ``DeltaAggregatedResources`` (incremental, :mod:`meshxl.xds.delta`). They share what an
operator sees and what keeps a NACK from looping: the per-node status, the quarantine
of rejected responses, the ``on_sent``/``on_answer`` hooks and the metrics.

Each stream has one reader task feeding an inbox and one loop (the gRPC handler) that
processes requests and writes responses; a single event wakes the loop for a request
or a new snapshot.

Responses are pre-encoded bytes from the snapshot plus a nonce, sent through a method
handler whose response serializer is the identity, so a push to N Envoys encodes
nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from envoy.service.discovery.v3.discovery_pb2 import DeltaDiscoveryRequest, DiscoveryRequest

from meshxl.addr import GRPC_SERVER_OPTIONS, bind_grpc
from meshxl.tls import ServerTls
from meshxl.xds import delta, sotw
from meshxl.xds.cache import SnapshotCache
from meshxl.xds.metrics import XdsMetrics
from meshxl.xds.nodes import (
    NACK_TEXT_MAX,
    NODE_CLUSTER_MAX,
    BadRequest,
    LogLimiter,
    Nack,
    NodeStatus,
    Session,
    bound_text,
    node_id_problem,
)

__all__ = ["ADS_SERVICE", "AdsServer", "OnDelivery", "OnStatusChange"]

log = logging.getLogger(__name__)

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"

#: ``await on_status_change(node_id, status)``: called after a node connects,
#: disconnects, ACKs or NACKs. Calls for one node are serialized and coalesced.
OnStatusChange = Callable[[list[tuple[str, dict[str, Any]]]], Awaitable[None]]
OnDelivery = Callable[[str, str, str, str | None], None]
"""(node id, type URL, version, NACK error or None): a response was sent (error None,
called through ``on_sent``) or answered (``on_answer``). The version is the type's
snapshot version, for delta streams too (their ``system_version_info``)."""

# Distinct subscription name sets kept shared between streams (cleared when full).
_NAMES_MEMO_MAX = 4096
# Disconnected nodes whose status (and quarantine) is kept; the oldest go first, so
# pod churn cannot grow the control plane without bound.
DISCONNECTED_NODES_MAX = 1024

# Server-side keepalive so a vanished Envoy's stream (and its node status) ends. Envoy's
# bootstrap pings every second to notice a dead control plane fast: accept that rate,
# or gRPC closes the stream as abusive ("too many pings") every few seconds.
_GRPC_OPTIONS = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 500),
    ("grpc.http2.max_ping_strikes", 0),
    *GRPC_SERVER_OPTIONS,  # no SO_REUSEPORT: a second server on a busy port fails
)

def _identity(data: bytes) -> bytes:
    return data


class AdsServer:
    """Serves a :class:`SnapshotCache` to any number of Envoys over ADS, state of the
    world and delta alike.

    Per node it keeps the status operators need (streams, versions sent and ACKed,
    the last NACK) and a quarantine of rejected responses so a NACK never loops.
    """

    def __init__(
        self, cache: SnapshotCache, *, on_status_change: OnStatusChange | None = None,
        on_sent: OnDelivery | None = None, on_answer: OnDelivery | None = None,
        metrics: XdsMetrics | None = None,
    ) -> None:
        self._cache = cache
        self._on_status_change = on_status_change
        self._on_sent = on_sent
        self._on_answer = on_answer
        self._metrics = metrics
        self._nodes: dict[str, NodeStatus] = {}
        self._dirty: dict[str, NodeStatus] = {}
        self._names: dict[frozenset[str], frozenset[str]] = {}
        self._notifier: asyncio.Task[None] | None = None
        #: Responses written, per type URL (both protocols).
        self.responses_sent: dict[str, int] = {}
        #: NACKs received (all nodes, all types).
        self.nacks = 0
        #: Requests whose nonce was not one this stream is waiting for: ignored as an
        #: ACK or NACK (a delta request still changes its subscriptions).
        self.stale_requests = 0
        #: Streams refused for a node id that cannot name a node.
        self.refused = 0
        self._log_limit = LogLimiter()

    # -- wiring -------------------------------------------------------------------

    def method_handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        """The ADS method handlers, for a server that builds its own generic handler."""
        return {
            "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self._sotw_stream,
                request_deserializer=DiscoveryRequest.FromString,
                response_serializer=_identity,
            ),
            "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self._delta_stream,
                request_deserializer=DeltaDiscoveryRequest.FromString,
                response_serializer=_identity,
            ),
        }

    def register(self, server: grpc.aio.Server) -> None:
        """Add the ADS service to ``server`` (before it starts)."""
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(ADS_SERVICE, self.method_handlers()),)
        )

    async def serve(self, listen: str, *, tls: ServerTls | None = None
                    ) -> tuple[grpc.aio.Server, int]:
        """Start a gRPC server on ``listen`` ("host:port", port may be 0): plaintext, or
        TLS (mutual TLS when ``tls`` has a client CA).

        Returns the started server and the bound port; stop it with ``server.stop``.
        """
        server = grpc.aio.server(options=_GRPC_OPTIONS)
        self.register(server)
        port = bind_grpc(server, listen, None if tls is None else tls.credentials())
        await server.start()
        return server, port

    async def close(self) -> None:
        """Wait for scheduled status callbacks to finish."""
        while self._notifier is not None and not self._notifier.done():
            await asyncio.gather(self._notifier, return_exceptions=True)

    # -- status -------------------------------------------------------------------

    def node_status(self) -> dict[str, dict[str, Any]]:
        """Per node id, a JSON-able status (streams, versions, last NACK)."""
        return {node_id: node.as_dict() for node_id, node in self._nodes.items()}

    def acked(self) -> dict[str, dict[str, str | None]]:
        """Connected nodes and the version each ACKed last, per type: what the
        per-rebuild bookkeeping needs, without building every node's full status."""
        return {node_id: {t: st.acked_version for t, st in node.types.items()}
                for node_id, node in self._nodes.items() if node.streams > 0}

    def forget(self, node_id: str) -> None:
        """Drop a disconnected node's status and quarantine (e.g. its pod is gone)."""
        node = self._nodes.get(node_id)
        if node is not None and node.streams == 0:
            del self._nodes[node_id]

    def _changed(self, node: NodeStatus) -> None:
        """Schedule ``on_status_change``: one runner for all nodes, in batches (a push
        to 1,000 Envoys is 1,000 ACKs: their statuses go out together), the latest
        status of each node winning."""
        if self._on_status_change is None:
            return
        self._dirty[node.node_id] = node
        if self._notifier is None or self._notifier.done():
            self._notifier = asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        assert self._on_status_change is not None
        while self._dirty:
            await asyncio.sleep(0)  # let the ACKs already read join this batch
            batch = [(node_id, node.as_dict()) for node_id, node in self._dirty.items()]
            self._dirty.clear()
            try:
                await self._on_status_change(batch)
            except Exception:
                log.exception("status callback failed for %d node(s)", len(batch))

    # -- what both protocols record: the Streams interface of meshxl.xds.nodes ---------

    def connect(self, session: Session, node_proto: Any) -> NodeStatus:
        """The stream's first request names its node: count the stream on it."""
        node_id = node_proto.id
        problem = node_id_problem(node_id)
        if problem is not None:
            self.refused += 1
            allowed, held = self._log_limit.allow(("refused", problem))
            if allowed:
                log.warning("ADS stream refused: %s%s", problem,
                            f" ({held} more since the last report)" if held else "")
            raise BadRequest(problem)
        node = self._nodes.get(node_id)
        if node is None:
            node = self._nodes[node_id] = NodeStatus(node_id)
        node.cluster = bound_text(node_proto.cluster, NODE_CLUSTER_MAX) or node.cluster
        node.streams += 1
        node.connected_at = time.time()
        session.node = node
        allowed, held = self._log_limit.allow((node_id, "connected"))
        if allowed:
            log.info("node %s connected (%d streams)%s", node_id, node.streams,
                     f" ({held} more connections since the last report)" if held else "")
        self._changed(node)
        return node

    def _disconnect(self, session: Session) -> None:
        node = session.node
        if node is None:
            return
        session.node = None
        node.streams -= 1
        node.disconnected_at = time.time()
        allowed, held = self._log_limit.allow((node.node_id, "disconnected"))
        if allowed:
            log.info("node %s disconnected (%d streams left)%s", node.node_id, node.streams,
                     f" ({held} more disconnections since the last report)" if held else "")
        self._changed(node)
        if node.streams == 0:
            self._prune_disconnected()

    def _prune_disconnected(self) -> None:
        gone = [n for n in self._nodes.values() if n.streams == 0]
        if len(gone) <= DISCONNECTED_NODES_MAX:
            return
        gone.sort(key=lambda n: n.disconnected_at or 0.0)
        for node in gone[: len(gone) - DISCONNECTED_NODES_MAX]:
            del self._nodes[node.node_id]

    def delivered(self, session: Session, type_url: str, version: str) -> float:
        """A response for ``type_url`` at (snapshot) ``version`` is being written on
        ``session``'s stream. Returns its ``time.monotonic()``, for the ACK latency.
        """
        now = time.monotonic()
        node = session.node
        assert node is not None
        status = node.status(type_url)
        status.sent_version = version
        status.responses += 1
        self.responses_sent[type_url] = self.responses_sent.get(type_url, 0) + 1
        if self._on_sent is not None:
            self._on_sent(node.node_id, type_url, version, None)
        if self._metrics is not None:
            # Push latency only for a snapshot published while the stream was open: the
            # first answer to an Envoy that connects later is no push.
            published = self._cache.published_at
            since = None if published is None or published < session.opened_at \
                else now - published
            self._metrics.sent(type_url, session.protocol, since)
        return now

    def answered(self, node: NodeStatus, type_url: str, version: str | None, error: str | None,
                  sent_at: float | None, *, nack: bool = False) -> None:
        """Envoy ACKed (``nack`` False) or NACKed the response sent at ``sent_at``.

        ``version`` is the type's snapshot version that response carried (None when
        a NACK names no response of this stream).
        """
        nack = nack or error is not None
        status = node.status(type_url)
        if error is not None:
            error = bound_text(error, NACK_TEXT_MAX)
        if nack:
            node.nacks += 1
            node.last_nack = Nack(type_url, version, error or "", time.time())
            self.nacks += 1
            allowed, held = self._log_limit.allow((node.node_id, "nack", type_url, error))
            if allowed:
                log.warning("node %s rejected %s version %s: %s%s", node.node_id, type_url,
                            version, error,
                            f" ({held} identical rejections since the last report)"
                            if held else "")
        elif version is not None:
            status.acked_version = version
            status.ack_time = time.time()
        if self._on_answer is not None and version is not None:
            self._on_answer(node.node_id, type_url, version, (error or "rejected") if nack
                            else None)
        if self._metrics is not None and sent_at is not None:
            self._metrics.answered(type_url, nack, time.monotonic() - sent_at)
        self._changed(node)

    def shared_names(self, names: frozenset[str]) -> frozenset[str]:
        """One set object per distinct list of names: a thousand Envoys asking for the
        same hundred clusters keep one copy of the names, not a thousand."""
        shared = self._names.get(names)
        if shared is None:
            if len(self._names) >= _NAMES_MEMO_MAX:
                self._names.clear()
            shared = self._names[names] = names
        return shared

    def stale(self, node: NodeStatus, type_url: str, nonce: str) -> None:
        self.stale_requests += 1
        log.debug("node %s: stale %s nonce %s ignored", node.node_id, type_url,
                  bound_text(nonce, 64))

    # -- the streams ----------------------------------------------------------------

    async def _sotw_stream(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> None:
        await self._run(requests, context, sotw.SotwSession(self))

    async def _delta_stream(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> None:
        await self._run(requests, context, delta.DeltaSession(self))

    async def _run(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext,
                   session: Session) -> None:
        if self._metrics is not None:
            self._metrics.stream_opened(session.protocol)
        reader: asyncio.Task[None] | None = None
        try:
            with self._cache.watch() as wake:
                reader = asyncio.create_task(self._read(requests, session, wake))
                await self._loop(context, session, wake)
        finally:
            # Every way a stream ends (the client leaving, an abort, the handler task
            # cancelled, even while it waits below) first drops the stream from its
            # node, synchronously: an await before it could be cancelled in turn and
            # leave a "ghost" node that counts as connected until a restart.
            self._disconnect(session)
            if self._metrics is not None:
                self._metrics.stream_closed(session.protocol)
            if reader is not None:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)

    async def _loop(self, context: grpc.aio.ServicerContext, session: Session,
                    wake: asyncio.Event) -> None:
        while True:
            await wake.wait()
            wake.clear()
            while session.inbox:
                try:
                    error = session.handle(session.inbox.popleft())
                except BadRequest as exc:
                    error = str(exc)
                if error is not None:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, error)
            if session.closed:
                return
            snapshot = self._cache.snapshot
            if snapshot is None or session.node is None:
                continue  # hold requests until there is something to serve
            for response in session.responses(snapshot):
                await context.write(response)

    async def _read(
        self, requests: AsyncIterator[Any], session: Session, wake: asyncio.Event
    ) -> None:
        try:
            async for request in requests:
                session.inbox.append(request)
                wake.set()
        except Exception as e:  # the client went away mid-read
            log.debug("ADS stream read ended: %r", e)
        finally:
            session.closed = True
            wake.set()
