"""Compiling the model into Envoy protos, asserted field by field."""

from __future__ import annotations

from pathlib import Path
from textwrap import dedent

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.retry.priority.previous_priorities.v3 import (
    previous_priorities_config_pb2,
)

from meshxl.model import (
    AdminAction,
    ModelError,
    ModelSpec,
    Registration,
    RuntimeState,
    parse_model,
)
from meshxl.xds import types
from meshxl.xds.compiler import Resources, compile_resources
from meshxl.xds.resources import CompileError, listener_name

QUICKSTART = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "quickstart.yaml"
MEMBERS = """
            members:
              - {name: a, address: 127.0.0.1, port: 8081}
              - {name: b, address: 127.0.0.2, port: 8082}
"""


def model(text: str) -> ModelSpec:
    return parse_model(dedent(text))


def compile_yaml(text: str, state: RuntimeState | None = None) -> Resources:
    return compile_resources(model(text), state)


def one_cluster(extra: str = "", members: str = MEMBERS) -> str:
    """A one-cluster model named ``c``; ``extra`` is YAML at the cluster's indentation."""
    body = "\n".join("    " + line if line.strip() else line
                     for line in dedent(extra).splitlines())
    return "clusters:\n  - name: c\n" + body + "\n" + dedent(members).replace(
        "\n", "\n    ").rstrip() + "\n"


def cds(extra: str = "", members: str = MEMBERS) -> cluster_pb2.Cluster:
    return compile_yaml(one_cluster(extra, members)).clusters["c"]


def eds(text: str, state: RuntimeState | None = None) -> endpoint_pb2.ClusterLoadAssignment:
    return compile_yaml(text, state).endpoints["c"]


def routes(extra: str = "") -> list[route_components_pb2.Route]:
    """The routes of the one-cluster model's listener, in Envoy's order."""
    res = compile_yaml(one_cluster("listener: {port: 10000}\n" + dedent(extra)))
    (vhost,) = res.routes[listener_name("0.0.0.0", 10000)].virtual_hosts
    return list(vhost.routes)


def route(extra: str = "") -> route_components_pb2.Route:
    """The cluster's own route (the last: an upgrades route, if any, comes first)."""
    r = routes(extra)[-1]
    assert r.name == "c"
    return r


def endpoints_by_name(cla: endpoint_pb2.ClusterLoadAssignment) -> dict[str, tuple]:
    """member -> (priority, zone, lb endpoint)."""
    out = {}
    for group in cla.endpoints:
        for ep in group.lb_endpoints:
            out[ep.endpoint.hostname] = (group.priority, group.locality.zone, ep)
    return out


def test_helper_builds_the_model_it_says() -> None:
    spec = model(one_cluster("mode: load-sharing"))
    assert spec.clusters[0].name == "c" and spec.clusters[0].mode == "load-sharing"
    assert [m.name for m in spec.clusters[0].members] == ["a", "b"]


# -- CDS ------------------------------------------------------------------------------------


def test_a_hashed_cluster_uses_maglev_over_ads_eds() -> None:
    c = cds("mode: load-sharing\nstickiness: {header: x-session, maglev_table_size: 5003}")
    assert c.name == "c"
    assert c.type == cluster_pb2.Cluster.EDS
    assert c.eds_cluster_config.eds_config.HasField("ads")
    assert c.eds_cluster_config.eds_config.resource_api_version == 2  # V3
    assert c.lb_policy == cluster_pb2.Cluster.MAGLEV
    assert c.maglev_lb_config.table_size.value == 5003
    assert not c.HasField("ring_hash_lb_config")
    assert c.connect_timeout.ToNanoseconds() == 250_000_000
    assert c.ignore_health_on_host_removal
    # Panic routing would send traffic to members known to be down.
    assert c.common_lb_config.HasField("healthy_panic_threshold")
    assert c.common_lb_config.healthy_panic_threshold.value == 0.0
    # Host health changes reach the load balancer at once, not after a 1 s merge window.
    assert c.common_lb_config.HasField("update_merge_window")
    assert c.common_lb_config.update_merge_window.ToNanoseconds() == 0
    assert dict(c.metadata.filter_metadata["meshxl"]) == {
        "cluster": "c", "mode": "load-sharing", "stickiness": "header"}


def test_an_ha_cluster_of_one_member_per_tier_is_placed_by_tier() -> None:
    """The hash would decide nothing, and Envoy's hash balancers ignore the route's
    retry priority: least request lets a retry reach the standby's tier at once."""
    c = cds("stickiness: {header: x-session}")
    assert c.lb_policy == cluster_pb2.Cluster.LEAST_REQUEST
    assert not c.HasField("maglev_lb_config")
    assert not c.least_request_lb_config.HasField("slow_start_config")
    r = route("stickiness: {header: x-session}")
    assert r.route.hash_policy[0].header.header_name == "x-session"  # a load-sharing view
    assert r.route.retry_policy.retry_priority.name.endswith("previous_priorities")


def test_priorities_given_one_member_each_are_placed_by_tier() -> None:
    """A virtual system's members each carry their own priority from the placement."""
    members = MEMBERS.replace("8081}", "8081, priority: 1}").replace("8082}", "8082, priority: 0}")
    assert cds("stickiness: {header: x-session}", members).lb_policy == \
        cluster_pb2.Cluster.LEAST_REQUEST


@pytest.mark.parametrize("extra, members", [
    ("mode: load-sharing", MEMBERS),
    ("stickiness: {header: x, balance_factor: 1.5}", MEMBERS),
    ("protocol: tcp\nlistener: {port: 9000}", MEMBERS),
    ("", MEMBERS.replace("port: 8081}", "port: 8081, priority: 0}")),
    ("", MEMBERS.replace("}", ", priority: 1}")),
    ("", MEMBERS.replace("address: 127.0.0.1", "address: members.example")),
])
def test_a_tier_that_may_hold_several_members_keeps_its_hash(extra: str, members: str) -> None:
    if "stickiness" not in extra:
        extra += "\nstickiness: {source_ip: true}"
    assert cds(extra, members).lb_policy == cluster_pb2.Cluster.MAGLEV


def test_ring_hash_config() -> None:
    c = cds("""
        mode: load-sharing
        stickiness:
          algorithm: ring_hash
          source_ip: true
          ring_minimum_size: 2048
          ring_maximum_size: 4096
        """)
    assert c.lb_policy == cluster_pb2.Cluster.RING_HASH
    assert c.ring_hash_lb_config.minimum_ring_size.value == 2048
    assert c.ring_hash_lb_config.maximum_ring_size.value == 4096
    assert not c.HasField("maglev_lb_config")


@pytest.mark.parametrize("algorithm", ["maglev", "ring_hash"])
def test_balance_factor_bounds_the_load_of_hashing(algorithm: str) -> None:
    c = cds(f"stickiness: {{header: x-s, algorithm: {algorithm}, balance_factor: 1.25}}")
    assert c.common_lb_config.consistent_hashing_lb_config.hash_balance_factor.value == 125
    plain = cds(f"stickiness: {{header: x-s, algorithm: {algorithm}}}")
    assert not plain.common_lb_config.consistent_hashing_lb_config.HasField(
        "hash_balance_factor")


def test_balance_factor_below_one_is_refused() -> None:
    with pytest.raises(ModelError, match="balance_factor"):
        cds("stickiness: {header: x-s, balance_factor: 0.9}")


def test_no_stickiness_is_least_request() -> None:
    c = cds()
    assert c.lb_policy == cluster_pb2.Cluster.LEAST_REQUEST
    assert not c.HasField("maglev_lb_config") and not c.HasField("ring_hash_lb_config")
    assert c.metadata.filter_metadata["meshxl"]["stickiness"] == "none"
    assert c.common_lb_config.HasField("healthy_panic_threshold")


def test_health_check_defaults() -> None:
    (hc,) = cds().health_checks
    assert hc.interval.ToMilliseconds() == 250
    assert hc.timeout.ToMilliseconds() == 1000
    # Envoy's default would be 60 s: an idle standby would be checked once a minute.
    assert hc.no_traffic_interval.ToMilliseconds() == 500
    assert hc.unhealthy_interval.ToMilliseconds() == 500
    assert hc.unhealthy_edge_interval.ToMilliseconds() == 100
    assert hc.healthy_edge_interval.ToMilliseconds() == 100
    assert hc.interval_jitter.ToMilliseconds() == 25
    assert hc.healthy_threshold.value == 1
    assert hc.unhealthy_threshold.value == 2
    assert hc.http_health_check.path == "/healthz"
    assert [(r.start, r.end) for r in hc.http_health_check.expected_statuses] == [(200, 201)]


def test_health_check_from_model() -> None:
    (hc,) = cds("""
        health_check:
          path: /ready
          interval: 2s
          timeout: 1s
          no_traffic_interval: 3s
          healthy_threshold: 3
          unhealthy_threshold: 4
          expected_statuses: [204, 200, 200]
        """).health_checks
    assert hc.http_health_check.path == "/ready"
    assert hc.interval.seconds == 2 and hc.timeout.seconds == 1
    assert hc.no_traffic_interval.seconds == 3
    assert hc.interval_jitter.ToMilliseconds() == 50  # capped
    assert (hc.healthy_threshold.value, hc.unhealthy_threshold.value) == (3, 4)
    assert [(r.start, r.end) for r in hc.http_health_check.expected_statuses] == [
        (200, 201), (204, 205)]


def test_health_check_disabled() -> None:
    assert len(cds("health_check: {enabled: false}").health_checks) == 0


def test_outlier_detection_splits_local_origin_errors() -> None:
    od = cds("outlier_detection: {consecutive_5xx: 7, base_ejection_time: 30s}\n"
             "websocket: false").outlier_detection
    assert od.split_external_local_origin_errors
    assert od.consecutive_local_origin_failure.value == 1
    assert od.enforcing_consecutive_local_origin_failure.value == 100
    assert od.consecutive_5xx.value == 7
    assert od.consecutive_gateway_failure.value == 3
    assert od.enforcing_consecutive_gateway_failure.value == 100
    assert od.interval.seconds == 1
    assert od.base_ejection_time.seconds == 30
    assert od.max_ejection_percent.value == 50  # never every member for a shared cause


ROUTED = "listener: {port: 10000}\n"


@pytest.mark.parametrize("extra", [
    "", "websocket: true", "websocket: false", "protocol: grpc", "protocol: tcp",
    "health_check: {enabled: false}", "mode: load-sharing\nstickiness: {header: x}",
])
def test_plain_requests_eject_on_the_first_local_origin_failure(extra: str) -> None:
    """WebSockets or not: a cluster's requests leave a member that refused one connect,
    as a hand-written Envoy with one-failure local-origin ejection does."""
    od = cds(ROUTED + extra).outlier_detection
    assert od.consecutive_local_origin_failure.value == 1
    assert od.enforcing_consecutive_local_origin_failure.value == 100


@pytest.mark.parametrize("extra, enforced", [
    ("", 0), ("websocket: true", 0),
    # Ejection is then the only way out: no health check, no retry that leaves.
    ("health_check: {enabled: false}", 100), ("retries: {attempts: 0}", 100),
    ("retries: {previous_priorities: false}", 100),
    ("mode: load-sharing\nstickiness: {header: x}\nretries: {previous_hosts: false}", 100),
    ("mode: load-sharing\nstickiness: {header: x}", 0),
])
def test_websocket_ends_do_not_eject_on_the_upgrades_cluster(extra: str,
                                                            enforced: int) -> None:
    """Envoy reports the end of a WebSocket as a local-origin failure of its member:
    the cluster of upgrades counts such failures without ejecting on them. A cluster
    without a listener has no meshxl route and no twin: it follows the same rule, since
    what routes to it may send it WebSockets."""
    res = compile_yaml(one_cluster(ROUTED + extra))
    for od in (res.clusters["c~ws"].outlier_detection, cds(extra).outlier_detection):
        assert od.consecutive_local_origin_failure.value == 1
        assert od.enforcing_consecutive_local_origin_failure.value == enforced
    assert res.clusters["c"].outlier_detection.enforcing_consecutive_local_origin_failure \
        .value == 100
    assert cds(extra).close_connections_on_host_health_failure


@pytest.mark.parametrize("extra", [
    "", "stickiness: {header: x-s, pin: {header: x-pin}}",
    "mode: load-sharing\nstickiness: {cookie: {name: sid, ttl: 1h}}\nwarmup: 10s",
    "health_check: {enabled: false}\noverrides: {cluster: {connectTimeout: 2s}}",
])
def test_the_upgrades_cluster_is_the_plain_one_but_for_ejection(extra: str) -> None:
    """Same endpoints (one EDS resource), balancer, health checks, circuit breakers and
    retries budget: only its name, EDS service name, local-origin enforcement and the
    closing of a failed member's connections (WebSockets live there) differ."""
    res = compile_yaml(one_cluster(ROUTED + extra))
    assert set(res.clusters) == {"c", "c~ws"} and set(res.endpoints) == {"c"}
    plain, twin = res.clusters["c"], res.clusters["c~ws"]
    assert twin.name == "c~ws"
    assert twin.eds_cluster_config.service_name == "c"  # the plain cluster's resource
    assert not plain.eds_cluster_config.service_name  # its own name
    assert twin.close_connections_on_host_health_failure
    assert not plain.close_connections_on_host_health_failure  # requests only
    assert twin.metadata == plain.metadata  # names the model cluster, c
    expected = cluster_pb2.Cluster()
    expected.CopyFrom(plain)
    expected.name = twin.name
    expected.eds_cluster_config.service_name = "c"
    expected.close_connections_on_host_health_failure = True
    expected.outlier_detection.enforcing_consecutive_local_origin_failure.CopyFrom(
        twin.outlier_detection.enforcing_consecutive_local_origin_failure)
    assert twin == expected


@pytest.mark.parametrize("extra", [
    ROUTED + "websocket: false", ROUTED + "protocol: grpc", ROUTED + "protocol: http2",
    ROUTED + "protocol: tcp", "",  # no listener: no route of meshxl's to send it any
])
def test_no_upgrades_cluster_where_no_websocket_passes(extra: str) -> None:
    res = compile_yaml(one_cluster(extra))
    assert set(res.clusters) == {"c"}


def test_clusters_alike_but_for_a_listener_do_not_share_their_ejection() -> None:
    """Built once per shape and copied: having a listener (an upgrades twin) is part of
    the shape."""
    res = compile_yaml("""
        clusters:
          - name: routed
            listener: {port: 10000}
            members: [{name: a, address: 127.0.0.1, port: 8081}]
          - name: unrouted
            members: [{name: a, address: 127.0.0.1, port: 8081}]
        """)
    assert set(res.clusters) == {"routed", "routed~ws", "unrouted"}
    enforced = {name: c.outlier_detection.enforcing_consecutive_local_origin_failure.value
                for name, c in res.clusters.items()}
    assert enforced == {"routed": 100, "routed~ws": 0, "unrouted": 0}


def test_upgrade_requests_are_routed_to_the_upgrades_cluster_first() -> None:
    """Envoy takes the first route that matches: the upgrades route, matching the upgrade
    header as the connection manager does (any case), comes just before the cluster's
    own and is the same route in all else: same hash (same member), pins, retries."""
    extra = "stickiness: {header: x-s, pin: {header: x-pin}}\nroute: {prefix: /chat}"
    upgrades, _events, plain = routes(extra)
    assert (upgrades.name, upgrades.route.cluster) == ("c~ws", "c~ws")
    assert (plain.name, plain.route.cluster) == ("c", "c")
    (header,) = upgrades.match.headers
    assert header.name == "upgrade"
    assert header.string_match.exact == "websocket" and header.string_match.ignore_case
    assert not plain.match.headers
    expected = route_components_pb2.Route()
    expected.CopyFrom(plain)
    expected.name = expected.route.cluster = "c~ws"
    expected.match.headers.add().CopyFrom(header)
    assert upgrades == expected
    assert upgrades.match.prefix == "/chat"
    assert upgrades.route.hash_policy[0].header.header_name == "x-s"
    assert upgrades.typed_per_filter_config.keys() == plain.typed_per_filter_config.keys() != set()


def test_each_upgrades_route_stays_beside_its_clusters_route() -> None:
    """Longest prefix first still: a WebSocket to /api/x goes to api's upgrades cluster,
    not to the shorter prefix's."""
    res = compile_yaml(dedent("""
        clusters:
          - name: web
            listener: {port: 10000}
            route: {prefix: /}
            members: [{name: a, address: 127.0.0.1, port: 8081}]
          - name: api
            listener: {port: 10000}
            route: {prefix: /api}
            members: [{name: b, address: 127.0.0.1, port: 8082}]
          - name: plain
            listener: {port: 10000}
            route: {prefix: /plain}
            websocket: false
            members: [{name: c, address: 127.0.0.1, port: 8083}]
        """))
    (vhost,) = res.routes[listener_name("0.0.0.0", 10000)].virtual_hosts
    assert [r.route.cluster for r in vhost.routes] == [
        "plain", "plain", "api~ws", "api", "api", "web~ws", "web", "web"]
    assert [r.name for r in vhost.routes][:2] == ["plain~sse", "plain"]


def test_event_streams_have_a_route_without_the_routes_timeout() -> None:
    """A request for Server-Sent Events goes where the cluster's route sends it (same
    hash, pins, retries) but without its timeout, which would cut every event stream
    at 15 s (it counts until the response is complete)."""
    extra = "stickiness: {header: x-s, pin: {header: x-pin}}\nroute: {prefix: /feed}"
    _upgrades, events, plain = routes(extra)
    assert plain.route.timeout.seconds == 15
    (header,) = events.match.headers
    assert (header.name, header.string_match.contains) == ("accept", "text/event-stream")
    assert header.string_match.ignore_case
    expected = route_components_pb2.Route()
    expected.CopyFrom(plain)
    expected.name = "c~sse"
    expected.route.timeout.Clear()
    expected.match.headers.add().CopyFrom(header)
    assert events == expected and events.route.HasField("timeout")
    assert events.route.timeout.seconds == 0 and events.route.timeout.nanos == 0
    # gRPC and TCP clusters have none.
    grpc_routes = routes("protocol: grpc")
    assert not any(r.name.endswith("~sse") for r in grpc_routes)


def test_outlier_detection_disabled() -> None:
    assert not cds("outlier_detection: {enabled: false}").HasField("outlier_detection")


def test_circuit_breaker_has_retry_budget() -> None:
    c = cds("retries: {budget_percent: 25, min_retry_concurrency: 10}")
    (t,) = c.circuit_breakers.thresholds
    assert t.priority == base_pb2.RoutingPriority.DEFAULT
    assert t.HasField("retry_budget")
    assert t.retry_budget.budget_percent.value == 25.0
    assert t.retry_budget.min_retry_concurrency.value == 10
    (default,) = cds().circuit_breakers.thresholds
    # Every request in flight may be retried once: a dead active member held all of them.
    assert default.retry_budget.budget_percent.value == 100.0
    assert default.retry_budget.min_retry_concurrency.value == 1024


def test_circuit_breaker_caps_no_connection_or_request() -> None:
    """Envoy's defaults (1,024 connections, pending requests and requests in flight per
    cluster) would answer a thousand open streams' next requests with 503s; the cluster
    is uncapped, as Istio renders it, unless its overrides set a cap."""
    (t,) = cds().circuit_breakers.thresholds
    assert t.max_connections.value == t.max_pending_requests.value == 2**32 - 1
    assert t.max_requests.value == 2**32 - 1
    capped = cds('overrides: {cluster: {circuit_breakers: {thresholds: [{max_requests: 500}]}}}')
    assert [th.max_requests.value for th in capped.circuit_breakers.thresholds] == [500]


def test_connect_timeout_from_model() -> None:
    assert cds("connect_timeout: 1500ms").connect_timeout.ToMilliseconds() == 1500


# -- overrides --------------------------------------------------------------------------------


def test_cluster_override_replaces_a_field_and_keeps_the_rest() -> None:
    c = cds("""
        mode: load-sharing
        stickiness: {header: x-id}
        overrides: {cluster: {connectTimeout: 2s, perConnectionBufferLimitBytes: 1024}}
        """)
    assert c.connect_timeout.seconds == 2
    assert c.per_connection_buffer_limit_bytes.value == 1024
    assert c.lb_policy == cluster_pb2.Cluster.MAGLEV
    assert c.maglev_lb_config.table_size.value == 4099
    assert c.common_lb_config.HasField("healthy_panic_threshold")
    assert c.health_checks[0].no_traffic_interval.ToMilliseconds() == 500
    assert c.eds_cluster_config.eds_config.HasField("ads")


def test_cluster_override_is_deep_merged() -> None:
    od = cds("overrides: {cluster: {outlierDetection: {consecutive5xx: 9}}}").outlier_detection
    assert od.consecutive_5xx.value == 9
    # Siblings of the overridden field survive.
    assert od.split_external_local_origin_errors
    assert od.consecutive_local_origin_failure.value == 1
    assert od.base_ejection_time.seconds == 5


def test_bad_cluster_override_names_the_field_path() -> None:
    text = dedent("""
        clusters:
          - name: ok
            members: [{name: a, address: 127.0.0.1, port: 1}]
          - name: c
            members: [{name: a, address: 127.0.0.1, port: 1}]
            overrides: {cluster: {connectTimeoutt: 2s}}
        """)
    with pytest.raises(CompileError) as info:
        compile_resources(parse_model(text))
    assert info.value.path == "clusters[1].overrides.cluster"
    assert str(info.value).startswith("clusters[1].overrides.cluster: ")
    assert "connectTimeoutt" in str(info.value)


def test_bad_cluster_override_value_type() -> None:
    with pytest.raises(CompileError) as info:
        cds("overrides: {cluster: {connectTimeout: soon}}")
    assert info.value.path == "clusters[0].overrides.cluster"


def test_route_override_is_merged_and_bad_one_is_named() -> None:
    r = route("stickiness: {header: x-id}\noverrides: {route: {route: {timeout: 30s}}}")
    assert r.route.timeout.seconds == 30
    assert r.route.cluster == "c"
    assert r.route.hash_policy[0].header.header_name == "x-id"
    assert r.route.retry_policy.num_retries.value == 3
    with pytest.raises(CompileError) as info:
        route("overrides: {route: {route: {timeoutt: 30s}}}")
    assert info.value.path == "clusters[0].overrides.route"


# -- EDS --------------------------------------------------------------------------------------

HA_SITES = """
    clusters:
      - name: c
        sites: [{name: dc1}, {name: dc2}]
        members:
          - {name: a, address: 127.0.0.1, port: 8081, site: dc1}
          - {name: b, address: 127.0.0.2, port: 8082, site: dc1}
          - {name: c, address: 127.0.0.3, port: 8083, site: dc2}
    """


def test_eds_priorities_and_localities() -> None:
    cla = eds(HA_SITES)
    assert cla.cluster_name == "c"
    assert [(g.priority, g.locality.zone, [e.endpoint.hostname for e in g.lb_endpoints])
            for g in cla.endpoints] == [(0, "dc1", ["a"]), (1, "dc1", ["b"]), (2, "dc2", ["c"])]
    a = cla.endpoints[0].lb_endpoints[0]
    sock = a.endpoint.address.socket_address
    assert (sock.address, sock.port_value, sock.protocol) == (
        "127.0.0.1", 8081, address_pb2.SocketAddress.TCP)
    assert a.health_status == health_check_pb2.UNKNOWN
    # The member is the hostname and its site the zone: no per-endpoint metadata to pay for.
    assert not a.HasField("metadata")


def test_default_site_is_the_locality_zone() -> None:
    cla = eds(one_cluster())
    assert {g.locality.zone for g in cla.endpoints} == {"default"}


def test_load_sharing_groups_a_site_in_one_locality() -> None:
    cla = eds(one_cluster("mode: load-sharing"))
    (group,) = cla.endpoints
    assert group.priority == 0
    assert [e.endpoint.hostname for e in group.lb_endpoints] == ["a", "b"]


def test_no_spillover_by_default() -> None:
    cla = eds(one_cluster())
    assert cla.policy.HasField("overprovisioning_factor")
    # Any healthy member keeps its tier at 100 %: no gradual spill to the standby.
    assert cla.policy.overprovisioning_factor.value >= 100_000


def test_priority_spillover_leaves_envoy_default() -> None:
    cla = eds(one_cluster("priority_spillover: true"))
    assert not cla.policy.HasField("overprovisioning_factor")


def test_admin_down_member_is_draining() -> None:
    cla = eds(HA_SITES, RuntimeState(members_down={("c", "a"): AdminAction()}))
    eps = endpoints_by_name(cla)
    assert eps["a"][2].health_status == health_check_pb2.DRAINING
    assert eps["a"][0] == 0  # kept where it was
    assert eps["b"][2].health_status == health_check_pb2.UNKNOWN
    assert eps["b"][0] == 1  # the standby's tier serves while the drained active is empty


def test_site_offline_members_are_draining() -> None:
    cla = eds(HA_SITES, RuntimeState(sites_offline={"dc1": AdminAction()}))
    status = {h: ep.health_status for h, (_, _, ep) in endpoints_by_name(cla).items()}
    assert status == {"a": health_check_pb2.DRAINING, "b": health_check_pb2.DRAINING,
                      "c": health_check_pb2.UNKNOWN}


def test_unadvertised_members_are_left_out_and_priorities_stay_dense() -> None:
    text = HA_SITES.replace("name: c\n", "name: c\n        membership: registered\n", 1)
    state = RuntimeState(registrations={("c", "b"): Registration("127.0.0.2", 8082),
                                        ("c", "c"): Registration("127.0.0.3", 8083)})
    cla = eds(text, state)
    assert [(g.priority, [e.endpoint.hostname for e in g.lb_endpoints])
            for g in cla.endpoints] == [(0, ["b"]), (1, ["c"])]


def test_endpoint_weights() -> None:
    cla = eds("""
        clusters:
          - name: c
            mode: load-sharing
            sites: [{name: dc1, weight: 70, failover_rank: 0},
                    {name: dc2, weight: 30, failover_rank: 0}]
            members:
              - {name: a, address: 127.0.0.1, port: 80, site: dc1}
              - {name: b, address: 127.0.0.2, port: 80, site: dc1}
              - {name: c, address: 127.0.0.3, port: 80, site: dc2}
        """)
    eps = endpoints_by_name(cla)
    assert {h: (p, z) for h, (p, z, _) in eps.items()} == {
        "a": (0, "dc1"), "b": (0, "dc1"), "c": (0, "dc2")}
    w = {h: ep.load_balancing_weight.value for h, (_, _, ep) in eps.items()}
    assert w["a"] == w["b"] > 0
    assert (w["a"] + w["b"]) * 30 == w["c"] * 70
    assert len(cla.endpoints) == 2  # one locality per (priority, site)


def test_member_weights_reach_eds() -> None:
    cla = eds(one_cluster("mode: load-sharing", members="""
        members:
          - {name: a, address: 127.0.0.1, port: 1, weight: 100}
          - {name: b, address: 127.0.0.2, port: 1, weight: 300}
        """))
    w = {h: ep.load_balancing_weight.value for h, (_, _, ep) in endpoints_by_name(cla).items()}
    assert w["b"] == 3 * w["a"]


# -- RDS: hash policies and retries ------------------------------------------------------------


def test_header_hash_policy() -> None:
    (hp,) = route("stickiness: {header: x-session-id}").route.hash_policy
    assert hp.WhichOneof("policy_specifier") == "header"
    assert hp.header.header_name == "x-session-id"
    assert hp.terminal


def test_cookie_hash_policy() -> None:
    (hp,) = route(
        "stickiness: {cookie: {name: sess, ttl: 30m, path: /app}}").route.hash_policy
    assert hp.WhichOneof("policy_specifier") == "cookie"
    assert hp.cookie.name == "sess"
    assert hp.cookie.path == "/app"
    assert hp.cookie.ttl.seconds == 1800


def test_cookie_ttl_zero_is_a_session_cookie() -> None:
    # Envoy generates the cookie only when ttl is present; 0 means a session cookie.
    (hp,) = route("stickiness: {cookie: {ttl: 0}}").route.hash_policy
    assert hp.cookie.name == "meshxl-session"
    assert hp.cookie.HasField("ttl") and hp.cookie.ttl.ToNanoseconds() == 0


def test_source_ip_hash_policy() -> None:
    (hp,) = route("stickiness: {source_ip: true}").route.hash_policy
    assert hp.WhichOneof("policy_specifier") == "connection_properties"
    assert hp.connection_properties.source_ip


def test_no_stickiness_no_hash_policy() -> None:
    assert len(route().route.hash_policy) == 0


def test_route_match_and_timeout() -> None:
    r = route("route: {prefix: /api, timeout: 5s}")
    assert r.name == "c"
    assert r.match.prefix == "/api"
    assert r.route.cluster == "c"
    assert r.route.timeout.seconds == 5


def test_retry_policy_defaults_in_ha() -> None:
    rp = route().route.retry_policy
    assert rp.retry_on == "connect-failure,refused-stream,reset,gateway-error"
    assert rp.num_retries.value == 3
    assert rp.per_try_timeout.seconds == 2
    assert rp.retry_back_off.base_interval.ToMilliseconds() == 5
    assert rp.retry_back_off.max_interval.ToMilliseconds() == 50
    (pred,) = rp.retry_host_predicate
    assert pred.name == "envoy.retry_host_predicates.previous_hosts"
    assert pred.typed_config.type_url.endswith("PreviousHostsPredicate")
    # A consistent hash would pick the same dead member again without re-picks.
    assert rp.host_selection_retry_max_attempts == 100
    assert rp.retry_priority.name == "envoy.retry_priorities.previous_priorities"
    cfg = previous_priorities_config_pb2.PreviousPrioritiesConfig()
    assert rp.retry_priority.typed_config.Unpack(cfg)
    assert cfg.update_frequency == 1


def test_retry_policy_from_model() -> None:
    rp = route("""
        retries: {attempts: 5, retry_on: [5xx, reset], host_selection_max_attempts: 9,
                  per_try_timeout: 750ms}
        """).route.retry_policy
    assert rp.retry_on == "5xx,reset"
    assert rp.num_retries.value == 5
    assert rp.host_selection_retry_max_attempts == 9
    assert rp.per_try_timeout.ToMilliseconds() == 750


def test_retry_without_previous_hosts() -> None:
    rp = route("retries: {previous_hosts: false}").route.retry_policy
    assert len(rp.retry_host_predicate) == 0
    assert rp.host_selection_retry_max_attempts == 0


def test_previous_priorities_off_by_default_in_load_sharing() -> None:
    rp = route("mode: load-sharing").route.retry_policy
    assert not rp.HasField("retry_priority")
    assert len(rp.retry_host_predicate) == 1


@pytest.mark.parametrize(
    ("mode", "setting", "expected"),
    [("high-availability", "false", False), ("load-sharing", "true", True)],
)
def test_previous_priorities_overridable(mode: str, setting: str, expected: bool) -> None:
    rp = route(f"mode: {mode}\nretries: {{previous_priorities: {setting}}}").route.retry_policy
    assert rp.HasField("retry_priority") is expected


def test_zero_attempts_means_no_retry_policy() -> None:
    assert not route("retries: {attempts: 0}").route.HasField("retry_policy")


# -- LDS / RDS: shared listeners ---------------------------------------------------------------


def test_quickstart_shares_one_listener_between_two_clusters() -> None:
    res = compile_resources(parse_model(QUICKSTART.read_text(encoding="utf-8")))
    name = listener_name("127.0.0.1", 10000)
    assert name == "meshxl_127.0.0.1_10000"
    assert list(res.listeners) == [name] and list(res.routes) == [name]
    assert set(res.endpoints) == {"orders", "cart"}
    assert set(res.clusters) == {"orders", "orders~ws", "cart", "cart~ws"}  # WebSockets'

    lst = res.listeners[name]
    assert lst.name == name
    assert lst.address.socket_address.address == "127.0.0.1"
    assert lst.address.socket_address.port_value == 10000
    (chain,) = lst.filter_chains
    (flt,) = chain.filters
    assert flt.name == "envoy.filters.network.http_connection_manager"
    hcm = hcm_pb2.HttpConnectionManager()
    assert flt.typed_config.Unpack(hcm)
    assert hcm.rds.route_config_name == name
    assert hcm.rds.config_source.HasField("ads")
    assert [f.name for f in hcm.http_filters] == ["envoy.filters.http.router"]

    rc = res.routes[name]
    assert rc.name == name
    hosts = {tuple(vh.domains): [r.route.cluster for r in vh.routes] for vh in rc.virtual_hosts}
    assert hosts == {("orders.local",): ["orders~ws", "orders", "orders"],
                     ("*",): ["cart~ws", "cart", "cart"]}  # upgrades, event streams, plain
    assert len({vh.name for vh in rc.virtual_hosts}) == 2


def test_clusters_with_same_domains_share_a_virtual_host_longest_prefix_first() -> None:
    res = compile_yaml("""
        clusters:
          - name: web
            members: [{name: a, address: 127.0.0.1, port: 1}]
            listener: {port: 8080}
          - name: api
            members: [{name: a, address: 127.0.0.2, port: 1}]
            listener: {port: 8080}
            route: {prefix: /api}
          - name: other
            members: [{name: a, address: 127.0.0.3, port: 1}]
            listener: {port: 9090}
        """)
    assert set(res.listeners) == {"meshxl_0.0.0.0_8080", "meshxl_0.0.0.0_9090"}
    (vh,) = res.routes["meshxl_0.0.0.0_8080"].virtual_hosts
    assert list(vh.domains) == ["*"]
    assert [(r.match.prefix, r.name) for r in vh.routes] == [
        ("/api", "api~ws"), ("/api", "api~sse"), ("/api", "api"),
        ("/", "web~ws"), ("/", "web~sse"), ("/", "web")]


def test_cluster_without_listener_has_no_lds_or_rds() -> None:
    res = compile_yaml(one_cluster())
    assert set(res.clusters) == {"c"} and set(res.endpoints) == {"c"}
    assert res.listeners == {} and res.routes == {}


def test_by_type_maps_type_urls() -> None:
    res = compile_resources(parse_model(QUICKSTART.read_text(encoding="utf-8")))
    by = res.by_type()
    assert by[types.CLUSTER] is res.clusters and by[types.ENDPOINT] is res.endpoints
    assert by[types.LISTENER] is res.listeners and by[types.ROUTE] is res.routes
    for url, resources in by.items():
        for msg in resources.values():
            assert url.endswith("/" + msg.DESCRIPTOR.full_name)


def test_overlapping_domains_never_repeat_across_virtual_hosts() -> None:
    text = """
        clusters:
          - name: a
            members: [{name: m, address: 127.0.0.1, port: 1}]
            listener: {port: 8080}
            route: {domains: [a.local, b.local], prefix: /x}
          - name: b
            members: [{name: m, address: 127.0.0.2, port: 1}]
            listener: {port: 8080}
            route: {domains: [b.local], prefix: /y}
        """
    try:
        spec = model(text)
    except ModelError as exc:  # rejecting the model is an acceptable fix too
        assert any("b.local" in str(p) for p in exc.problems)
        return
    rc = compile_resources(spec).routes["meshxl_0.0.0.0_8080"]
    domains = [d for vh in rc.virtual_hosts for d in vh.domains]
    assert len(domains) == len(set(domains)), domains


# -- determinism --------------------------------------------------------------------------------


def serialized(res: Resources) -> dict[str, dict[str, bytes]]:
    return {url: {name: msg.SerializeToString(deterministic=True)
                  for name, msg in msgs.items()}
            for url, msgs in res.by_type().items()}


def test_compiling_twice_gives_identical_bytes() -> None:
    spec = parse_model(QUICKSTART.read_text(encoding="utf-8"))
    regs = [(("orders", "orders-b"), Registration("127.0.0.1", 18082, ready=False)),
            (("cart", "cart-z"), Registration("127.0.0.1", 18089)),
            (("cart", "cart-y"), Registration("127.0.0.1", 18088, weight=50))]
    first = compile_resources(spec, RuntimeState(
        registrations=dict(regs), members_down={("orders", "orders-a"): AdminAction()}))
    # Same state built in another order (as another control-plane replica might).
    second = compile_resources(spec, RuntimeState(
        registrations=dict(reversed(regs)),
        members_down={("orders", "orders-a"): AdminAction()}))
    assert serialized(first) == serialized(second)
    assert list(first.clusters) == list(second.clusters)
    assert serialized(compile_resources(spec)) == serialized(compile_resources(spec))
