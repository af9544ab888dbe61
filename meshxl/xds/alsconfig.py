"""The access logs Envoy is told to stream to the control plane (pure: model -> protos).

A listener whose routes lead to at least one cluster measured for degradation
(``degradation.action`` other than ``off``) gets Envoy's gRPC access logger (on its
router's upstream log: one entry per attempt; a TCP proxy's access log), sending
every request's entry to the access log service on the ADS port
(:mod:`meshxl.xds.accesslog`), through the xDS cluster of the Envoy's bootstrap, so
it reaches a control-plane replica over the same connection settings (and client
certificate) as ADS. One message is built per model and shared by its listeners.
"""

from __future__ import annotations

from collections.abc import Iterable

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.core.v3 import config_source_pb2
from envoy.extensions.access_loggers.grpc.v3 import als_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2

from meshxl.model import ClusterSpec

__all__ = ["ACCESS_LOG_CLUSTER", "BUFFER_BYTES", "FLUSH_SECONDS", "LOG_NAME", "http_access_log",
           "log_tcp", "measured", "tcp_access_log", "upstream_router"]

ACCESS_LOG_CLUSTER = "meshxl_xds"
"""The bootstrap's xDS cluster (``meshxl.proxy.bootstrap.XDS_CLUSTER``, which this
package may not import; a unit test keeps the two equal)."""
LOG_NAME = "meshxl"
FLUSH_SECONDS = 0.2
"""Envoy sends what it buffered at least this often: a sample is this late at most."""
BUFFER_BYTES = 16 * 1024
"""Envoy sends sooner when its buffer holds this much (about a hundred entries)."""
GRPC_STATUS = "grpc-status"


def measured(specs: Iterable[ClusterSpec]) -> bool:
    """Whether any of ``specs`` is measured for degradation (its action is not off)."""
    return any(spec.degradation.action != "off" for spec in specs)


def _common(cluster: str) -> als_pb2.CommonGrpcAccessLogConfig:
    common = als_pb2.CommonGrpcAccessLogConfig(
        log_name=LOG_NAME, transport_api_version=config_source_pb2.ApiVersion.V3)
    common.grpc_service.envoy_grpc.cluster_name = cluster
    common.buffer_flush_interval.FromMilliseconds(round(FLUSH_SECONDS * 1000))
    common.buffer_size_bytes.value = BUFFER_BYTES
    return common


def http_access_log(cluster: str = ACCESS_LOG_CLUSTER) -> accesslog_pb2.AccessLog:
    """``envoy.access_loggers.http_grpc`` to ``cluster``, with the ``grpc-status``
    trailer (and header, for a trailers-only answer) a failed gRPC call is told by."""
    config = als_pb2.HttpGrpcAccessLogConfig(
        common_config=_common(cluster), additional_response_trailers_to_log=[GRPC_STATUS],
        additional_response_headers_to_log=[GRPC_STATUS])
    log = accesslog_pb2.AccessLog(name="envoy.access_loggers.http_grpc")
    log.typed_config.Pack(config)
    return log


def tcp_access_log(cluster: str = ACCESS_LOG_CLUSTER) -> accesslog_pb2.AccessLog:
    """``envoy.access_loggers.tcp_grpc`` to ``cluster``."""
    config = als_pb2.TcpGrpcAccessLogConfig(common_config=_common(cluster))
    log = accesslog_pb2.AccessLog(name="envoy.access_loggers.tcp_grpc")
    log.typed_config.Pack(config)
    return log


def upstream_router(log: accesslog_pb2.AccessLog | None) -> router_pb2.Router:
    """The router filter, logging every upstream attempt to ``log`` (when given).

    The router's upstream log, not the connection manager's access log: an attempt a
    member failed and Envoy retried on another member is an entry of the member that
    failed it (the connection manager logs only the attempt that answered, so a
    member failing a fifth of its requests behind retries would look healthy). A
    WebSocket is an entry when it closes, with its time to the 101."""
    router = router_pb2.Router()
    if log is not None:
        router.upstream_log.append(log)
    return router


def log_tcp(proxy: tcp_proxy_pb2.TcpProxy, log: accesslog_pb2.AccessLog) -> None:
    """Add ``log`` to ``proxy``, with an entry when the upstream connection is made (a
    connection counts when it opens)."""
    proxy.access_log.append(log)
    proxy.access_log_options.flush_access_log_on_connected = True
