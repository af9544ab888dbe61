"""What a cluster's protocol adds to its Envoy resources (pure).

* ``http2`` and ``grpc``: the members are spoken to over HTTP/2 (the cluster's
  ``HttpProtocolOptions``; without it Envoy speaks HTTP/1.1 and a gRPC server answers
  nothing useful); gRPC clusters are health-checked with grpc.health.v1, and their
  route lets a call's own deadline (``grpc-timeout``) bound it instead of cutting
  streams at the route timeout;
* ``http``: WebSocket upgrades on the listener's HTTP connection manager (and refused on
  the routes of clusters that do not allow them);
* ``tcp``: a listener of its own with Envoy's TCP proxy, hashing on the source address
  for a consistent-hash cluster, connect retries spread by the retry backoff, and TCP
  health checks.

Clusters with long-lived connections also close them when Envoy finds their member
dead (``close_connections_on_host_health_failure``), and their listeners carry a drain
generation: a change of it makes Envoy drain the listener's connections
(docs/model.md, "Drains").
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

from envoy.config.accesslog.v3.accesslog_pb2 import AccessLog
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import health_check_pb2, protocol_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.v3 import http_pb2
from google.protobuf import wrappers_pb2

from meshxl.model import ClusterSpec, HealthCheck
from meshxl.model.spec import HealthCheckType, Protocol, choose
from meshxl.xds.alsconfig import log_tcp
from meshxl.xds.upgrades import WEBSOCKET, has_upgrade_cluster

__all__ = [
    "EVENT_STREAM", "EVENT_STREAMS_SUFFIX", "HTTP_PROTOCOL_OPTIONS", "TCP_PROXY", "WEBSOCKET",
    "apply_protocol", "build_event_stream_route", "build_tcp_listener", "drain_generation",
    "has_event_stream_route", "health_check_kind", "route_protocol", "websocket_upgrades",
]

HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
TCP_PROXY = "envoy.filters.network.tcp_proxy"
_DRAIN_KEY = "meshxl.drain"


def _http11(c: cluster_pb2.Cluster) -> None:
    """Envoy's default upstream protocol: nothing to add."""


def _http2(c: cluster_pb2.Cluster) -> None:
    options = http_protocol_options_pb2.HttpProtocolOptions()
    options.explicit_http_config.http2_protocol_options.CopyFrom(
        protocol_pb2.Http2ProtocolOptions())
    c.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS].Pack(options)


#: Protocol -> how the cluster speaks to its members.
_UPSTREAM: dict[Protocol, Any] = {"http": _http11, "http2": _http2, "grpc": _http2,
                                  "tcp": _http11}


def apply_protocol(c: cluster_pb2.Cluster, spec: ClusterSpec) -> None:
    """The upstream protocol, and closing a dead member's long-lived connections (an
    HTTP/1.1 cluster's are its WebSockets, on its upgrades twin where it has one:
    :mod:`meshxl.xds.upgrades`)."""
    choose(_UPSTREAM, spec.protocol, "protocol")(c)
    if spec.long_lived and not has_upgrade_cluster(spec):
        # A member that fails its health check (or is ejected) keeps its open streams,
        # WebSockets and TCP connections unless Envoy closes them: their clients then
        # reconnect, to the member that took the sessions over.
        c.close_connections_on_host_health_failure = True


def _http_check(check: health_check_pb2.HealthCheck, hc: HealthCheck, spec: ClusterSpec,
                ) -> None:
    http = check.http_health_check
    http.path = hc.path
    if spec.protocol in ("http2", "grpc"):
        http.codec_client_type = http_pb2.CodecClientType.HTTP2
    for status in sorted(set(hc.expected_statuses)):
        http.expected_statuses.add(start=status, end=status + 1)


def _grpc_check(check: health_check_pb2.HealthCheck, hc: HealthCheck, spec: ClusterSpec,
                ) -> None:
    check.grpc_health_check.service_name = hc.grpc_service


def _tcp_check(check: health_check_pb2.HealthCheck, hc: HealthCheck, spec: ClusterSpec,
               ) -> None:
    # Connect only: an empty send and no receive pass once the connection is up.
    check.tcp_health_check.SetInParent()


#: Health check type -> how the check is written.
_HEALTH_CHECKS: dict[HealthCheckType, Any] = {"http": _http_check, "grpc": _grpc_check,
                                              "tcp": _tcp_check}


def health_check_kind(check: health_check_pb2.HealthCheck, spec: ClusterSpec) -> None:
    """What the check sends: HTTP GET, grpc.health.v1 or a TCP connect."""
    hc = spec.health_check
    kind = hc.type or "http"
    choose(_HEALTH_CHECKS, kind, "health check type")(check, hc, spec)


def route_protocol(route: route_components_pb2.Route, spec: ClusterSpec) -> None:
    """gRPC: the call's own deadline bounds it (``grpc-timeout``, uncapped). A cluster
    that refuses WebSockets turns them off on its route (its listener may allow them
    for another cluster)."""
    if spec.protocol == "grpc":
        route.route.max_stream_duration.grpc_timeout_header_max.SetInParent()
    if not spec.websocket_upgrades:
        route.route.upgrade_configs.add(upgrade_type=WEBSOCKET,
                                        enabled=wrappers_pb2.BoolValue(value=False))


EVENT_STREAM = "text/event-stream"
"""What a request for Server-Sent Events accepts."""
EVENT_STREAMS_SUFFIX = "~sse"


def has_event_stream_route(spec: ClusterSpec) -> bool:
    """``spec`` serves HTTP through a meshxl listener: its Server-Sent Events get a
    route of their own (:func:`build_event_stream_route`)."""
    return spec.protocol in ("http", "http2") and spec.listener is not None


def build_event_stream_route(plain: route_components_pb2.Route
                             ) -> route_components_pb2.Route:
    """The route of a cluster's Server-Sent Events, just before ``plain``: a request
    that accepts ``text/event-stream`` goes where ``plain`` sends it (same cluster, hash,
    pins and retries) without the route's timeout, which counts until the response is
    complete and so would cut every event stream at 15 s by default. Such a response
    is bounded by the connection manager's stream idle timeout instead (5 min; the
    server's heartbeats keep a live one going: docs/streams.md)."""
    r = route_components_pb2.Route()
    r.CopyFrom(plain)
    r.name = plain.name + EVENT_STREAMS_SUFFIX
    r.route.timeout.Clear()
    r.route.timeout.seconds = 0
    header = r.match.headers.add(name="accept")
    header.string_match.contains = EVENT_STREAM
    header.string_match.ignore_case = True
    return r


def listener_protocols(hcm: hcm_pb2.HttpConnectionManager, websocket: bool) -> None:
    """A meshxl listener's clients' protocols: HTTP/2 (:func:`downstream_http2`), and
    WebSocket upgrades where a cluster on it allows them."""
    downstream_http2(hcm)
    if websocket:
        websocket_upgrades(hcm)


def downstream_http2(hcm: hcm_pb2.HttpConnectionManager) -> None:
    """Clients' HTTP/2 (gRPC) on Envoy's oghttp2 codec.

    Envoy's other HTTP/2 codec (nghttp2) allows a client 1,000 RST_STREAM frames at
    once and 33 a second after (its guard against reset floods), counting resets of
    streams already closed, and past that closes the connection (GOAWAY, INTERNAL_ERROR)
    with every stream on it. One gRPC channel carrying a thousand resumable streams
    spends it when their member dies: the client resets each stream Envoy reset
    (bench/streams.py's gRPC kill: 1,000 at once), and the next few dozen resets, within
    half a minute, closed the channel's connection and broke every stream again, the
    resumed ones included. oghttp2 has no such bucket; Envoy's own guard stays (a
    connection whose streams are mostly reset within a second of opening is closed).
    Envoy's ``stream_reset_burst`` and ``stream_reset_rate`` (1.39) would raise the
    bucket instead; the API this control plane is built on predates them."""
    hcm.http2_protocol_options.use_oghttp2_codec.value = True


WEBSOCKET_CLOSE_GRACE = 0.0
"""Envoy's ``delayed_close_timeout`` on listeners that carry WebSockets: 0, Envoy closes
the client's connection as soon as what it wrote is flushed.

When a member's side of a WebSocket breaks, Envoy ends the client's connection with a
*delayed* close: it stops, waits up to this long for the client to close first, and
sends nothing (no FIN) meanwhile, so the client learns that its member died only when
the grace runs out (Envoy's default 1 s; measured: 1.0 s, 110 ms with 100 ms, 5 ms with
0). The grace exists for a response Envoy ends with a close while the client is still
sending; a broken WebSocket has nothing left to deliver. 0 disables the timer
altogether: the connection closes once its writes are flushed, never cutting a slow
reader's last bytes (a positive grace shorter than a client's round trip could)."""


def websocket_upgrades(hcm: hcm_pb2.HttpConnectionManager) -> None:
    hcm.upgrade_configs.add(upgrade_type=WEBSOCKET)
    # Set explicitly: an unset field is Envoy's 1 s.
    hcm.delayed_close_timeout.FromNanoseconds(round(WEBSOCKET_CLOSE_GRACE * 1e9))


def drain_generation(drained: Iterable[tuple[str, str]]) -> str:
    """A name for the set of (cluster, member) whose drain window has passed: when it
    changes, Envoy drains the listener's connections (empty for none)."""
    items = sorted(set(drained))
    if not items:
        return ""
    digest = hashlib.sha256(repr(items).encode()).hexdigest()[:16]
    return f"drain-{digest}"


def mark_generation(chain: listener_components_pb2.FilterChain, generation: str) -> None:
    """Carry the drain generation in the filter chain: a changed chain is one Envoy drains
    (in place: the listener and its other chains stay)."""
    if generation:
        chain.metadata.filter_metadata["meshxl"].fields[_DRAIN_KEY].string_value = generation


def build_tcp_listener(name: str, address: str, port: int, spec: ClusterSpec,
                       generation: str = "", access_log: AccessLog | None = None,
                       ) -> listener_pb2.Listener:
    """A listener whose every connection goes to ``spec``'s cluster through Envoy's TCP
    proxy: hashed on the client's address for a consistent-hash cluster, retried on
    another member when the connection cannot be made.

    Each connect attempt is placed by the load balancer again, and a consistent hash
    places it on the same member until Envoy has ejected that member (outlier detection,
    on its first refusal; the ejection reaches Envoy's workers milliseconds later). Made
    back to back, every attempt of a connection that arrives in that window meets the
    dead member and the connection is closed while the standby is up; spaced by the
    retry backoff (jittered, ``backoff_base`` doubling up to ``backoff_max``) they
    outlast the ejection. ``access_log``: streamed to the control plane
    (:mod:`meshxl.xds.alsconfig`)."""
    r = spec.retries
    proxy = tcp_proxy_pb2.TcpProxy(stat_prefix=name, cluster=spec.name)
    proxy.max_connect_attempts.value = r.attempts + 1
    if r.attempts:
        proxy.backoff_options.base_interval.FromNanoseconds(round(r.backoff_base * 1e9))
        proxy.backoff_options.max_interval.FromNanoseconds(round(r.backoff_max * 1e9))
    st = spec.stickiness
    if st is not None and st.source_ip:
        proxy.hash_policy.add().source_ip.SetInParent()
    if access_log is not None:
        log_tcp(proxy, access_log)
    listener = listener_pb2.Listener(name=name)
    listener.address.socket_address.address = address
    listener.address.socket_address.port_value = port
    chain = listener.filter_chains.add()
    chain.filters.add(name=TCP_PROXY).typed_config.Pack(proxy)
    mark_generation(chain, generation)
    return listener

