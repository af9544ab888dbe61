"""ADS streams: nonces, ACK/NACK and per-node status, for state of the world and delta.

Resources and versions live in :mod:`meshxl.xds.cache`; this module only runs the
protocol (go-control-plane keeps the same split). Both ADS methods are served on one
gRPC service: ``StreamAggregatedResources`` (state of the world, :mod:`meshxl.xds.sotw`)
and ``DeltaAggregatedResources`` (incremental, :mod:`meshxl.xds.delta`); the same two
handlers serve the per-resource EDS service (``StreamEndpoints``, ``DeltaEndpoints``)
for clusters whose EDS alone comes from meshxl (Istio sidecars). They share what an
operator sees and what keeps a NACK from looping: the per-node status, the quarantine
of rejected responses with the last accepted version a quarantined one gives way to,
the ``on_sent``/``on_answer`` hooks and the metrics. Who may speak for a node (a bearer
token, the node id bound to the client certificate) is :mod:`meshxl.xds.auth`.

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
from meshxl.nodeid import node_id_problem
from meshxl.tls import ServerTls
from meshxl.xds import delta, sotw
from meshxl.xds.auth import (
    AdsAuth,
    AdsRefused,
    InvalidNodeId,
    Peer,
    PermissionDenied,
    TooManyNodes,
    Unauthenticated,
    peer_names,
)
from meshxl.xds.cache import EncodedResources, SnapshotCache
from meshxl.xds.credentials import MAX_NODES, MAX_NODES_PER_CREDENTIAL, RESERVED_NAMES
from meshxl.xds.metrics import XdsMetrics
from meshxl.xds.nodes import (
    NACK_TEXT_MAX,
    NODE_CLUSTER_MAX,
    BadDiscoveryRequest,
    DeltaRequest,
    EnvoyNode,
    LogLimiter,
    Nack,
    NodeStatus,
    RequestStream,
    RequestT,
    SotwRequest,
    Stream,
    bound_text,
    routed,
)

__all__ = ["ADS_GRPC_OPTIONS", "ADS_SERVICE", "EDS_SERVICE", "AdsServer", "OnDelivery",
           "OnStatusChange", "peer_host"]

log = logging.getLogger(__name__)

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
#: The per-resource EDS service: an Envoy cluster whose ``eds_config`` is an
#: ``api_config_source`` of type GRPC (or DELTA_GRPC) on this server streams its endpoints
#: here (Istio sidecars: docs/istio.md, "Endpoints from meshxl"). Same messages as ADS.
EDS_SERVICE = "envoy.service.endpoint.v3.EndpointDiscoveryService"

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
# Versions per type kept for disconnected nodes to fall back to (the most recently
# used first): nodes ACK the same few versions, so a handful covers every restart.
RETAINED_VERSIONS_MAX = 16

#: The gRPC status a refused stream ends with, by the refusal's class.
_REFUSAL_CODES: dict[type[AdsRefused], grpc.StatusCode] = {
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    TooManyNodes: grpc.StatusCode.RESOURCE_EXHAUSTED,
}

# Server-side keepalive so a vanished Envoy's stream (and its node status) ends. Envoy's
# bootstrap pings every second to notice a dead control plane fast: accept that rate,
# or gRPC closes the stream as abusive ("too many pings") every few seconds.
ADS_GRPC_OPTIONS = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 500),
    ("grpc.http2.max_ping_strikes", 0),
    *GRPC_SERVER_OPTIONS,  # no SO_REUSEPORT: a second server on a busy port fails
)

def peer_host(address: str) -> str:
    """The IP address of gRPC's ``context.peer()`` (``ipv4:10.0.0.1:5000``,
    ``ipv6:[::1]:5000``): ``10.0.0.1``, ``::1``; the text itself for other forms
    (``unix:...``)."""
    family, _, rest = address.partition(":")
    if family not in ("ipv4", "ipv6") or ":" not in rest:
        return address
    host = rest.rpartition(":")[0]
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _identity(data: bytes) -> bytes:
    return data


class AdsServer:
    """Serves a :class:`SnapshotCache` to any number of Envoys over ADS, state of the
    world and delta alike.

    Per node it keeps the status operators need (streams, versions sent and ACKed,
    the last NACK), a quarantine of rejected responses so a NACK never loops, and the
    last version of each type the node accepted, which a quarantined one gives way to.
    ``auth`` decides who may open a stream and for which node (and zone); a new node id
    past ``max_nodes`` connected, or past its credential's bound
    (``max_nodes_per_credential`` unless its entry sets one), is refused.
    """

    def __init__(
        self, cache: SnapshotCache, *, on_status_change: OnStatusChange | None = None,
        on_sent: OnDelivery | None = None, on_answer: OnDelivery | None = None,
        metrics: XdsMetrics | None = None, auth: AdsAuth | None = None,
        max_nodes: int = MAX_NODES, max_nodes_per_credential: int = MAX_NODES_PER_CREDENTIAL,
    ) -> None:
        self._cache = cache
        self.auth = auth or AdsAuth()
        self.max_nodes = max_nodes
        self.max_nodes_per_credential = max_nodes_per_credential
        # Per credential, the node ids it speaks for now and their streams under it.
        self._spoken: dict[str, dict[str, int]] = {}
        self._bounds: dict[str, int | None] = {}  # per credential counted, its bound
        self._connected = 0  # node ids with a stream
        # Per connected node id, the hosts (IP addresses) its streams come from and how
        # many: the access log service admits a node's log stream from these
        # (meshxl.xds.accesslog).
        self._hosts: dict[str, dict[str, int]] = {}
        self._open: dict[str, set[Stream]] = {}  # per node id, its open streams
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
        #: Streams refused, by reason (invalid_node_id, unauthenticated,
        #: permission_denied).
        self.refused: dict[str, int] = {}
        self._log_limit = LogLimiter()
        # Accepted versions of disconnected nodes, per type and version, most recently
        # used last (bounded by RETAINED_VERSIONS_MAX per type).
        self._retained: dict[str, dict[str, EncodedResources]] = {}

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
        """Add the ADS service and the EDS service to ``server`` (before it starts)."""
        ads = self.method_handlers()
        eds = {"StreamEndpoints": ads["StreamAggregatedResources"],
               "DeltaEndpoints": ads["DeltaAggregatedResources"]}
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(ADS_SERVICE, ads),
             grpc.method_handlers_generic_handler(EDS_SERVICE, eds))
        )

    async def serve(self, listen: str, *, tls: ServerTls | None = None
                    ) -> tuple[grpc.aio.Server, int]:
        """Start a gRPC server on ``listen`` ("host:port", port may be 0): plaintext, or
        TLS (mutual TLS when ``tls`` has a client CA).

        Returns the started server and the bound port; stop it with ``server.stop``.
        """
        server = grpc.aio.server(options=ADS_GRPC_OPTIONS)
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

    def zones(self) -> dict[str, str]:
        """Connected nodes' locality zones (the ones that have one; a node's streams in
        several zones: its oldest stream's)."""
        return {node_id: node.zone for node_id, node in self._nodes.items()
                if node.streams > 0 and node.zone}

    def routes(self, node_id: str) -> frozenset[str] | None:
        """The clusters ``node_id`` routes to as this control plane serves it
        (:func:`~meshxl.xds.nodes.routed`): the access log counts entries for these."""
        return routed(self._open.get(node_id, ()))

    def connected_from(self, node_id: str, host: str) -> bool:
        """Whether ``node_id`` has an open (hence admitted) ADS stream from ``host``
        (an IP address, as :func:`peer_host` gives it)."""
        return host in self._hosts.get(node_id, ())

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

    def credential_counts(self) -> dict[str, dict[str, int | None]]:
        """Per credential with a node connected: its node ids and its bound (None:
        only ``max_nodes``)."""
        return {name: {"nodes": len(nodes), "max_nodes": self._bounds.get(name)}
                for name, nodes in self._spoken.items()}

    def _limit(self, name: str, bound: int | None) -> int | None:
        """A credential's bound: its entry's, else the server's; None for the shared
        token and no authentication (one credential for every node)."""
        if name in RESERVED_NAMES:
            return None
        return bound or self.max_nodes_per_credential

    def _count(self, stream: Stream, node_id: str, counted: list[tuple[str, int | None]],
               ) -> None:
        """Count ``node_id`` against its credentials and all nodes, or refuse a new one
        past a bound (:class:`~meshxl.xds.auth.TooManyNodes`)."""
        node = self._nodes.get(node_id)
        if (node is None or node.streams == 0) and self._connected >= self.max_nodes:
            raise TooManyNodes(
                f"this control plane serves {self._connected} node ids, its bound "
                f"(--max-nodes): node id {node_id!r} refused until another node leaves")
        for name, bound in counted:
            spoken = self._spoken.get(name, {})
            limit = self._limit(name, bound)
            if node_id not in spoken and limit is not None and len(spoken) >= limit:
                raise TooManyNodes(
                    f"credential {name!r} speaks for {len(spoken)} node ids, its bound "
                    "(max_nodes of its entry, or --max-nodes-per-credential): node id "
                    f"{node_id!r} refused until one of them leaves", name)
        for name, bound in counted:
            spoken = self._spoken.setdefault(name, {})
            spoken[node_id] = spoken.get(node_id, 0) + 1
            self._bounds[name] = self._limit(name, bound)
        stream.counted = [name for name, _ in counted]

    def _uncount(self, stream: Stream, node_id: str) -> None:
        for name in stream.counted:
            spoken = self._spoken.get(name, {})
            left = spoken.get(node_id, 1) - 1
            if left > 0:
                spoken[node_id] = left
                continue
            spoken.pop(node_id, None)
            if not spoken:
                self._spoken.pop(name, None)
                self._bounds.pop(name, None)
        stream.counted = []

    def connect(self, stream: Stream, node_proto: EnvoyNode) -> NodeStatus:
        """The stream's first request names its node (and zone): check that the
        stream may speak for them and that a new node id is within the bounds
        (:class:`~meshxl.xds.auth.AdsRefused` otherwise), then count the stream. The zone
        is the stream's own: what it is served follows it, and no other stream's."""
        node_id = node_proto.id
        problem = node_id_problem(node_id)
        if problem is not None:
            raise InvalidNodeId(problem)
        zone = bound_text(node_proto.locality.zone, NODE_CLUSTER_MAX)
        grant = stream.grant if stream.grant is not None else self.auth.admit((), stream.peer)
        self._count(stream, node_id, self.auth.authorize(grant, stream.peer, node_id, zone))
        node = self._nodes.get(node_id)
        if node is None:
            node = self._nodes[node_id] = NodeStatus(node_id)
        node.cluster = bound_text(node_proto.cluster, NODE_CLUSTER_MAX) or node.cluster
        stream.zone = zone
        node.stream_zone(stream, zone)
        if node.streams == 0:
            self._restore(node)
            self._connected += 1
        node.streams += 1
        node.connected_at = time.time()
        stream.node = node
        hosts = self._hosts.setdefault(node_id, {})
        host = peer_host(stream.peer.address)
        hosts[host] = hosts.get(host, 0) + 1
        self._open.setdefault(node_id, set()).add(stream)
        allowed, held = self._log_limit.allow((node_id, "connected"))
        if allowed:
            log.info("node %s connected (%d streams)%s", node_id, node.streams,
                     f" ({held} more connections since the last report)" if held else "")
        self._changed(node)
        return node

    def refuse(self, refusal: AdsRefused, peer: Peer) -> grpc.StatusCode:
        """Count and log a refused stream; the status it ends with."""
        reason = refusal.reason
        self.refused[reason] = self.refused.get(reason, 0) + 1
        if self._metrics is not None:
            self._metrics.refused(reason)
        key = refusal.credential if isinstance(refusal, TooManyNodes) else str(refusal)
        allowed, held = self._log_limit.allow(("refused", reason, key))
        if allowed:
            log.warning("ADS stream from %s refused (%s): %s%s", peer.address or "?",
                        reason, refusal,
                        f" ({held} more since the last report)" if held else "")
        return _REFUSAL_CODES.get(type(refusal), grpc.StatusCode.INVALID_ARGUMENT)

    def _disconnect(self, stream: Stream) -> None:
        node = stream.node
        if node is None:
            return
        stream.node = None
        node.streams -= 1
        hosts = self._hosts.get(node.node_id, {})
        host = peer_host(stream.peer.address)
        if hosts.get(host, 0) > 1:
            hosts[host] -= 1
        else:
            hosts.pop(host, None)
            if not hosts:
                self._hosts.pop(node.node_id, None)
        streams = self._open.get(node.node_id, set())
        streams.discard(stream)
        if not streams:
            self._open.pop(node.node_id, None)
        node.stream_zone(stream, None)
        self._uncount(stream, node.node_id)
        if node.streams == 0:
            self._connected -= 1
        node.disconnected_at = time.time()
        allowed, held = self._log_limit.allow((node.node_id, "disconnected"))
        if allowed:
            log.info("node %s disconnected (%d streams left)%s", node.node_id, node.streams,
                     f" ({held} more disconnections since the last report)" if held else "")
        self._changed(node)
        if node.streams == 0:
            self._retain(node)
            self._prune_disconnected()

    def _retain(self, node: NodeStatus) -> None:
        """The node's last stream ended: its accepted versions go to the bounded store
        shared by disconnected nodes (the node keeps their version names)."""
        for types in node.accepted.values():
            for type_url, resources in types.items():
                kept = self._retained.setdefault(type_url, {})
                kept.pop(resources.version, None)
                kept[resources.version] = resources  # most recently used last
                while len(kept) > RETAINED_VERSIONS_MAX:
                    del kept[next(iter(kept))]
        node.accepted.clear()

    def _restore(self, node: NodeStatus) -> None:
        """A disconnected node's first stream: its accepted versions, where kept."""
        for zone, versions in node.accepted_versions.items():
            for type_url, version in versions.items():
                found = self._retained.get(type_url, {}).get(version)
                if found is not None:
                    node.accepted.setdefault(zone, {})[type_url] = found

    def _prune_disconnected(self) -> None:
        gone = [n for n in self._nodes.values() if n.streams == 0]
        if len(gone) <= DISCONNECTED_NODES_MAX:
            return
        gone.sort(key=lambda n: n.disconnected_at or 0.0)
        for node in gone[: len(gone) - DISCONNECTED_NODES_MAX]:
            del self._nodes[node.node_id]

    def delivered(self, stream: Stream, type_url: str, version: str) -> float:
        """A response for ``type_url`` at (snapshot) ``version`` is being written on
        ``stream``. Returns its ``time.monotonic()``, for the ACK latency.
        """
        now = time.monotonic()
        node = stream.node
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
            since = None if published is None or published < stream.opened_at \
                else now - published
            self._metrics.sent(type_url, stream.protocol, since)
        return now

    def answered(self, node: NodeStatus, type_url: str, version: str | None, error: str | None,
                  sent_at: float | None, *, nack: bool = False,
                  resources: EncodedResources | None = None, zone: str = "") -> None:
        """Envoy ACKed (``nack`` False) or NACKed the response sent at ``sent_at``.

        ``version`` is the type's snapshot version that response carried (None when
        a NACK names no response of this stream, or an ACK does not mean the node holds
        that version whole); ``resources``, of an ACK with a version, are what the node
        now holds: its fallback from then on, in ``zone`` (the answering stream's).
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
            if resources is not None:
                node.accept(type_url, zone, resources)
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
        self, requests: AsyncIterator[SotwRequest], context: grpc.aio.ServicerContext
    ) -> None:
        await self._run(requests, context, sotw.SotwStream(self))

    async def _delta_stream(
        self, requests: AsyncIterator[DeltaRequest], context: grpc.aio.ServicerContext
    ) -> None:
        await self._run(requests, context, delta.DeltaStream(self))

    async def _run(self, requests: AsyncIterator[RequestT],
                   context: grpc.aio.ServicerContext,
                   stream: RequestStream[RequestT]) -> None:
        stream.peer = peer_names(context.auth_context() or {}, context.peer() or "")
        try:
            stream.grant = self.auth.admit(context.invocation_metadata() or (), stream.peer)
        except AdsRefused as refusal:
            await context.abort(self.refuse(refusal, stream.peer), str(refusal))
        if self._metrics is not None:
            self._metrics.stream_opened(stream.protocol)
        reader: asyncio.Task[None] | None = None
        try:
            with self._cache.watch() as wake:
                reader = asyncio.create_task(self._read(requests, stream, wake))
                await self._loop(context, stream, wake)
        finally:
            # Every way a stream ends (the client leaving, an abort, the handler task
            # cancelled, even while it waits below) first drops the stream from its
            # node, synchronously: an await before it could be cancelled in turn and
            # leave a "ghost" node that counts as connected until a restart.
            self._disconnect(stream)
            if self._metrics is not None:
                self._metrics.stream_closed(stream.protocol)
            if reader is not None:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)

    async def _loop(self, context: grpc.aio.ServicerContext,
                    stream: RequestStream[RequestT], wake: asyncio.Event) -> None:
        while True:
            await wake.wait()
            wake.clear()
            while stream.inbox:
                code = grpc.StatusCode.INVALID_ARGUMENT
                try:
                    error = stream.handle(stream.inbox.popleft())
                except AdsRefused as refusal:
                    error, code = str(refusal), self.refuse(refusal, stream.peer)
                except BadDiscoveryRequest as exc:
                    error = str(exc)
                if error is not None:
                    await context.abort(code, error)
            if stream.closed:
                return
            snapshot = self._cache.snapshot
            if snapshot is None or stream.node is None:
                continue  # hold requests until there is something to serve
            for response in stream.responses(snapshot):
                await context.write(response)

    async def _read(
        self, requests: AsyncIterator[RequestT], stream: RequestStream[RequestT],
        wake: asyncio.Event,
    ) -> None:
        try:
            async for request in requests:
                stream.inbox.append(request)
                wake.set()
        except Exception as e:  # the client went away mid-read
            log.debug("ADS stream read ended: %r", e)
        finally:
            stream.closed = True
            wake.set()
