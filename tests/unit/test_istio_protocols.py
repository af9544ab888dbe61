"""Istio mode per protocol: the rendered objects validate against Istio's CRDs (and
their patches as Envoy protos), carry what each protocol needs, and ``meshxl istio
check`` flags a Service port that does not declare the cluster's protocol."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from meshxl.istio.check import check
from meshxl.istio.protocols import declared_protocol
from meshxl.istio.render import IstioOptions, render_model
from meshxl.model import parse_model
from tests.unit.test_istio import check_crd

OPTIONS = IstioOptions(namespace="shop")


def _model(**fields: Any) -> Any:
    cluster = {"name": "orders", "members": [
        {"name": "a", "address": "10.0.0.1", "port": 9000},
        {"name": "b", "address": "10.0.0.2", "port": 9000}],
        "listener": {"address": "0.0.0.0", "port": 8080}, **fields}
    return parse_model(yaml.safe_dump({"clusters": [cluster]}))


def _render(model: Any, options: IstioOptions = OPTIONS) -> tuple[dict[str, Any], dict[str, Any],
                                                                  list[str]]:
    rendered = render_model(model, options)
    for obj in rendered.objects:
        check_crd(obj)  # Istio's CRD schema, and each patch value as its Envoy proto
    dr, ef = rendered.objects
    return dr, {p["applyTo"]: p for p in ef["spec"]["configPatches"]}, rendered.warnings


def _service(port: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "orders", "namespace": "shop"},
            "spec": {"ports": [{"port": 8080, "targetPort": 9000, **port}]}}


def test_grpc_hashes_on_the_metadata_header_and_lets_streams_live() -> None:
    dr, patches, warnings = _render(_model(protocol="grpc",
                                           stickiness={"header": "x-session-id"}))
    assert dr["spec"]["trafficPolicy"]["loadBalancer"]["consistentHash"][
        "httpHeaderName"] == "x-session-id"
    route = patches["HTTP_ROUTE"]["patch"]["value"]["route"]
    assert route["retry_policy"]["retry_on"] == "connect-failure,refused-stream,reset,unavailable"
    assert route["max_stream_duration"] == {"grpc_timeout_header_max": "0s"}
    assert route["timeout"] == "0s"
    cluster = patches["CLUSTER"]["patch"]["value"]
    assert cluster["health_checks"][0]["grpc_health_check"] == {"service_name": ""}
    assert cluster["close_connections_on_host_health_failure"] is True
    # Without the Service, render says what its port must declare.
    assert any("appProtocol: grpc" in w for w in warnings), warnings


def test_tcp_hashes_on_the_source_ip_and_patches_no_route() -> None:
    dr, patches, _ = _render(_model(protocol="tcp", stickiness={"source_ip": True}))
    assert dr["spec"]["trafficPolicy"]["loadBalancer"]["consistentHash"]["useSourceIp"] is True
    assert "HTTP_ROUTE" not in patches
    assert patches["CLUSTER"]["patch"]["value"]["health_checks"][0]["tcp_health_check"] == {}


def test_http2_checks_speak_http2_and_websockets_can_be_refused() -> None:
    _, patches, _ = _render(_model(protocol="http2"))
    check_http = patches["CLUSTER"]["patch"]["value"]["health_checks"][0]["http_health_check"]
    assert check_http["codec_client_type"] == "HTTP2"
    _, patches, warnings = _render(_model(websocket=False))
    assert patches["HTTP_ROUTE"]["patch"]["value"]["route"]["upgrade_configs"] == [
        {"upgrade_type": "websocket", "enabled": False}]
    assert "close_connections_on_host_health_failure" not in patches["CLUSTER"]["patch"]["value"]
    assert warnings == []  # HTTP/1.1 needs no port declaration (Istio sniffs it)


@pytest.mark.parametrize(("port", "declared"), [
    ({"name": "grpc"}, "grpc"), ({"name": "grpc-orders"}, "grpc"),
    ({"name": "grpc-web-x"}, "grpc-web"), ({"name": "http2-x"}, "http2"),
    ({"name": "tcp-db"}, "tcp"), ({"name": "web"}, None), ({}, None),
    ({"name": "http", "appProtocol": "grpc"}, "grpc"),
    ({"appProtocol": "kubernetes.io/h2c"}, "h2c"),
])
def test_what_a_service_port_declares(port: dict[str, Any], declared: str | None) -> None:
    assert declared_protocol(port) == declared


@pytest.mark.parametrize(("protocol", "port", "level"), [
    ("grpc", {"name": "http-orders"}, "error"),
    ("grpc", {"name": "orders"}, "warning"),
    ("grpc", {"name": "grpc-orders"}, None),
    ("grpc", {"name": "x", "appProtocol": "grpc"}, None),
    ("tcp", {"name": "http"}, "error"),
    ("tcp", {"name": "tcp-db"}, None),
    ("http", {"name": "tcp-x"}, "error"),
    ("http", {"name": "web"}, None),
    ("http2", {"name": "grpc"}, None),
])
def test_istio_check_flags_a_port_that_does_not_declare_the_protocol(
        protocol: str, port: dict[str, Any], level: str | None) -> None:
    fields: dict[str, Any] = {"protocol": protocol}
    if protocol == "tcp":
        fields["stickiness"] = {"source_ip": True}
    model = _model(**fields)
    service = _service(port)
    objects = [service, *render_model(model, OPTIONS).objects]
    found = [(f.level, f.message) for f in check(model, objects, OPTIONS,
                                                 istio_version=(1, 27))
             if "declares" in f.message]
    if level is None:
        assert found == []
    else:
        assert [lvl for lvl, _ in found] == [level], found
        assert protocol in found[0][1] and "appProtocol" in found[0][1]
    # render with --services says the same.
    rendered = render_model(model, IstioOptions(namespace="shop",
                                                services={"orders": service}))
    assert any("declares" in w for w in rendered.warnings) == (level is not None)
