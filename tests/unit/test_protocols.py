"""Protocols in the model and the xDS compiler (pure): defaults per protocol, the
combinations validation refuses (naming the field), what each protocol compiles to, and
the drain generation that closes a drained member's long-lived connections."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import yaml
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.v3 import http_pb2

from meshxl.model import AdminAction, ModelError, RuntimeState, parse_model
from meshxl.model.decode import decode
from meshxl.model.spec import GRPC_RETRY_ON, TCP_CONNECT_RETRIES, ClusterSpec
from meshxl.xds.compiler import Compiler, compile_resources
from meshxl.xds.drains import drain_started, expired_drains
from meshxl.xds.protocols import HTTP_PROTOCOL_OPTIONS, drain_generation


def model(*clusters: dict[str, Any]) -> Any:
    return parse_model(yaml.safe_dump({"clusters": list(clusters)}))


def cluster(name: str = "c", port: int = 8080, **fields: Any) -> dict[str, Any]:
    return {"name": name, "members": [{"name": "a", "address": "127.0.0.1", "port": 9001},
                                      {"name": "b", "address": "127.0.0.1", "port": 9002}],
            "listener": {"address": "127.0.0.1", "port": port}, **fields}


def problems(*clusters: dict[str, Any]) -> list[str]:
    with pytest.raises(ModelError) as err:
        model(*clusters)
    return [str(p) for p in err.value.problems]


# -- the model ------------------------------------------------------------------------------


def test_http_is_the_default_and_compiles_as_before_plus_websockets() -> None:
    [spec] = model(cluster()).clusters
    assert (spec.protocol, spec.websocket_upgrades, spec.health_check.type) == (
        "http", True, "http")
    assert spec.route.timeout == 15.0 and "unavailable" not in spec.retries.retry_on


def test_grpc_defaults_health_check_retries_and_no_route_timeout() -> None:
    [spec] = model(cluster(protocol="grpc", stickiness={"header": "x-session-id"})).clusters
    assert spec.health_check.type == "grpc"
    assert tuple(spec.retries.retry_on) == GRPC_RETRY_ON
    assert spec.route.timeout == 0.0
    assert not spec.websocket_upgrades and spec.long_lived
    # What the model file says wins.
    [spec] = model(cluster(protocol="grpc", retries={"retry_on": ["reset"]},
                           route={"timeout": "30s"},
                           health_check={"type": "http", "path": "/h"})).clusters
    assert (spec.retries.retry_on, spec.route.timeout, spec.health_check.type) == (
        ["reset"], 30.0, "http")


def test_tcp_defaults_to_a_connect_health_check() -> None:
    [spec] = model(cluster(protocol="tcp", stickiness={"source_ip": True})).clusters
    assert spec.health_check.type == "tcp" and spec.long_lived


@pytest.mark.parametrize(("fields", "path", "words"), [
    ({"protocol": "tcp", "stickiness": {"cookie": {}}}, "stickiness.cookie", "no cookies"),
    ({"protocol": "tcp", "stickiness": {"header": "x"}}, "stickiness.header", "no headers"),
    ({"protocol": "tcp", "stickiness": {"source_ip": True, "pin": {}}}, "stickiness.pin",
     "pins travel"),
    ({"protocol": "tcp", "route": {"prefix": "/a"}}, "route", "no HTTP routes"),
    ({"protocol": "tcp", "retries": {"retry_on": ["reset"]}}, "retries.retry_on",
     "cannot connect"),
    ({"protocol": "tcp", "websocket": True}, "websocket", "only protocol: http"),
    ({"protocol": "http", "health_check": {"type": "grpc"}}, "health_check.type",
     "HTTP/2"),
    ({"protocol": "tcp", "health_check": {"type": "grpc"}}, "health_check.type", "HTTP/2"),
    ({"protocol": "http", "retries": {"retry_on": ["unavailable"]}}, "retries.retry_on",
     "gRPC statuses"),
    ({"protocol": "grpc", "websocket": True}, "websocket", "only protocol: http"),
    ({"protocol": "grpc", "stickiness": {"cookie": {}}}, "stickiness.cookie",
     "metadata header"),
    ({"protocol": "grpc", "stickiness": {"header": "x", "pin": {}}}, "stickiness.pin",
     "header"),
    ({"health_check": {"grpc_service": "svc"}}, "health_check.grpc_service", "type: grpc"),
])
def test_combinations_that_cannot_work_are_refused_naming_the_field(
        fields: dict[str, Any], path: str, words: str) -> None:
    found = problems(cluster(**fields))
    assert any(p.startswith(f"clusters[0].{path}:") and words in p for p in found), found


def test_a_tcp_listener_belongs_to_one_cluster() -> None:
    found = problems(cluster("t", protocol="tcp"), cluster("h", route={"prefix": "/h"}))
    assert any(p.startswith("clusters[0].listener:") and "h also listen" in p
               for p in found), found
    # Two TCP clusters on their own ports are fine, as are HTTP and gRPC sharing one.
    model(cluster("t", protocol="tcp"), cluster("u", 8081, protocol="tcp"))
    model(cluster("h"), cluster("g", protocol="grpc", route={"prefix": "/pkg.Svc/"}))


# -- what each protocol compiles to ---------------------------------------------------------


def test_grpc_compiles_to_http2_grpc_health_checks_and_stream_friendly_routes() -> None:
    out = compile_resources(model(cluster(protocol="grpc",
                                          stickiness={"header": "x-session-id"})))
    c = out.clusters["c"]
    options = http_protocol_options_pb2.HttpProtocolOptions()
    c.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS].Unpack(options)
    assert options.explicit_http_config.HasField("http2_protocol_options")
    assert c.health_checks[0].HasField("grpc_health_check")
    assert c.close_connections_on_host_health_failure
    [route] = out.routes["meshxl_127.0.0.1_8080"].virtual_hosts[0].routes
    assert route.route.timeout.ToNanoseconds() == 0
    assert route.route.max_stream_duration.HasField("grpc_timeout_header_max")
    assert route.route.retry_policy.retry_on == "connect-failure,refused-stream,reset,unavailable"
    assert [(u.upgrade_type, u.enabled.value) for u in route.route.upgrade_configs] == [
        ("websocket", False)]
    assert route.route.hash_policy[0].header.header_name == "x-session-id"


def test_clients_http2_is_on_the_codec_without_a_reset_bucket() -> None:
    """A thousand gRPC streams whose member died are reset at once by their client:
    nghttp2's bucket of 1,000 resets would close the connection at the next few."""
    out = compile_resources(model(cluster(protocol="grpc")))
    hcm = hcm_pb2.HttpConnectionManager()
    out.listeners["meshxl_127.0.0.1_8080"].filter_chains[0].filters[0].typed_config.Unpack(hcm)
    assert hcm.http2_protocol_options.use_oghttp2_codec.value is True


def test_http2_health_checks_speak_http2() -> None:
    c = compile_resources(model(cluster(protocol="http2"))).clusters["c"]
    assert c.health_checks[0].http_health_check.codec_client_type == http_pb2.HTTP2
    assert HTTP_PROTOCOL_OPTIONS in c.typed_extension_protocol_options


def test_http_listeners_pass_websocket_upgrades_and_close_them_quickly() -> None:
    out = compile_resources(model(cluster()))
    hcm = hcm_pb2.HttpConnectionManager()
    out.listeners["meshxl_127.0.0.1_8080"].filter_chains[0].filters[0].typed_config.Unpack(hcm)
    assert [u.upgrade_type for u in hcm.upgrade_configs] == ["websocket"]
    # Written as 0 (an unset field is Envoy's 1 s): a broken WebSocket's client hears of
    # it as soon as Envoy closes, not after a grace it waits out in silence.
    assert hcm.HasField("delayed_close_timeout")
    assert hcm.delayed_close_timeout.ToNanoseconds() == 0
    c = out.clusters["c"]
    assert HTTP_PROTOCOL_OPTIONS not in c.typed_extension_protocol_options  # HTTP/1.1
    assert c.health_checks[0].http_health_check.path == "/healthz"
    # Without WebSockets the listener is as it always was.
    out = compile_resources(model(cluster(websocket=False)))
    hcm = hcm_pb2.HttpConnectionManager()
    out.listeners["meshxl_127.0.0.1_8080"].filter_chains[0].filters[0].typed_config.Unpack(hcm)
    assert not hcm.upgrade_configs and not hcm.HasField("delayed_close_timeout")
    assert not out.clusters["c"].close_connections_on_host_health_failure


def test_tcp_compiles_to_a_tcp_proxy_hashing_on_the_source_address() -> None:
    out = compile_resources(model(cluster(protocol="tcp", stickiness={"source_ip": True},
                                          retries={"attempts": 2},
                                          health_check={"port": 9100})))
    assert out.routes == {}
    [chain] = out.listeners["meshxl_127.0.0.1_8080"].filter_chains
    assert chain.filters[0].name == "envoy.filters.network.tcp_proxy"
    proxy = tcp_proxy_pb2.TcpProxy()
    chain.filters[0].typed_config.Unpack(proxy)
    assert proxy.cluster == "c" and proxy.max_connect_attempts.value == 3
    assert proxy.hash_policy[0].HasField("source_ip")
    # The attempts are spaced by the retries' backoff (5 ms doubling up to 50 ms).
    assert proxy.backoff_options.base_interval.ToMilliseconds() == 5
    assert proxy.backoff_options.max_interval.ToMilliseconds() == 50
    c = out.clusters["c"]
    assert c.health_checks[0].HasField("tcp_health_check")
    assert c.lb_policy == c.MAGLEV
    ports = {ep.endpoint.health_check_config.port_value
             for group in out.endpoints["c"].endpoints for ep in group.lb_endpoints}
    assert ports == {9100}


# -- drains ---------------------------------------------------------------------------------


def _at(seconds_ago: float, now: float) -> str:
    return datetime.fromtimestamp(now - seconds_ago, UTC).isoformat(timespec="milliseconds")


def test_drains_expire_after_the_clusters_window_for_long_lived_clusters_only() -> None:
    now = 1_800_000_000.0
    spec = model(cluster("g", protocol="grpc", drain_window="5s"),
                 cluster("h", 8081, websocket=False, drain_window="5s"),
                 cluster("t", 8082, protocol="tcp", drain_window=0,
                         sites=[{"name": "s1"}, {"name": "s2"}],
                         members=[{"name": "x", "address": "127.0.0.1", "port": 1,
                                   "site": "s2"}]))
    state = RuntimeState(
        members_down={("g", "a"): AdminAction(at=_at(6, now)),
                      ("g", "b"): AdminAction(at=_at(2, now)),
                      ("h", "a"): AdminAction(at=_at(60, now))},
        sites_offline={"s2": AdminAction(at=_at(0, now))})
    drains = expired_drains(spec, state, now)
    # a's window passed; b's ends in 3 s; plain HTTP/1.1 has nothing to close; a
    # window of 0 closes at once.
    assert drains.expired == {("g", "a"), ("t", "x")}
    assert drains.next_expiry == pytest.approx(now + 3, abs=0.01)
    assert drain_started(AdminAction(at="not a time")) == float("-inf")
    # Under delayed sync a drain goes ahead once its member replicated its young
    # sessions: its window counts from then (the went-ahead times by token).
    a, s2 = state.members_down[("g", "a")], state.sites_offline["s2"]
    later = expired_drains(spec, state, now, {f"down@{a.at}": now - 4,
                                              f"offline:s2@{s2.at}": now + 1})
    assert later.expired == set()  # a's 5 s from 4 s ago; t's window of 0 from 1 s on
    assert later.next_expiry == pytest.approx(now + 1, abs=0.01)


def test_the_drain_generation_changes_only_the_listeners_of_drained_clusters() -> None:
    spec = model(cluster("g", protocol="grpc"), cluster("t", 8082, protocol="tcp"))
    compiler = Compiler()
    before = compiler.compile(spec)
    after = compiler.compile(spec, drained=frozenset({("g", "a")}))
    g, t = "meshxl_127.0.0.1_8080", "meshxl_127.0.0.1_8082"
    assert after.listeners[t] is before.listeners[t] or after.listeners[t] == before.listeners[t]
    assert after.listeners[g] != before.listeners[g]
    meta = after.listeners[g].filter_chains[0].metadata.filter_metadata["meshxl"]
    assert meta.fields["meshxl.drain"].string_value == drain_generation([("g", "a")])
    assert after.clusters["g"] is before.clusters["g"]  # CDS untouched
    # The same input compiles to the same bytes, whatever compiled before.
    fresh = compile_resources(spec, drained=frozenset({("g", "a")}))
    assert fresh.listeners[g] == after.listeners[g]
    assert drain_generation([]) == "" and not before.listeners[g].filter_chains[0].HasField(
        "metadata")
    assert drain_generation([("g", "a"), ("g", "b")]) == drain_generation(
        [("g", "b"), ("g", "a")])


def test_a_drain_window_is_a_duration() -> None:
    [spec] = model(cluster(drain_window="250ms")).clusters
    assert spec.drain_window == 0.25
    assert any("drain_window" in p for p in problems(cluster(drain_window="-1s")))
    assert timedelta(seconds=model(cluster()).clusters[0].drain_window) == timedelta(seconds=10)


def test_the_reconnect_report_says_where_connections_went_and_whether_state_held() -> None:
    from meshxl.local.streams import Reconnect, reconnect_report, source_address

    kill = 100.0
    report = reconnect_report([
        Reconnect("s1", 100.05, 100.20, "a", "b", 7, 8),
        Reconnect("s2", 100.06, 100.30, "a", "b", 3, 4),
        Reconnect("s3", 99.00, 99.10, "c", "c", 5, 6),  # before the kill, another member
    ], kill, "a")
    assert report["reconnects"] == 3 and report["of_killed_member"] == 2
    assert report["kill_to_first_answer_ms"] == {"count": 2, "p50": 200.0, "p99": 300.0,
                                                 "max": 300.0}
    assert report["moved_to"] == {"b": 2} and report["state_intact"]
    # A new owner that started the count again lost the session's state.
    lost = reconnect_report([Reconnect("s1", 100.05, 100.2, "a", "b", 7, 1)], kill, "a")
    assert not lost["state_intact"]
    assert [source_address(k) for k in (0, 245, 246)] == [
        "127.0.0.10", "127.0.0.255", "127.0.1.0"]


def _tcp_proxy(**fields: Any) -> tcp_proxy_pb2.TcpProxy:
    out = compile_resources(model(cluster(protocol="tcp", stickiness={"source_ip": True},
                                          **fields)))
    proxy = tcp_proxy_pb2.TcpProxy()
    out.listeners["meshxl_127.0.0.1_8080"].filter_chains[0].filters[0].typed_config.Unpack(
        proxy)
    return proxy


def test_tcp_connect_attempts_outlast_the_dead_members_ejection() -> None:
    """Every attempt is hashed to the dead member until its ejection reaches Envoy's
    workers: by default six retries, spaced by the jittered backoff, not four back to
    back (with which a connection arriving in that window was closed while the standby
    was up)."""
    proxy = _tcp_proxy()
    assert proxy.max_connect_attempts.value == TCP_CONNECT_RETRIES + 1 == 7
    assert proxy.backoff_options.base_interval.ToMilliseconds() == 5
    assert proxy.backoff_options.max_interval.ToMilliseconds() == 50
    # What the model writes wins: its own retries and backoff, or none at all.
    proxy = _tcp_proxy(retries={"attempts": 4, "backoff_base": "20ms",
                                "backoff_max": "200ms"})
    assert proxy.max_connect_attempts.value == 5
    assert proxy.backoff_options.base_interval.ToMilliseconds() == 20
    assert proxy.backoff_options.max_interval.ToMilliseconds() == 200
    proxy = _tcp_proxy(retries={"attempts": 0})
    assert proxy.max_connect_attempts.value == 1 and not proxy.HasField("backoff_options")
    # Only TCP clusters change: an HTTP cluster keeps 3 retries.
    assert decode({"name": "h"}, ClusterSpec).retries.attempts == 3


def test_a_failed_request_is_described_by_its_grpc_code_or_its_type() -> None:
    """A gRPC error by its code and details; an HTTP one (aiohttp's, whose ``code``
    property is deprecated) by its type and text, with no warning."""
    import warnings

    import grpc
    from aiohttp import ClientResponseError, RequestInfo
    from grpc.aio import AioRpcError, Metadata
    from multidict import CIMultiDict, CIMultiDictProxy
    from yarl import URL

    from meshxl.local.streams import _describe

    url = URL("http://127.0.0.1:1/counter")
    info = RequestInfo(url, "GET", CIMultiDictProxy(CIMultiDict()), url)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _describe(ClientResponseError(info, (), status=503, message="no")) == \
            "ClientResponseError: 503, message='no', url='http://127.0.0.1:1/counter'"
        assert _describe(AioRpcError(grpc.StatusCode.UNAVAILABLE, Metadata(), Metadata(),
                                     details="down")) == "UNAVAILABLE: down"
