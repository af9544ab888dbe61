"""Build Envoy resources from the cluster model and runtime state (pure); the compiler
(:mod:`meshxl.xds.compiler`) decides what to build and what to reuse.

One meshxl cluster becomes:

* a CDS ``Cluster`` (EDS over ADS): consistent-hash lb policy, active health checks,
  outlier detection, a retry budget in the circuit breakers, and a priority policy
  that keeps lower tiers idle while a higher one has a healthy member;
* an EDS ``ClusterLoadAssignment``: one ``LocalityLbEndpoints`` per (site, priority),
  members advertised with their tier as priority and their weight; admin-drained
  members kept as ``DRAINING`` so Envoy stops sending them new requests;
* a virtual host in the RDS ``RouteConfiguration`` of its listener, with the hash
  policy and a retry policy that moves a retry to a different member and tier;
* an LDS ``Listener`` per distinct listener address (shared by clusters).

Everything here is a pure function of (spec, state), so it is tested case by case
without processes, and two control-plane replicas given the same input produce the
same bytes.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from envoy.config.accesslog.v3.accesslog_pb2 import AccessLog
from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import base_pb2, config_source_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.stateful_session.v3 import stateful_session_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.http.stateful_session.cookie.v3 import cookie_pb2
from envoy.extensions.http.stateful_session.header.v3 import header_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.extensions.retry.priority.previous_priorities.v3 import (
    previous_priorities_config_pb2,
)
from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2, duration_pb2, struct_pb2, wrappers_pb2
from google.protobuf.message import Message

from meshxl.errors import InputError
from meshxl.model import (
    ClusterSpec,
    ClusterView,
    Telemetry,
)
from meshxl.model.runtime import ADVERTISED as _ADVERTISED
from meshxl.model.runtime import DEGRADED as _DEGRADED
from meshxl.model.runtime import DRAINING as _DRAINING
from meshxl.model.spec import Algorithm, HashKey, Pin, PinCarrier, Stickiness, choose
from meshxl.xds.alsconfig import upstream_router
from meshxl.xds.dns import is_ip_literal
from meshxl.xds.overrides import OverrideError, merge_override
from meshxl.xds.protocols import (
    apply_protocol,
    build_event_stream_route,
    has_event_stream_route,
    health_check_kind,
    listener_protocols,
    mark_generation,
    route_protocol,
)
from meshxl.xds.tracingconfig import trace
from meshxl.xds.upgrades import build_upgrade_route, has_upgrade_cluster
from meshxl.xds.warmup import MIN_FRACTION

# A lower tier takes traffic only when the tier above has no healthy member: Envoy
# scales a tier's health by this factor / 100, so any healthy host keeps it at 100 %.
_NO_SPILLOVER_FACTOR = 1_000_000
_UNCAPPED = wrappers_pb2.UInt32Value(value=2**32 - 1)  # a threshold that caps nothing
_ADS = config_source_pb2.ConfigSource(
    ads=config_source_pb2.AggregatedConfigSource(),
    resource_api_version=config_source_pb2.ApiVersion.V3,
)


class CompileError(InputError):
    """The model cannot be turned into Envoy resources (names the field path)."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"{path}: {message}")


def _dur(seconds: float) -> duration_pb2.Duration:
    nanos = round(seconds * 1e9)
    return duration_pb2.Duration(seconds=nanos // 1_000_000_000, nanos=nanos % 1_000_000_000)


def _any(message: Message) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(message)
    return a


def listener_name(address: str, port: int) -> str:
    return f"meshxl_{address}_{port}"


# -- CDS -------------------------------------------------------------------------------


def _maglev(c: cluster_pb2.Cluster, st: Stickiness) -> None:
    c.lb_policy = cluster_pb2.Cluster.MAGLEV
    c.maglev_lb_config.table_size.value = st.maglev_table_size


def _ring_hash(c: cluster_pb2.Cluster, st: Stickiness) -> None:
    c.lb_policy = cluster_pb2.Cluster.RING_HASH
    c.ring_hash_lb_config.minimum_ring_size.value = st.ring_minimum_size
    c.ring_hash_lb_config.maximum_ring_size.value = st.ring_maximum_size


#: Stickiness algorithm -> how a cluster is set up for it.
_LB_POLICIES: dict[Algorithm, Callable[[cluster_pb2.Cluster, Stickiness], None]] = {
    "maglev": _maglev,
    "ring_hash": _ring_hash,
}


def build_cluster(spec: ClusterSpec, path: str = "cluster") -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(
        name=spec.name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ADS),
        connect_timeout=_dur(spec.connect_timeout),
        # A removed member leaves at once, even while its health check still passes.
        ignore_health_on_host_removal=True,
    )
    st = spec.stickiness
    hashing = None if st is None else choose(_LB_POLICIES, st.algorithm,
                                             "stickiness algorithm")
    if hashing is None or placed_by_tier(spec):
        c.lb_policy = cluster_pb2.Cluster.LEAST_REQUEST
        if st is None and spec.warmup > 0:
            # Envoy's own slow start (least request and round robin only; hashed
            # clusters ramp through EDS weights instead: meshxl.xds.warmup).
            slow = c.least_request_lb_config.slow_start_config
            slow.slow_start_window.CopyFrom(_dur(spec.warmup))
            slow.min_weight_percent.value = 100 * MIN_FRACTION
    else:
        assert st is not None
        hashing(c, st)
    if st is not None and st.balance_factor is not None:
        # Consistent hashing with bounded loads: a member above factor x the mean load
        # (requests in flight) passes new requests on along the hash ring/table.
        c.common_lb_config.consistent_hashing_lb_config.hash_balance_factor.value = round(
            st.balance_factor * 100)
    if st is not None and st.pin is not None:
        # A pinned session stays on its member while Envoy sees it UNKNOWN (members are
        # sent without a status) or DEGRADED (overloaded: it keeps its sessions). A
        # draining, failing or ejected member is no override target: its sessions move;
        # nor is one sent HEALTHY: a sick member whose pins are let go
        # (meshxl.xds.stepdown), still a healthy target of the hash.
        c.common_lb_config.override_host_status.statuses.extend(_PIN_TARGETS)
    # Panic routing would send traffic to members known to be down: never for HA.
    c.common_lb_config.healthy_panic_threshold.CopyFrom(percent_pb2.Percent(value=0.0))
    # Envoy batches host health/weight changes for 1 s by default; a failover must not wait.
    c.common_lb_config.update_merge_window.CopyFrom(_dur(0))

    hc = spec.health_check
    if hc.enabled:
        check = health_check_pb2.HealthCheck(
            timeout=_dur(hc.timeout),
            interval=_dur(hc.interval),
            interval_jitter=_dur(min(hc.interval / 10, 0.05)),
            healthy_threshold=wrappers_pb2.UInt32Value(value=hc.healthy_threshold),
            unhealthy_threshold=wrappers_pb2.UInt32Value(value=hc.unhealthy_threshold),
            no_traffic_interval=_dur(hc.no_traffic_interval),
            unhealthy_interval=_dur(hc.unhealthy_interval),
            unhealthy_edge_interval=_dur(hc.unhealthy_edge_interval),
            healthy_edge_interval=_dur(hc.healthy_edge_interval),
        )
        health_check_kind(check, spec)  # HTTP GET, grpc.health.v1 or a TCP connect
        c.health_checks.append(check)
    apply_protocol(c, spec)

    od = spec.outlier_detection
    if od.enabled:
        c.outlier_detection.CopyFrom(outlier_detection_pb2.OutlierDetection(
            split_external_local_origin_errors=True,
            consecutive_local_origin_failure=wrappers_pb2.UInt32Value(
                value=od.consecutive_local_origin_failure),
            # The first refused connect ejects; WebSockets, whose ends Envoy counts as
            # local-origin failures, go to the upgrades twin (meshxl.xds.upgrades).
            enforcing_consecutive_local_origin_failure=wrappers_pb2.UInt32Value(
                value=100 if _plain_requests_only(spec)
                or upgrades_eject_on_local_origin(spec) else 0),
            consecutive_5xx=wrappers_pb2.UInt32Value(value=od.consecutive_5xx),
            consecutive_gateway_failure=wrappers_pb2.UInt32Value(
                value=od.consecutive_gateway_failure),
            enforcing_consecutive_gateway_failure=wrappers_pb2.UInt32Value(value=100),
            interval=_dur(od.interval),
            base_ejection_time=_dur(od.base_ejection_time),
            max_ejection_percent=wrappers_pb2.UInt32Value(value=od.max_ejection_percent),
        ))


    # Retries are capped by the circuit breaker (3 outstanding by default): when a
    # member dies under load most retries would overflow. A budget scales with load.
    # Nothing else is capped, as in Istio (Envoy's default 1,024 connections, pending
    # requests and requests answer a thousand open streams' requests with 503s).
    r = spec.retries
    c.circuit_breakers.CopyFrom(circuit_breaker_pb2.CircuitBreakers(thresholds=[
        circuit_breaker_pb2.CircuitBreakers.Thresholds(
            priority=base_pb2.RoutingPriority.DEFAULT,
            max_connections=_UNCAPPED, max_pending_requests=_UNCAPPED, max_requests=_UNCAPPED,
            retry_budget=circuit_breaker_pb2.CircuitBreakers.Thresholds.RetryBudget(
                budget_percent=percent_pb2.Percent(value=r.budget_percent),
                min_retry_concurrency=wrappers_pb2.UInt32Value(value=r.min_retry_concurrency),
            ),
        )
    ]))
    c.metadata.filter_metadata["meshxl"].CopyFrom(
        _struct({"cluster": spec.name, "mode": spec.mode,
                 "stickiness": st.key if st else "none"}))
    if spec.overrides.cluster:
        c = _merge(c, spec.overrides.cluster, f"{path}.overrides.cluster")
    return c


def _plain_requests_only(spec: ClusterSpec) -> bool:
    """The cluster carries no WebSocket: none allowed, or they have their own cluster."""
    return not spec.websocket_upgrades or has_upgrade_cluster(spec)


def upgrades_eject_on_local_origin(spec: ClusterSpec) -> bool:
    """Whether the upgrades twin ejects on local-origin failures, or only counts them:
    not where a health check removes dead members and retries leave them.

    Envoy's router reports every upstream reset as a local-origin failure, and the end
    of a WebSocket whose member closes first (a graceful close included) is one
    (envoyproxy/envoy#24690). Enforced, each such end ejects the member and, through
    ``close_connections_on_host_health_failure``, closes all its other WebSockets. A
    dead member's upgrade requests are retried on another member or tier all the same
    (``previous_hosts``; ``previous_priorities``, see :func:`placed_by_tier`), and its
    health check removes it. Without a health check, or without retries that leave
    the member, ejection is the only way out. Plain requests, on the plain cluster,
    always eject on the first failure (a cluster without a listener, which has no
    twin, follows this rule: its routes, not meshxl's, may send it WebSockets)."""
    return not (spec.health_check.enabled and _retries_leave_the_member(spec))


def _retries_leave_the_member(spec: ClusterSpec) -> bool:
    """A retry goes to another member: to the next tier where the tier places sessions,
    to another member of the tier elsewhere."""
    r = spec.retries
    if r.attempts == 0:
        return False
    if placed_by_tier(spec):
        return r.previous_priorities is not False  # unset: on in high availability
    return r.previous_hosts


def placed_by_tier(spec: ClusterSpec) -> bool:
    """A high-availability cluster whose every tier holds one member (no ``priority``
    shared, none given beside members without one, no host name that may resolve to
    several addresses; a virtual system's members each have their own): the tier alone
    places a session, so it is balanced by least request, whatever its stickiness.

    A hash would decide nothing there and gets in the way of failover: Envoy's Maglev
    and ring-hash balancers choose the priority from the members' health alone and never
    ask the route's ``retry_priority`` (``ThreadAwareLoadBalancerBase::LoadBalancerImpl
    ::chooseHost``), so a retry after a refused connect goes back to the dead active
    until it is ejected or fails its health check. Least request honours
    ``previous_priorities``: the retry goes to the standby's tier at once. TCP keeps its
    hash (the TCP proxy uses no retry priority) and so does a bounded-load hash
    (``balance_factor``)."""
    return (spec.high_availability and spec.protocol != "tcp"
            and (spec.stickiness is None or spec.stickiness.balance_factor is None)
            and all(is_ip_literal(m.address) for m in spec.members)
            and _one_member_per_tier([m.priority for m in spec.members]))


def _one_member_per_tier(priorities: list[int | None]) -> bool:
    """Members' tiers are one each: none given (each member its own tier, by its place
    in its site), or every one given and no two alike (a virtual system's, from the
    placement). Mixed, a given priority may meet a member's place in its site."""
    given = [p for p in priorities if p is not None]
    if not given:
        return True
    return len(given) == len(priorities) and len(set(given)) == len(given)


_PIN_TARGETS = (health_check_pb2.UNKNOWN, health_check_pb2.DEGRADED)
#: The status a member whose pins are let go is sent with: healthy to the load
#: balancer, no override target (Envoy's ``HostImpl::healthStatus`` is the EDS status
#: when no health check or outlier detection failed it).
_RELEASED = health_check_pb2.HEALTHY


_Resource = TypeVar("_Resource", bound=Message)


def _struct(data: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(data)
    return s


def _merge(message: _Resource, override: Mapping[str, Any], path: str) -> _Resource:
    """Overlay raw Envoy JSON on a generated resource (:mod:`meshxl.xds.overrides`)."""
    try:
        return merge_override(message, override)
    except OverrideError as exc:
        raise CompileError(path, str(exc)) from None


# -- EDS -------------------------------------------------------------------------------


_PRIORITY_SITE = operator.itemgetter(6, 3)  # MemberView.priority, MemberView.site
#: Member states sent with an EDS health status (others are sent without one).
_STATUS: dict[Any, int] = {
    **dict.fromkeys(_DRAINING, health_check_pb2.DRAINING),
    **dict.fromkeys(_DEGRADED, health_check_pb2.DEGRADED),
}


def build_load_assignment(view: ClusterView[ClusterSpec],
                          resolved: Mapping[str, tuple[str, ...]] | None = None,
                          released: frozenset[str] = frozenset(),
                          ) -> endpoint_pb2.ClusterLoadAssignment:
    """Endpoints by (priority, site). The member is the endpoint's hostname and its site
    the locality zone, so Envoy's /clusters and config_dump name both.

    A member whose address is a host name gets one endpoint per address in
    ``resolved`` (same priority, weight and state; the name in the endpoint's
    ``meshxl`` metadata), and none while it has not resolved. ``released``: members
    sent ``HEALTHY``, so Envoy honours no pin to them (:mod:`meshxl.xds.stepdown`);
    in a pinned high-availability cluster also every member behind the first tier."""
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=view.name)
    if not view.spec.priority_spillover:
        cla.policy.overprovisioning_factor.value = _NO_SPILLOVER_FACTOR
    advertised = [m for m in view.members if m.state in _ADVERTISED]
    advertised.sort(key=_PRIORITY_SITE)
    spec = view.spec
    if advertised and spec.high_availability and spec.stickiness is not None \
            and spec.stickiness.pin is not None:
        # High availability: outside a probe (its standby shares the active's tier) only
        # the active's tier keeps pins (meshxl.xds.stepdown, "Pins in high availability").
        first = advertised[0].priority
        released = released | {m.name for m in advertised if m.priority > first}
    add: Any = None
    last_priority, last_site = -1, None
    # Unpacking the view tuple is several times cheaper than attribute access, and this
    # loop runs once per endpoint of the whole mesh.
    resolved = resolved or {}
    gaps = False
    hc = view.spec.health_check
    side_port = hc.port if hc.enabled else None
    for name, address, port, site, _, state, priority, lb_weight, _, _ in advertised:
        if priority != last_priority or site != last_site:
            last_priority, last_site = priority, site
            group = cla.endpoints.add(priority=priority)
            group.locality.zone = site
            add = group.lb_endpoints.add
        status = _STATUS.get(state)
        if status is None and name in released:
            status = _RELEASED
        if is_ip_literal(address):
            ep = add(health_status=status) if status is not None else add()
            endpoint = ep.endpoint
            endpoint.hostname = name
            sock = endpoint.address.socket_address
            sock.address = address
            sock.port_value = port  # protocol: TCP, the default
            ep.load_balancing_weight.value = lb_weight
            if side_port is not None:
                endpoint.health_check_config.port_value = side_port
            continue
        ips = resolved.get(address, ())
        gaps = gaps or not ips
        for ip in ips:
            ep = add(health_status=status) if status is not None else add()
            endpoint = ep.endpoint
            endpoint.hostname = name
            sock = endpoint.address.socket_address
            sock.address = ip
            sock.port_value = port
            ep.load_balancing_weight.value = lb_weight
            if side_port is not None:
                endpoint.health_check_config.port_value = side_port
            ep.metadata.filter_metadata["meshxl"].fields["address"].string_value = address
    # A (priority, site) group whose members have no address yet is left out: Envoy
    # refuses nothing about it, but the priorities must stay dense.
    return _dense(cla) if gaps else cla


def _dense(cla: endpoint_pb2.ClusterLoadAssignment) -> endpoint_pb2.ClusterLoadAssignment:
    if all(group.lb_endpoints for group in cla.endpoints):
        return cla
    groups = [g for g in cla.endpoints if g.lb_endpoints]
    out = endpoint_pb2.ClusterLoadAssignment(cluster_name=cla.cluster_name)
    out.policy.CopyFrom(cla.policy)
    if not cla.HasField("policy"):
        out.ClearField("policy")
    ranks = {p: i for i, p in enumerate(sorted({g.priority for g in groups}))}
    for group in groups:
        added = out.endpoints.add()
        added.CopyFrom(group)
        added.priority = ranks[group.priority]
    return out


# -- LDS / RDS ---------------------------------------------------------------------------


STATEFUL_SESSION = "envoy.filters.http.stateful_session"


def build_listener(name: str, address: str, port: int, telemetry: Telemetry | None = None,
                   *, pinned: bool = False, websocket: bool = False,
                   generation: str = "", access_log: AccessLog | None = None,
                   ) -> listener_pb2.Listener:
    """``pinned``: some route of the listener pins sessions, so the HCM runs Envoy's
    stateful session filter (inactive by itself: each pinned route configures it).
    ``websocket``: some cluster of the listener allows WebSocket upgrades.
    ``generation``: the drain generation (:func:`meshxl.xds.protocols.drain_generation`).
    ``access_log``: every upstream attempt's entry, streamed to the control plane
    (:mod:`meshxl.xds.alsconfig`)."""
    filters = [hcm_pb2.HttpFilter(name="envoy.filters.http.router",
                                  typed_config=_any(upstream_router(access_log)))]
    if pinned:
        filters.insert(0, hcm_pb2.HttpFilter(
            name=STATEFUL_SESSION,
            typed_config=_any(stateful_session_pb2.StatefulSession())))
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=name,
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        rds=hcm_pb2.Rds(config_source=_ADS, route_config_name=name),
        http_filters=filters,
    )
    listener_protocols(hcm, websocket)
    if telemetry is not None and telemetry.tracing:
        trace(hcm, telemetry)
    listener = listener_pb2.Listener(name=name)
    listener.address.socket_address.address = address
    listener.address.socket_address.port_value = port
    listener.filter_chains.append(listener_components_pb2.FilterChain(filters=[
        listener_components_pb2.Filter(name="envoy.filters.network.http_connection_manager",
                                       typed_config=_any(hcm)),
    ]))
    mark_generation(listener.filter_chains[0], generation)
    return listener


def build_route_config(name: str, specs: list[ClusterSpec],
                       paths: Mapping[str, str] | None = None,
                       route: Callable[[ClusterSpec, str], route_components_pb2.Route]
                       | None = None) -> route_pb2.RouteConfiguration:
    """One route configuration per listener.

    Envoy allows a domain in one virtual host only, while clusters may share a
    domain under different prefixes: routes are collected per domain, and domains
    with identical routes share a virtual host. ``route`` builds a cluster's route
    (default :func:`build_route`; the compiler's copies one per shape).
    """
    route = route or build_route
    per_domain: dict[str, list[ClusterSpec]] = {}
    for spec in specs:
        for domain in dict.fromkeys(spec.route.domains):
            per_domain.setdefault(domain, []).append(spec)
    groups: dict[tuple[str, ...], list[str]] = {}
    for domain, members in per_domain.items():
        # Longest prefix first: Envoy takes the first matching route.
        ordered = sorted(members, key=lambda s: -len(s.route.prefix))
        groups.setdefault(tuple(s.name for s in ordered), []).append(domain)
    by_name = {spec.name: spec for spec in specs}
    rc = route_pb2.RouteConfiguration(name=name)
    for i, (cluster_names, domains) in enumerate(groups.items()):
        vhost = rc.virtual_hosts.add(name=f"{name}_{i}", domains=domains)
        for cluster_name in cluster_names:
            spec = by_name[cluster_name]
            path = (paths or {}).get(cluster_name, "cluster")
            plain = route(spec, path)
            if has_upgrade_cluster(spec):
                vhost.routes.append(build_upgrade_route(plain))
            if has_event_stream_route(spec):
                vhost.routes.append(build_event_stream_route(plain))
            vhost.routes.append(plain)
    return rc


def _hash_header(hp: Any, st: Stickiness) -> None:
    hp.header.header_name = st.header or ""


def _hash_cookie(hp: Any, st: Stickiness) -> None:
    assert st.cookie is not None
    hp.cookie.name = st.cookie.name
    hp.cookie.path = st.cookie.path
    hp.cookie.ttl.CopyFrom(_dur(st.cookie.ttl))


def _hash_source_ip(hp: Any, st: Stickiness) -> None:
    hp.connection_properties.source_ip = True


def _pin_cookie(pin: Pin) -> tuple[str, Message]:
    assert pin.cookie is not None
    state = cookie_pb2.CookieBasedSessionState()
    state.cookie.name = pin.cookie.name
    state.cookie.path = pin.cookie.path
    state.cookie.ttl.CopyFrom(_dur(pin.cookie.ttl))
    return "envoy.http.stateful_session.cookie", state


def _pin_header(pin: Pin) -> tuple[str, Message]:
    return "envoy.http.stateful_session.header", header_pb2.HeaderBasedSessionState(
        name=pin.header or "")


#: Where a pin travels -> Envoy's session state extension (name, config).
_PIN_STATES: dict[PinCarrier, Callable[[Pin], tuple[str, Message]]] = {
    "cookie": _pin_cookie,
    "header": _pin_header,
}


def pin_config(pin: Pin) -> stateful_session_pb2.StatefulSessionPerRoute:
    """The stateful session filter's configuration for one pinned route."""
    name, state = choose(_PIN_STATES, pin.carrier, "pin carrier")(pin)
    config = stateful_session_pb2.StatefulSession(strict=pin.strict)
    config.session_state.name = name
    config.session_state.typed_config.Pack(state)
    return stateful_session_pb2.StatefulSessionPerRoute(stateful_session=config)


#: Stickiness key -> the route's hash policy (a ``RouteAction.HashPolicy``).
_HASH_POLICIES: dict[HashKey, Callable[[Any, Stickiness], None]] = {
    "header": _hash_header,
    "cookie": _hash_cookie,
    "source_ip": _hash_source_ip,
}


def build_route(spec: ClusterSpec, path: str = "cluster") -> route_components_pb2.Route:
    route = route_components_pb2.Route(name=spec.name)
    route.match.prefix = spec.route.prefix
    action = route.route
    action.cluster = spec.name
    action.timeout.CopyFrom(_dur(spec.route.timeout))
    st = spec.stickiness
    if st is not None:
        hp = action.hash_policy.add()
        choose(_HASH_POLICIES, st.key, "stickiness key")(hp, st)
        hp.terminal = True
        if st.pin is not None:
            route.typed_per_filter_config[STATEFUL_SESSION].Pack(pin_config(st.pin))
    route_protocol(route, spec)

    r = spec.retries
    if r.attempts > 0:
        rp = action.retry_policy
        rp.retry_on = ",".join(r.retry_on)
        rp.num_retries.value = r.attempts
        if r.per_try_timeout > 0:
            rp.per_try_timeout.CopyFrom(_dur(r.per_try_timeout))
        rp.retry_back_off.base_interval.CopyFrom(_dur(r.backoff_base))
        rp.retry_back_off.max_interval.CopyFrom(_dur(r.backoff_max))
        if r.previous_hosts:
            rp.retry_host_predicate.append(route_components_pb2.RetryPolicy.RetryHostPredicate(
                name="envoy.retry_host_predicates.previous_hosts",
                typed_config=_any(previous_hosts_pb2.PreviousHostsPredicate()),
            ))
            # A consistent hash picks the same dead member again unless Envoy may re-pick.
            rp.host_selection_retry_max_attempts = r.host_selection_max_attempts
        previous_priorities = r.previous_priorities
        if previous_priorities is None:
            previous_priorities = spec.high_availability
        if previous_priorities:
            rp.retry_priority.CopyFrom(route_components_pb2.RetryPolicy.RetryPriority(
                name="envoy.retry_priorities.previous_priorities",
                typed_config=_any(previous_priorities_config_pb2.PreviousPrioritiesConfig(
                    update_frequency=1)),
            ))
    if spec.overrides.route:
        route = _merge(route, spec.overrides.route, f"{path}.overrides.route")
    return route


__all__ = [
    "STATEFUL_SESSION", "CompileError", "build_cluster", "build_listener",
    "build_load_assignment", "build_route", "build_route_config", "listener_name",
    "pin_config", "placed_by_tier", "upgrades_eject_on_local_origin",
]
