"""build_bootstrap / parse_hostport: pure, no processes (the real Envoy checks the same
bootstraps in tests/integration/test_harness.py)."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from meshxl.proxy.bootstrap import (
    SPAN_BATCH,
    XDS_CLUSTER,
    build_bootstrap,
    parse_hostport,
    render_yaml,
)


def _xds_cluster(bootstrap: dict[str, Any]) -> dict[str, Any]:
    clusters = bootstrap["static_resources"]["clusters"]
    assert [c["name"] for c in clusters] == [XDS_CLUSTER]
    cluster: dict[str, Any] = clusters[0]
    return cluster


def _endpoints(cluster: dict[str, Any]) -> list[tuple[int, str, int]]:
    out = []
    for group in cluster["load_assignment"]["endpoints"]:
        for lb in group["lb_endpoints"]:
            sock = lb["endpoint"]["address"]["socket_address"]
            out.append((group["priority"], sock["address"], sock["port_value"]))
    return out


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:18000", ("127.0.0.1", 18000)),
        ("localhost:1", ("localhost", 1)),
        ("xds.meshxl.svc:65535", ("xds.meshxl.svc", 65535)),
        ("[::1]:18000", ("::1", 18000)),
        (" 127.0.0.1:80 ", ("127.0.0.1", 80)),
    ],
)
def test_parse_hostport_accepts(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text) == expected


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("127.0.0.1", "expected HOST:PORT"),
        (":18000", "expected HOST:PORT"),
        ("", "expected HOST:PORT"),
        ("host:abc", "is not a number"),
        ("host:", "is not a number"),
        ("host:0", "1..65535"),
        ("host:70000", "1..65535"),
        ("::1:18000", "brackets"),
        ("[::1]18000", "[IPV6]:PORT"),
        ("[::1", "[IPV6]:PORT"),
        ("[127.0.0.1]:80", "not an IPv6 address"),
        ("bad host:80", "not a valid host"),
        ("http://x:80", "brackets"),
    ],
)
def test_parse_hostport_rejects_naming_the_value(text: str, hint: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_hostport(text)
    assert repr(text) in str(info.value)
    assert hint in str(info.value)


def test_parse_hostport_port_zero_only_when_allowed() -> None:
    assert parse_hostport("127.0.0.1:0", allow_zero=True) == ("127.0.0.1", 0)
    with pytest.raises(ValueError, match="1..65535"):
        parse_hostport("127.0.0.1:0")


def test_single_replica_sotw_bootstrap() -> None:
    b = build_bootstrap("node-a", ["127.0.0.1:18000"], admin_port=19000)

    assert b["node"] == {"id": "node-a", "cluster": "meshxl"}
    assert b["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 19000}
    ads = b["dynamic_resources"]["ads_config"]
    assert ads["api_type"] == "GRPC"
    assert ads["transport_api_version"] == "V3"
    assert ads["set_node_on_first_message_only"] is True
    assert [g["envoy_grpc"]["cluster_name"] for g in ads["grpc_services"]] == [XDS_CLUSTER]
    for key in ("cds_config", "lds_config"):
        assert b["dynamic_resources"][key] == {"ads": {}, "resource_api_version": "V3"}

    cluster = _xds_cluster(b)
    assert cluster["type"] == "STATIC"
    assert cluster["connect_timeout"] == "0.25s"
    assert _endpoints(cluster) == [(0, "127.0.0.1", 18000)]
    assert "health_checks" not in cluster  # one replica: nowhere to fail over to
    options = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert options["@type"].endswith("envoy.extensions.upstreams.http.v3.HttpProtocolOptions")
    keepalive = options["explicit_http_config"]["http2_protocol_options"]["connection_keepalive"]
    assert keepalive == {"interval": "1s", "timeout": "1s"}


def test_a_collector_gets_spans_in_batches_and_the_runtime_stays_modifiable() -> None:
    """Envoy's tracer exports every 5 spans by default: with a collector, the bootstrap
    batches them as the OpenTelemetry SDK does, and keeps an admin runtime layer."""
    assert "layered_runtime" not in build_bootstrap("n", ["127.0.0.1:18000"], admin_port=1)
    b = build_bootstrap("n", ["127.0.0.1:18000"], admin_port=1, otlp="127.0.0.1:4317")
    layers = b["layered_runtime"]["layers"]
    assert layers[0]["static_layer"] == {"tracing.opentelemetry.min_flush_spans": SPAN_BATCH}
    assert layers[-1] == {"name": "admin", "admin_layer": {}}
    assert SPAN_BATCH == 512


def test_delta_selects_delta_grpc() -> None:
    b = build_bootstrap("n", [("127.0.0.1", 18000)], admin_port=19000, delta=True)
    assert b["dynamic_resources"]["ads_config"]["api_type"] == "DELTA_GRPC"


def test_replicas_become_priorities_in_preference_order_with_health_checks() -> None:
    b = build_bootstrap(
        "n",
        ["127.0.0.1:18002", ("127.0.0.1", 18000), "[::1]:18001"],
        admin_port=19000,
    )
    cluster = _xds_cluster(b)
    assert cluster["type"] == "STATIC"
    assert _endpoints(cluster) == [
        (0, "127.0.0.1", 18002),
        (1, "127.0.0.1", 18000),
        (2, "::1", 18001),
    ]
    (check,) = cluster["health_checks"]
    assert "tcp_health_check" in check
    assert check["interval"] == "1s"
    assert check["no_traffic_interval"] == "1s"  # not Envoy's 60 s default
    assert check["unhealthy_threshold"] == 1


def test_host_names_use_strict_dns() -> None:
    cluster = _xds_cluster(build_bootstrap("n", "localhost:18000", admin_port=19000))
    assert cluster["type"] == "STRICT_DNS"
    assert _endpoints(cluster) == [(0, "localhost", 18000)]


def test_locality_metadata_and_initial_fetch_timeout() -> None:
    b = build_bootstrap(
        "n",
        ["127.0.0.1:18000"],
        admin_port=19000,
        node_cluster="shop",
        region="eu",
        zone="site-a",
        metadata={"pod": "p1"},
        initial_fetch_timeout=2.5,
    )
    assert b["node"] == {
        "id": "n",
        "cluster": "shop",
        "locality": {"region": "eu", "zone": "site-a"},
        "metadata": {"pod": "p1"},
    }
    assert b["dynamic_resources"]["cds_config"]["initial_fetch_timeout"] == "2.5s"
    assert b["dynamic_resources"]["lds_config"]["initial_fetch_timeout"] == "2.5s"


def test_reconnect_backoff_is_short() -> None:
    b = build_bootstrap("n", ["127.0.0.1:18000"], admin_port=19000)
    grpc = b["dynamic_resources"]["ads_config"]["grpc_services"][0]["envoy_grpc"]
    assert grpc["retry_policy"]["retry_back_off"] == {"base_interval": "0.1s", "max_interval": "1s"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"node_id": ""}, "node id is empty"),
        ({"node_id": "a/b"}, "'/'"),
        ({"node_id": "two words"}, "' '"),
        ({"node_id": "n" * 257}, "257 characters"),
        ({"xds": []}, "at least one control-plane address"),
        ({"xds": ["127.0.0.1"]}, "'127.0.0.1'"),
        ({"xds": [("127.0.0.1", 0)]}, "('127.0.0.1', 0)"),
        ({"xds": [("127.0.0.1", "80")]}, "('127.0.0.1', '80')"),
        ({"xds": [42]}, "42"),
        ({"xds": ["127.0.0.1:1", ("127.0.0.1", 1)]}, "duplicate"),
        ({"admin_port": 0}, "admin port"),
        ({"admin_address": "localhost"}, "IP address"),
        ({"connect_timeout": 0}, "connect_timeout"),
        ({"reconnect_base": 2.0, "reconnect_max": 1.0}, "reconnect_max"),
    ],
)
def test_bad_inputs_raise_naming_the_value(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"node_id": "n", "xds": ["127.0.0.1:18000"], "admin_port": 19000}
    args.update(kwargs)
    with pytest.raises(ValueError) as info:
        build_bootstrap(args.pop("node_id"), args.pop("xds"), **args)
    assert message in str(info.value)


def test_render_yaml_round_trips_without_anchors() -> None:
    b = build_bootstrap(
        "n", ["127.0.0.1:18000", "127.0.0.1:18001"], admin_port=19000, initial_fetch_timeout=1
    )
    text = render_yaml(b)
    assert yaml.safe_load(text) == b
    assert "&id" not in text and "*id" not in text
    assert text.startswith("node:")  # field order kept: node first, as written


@pytest.mark.parametrize("node_id", ["n", "Y", "off", "yes", "null", "1.5", "1:30"])
def test_render_yaml_keeps_yaml11_lookalikes_strings(node_id: str) -> None:
    """Envoy reads YAML 1.1: an unquoted n is false, 1:30 is 90. Such ids stay strings."""
    import yaml as pyyaml

    text = render_yaml(build_bootstrap(node_id, ["127.0.0.1:18000"], admin_port=9901))
    assert f"id: '{node_id}'" in text
    assert pyyaml.safe_load(text)["node"]["id"] == node_id


def test_xds_token_is_sent_as_initial_metadata() -> None:
    token = "0123456789abcdef0123456789abcdef"
    boot = build_bootstrap("n1", "127.0.0.1:18000", admin_port=9901, xds_token=token)
    (service,) = boot["dynamic_resources"]["ads_config"]["grpc_services"]
    assert service["initial_metadata"] == [{"key": "authorization",
                                            "value": f"Bearer {token}"}]
    assert service["envoy_grpc"]["cluster_name"] == XDS_CLUSTER
    plain = build_bootstrap("n1", "127.0.0.1:18000", admin_port=9901)
    assert "initial_metadata" not in plain["dynamic_resources"]["ads_config"][
        "grpc_services"][0]
    with pytest.raises(ValueError, match="--xds-token-file"):
        build_bootstrap("n1", "127.0.0.1:18000", admin_port=9901, xds_token="bad token")
