"""The access logs a listener streams to the control plane (meshxl.xds.alsconfig)."""

from __future__ import annotations

from typing import Any

import yaml
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.access_loggers.grpc.v3 import als_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2

from meshxl.model import parse_model
from meshxl.proxy.bootstrap import XDS_CLUSTER
from meshxl.xds import alsconfig
from meshxl.xds.compiler import compile_resources


def cluster(name: str, port: int, **fields: Any) -> dict[str, Any]:
    extra: dict[str, Any] = {} if fields.get("protocol") == "tcp" else {
        "route": {"domains": [f"{name}.local"]}}
    return {"name": name, "members": [{"name": "a", "address": "127.0.0.1", "port": 9001},
                                      {"name": "b", "address": "127.0.0.1", "port": 9002}],
            "listener": {"address": "127.0.0.1", "port": port}, **extra, **fields}


def listeners(*clusters: dict[str, Any]) -> dict[str, listener_pb2.Listener]:
    model = parse_model(yaml.safe_dump({"clusters": list(clusters)}))
    return dict(compile_resources(model).listeners)


def hcm_of(listener: listener_pb2.Listener) -> hcm_pb2.HttpConnectionManager:
    hcm = hcm_pb2.HttpConnectionManager()
    assert listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    return hcm


def test_the_access_log_goes_to_the_bootstraps_xds_cluster() -> None:
    assert alsconfig.ACCESS_LOG_CLUSTER == XDS_CLUSTER


def router_of(listener: listener_pb2.Listener) -> router_pb2.Router:
    hcm = hcm_of(listener)
    [router_filter] = [f for f in hcm.http_filters if f.name == "envoy.filters.http.router"]
    router = router_pb2.Router()
    assert router_filter.typed_config.Unpack(router)
    return router


def test_a_listener_with_a_measured_cluster_logs_every_upstream_attempt() -> None:
    out = listeners(cluster("a", 8080), cluster("b", 8080, degradation={"action": "off"}),
                    cluster("c", 8081, degradation={"action": "report"}))
    assert len(out) == 2
    for name in out:
        assert not hcm_of(out[name]).access_log  # the router's log: one entry per attempt
        [log] = router_of(out[name]).upstream_log
        assert log.name == "envoy.access_loggers.http_grpc"
        config = als_pb2.HttpGrpcAccessLogConfig()
        assert log.typed_config.Unpack(config)
        common = config.common_config
        assert common.grpc_service.envoy_grpc.cluster_name == XDS_CLUSTER
        assert common.log_name == "meshxl" and common.transport_api_version == 2  # V3
        assert common.buffer_flush_interval.ToMilliseconds() == 200
        assert 0 < common.buffer_size_bytes.value <= 64 * 1024
        assert list(config.additional_response_trailers_to_log) == ["grpc-status"]
        assert list(config.additional_response_headers_to_log) == ["grpc-status"]


def test_no_access_log_where_every_cluster_is_off() -> None:
    out = listeners(cluster("a", 8080, degradation={"action": "off"}),
                    cluster("b", 8080, degradation={"action": "off"}),
                    cluster("t", 8082, protocol="tcp", degradation={"action": "off"}))
    for listener in out.values():
        assert "access_log" not in str(listener.filter_chains[0].filters[0].typed_config.value)
    [http] = [v for v in out.values() if "8080" in v.name]
    assert not hcm_of(http).access_log
    assert not router_of(http).upstream_log


def test_a_tcp_proxy_streams_one_entry_per_connection() -> None:
    out = listeners(cluster("t", 8082, protocol="tcp"))
    [listener] = out.values()
    proxy = tcp_proxy_pb2.TcpProxy()
    assert listener.filter_chains[0].filters[0].typed_config.Unpack(proxy)
    [log] = proxy.access_log
    assert log.name == "envoy.access_loggers.tcp_grpc"
    config = als_pb2.TcpGrpcAccessLogConfig()
    assert log.typed_config.Unpack(config)
    assert config.common_config.grpc_service.envoy_grpc.cluster_name == XDS_CLUSTER
    assert proxy.access_log_options.flush_access_log_on_connected
