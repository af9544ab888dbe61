"""What a node may report on (meshxl.xds.accesslog): entries count only for the
clusters it subscribes to and for their members' hosts; the rest is counted
``unrouted``, so a node of another namespace steers no judgement."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from meshxl.model import RuntimeState, parse_model
from meshxl.model.runtime import Registration
from meshxl.xds import accesslog
from meshxl.xds.accesslog import AccessLogReceiver, member_hosts
from meshxl.xds.metrics import XdsMetrics
from meshxl.xds.nodes import routed
from meshxl.xds.types import CLUSTER, ENDPOINT
from meshxl.xds.upstream import UpstreamSignals
from tests.unit.test_accesslog import T0, http, message

MODEL = parse_model("""
clusters:
- name: web
  mode: load-sharing
  members:
  - {name: a, address: 10.0.0.1, port: 80}
  - {name: b, address: 10.0.0.2, port: 80}
  - {name: c, address: web-c.example, port: 80}
- name: pay
  membership: registered
  members: []
""")


@dataclass
class Sub:
    names: frozenset[str]
    wildcard: bool = False


@dataclass
class FakeStream:
    subscriptions: dict[str, Any] = field(default_factory=dict)


def test_a_node_routes_to_the_endpoints_its_streams_subscribe_to() -> None:
    web = FakeStream({CLUSTER: Sub(frozenset(), True), ENDPOINT: Sub(frozenset({"web"}))})
    pay = FakeStream({ENDPOINT: Sub(frozenset({"pay"}))})
    assert routed([web, pay]) == {"web", "pay"}  # type: ignore[list-item]
    assert routed([FakeStream({CLUSTER: Sub(frozenset(), True)})]) == frozenset()  # type: ignore[list-item]
    assert routed([]) == frozenset()
    assert routed([FakeStream({ENDPOINT: Sub(frozenset(), True)})]) is None  # type: ignore[list-item]


def test_member_hosts_are_addresses_resolved_names_and_registrations() -> None:
    state = RuntimeState(registrations={
        ("pay", "p0"): Registration(address="10.0.1.1", port=9000),
        ("pay", "p1"): Registration(address="fd00::1", port=9000)})
    hosts = member_hosts(MODEL, state, {"web-c.example": ("10.0.0.3", "fd00::3")})
    assert hosts["web"] == {"10.0.0.1:80", "10.0.0.2:80", "web-c.example:80", "10.0.0.3:80",
                            "[fd00::3]:80"}
    assert hosts["pay"] == {"10.0.1.1:9000", "[fd00::1]:9000"}


def test_entries_of_other_clusters_and_hosts_are_unrouted() -> None:
    signals, metrics = UpstreamSignals(), XdsMetrics()
    routes = {"edge": frozenset({"web"}), "other": frozenset({"pay"})}
    receiver = AccessLogReceiver(
        signals, metrics=metrics, clock=lambda: T0 + 0.1, model=lambda: MODEL,
        routes=lambda node: routes.get(node, frozenset()),
        members=lambda: member_hosts(MODEL, RuntimeState(), {}))
    edge, other, stranger = (accesslog._Stream(0.0) for _ in range(3))  # noqa: SLF001
    edge.node_id, other.node_id, stranger.node_id = "edge", "other", "stranger"
    entries = (http(address="10.0.0.1"), http(address="10.0.0.2", rx=2.0),
               http(address="10.9.9.9"), http(cluster="pay", address="10.0.0.1"))
    receiver.receive(edge, message(*entries))
    assert receiver.counts["recorded"] == 2 and receiver.counts["unrouted"] == 2
    # A node subscribed to pay only, and one with no stream here: nothing of web counts,
    # an Istio name of web included.
    istio = http(cluster="outbound|80||web.shop.svc.cluster.local", address="10.0.0.1", rx=9.0)
    receiver.receive(other, message(*entries, istio))
    receiver.receive(stranger, message(*entries, istio))
    assert receiver.counts["recorded"] == 2 and receiver.counts["unrouted"] == 12
    summary = signals.summary("web", T0, T0 + 0.5)
    assert set(summary) == {"10.0.0.1:80", "10.0.0.2:80"}
    assert summary["10.0.0.1:80"].requests == 1
    assert summary["10.0.0.1:80"].p90 == summary["10.0.0.1:80"].p50 == 0.012
    assert metrics.registry.get_sample_value("meshxl_xds_access_log_entries_total",
                                             {"result": "unrouted"}) == 12
    # A wildcard subscription routes to every cluster; still only to member hosts (pay
    # has no registered member at 10.0.0.1).
    routes["edge"] = None  # type: ignore[assignment]
    receiver.receive(edge, message(*entries))
    assert receiver.counts["recorded"] == 4 and receiver.counts["unrouted"] == 14
