"""Envoy's access log service (ALS): every request an Envoy sent to a member, as a
sample of :class:`meshxl.xds.upstream.UpstreamSignals`.

The Envoys stream their access logs to the control plane over the xDS cluster of their
bootstrap (``envoy.access_loggers.http_grpc`` as the router's upstream log of every
listener that routes to a cluster measured for degradation: one entry per upstream
attempt, so a failure Envoy retried elsewhere still counts against the member that
failed; ``envoy.access_loggers.tcp_grpc`` on such a TCP proxy;
:mod:`meshxl.xds.alsconfig`), on the ADS port's gRPC server. Each entry becomes one
request against ``(common_properties.upstream_cluster,
common_properties.upstream_remote_address)``:

* latency: ``time_to_first_upstream_rx_byte``, Envoy's view of the member's time to
  answer (a WebSocket's time to its ``101``); an attempt sent that ended without a
  byte back and without the member closing or resetting it (a route or per-try
  timeout: Envoy 1.40 logs it with no response code and no flag; or a client that gave
  up) counts the time it waited (its ``duration``), a lower bound of the member's time
  to answer: a member that accepts requests and never answers them is slow, and sick,
  not down; None otherwise;
* failed: a response code of 500 or more; an upstream failure response flag
  (connection failure, remote reset, request timeout, connection termination,
  overflow); a gRPC status (trailer, or header of a trailers-only answer) of UNKNOWN,
  DEADLINE_EXCEEDED, INTERNAL, UNAVAILABLE or DATA_LOSS;
* entries without an upstream host (local replies: no route, no healthy upstream) are
  skipped and counted nowhere;
* an upstream log's WebSocket is counted when it closes (its time to the 101 is its
  latency). A connection manager's access log (Istio's ALS: docs/faults.md) counts a
  WebSocket by the entry written when its tunnel is established
  (``flush_log_on_tunnel_successfully_established``) and not again at its end, and
  sees only the attempt that answered;
* a TCP connection is counted once, by the entry written when its upstream connected
  (``flush_access_log_on_connected``, latency None), or by its end entry when it never
  connected (failed on an upstream connection failure).

**Istio's cluster names.** Under Istio the entries name Istio's outbound clusters,
``outbound|PORT|SUBSET|HOST``; ``meshxl istio render`` makes each model cluster a
Kubernetes Service of the same name, whose host is ``NAME.NAMESPACE.svc.DOMAIN``. An
entry whose cluster is no model cluster is recorded against the model cluster its
Istio name stands for (:func:`istio_cluster`: the Service's name, the host's first
label, when that names a model cluster), so its members are judged as under meshxl's
own xDS. The port and namespace are not compared: members are found by their
addresses (``ip:port``), so another namespace's Service of the same name adds hosts no
member has.

Samples are timed by their arrival here (the control plane's clock), not Envoy's
``start_time``: clocks of other machines never shift a window, and arrival is at
most a flush interval (0.2 s) after the answer.

**Who may send.** A log stream names its node in its first message. The ADS port's
checks (:mod:`meshxl.xds.auth`) apply: with mutual TLS Envoy's access log connection
presents the same client certificate as its ADS stream (the same cluster), so the
certificate must name the node as for ADS. A bearer token is sent by Envoy only where
a ``grpc_service`` carries it, and the access log's comes from LDS, which every node
shares: it cannot hold a node's token. So a log stream without a token is admitted
while its node has an admitted ADS stream from the same IP address, checked at every
message (one pod, one address: another pod cannot speak for it; on one host, e.g.
loopback, every Envoy shares the address, which only a certificate tells apart). A
stream with a wrong token, or a certificate that does not name its node: refused.

**What a node may report on.** An entry counts only for a cluster the sending node
routes to as this control plane serves it (the endpoint names its ADS or EDS streams
here subscribe to: :meth:`meshxl.xds.server.AdsServer.routes`; meshxl's own Envoys
subscribe to every cluster of their model, Istio's sidecars with ``meshxl istio render
--endpoints meshxl`` to the clusters whose endpoints they take from meshxl), and for a
host that is one of that cluster's members now (its address, or one its host name
resolved to: :func:`member_hosts`). Any other entry, e.g. from a sidecar of an
unrelated namespace admitted by its certificate, or naming a host no member has, is
dropped and counted ``unrouted``: an admitted node cannot steer the judgement of a
cluster it does not route to. Each node's entries are kept as its own view of a host
(:mod:`meshxl.xds.upstream`), so one that does route there weighs no more than any
other reporting node.

**Bounds.** Envoy paces its messages, but nothing it sends is trusted: at most
:data:`MAX_ENTRIES_PER_MESSAGE` entries of a message are read, and a stream gets
:data:`ENTRIES_PER_SECOND` (a burst of twice that) before its entries are dropped; names
longer than the model allows are dropped; at most :data:`MAX_STREAMS` log streams
are open. Every entry is counted in ``meshxl_xds_access_log_entries_total{result}`` (recorded,
dropped, unrouted, refused).
Cost: docs/performance.md ("Access log entries").
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Container, Iterable, Mapping, Sequence

import grpc
from envoy.data.accesslog.v3.accesslog_pb2 import (
    AccessLogCommon,
    AccessLogType,
    HTTPAccessLogEntry,
    TCPAccessLogEntry,
)
from envoy.service.accesslog.v3.als_pb2 import StreamAccessLogsMessage, StreamAccessLogsResponse

from meshxl.model import ModelSpec, RuntimeState, cluster_view
from meshxl.nodeid import node_id_problem
from meshxl.xds.auth import AdsAuth, AdsRefused, Unauthenticated, peer_names
from meshxl.xds.metrics import XdsMetrics
from meshxl.xds.nodes import LogLimiter
from meshxl.xds.server import peer_host
from meshxl.xds.upgrades import model_cluster
from meshxl.xds.upstream import UpstreamSignals

__all__ = ["ACCESS_LOG_SERVICE", "ENTRIES_PER_SECOND", "MAX_ENTRIES_PER_MESSAGE",
           "MAX_STREAMS", "AccessLogReceiver", "ConnectedFrom", "http_sample", "istio_cluster",
           "member_hosts", "tcp_sample"]

log = logging.getLogger(__name__)

ACCESS_LOG_SERVICE = "envoy.service.accesslog.v3.AccessLogService"
MAX_ENTRIES_PER_MESSAGE = 1000
"""Entries read from one message (Envoy's buffer of 16 KiB holds about a hundred)."""
ENTRIES_PER_SECOND = 20_000
"""Entries one stream may send per second (a burst of twice as many)."""
MAX_STREAMS = 4096
"""Log streams open at once; one more is refused with RESOURCE_EXHAUSTED."""
_NAME_MAX = 256  # cluster names: the model's bound is lower
_HOST_MAX = 64  # "[ipv6]:port"

_GRPC_FAILED = frozenset({"2", "4", "13", "14", "15"})
"""UNKNOWN, DEADLINE_EXCEEDED, INTERNAL, UNAVAILABLE, DATA_LOSS."""

_COUNTED = frozenset({
    AccessLogType.UpstreamEnd,  # the router's upstream log: one per attempt (meshxl's)
    AccessLogType.DownstreamEnd,  # a connection manager's access log (e.g. Istio's)
    AccessLogType.DownstreamTunnelSuccessfullyEstablished,
    AccessLogType.NotSet,  # an Envoy older than access log types
})

ConnectedFrom = Callable[[str, str], bool]
"""``(node id, host)``: whether the node has an admitted ADS stream from that IP."""
Routes = Callable[[str], "Container[str] | None"]
"""node id -> the clusters it routes to (None: every cluster)."""
Members = Callable[[], "Mapping[str, Container[str]]"]
"""Per cluster, its members' hosts (``ip:port``) now."""

Sample = tuple[str, str, float | None, bool]
"""(cluster, host, latency seconds or None, failed)."""


def istio_cluster(name: str, clusters: Container[str]) -> str | None:
    """The model cluster an Istio outbound cluster name (``outbound|PORT|SUBSET|HOST``,
    HOST ``SERVICE.NAMESPACE.svc...``) stands for: SERVICE when it is one of
    ``clusters`` (what ``meshxl istio render`` names each model cluster's Service);
    None for any other name."""
    parts = name.split("|")
    if len(parts) != 4 or parts[0] != "outbound" or not parts[1].isdigit():
        return None
    labels = parts[3].split(".")
    if len(labels) < 3 or labels[2] != "svc":
        return None
    return labels[0] if labels[0] in clusters else None


def _hostport(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def member_hosts(model: ModelSpec, state: RuntimeState,
                 resolved: Mapping[str, Iterable[str]]) -> dict[str, frozenset[str]]:
    """Per cluster, its members' upstream hosts as Envoy logs them (``ip:port``): each
    member's address (registered members' too), and the addresses a host name resolved
    to (``resolved``: the DNS resolver's answers)."""
    out: dict[str, frozenset[str]] = {}
    for spec in model.clusters:
        hosts: set[str] = set()
        for m in cluster_view(spec, state).members:
            hosts.add(_hostport(m.address, m.port))
            hosts.update(_hostport(ip, m.port) for ip in resolved.get(m.address, ()))
        out[spec.name] = frozenset(hosts)
    return out


def _host(common: AccessLogCommon) -> str | None:
    if not common.HasField("upstream_remote_address"):
        return None
    sa = common.upstream_remote_address.socket_address
    if not sa.address:
        return None
    return _hostport(sa.address, sa.port_value)


def _upstream_failed(common: AccessLogCommon) -> bool:
    f = common.response_flags
    return bool(f.upstream_connection_failure or f.upstream_remote_reset
                or f.upstream_request_timeout or f.upstream_connection_termination
                or f.upstream_overflow)


def _waited(common: AccessLogCommon, code: int) -> bool:
    """The attempt was sent to the member and ended with no byte back, not by the
    member closing or resetting it: a route or per-try timeout (Envoy 1.40's upstream
    log then has no response code and no flag, only the ``duration`` it waited), or a
    client that gave up. Its duration is a lower bound of the member's time to answer."""
    f = common.response_flags
    return ((code == 0 or f.upstream_request_timeout)
            and common.HasField("time_to_first_upstream_tx_byte")
            and common.HasField("duration")
            and not (f.upstream_remote_reset or f.upstream_connection_termination))


def http_sample(entry: HTTPAccessLogEntry) -> Sample | None:
    """What one HTTP entry says about its upstream host; None when it names none, is a
    WebSocket's end already counted when its tunnel was established, or never
    connected to it."""
    common = entry.common_properties
    host = _host(common)
    if host is None or not common.upstream_cluster:
        return None
    response = entry.response
    code = response.response_code.value
    kind = common.access_log_type
    if kind not in _COUNTED:
        return None  # periodic entries, or when an upstream stream starts: counted at end
    if code == 101 and kind == AccessLogType.DownstreamEnd:
        return None  # counted when its tunnel was established
    if common.response_flags.upstream_connection_failure:
        # Not connected at all: the member is down or cut off for this Envoy (its health
        # check, outlier detection and lease handle that), not sick. Counted, a member
        # one proxy cannot reach looked sick to the replica that proxy reports to.
        return None
    seconds = None
    if common.HasField("time_to_first_upstream_rx_byte"):
        d = common.time_to_first_upstream_rx_byte
        seconds = d.seconds + d.nanos / 1e9
    elif _waited(common, code):
        d = common.duration
        seconds = d.seconds + d.nanos / 1e9
    status = response.response_trailers.get("grpc-status") or \
        response.response_headers.get("grpc-status")
    failed = code >= 500 or _upstream_failed(common) or status in _GRPC_FAILED
    # A WebSocket's entry names its cluster's upgrades twin (meshxl.xds.upgrades).
    return model_cluster(common.upstream_cluster), host, seconds, failed


def tcp_sample(entry: TCPAccessLogEntry) -> Sample | None:
    """One TCP connection: counted when its upstream connected, or at its end when it
    never did (failed on an upstream connection failure); None otherwise."""
    common = entry.common_properties
    host = _host(common)
    if host is None or not common.upstream_cluster:
        return None
    kind = common.access_log_type
    failed = bool(common.response_flags.upstream_connection_failure)
    if kind == AccessLogType.TcpUpstreamConnected or kind == AccessLogType.NotSet:
        return common.upstream_cluster, host, None, failed
    if kind == AccessLogType.TcpConnectionEnd and failed:
        return common.upstream_cluster, host, None, True
    return None


class _Stream:
    """One log stream's node, how it was admitted, and its entry budget."""

    __slots__ = ("by_address", "host", "node_id", "tokens", "updated")

    def __init__(self, now: float) -> None:
        self.node_id = ""
        self.host = ""
        self.by_address = False
        self.tokens = float(2 * ENTRIES_PER_SECOND)
        self.updated = now

    def take(self, n: int, now: float) -> int:
        """How many of ``n`` entries the budget allows now."""
        self.tokens = min(2.0 * ENTRIES_PER_SECOND,
                          self.tokens + (now - self.updated) * ENTRIES_PER_SECOND)
        self.updated = now
        allowed = min(n, int(self.tokens))
        self.tokens -= allowed
        return allowed


class AccessLogReceiver:
    """The ``AccessLogService`` servicer: entries to ``signals``.

    ``auth``: the ADS port's checks; ``connected_from``: the ADS server's view of which
    node has a stream from which address (:meth:`meshxl.xds.server.AdsServer.connected_from`),
    for streams without a token; ``clock``: the Unix time samples are recorded at;
    ``model``: the model now, to whose clusters Istio's cluster names are mapped
    (:func:`istio_cluster`; None: recorded as they come); ``routes``: the clusters a
    node routes to, and ``members``: a cluster's hosts now (what a node may report on;
    None: not checked).
    """

    def __init__(self, signals: UpstreamSignals, auth: AdsAuth | None = None,
                 metrics: XdsMetrics | None = None, *,
                 connected_from: ConnectedFrom | None = None,
                 clock: Callable[[], float] = time.time,
                 model: Callable[[], ModelSpec | None] | None = None,
                 routes: Routes | None = None, members: Members | None = None) -> None:
        self.signals = signals
        self.model = model
        self.routes = routes
        self.members = members
        self._routed: Container[str] | None = None
        self._node = ""
        self._hosts: Mapping[str, Container[str]] = {}
        self._names_of: ModelSpec | None = None
        self.auth = auth or AdsAuth()
        self.metrics = metrics
        self.connected_from = connected_from
        self.clock = clock
        self.streams = 0
        self.counts = {"recorded": 0, "dropped": 0, "unrouted": 0, "refused": 0}
        self._known: Container[str] | None = None
        self._known_names: frozenset[str] = frozenset()
        self._log_limit = LogLimiter()

    def register(self, server: grpc.aio.Server) -> None:
        """Add the service to ``server`` (before it starts)."""
        handler = grpc.stream_unary_rpc_method_handler(
            self._stream, request_deserializer=StreamAccessLogsMessage.FromString,
            response_serializer=StreamAccessLogsResponse.SerializeToString)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            ACCESS_LOG_SERVICE, {"StreamAccessLogs": handler}),))

    def _count(self, result: str, n: int) -> None:
        if n <= 0:
            return
        self.counts[result] += n
        if self.metrics is not None:
            self.metrics.access_log_entries.labels(result).inc(n)

    async def _stream(self, messages: AsyncIterator[StreamAccessLogsMessage],
                      context: grpc.aio.ServicerContext) -> StreamAccessLogsResponse:
        if self.streams >= MAX_STREAMS:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"more than {MAX_STREAMS} access log streams")
        self.streams += 1
        try:
            stream = _Stream(time.monotonic())
            async for message in messages:
                refusal = self._admit(stream, message, context)
                if refusal is not None:
                    self._count("refused", len(message.http_logs.log_entry)
                                + len(message.tcp_logs.log_entry))
                    self._refused(context.peer() or "?", refusal)
                    await context.abort(refusal[0], refusal[1])
                self.receive(stream, message)
        finally:
            self.streams -= 1
        return StreamAccessLogsResponse()

    def _refused(self, peer: str, refusal: tuple[grpc.StatusCode, str]) -> None:
        allowed, held = self._log_limit.allow(("als refused", refusal[1]))
        if allowed:
            log.warning("access log stream from %s refused: %s%s", peer, refusal[1],
                        f" ({held} more since the last report)" if held else "")

    def _admit(self, stream: _Stream, message: StreamAccessLogsMessage,
               context: grpc.aio.ServicerContext) -> tuple[grpc.StatusCode, str] | None:
        """None when the stream may speak for its node (the first message names it),
        else the status and text it ends with."""
        if stream.node_id:
            if stream.by_address and self.connected_from is not None and \
                    not self.connected_from(stream.node_id, stream.host):
                return (grpc.StatusCode.UNAUTHENTICATED,
                        f"node {stream.node_id!r} has no ADS stream from {stream.host} now")
            return None
        node = message.identifier.node
        problem = node_id_problem(node.id)
        if problem is not None:
            return grpc.StatusCode.INVALID_ARGUMENT, f"access log identifier: {problem}"
        stream.node_id = node.id
        if not self.auth.enabled:
            return None
        peer = peer_names(context.auth_context() or {}, context.peer() or "")
        metadata: Sequence[tuple[str, str | bytes]] = context.invocation_metadata() or ()
        try:
            grant = self.auth.admit(metadata, peer)
            self.auth.authorize(grant, peer, node.id, node.locality.zone)
            return None
        except Unauthenticated as refusal:
            if any(k.lower() == "authorization" for k, _ in metadata) or \
                    self.connected_from is None:
                return grpc.StatusCode.UNAUTHENTICATED, str(refusal)
        except AdsRefused as refusal:
            return grpc.StatusCode.PERMISSION_DENIED, str(refusal)
        if self.connected_from is None:
            return grpc.StatusCode.UNAUTHENTICATED, "no token"
        stream.host = peer_host(peer.address)
        stream.by_address = True
        if not self.connected_from(node.id, stream.host):
            return (grpc.StatusCode.UNAUTHENTICATED,
                    f"no token, and node {node.id!r} has no ADS stream from {stream.host}")
        return None

    def receive(self, stream: _Stream, message: StreamAccessLogsMessage) -> None:
        """Record a message's entries, within the stream's bounds."""
        now_mono = time.monotonic()
        http = message.http_logs.log_entry
        tcp = message.tcp_logs.log_entry
        total = len(http) + len(tcp)
        if total == 0:
            return
        allowed = stream.take(min(total, MAX_ENTRIES_PER_MESSAGE), now_mono)
        self._count("dropped", total - allowed)
        at = self.clock()
        recorded = 0
        self._known = self._cluster_names()
        self._node = stream.node_id
        self._routed = self.routes(stream.node_id) if self.routes is not None else None
        self._hosts = self.members() if self.members is not None else {}
        record = self.signals.record
        for i, entry in enumerate(http):
            if i >= allowed:
                break
            sample = http_sample(entry)
            if sample is None:
                continue
            recorded += self._record(record, sample, at)
        for entry in tcp[:max(0, allowed - len(http))]:
            sample = tcp_sample(entry)
            if sample is not None:
                recorded += self._record(record, sample, at)
        self._count("recorded", recorded)

    def _cluster_names(self) -> frozenset[str] | None:
        model = self.model() if self.model is not None else None
        if model is None:
            return None
        if model is not self._names_of:
            self._names_of, self._known_names = model, frozenset(c.name for c in model.clusters)
        return self._known_names

    def _record(self, record: Callable[[str, str, float | None, bool, float, str], None],
                sample: Sample, at: float) -> int:
        cluster, host, seconds, failed = sample
        if len(cluster) > _NAME_MAX or len(host) > _HOST_MAX:
            self._count("dropped", 1)
            return 0
        known = self._known
        if known is not None and cluster not in known and cluster.startswith("outbound|"):
            cluster = istio_cluster(cluster, known) or cluster
        if self.routes is not None and self._routed is not None and cluster not in self._routed:
            self._count("unrouted", 1)  # a cluster this node does not route to
            return 0
        if self.members is not None:
            hosts = self._hosts.get(cluster)
            if hosts is None or host not in hosts:
                self._count("unrouted", 1)  # no member of the cluster has this host
                return 0
        record(cluster, host, seconds, failed, at, self._node)
        return 1
