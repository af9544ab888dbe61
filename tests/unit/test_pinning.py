"""Pinned sessions and overload in the model and the compiled Envoy resources (pure)."""

from __future__ import annotations

from textwrap import dedent, indent
from typing import Any

import pytest
from envoy.config.core.v3 import health_check_pb2
from envoy.extensions.filters.http.stateful_session.v3 import stateful_session_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.http.stateful_session.cookie.v3 import cookie_pb2
from envoy.extensions.http.stateful_session.header.v3 import header_pb2

from meshxl.model import (
    MemberState,
    ModelError,
    Registration,
    Role,
    RuntimeState,
    cluster_view,
    parse_model,
)
from meshxl.operator.views.status import _shares
from meshxl.xds.compiler import compile_resources
from meshxl.xds.history import Transition
from meshxl.xds.resources import STATEFUL_SESSION, listener_name


def model(stickiness: str, *, extra: str = "", mode: str = "load-sharing") -> Any:
    return parse_model(dedent(f"""\
        clusters:
          - name: web
            mode: {mode}
            stickiness: {stickiness}
            listener: {{port: 10000}}
            members:
              - {{name: a, address: 10.0.0.1, port: 80}}
              - {{name: b, address: 10.0.0.2, port: 80}}
        """) + indent(dedent(extra), "  "))


def hcm_filters(resources: Any, port: int = 10000) -> list[str]:
    listener = resources.listeners[listener_name("0.0.0.0", port)]
    hcm = hcm_pb2.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    return [f.name for f in hcm.http_filters]


def route_pin(resources: Any, cluster: str) -> stateful_session_pb2.StatefulSession | None:
    for rc in resources.routes.values():
        for vhost in rc.virtual_hosts:
            for route in vhost.routes:
                if route.route.cluster == cluster:
                    if STATEFUL_SESSION not in route.typed_per_filter_config:
                        return None
                    per_route = stateful_session_pb2.StatefulSessionPerRoute()
                    route.typed_per_filter_config[STATEFUL_SESSION].Unpack(per_route)
                    return per_route.stateful_session
    raise AssertionError(f"no route to {cluster}")


# -- the model --------------------------------------------------------------------------


def test_an_empty_pin_is_a_cookie_named_meshxl_pin() -> None:
    st = model("{header: x-session-id, pin: {}}").clusters[0].stickiness
    assert st.pin is not None and st.pin.carrier == "cookie"
    assert st.pin.cookie.name == "meshxl-pin" and st.pin.cookie.ttl == 3600
    assert st.pin.strict is False


@pytest.mark.parametrize(("stickiness", "message"), [
    ("{header: x-s, pin: {header: x-s}}", "pin.header 'x-s' is the hash header"),
    ("{cookie: {name: c}, pin: {cookie: {name: c}}}", "pin.cookie.name 'c' is the hash cookie"),
    ("{header: x-s, pin: {header: x-p, cookie: {name: p}}}", "a cookie or in a header, not both"),
    ("{header: x-s, pin: {header: 'X P'}}", "pin.header"),
    ("{header: x-s, pin: {strict: maybe}}", "strict"),
    ("{header: x-s, pin: {cookie: {name: 'a;b'}}}", "pin.cookie.name"),
    ("{header: x-s, pin: {cookie: {ttl: -1s}}}", "ttl"),
])
def test_bad_pins_are_refused_naming_the_field(stickiness: str, message: str) -> None:
    with pytest.raises(ModelError, match=message.replace("(", r"\(")):
        model(stickiness)


# -- what Envoy receives ----------------------------------------------------------------


def test_a_pinned_route_configures_the_stateful_session_filter() -> None:
    out = compile_resources(model("{header: x-session-id, pin: {cookie: {name: p, ttl: 10m, "
                                  "path: /app}}}"))
    assert hcm_filters(out) == [STATEFUL_SESSION, "envoy.filters.http.router"]
    pin = route_pin(out, "web")
    assert pin is not None and pin.strict is False
    assert pin.session_state.name == "envoy.http.stateful_session.cookie"
    state = cookie_pb2.CookieBasedSessionState()
    pin.session_state.typed_config.Unpack(state)
    assert (state.cookie.name, state.cookie.path, state.cookie.ttl.seconds) == ("p", "/app", 600)
    # The hash still places new sessions.
    assert out.routes[listener_name("0.0.0.0", 10000)].virtual_hosts[0].routes[0] \
        .route.hash_policy[0].header.header_name == "x-session-id"
    # Pinned sessions move off draining or failing members, stay on overloaded ones
    # (DEGRADED), and move off a sick member sent HEALTHY (meshxl.xds.stepdown).
    assert list(out.clusters["web"].common_lb_config.override_host_status.statuses) == [
        health_check_pb2.UNKNOWN, health_check_pb2.DEGRADED]


def test_a_header_pin_and_strict_mode() -> None:
    out = compile_resources(model("{source_ip: true, pin: {header: x-meshxl-pin, "
                                  "strict: true}}"))
    pin = route_pin(out, "web")
    assert pin is not None and pin.strict is True
    state = header_pb2.HeaderBasedSessionState()
    pin.session_state.typed_config.Unpack(state)
    assert state.name == "x-meshxl-pin"


def test_unpinned_clusters_get_no_filter_and_share_a_listener_with_pinned_ones() -> None:
    out = compile_resources(model("{header: x-session-id}"))
    assert hcm_filters(out) == ["envoy.filters.http.router"]
    assert route_pin(out, "web") is None
    assert not out.clusters["web"].common_lb_config.override_host_status.statuses
    shared = compile_resources(model("{header: x-session-id, pin: {}}", extra="""\
          - name: api
            stickiness: {header: x-session-id}
            route: {prefix: /api}
            listener: {port: 10000}
            members: [{name: c, address: 10.0.0.3, port: 80}]
        """))
    assert hcm_filters(shared)[0] == STATEFUL_SESSION
    assert route_pin(shared, "api") is None  # the filter stays idle on this route
    assert route_pin(shared, "web") is not None


# -- overload ---------------------------------------------------------------------------


def state_with(overloaded: set[str], ready: bool = True) -> RuntimeState:
    regs = {("web", n): Registration(address=f"10.0.0.{i + 1}", port=80, ready=ready,
                                     overloaded=n in overloaded)
            for i, n in enumerate(("a", "b"))}
    return RuntimeState(registrations=regs)


def registered_model(mode: str = "high-availability", failover: str = "") -> Any:
    return parse_model(dedent(f"""\
        clusters:
          - name: web
            mode: {mode}
            membership: registered
            stickiness: {{header: x-s, pin: {{}}}}
            listener: {{port: 10000}}
        """) + (f"    failover: {failover}\n" if failover else ""))


def eds_status(model: Any, state: RuntimeState) -> dict[str, int]:
    out = compile_resources(model, state)
    return {ep.endpoint.hostname: ep.health_status
            for group in out.endpoints["web"].endpoints for ep in group.lb_endpoints}


def test_an_overloaded_member_is_sent_degraded_while_its_tier_has_a_ready_member() -> None:
    spec = registered_model("load-sharing").clusters[0]
    view = cluster_view(spec, state_with({"a"}))
    a, b = view.member("a"), view.member("b")
    assert a is not None and b is not None
    assert a.state == MemberState.OVERLOADED and a.role == Role.LOAD_SHARING
    assert b.state == MemberState.READY
    assert eds_status(registered_model("load-sharing"), state_with({"a"})) == {
        "a": health_check_pb2.DEGRADED, "b": health_check_pb2.UNKNOWN}
    # New sessions: the ready member of the tier only.
    assert _shares(view.members) == {"b": 1.0}


def test_a_tier_of_overloaded_members_keeps_taking_new_sessions() -> None:
    """Envoy's hash balancers place nothing on DEGRADED hosts: a tier of overloaded
    members sent DEGRADED takes no new session (503 when no other tier is healthy)."""
    spec = registered_model("load-sharing").clusters[0]
    both = cluster_view(spec, state_with({"a", "b"}))
    assert {m.state for m in both.members} == {MemberState.ATTENTION}
    assert _shares(both.members) == {"a": 0.5, "b": 0.5}
    assert set(eds_status(registered_model("load-sharing"), state_with({"a", "b"})).values()
               ) == {health_check_pb2.UNKNOWN}
    # High availability: the active is alone in its tier; overload sends nothing to the
    # standby (it is no failover), the active keeps its role and its new sessions.
    ha = cluster_view(registered_model().clusters[0], state_with({"a"}))
    assert [(m.name, m.state, m.role) for m in ha.members] == [
        ("a", MemberState.ATTENTION, Role.ACTIVE), ("b", MemberState.READY, Role.STANDBY)]
    assert _shares(ha.members) == {"a": 1.0}
    # failover.all_withdrawn: withdraw passes the tier over, as Envoy would.
    strict = registered_model("load-sharing", "{all_withdrawn: withdraw}")
    view = cluster_view(strict.clusters[0], state_with({"a", "b"}))
    assert {m.state for m in view.members} == {MemberState.OVERLOADED}
    assert _shares(view.members) == {}
    assert set(eds_status(strict, state_with({"a", "b"})).values()) == {
        health_check_pb2.DEGRADED}


def test_overload_is_not_a_failover_but_leaving_overload_for_down_is() -> None:
    assert not Transition("web", "a", "ready", "overloaded", "").failover
    assert not Transition("web", "a", "overloaded", "ready", "").failover
    assert Transition("web", "a", "overloaded", "lost", "").failover


def test_a_registration_reads_overload_from_its_document() -> None:
    doc = {"address": "10.0.0.1", "port": 80, "overload": {"detail": "cpu", "since": "t"}}
    assert Registration.from_dict(doc).overloaded
    assert not Registration.from_dict({"address": "10.0.0.1", "port": 80}).overloaded
