"""Istio objects for a meshxl model (pure): istiod stays the control plane.

Each meshxl cluster is a Kubernetes Service (same name) whose pods run the statesync
sidecar. For each one this renders:

* a ``DestinationRule`` (networking.istio.io/v1): consistent hashing
  (``httpHeaderName`` / ``httpCookie`` / ``useSourceIp`` with ``maglev`` or
  ``ringHash``), outlier detection, the retry budget, the connect timeout, and the
  failover order of sites and members as ``localityLbSetting``;
* an ``EnvoyFilter`` (networking.istio.io/v1alpha3) for what a DestinationRule cannot
  say: the route's retry policy with the ``previous_hosts`` host predicate (Istio drops
  it from its default retry policy when the destination uses consistent hashing),
  ``host_selection_retry_max_attempts`` and the ``previous_priorities`` retry priority;
  and the cluster's active health checks and panic threshold; for pinned sessions
  (``stickiness.pin``) Envoy's stateful session filter in the client's outbound HTTP
  connection manager, its per-route configuration and the cluster's
  ``override_host_status``, exactly as meshxl's own xDS sends them (Istio's
  ``istio.io/persistent-session`` Service labels cannot say strict mode, the cookie's
  TTL or a path, and keep draining members' pins: docs/istio.md).

Failover order. Istio computes EDS priorities itself. With ``failoverPriority:
["label=value", ...]`` the priority of an endpoint depends only on its own labels, so
every proxy sees the same priorities and consistent hashing sends a session to the same
member from every client (region ``failover`` is relative to each client:
docs/istio.md). A label chain stops at its first mismatch. Load sharing over sites
orders by the site label (``meshxl.io/site=SITE``). High availability orders by the role
labels that ``meshxl istio label`` keeps on the member pods from meshxl's own view
(registrations, readiness, ``member down``, ``site offline``):
``meshxl.io/serving=true``, ``meshxl.io/preferred=true``, ``meshxl.io/role=active`` put
the active member at priority 0, the standby at 1, the other serving members at 2 and
drained or unready members last (3). In a pinned cluster the labeler also marks drained
members with istiod's draining label (``istio.io/draining``): istiod then leaves them
out of EDS, so their pinned sessions move as they do under meshxl's own xDS (a pin
outlives a mere change of priority). A load-sharing cluster whose degraded members move
(``degradation.action: move``) puts ``meshxl.io/serving=true`` first: the labeler takes
it off a member judged degraded (or drained), which goes behind its peers at once, and
marks it draining too when the cluster pins sessions (:func:`.labels.sick_entry`).
Virtual systems: the same, per VS, on the pods of its pool (:mod:`.pools`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from msgspec.structs import replace

from meshxl import __version__
from meshxl.errors import InputError
from meshxl.model import ClusterSpec, ModelSpec, RuntimeState, cluster_view
from meshxl.model.spec import (
    DEFAULT_SITE,
    Algorithm,
    HashKey,
    Stickiness,
    choose,
)
from meshxl.protowire import type_url

from .credentials import ANNOTATION as CREDENTIALS_EPOCH
from .durations import duration, proto_duration
from .endpoints import (
    EndpointSource,
    XdsClientTls,
    eds_patch,
    source_warnings,
    xds_destination_rule,
    xds_target,
)
from .labels import (
    DEFAULT_SITE_LABEL,
    HA_FAILOVER_PRIORITY,
    SERVING_LABEL,
    istio_session_labels,
    session_label_problem,
    sick_entry,
    vs_failover_priority,
    vs_label_keys,
)
from .pins import PIN_TARGETS, STATEFUL_SESSION, pin_of, pin_per_route
from .pools import pool_problems, pool_service, pools_with_systems, vs_service
from .protocols import health_check_patch, protocol_warnings, route_protocol_patch
from .versions import DEFAULT_ISTIO, limit_retries, retry_cap_warning, too_old

__all__ = ["PIN_TARGETS", "IstioOptions", "IstioRenderError", "Rendered", "pin_filter_name",
           "render_cluster", "render_model", "service_ports"]

_DR_API = "networking.istio.io/v1"
_EF_API = "networking.istio.io/v1alpha3"
_PREVIOUS_PRIORITIES = ("envoy.extensions.retry.priority.previous_priorities.v3."
                        "PreviousPrioritiesConfig")


class IstioRenderError(InputError):
    """A model (or option) Istio cannot express; the message names the cluster."""


@dataclass(frozen=True)
class IstioOptions:
    namespace: str = "default"
    """Namespace of the Services (and of the DestinationRules)."""
    cluster_domain: str = "cluster.local"
    root_namespace: str = "istio-system"
    """Istio's root namespace (kept for callers; EnvoyFilters go to ``filter_namespace``)."""
    filter_namespace: str | None = None
    """Where the EnvoyFilters go: default the Services' namespace (its sidecars only);
    the root namespace makes them mesh-wide."""
    client_selector: Mapping[str, str] = field(default_factory=dict)
    """workloadSelector labels of the client sidecars the EnvoyFilters patch."""
    ports: Mapping[str, int] = field(default_factory=dict)
    """Service port per meshxl cluster ("*" for all); default: the Service's port from
    ``services``, else the cluster's listener port."""
    services: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Kubernetes Service objects by name (from ``kubectl get svc -o yaml``), optional:
    the port then comes from (and is checked against) the Service."""
    site_label: str = DEFAULT_SITE_LABEL
    site_failover: Literal["priority", "region"] = "priority"
    """priority: failoverPriority on the site label (the same for every client);
    region: sites are Kubernetes regions and Istio's region ``failover`` is used."""
    endpoints: EndpointSource = "istiod"
    """meshxl: the client sidecars take the clusters' endpoints (weights, priorities)
    from meshxl's xDS server at ``xds_address`` (:mod:`.endpoints`)."""
    xds_address: str | None = None
    xds_tls: XdsClientTls | None = None
    """The EDS streams over mutual TLS with the sidecar's Istio certificate (``--xds-tls``)."""
    istio_version: tuple[int, int] = DEFAULT_ISTIO
    """The (major, minor) Istio the objects are for: what it lacks is left out, and
    what it has instead is used, with a warning (``--istio-version``)."""


@dataclass(frozen=True)
class Rendered:
    objects: list[dict[str, Any]]
    warnings: list[str]


def _host(name: str, options: IstioOptions) -> str:
    return f"{name}.{options.namespace}.svc.{options.cluster_domain}"


def service_ports(service: Mapping[str, Any]) -> list[tuple[int, Any]]:
    """(port, targetPort) of a Service object; malformed entries are skipped."""
    spec = service.get("spec")
    ports = spec.get("ports") if isinstance(spec, Mapping) else None
    out: list[tuple[int, Any]] = []
    for entry in ports if isinstance(ports, list) else []:
        if isinstance(entry, Mapping) and isinstance(entry.get("port"), int):
            out.append((entry["port"], entry.get("targetPort", entry["port"])))
    return out


def _port(spec: ClusterSpec, options: IstioOptions) -> int:
    """The Service port the EnvoyFilter matches: Istio names its outbound cluster and
    virtual host after the Service port, never after the pods' target port."""
    given = options.ports.get(spec.name, options.ports.get("*"))
    service = options.services.get(spec.name)
    if service is not None:
        ports = service_ports(service)
        numbers = [p for p, _ in ports]
        if given is not None:
            if given not in numbers:
                raise IstioRenderError(
                    f"cluster {spec.name}: Service {spec.name} has no port {given} (its "
                    f"ports: {', '.join(map(str, numbers)) or 'none'}); the EnvoyFilter "
                    "would match nothing. Give one of the Service's ports (not a target "
                    "port)")
            return given
        if len(numbers) == 1:
            return numbers[0]
        raise IstioRenderError(
            f"cluster {spec.name}: Service {spec.name} has "
            f"{'ports ' + ', '.join(map(str, numbers)) if numbers else 'no ports'}; "
            f"choose one (--port {spec.name}=PORT)")
    if given is not None:
        return given
    if spec.listener is not None:
        return spec.listener.port
    raise IstioRenderError(f"cluster {spec.name}: no listener port in the model; give its "
                           f"Service port (--port {spec.name}=PORT)")


def _labels(spec: ClusterSpec) -> dict[str, str]:
    return {"app.kubernetes.io/managed-by": "meshxl", "meshxl.io/cluster": spec.name}


def _load_balancer(spec: ClusterSpec) -> dict[str, Any]:
    st = spec.stickiness
    if st is None:
        if spec.warmup > 0:  # Envoy's slow start; istiod's EDS cannot ramp a hash
            return {"simple": "LEAST_REQUEST",
                    "warmup": {"duration": duration(spec.warmup), "minimumPercent": 10}}
        return {"simple": "LEAST_REQUEST"}
    hashing: dict[str, Any] = {}
    hashing.update(choose(_ISTIO_HASH_KEYS, st.key, "stickiness key")(st))
    hashing.update(choose(_ISTIO_ALGORITHMS, st.algorithm, "stickiness algorithm")(st))
    return {"consistentHash": hashing}


def _cookie(st: Stickiness) -> dict[str, Any]:
    assert st.cookie is not None
    return {"httpCookie": {"name": st.cookie.name, "path": st.cookie.path,
                           "ttl": duration(st.cookie.ttl)}}


#: Stickiness key -> DestinationRule ``consistentHash`` key.
_ISTIO_HASH_KEYS: dict[HashKey, Callable[[Stickiness], dict[str, Any]]] = {
    "header": lambda st: {"httpHeaderName": st.header},
    "cookie": _cookie,
    "source_ip": lambda st: {"useSourceIp": True},
}
#: Stickiness algorithm -> DestinationRule ``consistentHash`` algorithm settings.
_ISTIO_ALGORITHMS: dict[Algorithm, Callable[[Stickiness], dict[str, Any]]] = {
    "maglev": lambda st: {"maglev": {"tableSize": st.maglev_table_size}},
    "ring_hash": lambda st: {"ringHash": {"minimumRingSize": st.ring_minimum_size}},
}
#: Stickiness algorithm -> what the EnvoyFilter's cluster patch adds (DestinationRule
#: has no field for it).
_ALGORITHM_PATCHES: dict[Algorithm, Callable[[Stickiness], dict[str, Any]]] = {
    "maglev": lambda st: {},
    "ring_hash": lambda st: {"ring_hash_lb_config": {"maximum_ring_size":
                                                      st.ring_maximum_size}},
}


def pin_filter_name(spec: ClusterSpec, options: IstioOptions) -> str:
    """The name of the cluster's stateful session filter in the client's HTTP connection
    manager. One per pinned cluster, not Envoy's default name: clusters sharing a port
    share a connection manager (each filter acts only on the routes configured under its
    name), and istiod's own empty filter (PILOT_ENABLE_PERSISTENT_SESSION_FILTER) carries
    the default name."""
    return f"meshxl.pin.{options.namespace}.{spec.name}"


def _site_ranks(spec: ClusterSpec) -> dict[str, int]:
    return {s.name: (s.failover_rank if s.failover_rank is not None else i)
            for i, s in enumerate(spec.sites)} or {DEFAULT_SITE: 0}


def _site_chain(spec: ClusterSpec, options: IstioOptions,
                warnings: list[str]) -> list[str]:
    """The failoverPriority chain of a load-sharing cluster over sites."""
    ranks = _site_ranks(spec)
    distinct = sorted(set(ranks.values()))
    if len(distinct) <= 1:
        return []
    first = [site for site, rank in ranks.items() if rank == distinct[0]]
    if len(first) > 1:
        raise IstioRenderError(
            f"cluster {spec.name}: sites {', '.join(first)} share the first failover "
            "rank and other sites follow; Istio's failoverPriority matches one label "
            "value per level, so give the first rank a single site or give every site "
            "the same rank")
    if len(distinct) > 2:
        later = [site for site, rank in ranks.items() if rank != distinct[0]]
        warnings.append(f"cluster {spec.name}: sites {', '.join(later)} share Istio "
                        "priority 1 (a failoverPriority chain puts every site after the "
                        "first in one tier)")
    return [f"{options.site_label}={first[0]}"]


def _ha_chain(spec: ClusterSpec, warnings: list[str]) -> list[str]:
    """High availability: the role labels ``meshxl istio label`` maintains."""
    if spec.members:
        view = cluster_view(replace(spec, membership="static"), RuntimeState())
        tiers = {m.priority for m in view.members}
        if len(tiers) > 3:
            warnings.append(f"cluster {spec.name}: meshxl tiers 2 to {max(tiers)} (backup "
                            "members) share Istio priority 2")
    return list(HA_FAILOVER_PRIORITY)


def _region_failover(spec: ClusterSpec, warnings: list[str]) -> list[dict[str, str]]:
    ranks = _site_ranks(spec)
    order = sorted(ranks, key=lambda s: (ranks[s], list(ranks).index(s)))
    if spec.stickiness is not None:
        warnings.append(
            f"cluster {spec.name}: region failover is relative to each client's "
            "region, so clients in different sites hash a session to different "
            "members (consistent hashing with locality load balancing)")
    return [{"from": site, "to": order[(i + 1) % len(order)]}
            for i, site in enumerate(order)]


def _locality(spec: ClusterSpec, options: IstioOptions, warnings: list[str],
              chain: list[str] | None = None, serving: str = SERVING_LABEL) -> dict[str, Any]:
    if chain is not None:  # a virtual system: its own role labels (pools.py)
        return {"enabled": True, "failoverPriority": chain}
    # Load sharing: degraded members behind their peers (meshxl istio label).
    sick = sick_entry(spec, serving)
    if spec.site_affinity == "local":
        if spec.high_availability:
            raise IstioRenderError(
                f"cluster {spec.name}: site_affinity local in high-availability mode has "
                "an active member per site, and the role labels Istio's failoverPriority "
                "matches are the same for every client: use load-sharing, or "
                "site_affinity global")
        # A label without a value matches the client's own: each client proxy prefers
        # endpoints whose site label equals its own, then the others.
        return {"enabled": True, "failoverPriority": [*sick, options.site_label]}
    region = options.site_failover == "region" and len(spec.sites) > 1
    if spec.high_availability:
        # The member tier comes first; with region failover Istio orders each
        # failoverPriority tier by the client's region (priority x 5 + locality).
        setting: dict[str, Any] = {"enabled": True,
                                   "failoverPriority": _ha_chain(spec, warnings)}
        if region:
            setting["failover"] = _region_failover(spec, warnings)
        return setting
    if region:
        return {"enabled": True, "failover": _region_failover(spec, warnings),
                **({"failoverPriority": sick} if sick else {})}
    chain = [*sick, *_site_chain(spec, options, warnings)]
    if not chain:
        # One tier: turn Istio's locality preference off, or each client would prefer
        # members of its own zone and hash sessions differently from the others.
        return {"enabled": False}
    return {"enabled": True, "failoverPriority": chain}


def _outlier(spec: ClusterSpec) -> dict[str, Any]:
    od = spec.outlier_detection
    return {
        "splitExternalLocalOriginErrors": True,
        "consecutiveLocalOriginFailures": od.consecutive_local_origin_failure,
        "consecutive5xxErrors": od.consecutive_5xx,
        "consecutiveGatewayErrors": od.consecutive_gateway_failure,
        "interval": duration(od.interval),
        "baseEjectionTime": duration(od.base_ejection_time),
        "maxEjectionPercent": od.max_ejection_percent,
        # Istio's panic threshold: never send traffic to members known to be down.
        "minHealthPercent": 0,
    }


def destination_rule(spec: ClusterSpec, options: IstioOptions, warnings: list[str],
                     chain: list[str] | None = None,
                     serving: str = SERVING_LABEL) -> dict[str, Any]:
    load_balancer = _load_balancer(spec)
    # Endpoints from meshxl: its priorities and weights; Istio's locality settings
    # would weigh its localities (a locality without a weight gets no traffic).
    locality = {"enabled": False} if options.endpoints == "meshxl" else \
        _locality(spec, options, warnings, chain, serving)
    load_balancer["localityLbSetting"] = locality
    policy: dict[str, Any] = {
        "loadBalancer": load_balancer,
        "connectionPool": {"tcp": {"connectTimeout": duration(spec.connect_timeout)}},
    }
    if spec.outlier_detection.enabled:
        policy["outlierDetection"] = _outlier(spec)
    elif locality.get("enabled"):
        raise IstioRenderError(
            f"cluster {spec.name}: Istio fails over between sites or members only with "
            "outlier detection; enable outlier_detection or use a single tier")
    if spec.retries.attempts > 0:
        limit_retries(policy, spec.retries, options.istio_version)
    return {
        "apiVersion": _DR_API,
        "kind": "DestinationRule",
        "metadata": {"name": f"meshxl-{spec.name}", "namespace": options.namespace,
                     "labels": _labels(spec)},
        "spec": {"host": _host(spec.name, options), "trafficPolicy": policy},
    }


def _retry_policy(spec: ClusterSpec, warnings: list[str]) -> dict[str, Any] | None:
    """The retry policy merged into the routes to the cluster.

    No ``retry_host_predicate``: a MERGE appends to that list, and Istio's default
    route (no VirtualService) already carries ``previous_hosts`` (its non-hashing
    default policy), so adding it would duplicate it. A VirtualService route gets the
    predicate from its own ``retries.retryIgnorePreviousHosts``, which Istio honours
    both ways (``meshxl istio check`` compares it with the model)."""
    r = spec.retries
    if r.attempts == 0:
        return None
    if not r.previous_hosts:
        warnings.append(
            f"cluster {spec.name}: retries.previous_hosts: false holds only on "
            "VirtualService routes with retries.retryIgnorePreviousHosts: false; Istio's "
            "default route always carries the previous_hosts predicate and an EnvoyFilter "
            "merge cannot remove a list entry")
    policy: dict[str, Any] = {
        "retry_on": ",".join(r.retry_on),
        "num_retries": r.attempts,
        "retry_back_off": {"base_interval": proto_duration(r.backoff_base),
                           "max_interval": proto_duration(r.backoff_max)},
        # A consistent hash re-picks the failed member unless Envoy may pick again.
        "host_selection_retry_max_attempts": r.host_selection_max_attempts,
    }
    if r.per_try_timeout > 0:
        policy["per_try_timeout"] = proto_duration(r.per_try_timeout)
    previous_priorities = r.previous_priorities
    if previous_priorities is None:
        previous_priorities = spec.high_availability
    if previous_priorities:
        policy["retry_priority"] = {
            "name": "envoy.retry_priorities.previous_priorities",
            "typed_config": {"@type": type_url(_PREVIOUS_PRIORITIES),
                             "update_frequency": 1},
        }
    return policy


def _cluster_patch(spec: ClusterSpec, options: IstioOptions) -> dict[str, Any]:
    value: dict[str, Any] = {
        "common_lb_config": {"healthy_panic_threshold": {"value": 0},
                             # Envoy batches health changes for 1 s by default.
                             "update_merge_window": proto_duration(0)},
    }
    st = spec.stickiness
    if st is not None:
        value.update(choose(_ALGORITHM_PATCHES, st.algorithm, "stickiness algorithm")(st))
    if st is not None and st.pin is not None:
        value["common_lb_config"]["override_host_status"] = {"statuses": list(PIN_TARGETS)}
    if st is not None and st.balance_factor is not None:
        # DestinationRule has no bounded-load setting: patch Envoy's own field.
        value["common_lb_config"]["consistent_hashing_lb_config"] = {
            "hash_balance_factor": round(st.balance_factor * 100)}
    hc = spec.health_check
    if hc.enabled:
        # Istio drops an unready pod from EDS; without this Envoy keeps a removed host
        # as long as its active health check passes, and the pod keeps its traffic.
        value["ignore_health_on_host_removal"] = True
        value["health_checks"] = [{
            "timeout": proto_duration(hc.timeout),
            "interval": proto_duration(hc.interval),
            "healthy_threshold": hc.healthy_threshold,
            "unhealthy_threshold": hc.unhealthy_threshold,
            "no_traffic_interval": proto_duration(hc.no_traffic_interval),
            "unhealthy_interval": proto_duration(hc.unhealthy_interval),
            "unhealthy_edge_interval": proto_duration(hc.unhealthy_edge_interval),
            "healthy_edge_interval": proto_duration(hc.healthy_edge_interval),
            **health_check_patch(spec),  # HTTP GET, grpc.health.v1 or a TCP connect
        }]
    if spec.long_lived:
        value["close_connections_on_host_health_failure"] = True
    if options.endpoints == "meshxl":
        value.update(eds_patch(spec, xds_target(options.xds_address), options.xds_tls))
    return value


def envoy_filter(spec: ClusterSpec, options: IstioOptions,
                 warnings: list[str] | None = None) -> dict[str, Any]:
    warnings = [] if warnings is None else warnings
    host, port = _host(spec.name, options), _port(spec, options)
    patches: list[dict[str, Any]] = []
    route: dict[str, Any] = {}
    retry = _retry_policy(spec, warnings) if spec.protocol != "tcp" else None
    if retry is not None:
        route["route"] = {"retry_policy": retry}
    if spec.protocol != "tcp" and route_protocol_patch(spec):
        route.setdefault("route", {}).update(route_protocol_patch(spec))
    pin = pin_of(spec)
    if pin is not None:
        route["typed_per_filter_config"] = {pin_filter_name(spec, options):
                                            pin_per_route(pin)}
    if route:
        patches.append({
            "applyTo": "HTTP_ROUTE",
            # Only routes whose action is a route (to this Service's virtual host): a
            # merge into a redirect or direct response would make a route action with
            # no cluster, and Envoy would reject the proxy's whole RDS update.
            "match": {"context": "SIDECAR_OUTBOUND",
                      "routeConfiguration": {"vhost": {"name": f"{host}:{port}",
                                                       "route": {"action": "ROUTE"}}}},
            "patch": {"operation": "MERGE", "value": route},
        })
    patches.append({
        "applyTo": "CLUSTER",
        "match": {"context": "SIDECAR_OUTBOUND",
                  "cluster": {"service": host, "portNumber": port}},
        "patch": {"operation": "MERGE", "value": _cluster_patch(spec, options)},
    })
    if pin is not None:
        # The filter in the outbound HTTP connection manager of the Service port (shared
        # by every Service on that port): inert on routes without its configuration.
        patches.append({
            "applyTo": "HTTP_FILTER",
            "match": {"context": "SIDECAR_OUTBOUND", "listener": {
                "portNumber": port,
                "filterChain": {"filter": {
                    "name": "envoy.filters.network.http_connection_manager",
                    "subFilter": {"name": "envoy.filters.http.router"}}}}},
            "patch": {"operation": "INSERT_BEFORE", "value": {
                "name": pin_filter_name(spec, options),
                "typed_config": {"@type": type_url(f"{STATEFUL_SESSION}StatefulSession")}}},
        })
    filter_spec: dict[str, Any] = {}
    if options.client_selector:
        filter_spec["workloadSelector"] = {"labels": dict(options.client_selector)}
    filter_spec["configPatches"] = patches
    namespace = options.filter_namespace or options.namespace
    metadata: dict[str, Any] = {"name": f"meshxl-{options.namespace}-{spec.name}",
                                "namespace": namespace, "labels": _labels(spec)}
    if options.endpoints == "meshxl" and options.xds_tls is not None:
        # meshxl istio label moves it on, and the source's epoch with it (credentials.py).
        metadata["annotations"] = {CREDENTIALS_EPOCH: "0"}
    return {"apiVersion": _EF_API, "kind": "EnvoyFilter", "metadata": metadata,
            "spec": filter_spec}


def _dropped_weights(spec: ClusterSpec) -> list[str]:
    notes = []
    weighted = [m.name for m in spec.members if m.weight != 100]
    if weighted:
        notes.append(f"member weights ({', '.join(weighted)})")
    sites = [s.name for s in spec.sites if s.weight != 100]
    if sites:
        notes.append(f"site weights ({', '.join(sites)})")
    return notes


def render_cluster(spec: ClusterSpec, options: IstioOptions,
                   chain: list[str] | None = None, serving: str = SERVING_LABEL) -> Rendered:
    """``chain``: the failoverPriority of a high-availability virtual system;
    ``serving``: the serving label of a load-sharing one (:func:`.labels.sick_entry`)."""
    warnings: list[str] = []
    objects = [destination_rule(spec, options, warnings, chain, serving),
               envoy_filter(spec, options, warnings)]
    if not spec.high_availability and spec.degradation.action == "move" \
            and not spec.outlier_detection.enabled and options.endpoints == "istiod":
        warnings.append(f"cluster {spec.name}: without outlier detection Istio ignores "
                        "failoverPriority, so a degraded member is not put behind its "
                        "peers (degradation.action: move)")
    dropped = _dropped_weights(spec) if options.endpoints == "istiod" else []
    if dropped:
        warnings.append(f"cluster {spec.name}: {' and '.join(dropped)} are not rendered: "
                        "Istio weighs endpoints itself")
    service = options.services.get(spec.name)
    problem = session_label_problem(spec, istio_session_labels(service)) \
        if service is not None else None
    if problem is not None:
        warnings.append(f"cluster {spec.name}: {problem}")
    warnings += protocol_warnings(spec, service, _port(spec, options))
    return Rendered(objects, warnings)


def _render_pools(model: ModelSpec, options: IstioOptions, warnings: list[str]
                  ) -> list[dict[str, Any]]:
    """Per pool with virtual systems its headless Service, then per VS a Service over
    the pool's pods and its cluster's objects, failing over on the VS's role labels."""
    objects: list[dict[str, Any]] = []
    for pool, specs in pools_with_systems(model):
        problems, notes = pool_problems(model, pool, specs)
        if problems:
            raise IstioRenderError("; ".join(problems))
        warnings += notes
        objects.append(pool_service(pool, options))
        for spec in specs:
            chain = vs_failover_priority(spec.name) if spec.high_availability else None
            rendered = render_cluster(spec, options, chain, vs_label_keys(spec.name)[0])
            service = vs_service(spec.name, pool, _port(spec, options), spec.protocol, options)
            objects += [service, *rendered.objects]
            warnings += [w for w in rendered.warnings if chain is None or "weights" not in w]
    return objects


def render_model(model: ModelSpec, options: IstioOptions | None = None) -> Rendered:
    """A DestinationRule and an EnvoyFilter per cluster, in model order; for virtual
    systems their Services too (docs/vsls.md, "Istio and Kubernetes")."""
    options = options or IstioOptions()
    old = too_old(options.istio_version)
    if old is not None:
        raise IstioRenderError(old)
    unknown = sorted(set(options.ports) - {c.name for c in model.clusters} - {"*"})
    if unknown:
        raise IstioRenderError(f"--port names clusters not in the model: {', '.join(unknown)}")
    warnings: list[str] = []
    if options.filter_namespace == options.root_namespace and not options.client_selector:
        warnings.append(f"EnvoyFilters in the root namespace {options.root_namespace} "
                        "without a client selector patch every sidecar of the mesh: each "
                        "one that has a cluster's route health-checks its members")
    if options.endpoints == "meshxl":
        warnings += source_warnings(xds_target(options.xds_address), options.xds_tls,
                                    options.filter_namespace or options.namespace,
                                    options.root_namespace)
    objects: list[dict[str, Any]] = []
    for spec in model.clusters:
        if spec.name not in model.virtual_names:
            rendered = render_cluster(spec, options)
            objects += rendered.objects
            warnings += rendered.warnings
    objects += _render_pools(model, options, warnings)
    if options.endpoints == "meshxl" and options.xds_tls is not None:
        objects += filter(None, [xds_destination_rule(
            xds_target(options.xds_address), options.xds_tls,
            options.filter_namespace or options.namespace, options.cluster_domain,
            options.root_namespace)])
    capped = retry_cap_warning(options.istio_version, [
        o["metadata"]["name"] for o in objects if o["kind"] == "DestinationRule"
        and "http" in o["spec"].get("trafficPolicy", {}).get("connectionPool", {})])
    warnings += [capped] if capped else []
    for obj in objects:
        obj["metadata"].setdefault("annotations", {})["meshxl.io/generated-by"] = \
            f"meshxl {__version__}"
    return Rendered(objects, warnings)
