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
  and the cluster's active health checks and panic threshold.

Failover order. Istio computes EDS priorities itself. With
``failoverPriority: ["label=value", ...]`` the priority of an endpoint depends only on
its own labels, so every proxy sees the same priorities and consistent hashing sends a
session to the same member from every client. (Region-based ``failover`` and Istio's
default locality preference are relative to each client's locality: two clients in
different sites then hash the same session to different members; ``site_failover=
"region"`` renders that form anyway, with a warning.) A label chain stops at its first
mismatch, so it expresses: the first site (``meshxl.io/site=SITE``), then inside it
the active member (``statefulset.kubernetes.io/pod-name=MEMBER``), then everyone else.
Shapes that need more levels are rendered with the lower tiers merged and a warning;
shapes whose *active* tier cannot be expressed are an error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from meshxl import __version__
from meshxl.model import ClusterSpec, ModelSpec, RuntimeState, cluster_view
from meshxl.model.spec import DEFAULT_SITE

__all__ = [
    "DEFAULT_MEMBER_LABEL", "DEFAULT_SITE_LABEL", "IstioOptions", "IstioRenderError",
    "Rendered", "render_cluster", "render_model",
]

DEFAULT_SITE_LABEL = "meshxl.io/site"
#: Set by the StatefulSet controller on every pod: the member name is the pod name.
DEFAULT_MEMBER_LABEL = "statefulset.kubernetes.io/pod-name"
_DR_API = "networking.istio.io/v1"
_EF_API = "networking.istio.io/v1alpha3"
_PREVIOUS_HOSTS = "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
_PREVIOUS_PRIORITIES = ("envoy.extensions.retry.priority.previous_priorities.v3."
                        "PreviousPrioritiesConfig")


class IstioRenderError(ValueError):
    """A model (or option) Istio cannot express; the message names the cluster."""


@dataclass(frozen=True)
class IstioOptions:
    namespace: str = "default"
    """Namespace of the Services (and of the DestinationRules)."""
    cluster_domain: str = "cluster.local"
    root_namespace: str = "istio-system"
    """Istio's root namespace: EnvoyFilters there apply to every sidecar of the mesh."""
    ports: Mapping[str, int] = field(default_factory=dict)
    """Service port per meshxl cluster ("*" for all); default: the members' port."""
    site_label: str = DEFAULT_SITE_LABEL
    member_label: str = DEFAULT_MEMBER_LABEL
    site_failover: Literal["priority", "region"] = "priority"
    """priority: failoverPriority on the site label (the same for every client);
    region: sites are Kubernetes regions and Istio's region ``failover`` is used."""


@dataclass(frozen=True)
class Rendered:
    objects: list[dict[str, Any]]
    warnings: list[str]


def _duration(seconds: float) -> str:
    """A duration Istio (Go's time.ParseDuration and the CRD's CEL rules) accepts."""
    ms = round(seconds * 1000)
    if seconds > 0 and ms == 0:
        ms = 1  # Istio's CRD rejects durations under 1 ms
    if ms % 1000 == 0:
        return f"{ms // 1000}s"
    return f"{ms}ms"


def _proto_duration(seconds: float) -> str:
    """A ``google.protobuf.Duration`` in proto JSON form (EnvoyFilter patch values are
    parsed as Envoy protos, and proto JSON accepts only decimal seconds)."""
    text = f"{seconds:.9f}".rstrip("0").rstrip(".")
    return f"{text or '0'}s"


def _host(name: str, options: IstioOptions) -> str:
    return f"{name}.{options.namespace}.svc.{options.cluster_domain}"


def _port(spec: ClusterSpec, options: IstioOptions) -> int:
    port = options.ports.get(spec.name, options.ports.get("*"))
    if port is not None:
        return port
    member_ports = {m.port for m in spec.members}
    if len(member_ports) == 1:
        return member_ports.pop()
    why = "its members use different ports" if member_ports else "it lists no members"
    raise IstioRenderError(f"cluster {spec.name}: {why}; give its Service port "
                           f"(--port {spec.name}=PORT)")


def _labels(spec: ClusterSpec) -> dict[str, str]:
    return {"app.kubernetes.io/managed-by": "meshxl", "meshxl.io/cluster": spec.name}


def _load_balancer(spec: ClusterSpec) -> dict[str, Any]:
    st = spec.stickiness
    if st is None:
        return {"simple": "LEAST_REQUEST"}
    hashing: dict[str, Any] = {}
    if st.header:
        hashing["httpHeaderName"] = st.header
    elif st.cookie:
        hashing["httpCookie"] = {"name": st.cookie.name, "path": st.cookie.path,
                                 "ttl": _duration(st.cookie.ttl)}
    else:
        hashing["useSourceIp"] = True
    if st.algorithm == "maglev":
        hashing["maglev"] = {"tableSize": st.maglev_table_size}
    else:
        hashing["ringHash"] = {"minimumRingSize": st.ring_minimum_size}
    return {"consistentHash": hashing}


def _site_ranks(spec: ClusterSpec) -> dict[str, int]:
    return {s.name: (s.failover_rank if s.failover_rank is not None else i)
            for i, s in enumerate(spec.sites)} or {DEFAULT_SITE: 0}


def _istio_priority(labels: Mapping[str, str], chain: list[tuple[str, str]]) -> int:
    """Istio's failoverPriority with label=value entries: N minus the leading matches."""
    for depth, (key, value) in enumerate(chain):
        if labels.get(key) != value:
            return len(chain) - depth
    return 0


def _failover_chain(spec: ClusterSpec, options: IstioOptions,
                    warnings: list[str]) -> list[tuple[str, str]]:
    """The failoverPriority label chain for a cluster, checked against meshxl's tiers."""
    ranks = _site_ranks(spec)
    distinct = sorted(set(ranks.values()))
    chain: list[tuple[str, str]] = []
    if len(distinct) > 1:
        first = [site for site, rank in ranks.items() if rank == distinct[0]]
        if len(first) > 1:
            raise IstioRenderError(
                f"cluster {spec.name}: sites {', '.join(first)} share the first failover "
                "rank and other sites follow; Istio's failoverPriority matches one label "
                "value per level, so give the first rank a single site or give every site "
                "the same rank")
        chain.append((options.site_label, first[0]))
        if len(distinct) > 2:
            later = [site for site, rank in ranks.items() if rank != distinct[0]]
            warnings.append(f"cluster {spec.name}: sites {', '.join(later)} share Istio "
                            "priority 1 (a failoverPriority chain puts every site after the "
                            "first in one tier)")

    if spec.mode == "high-availability" and spec.members:
        view = cluster_view(spec.model_copy(update={"membership": "static"}), RuntimeState())
        active = [m for m in view.members if m.priority == 0]
        if len(active) == 1 and len(view.members) > 1:
            chain.append((options.member_label, active[0].name))
        meshxl_tier = {m.name: m.priority for m in view.members}
        istio_tier = {m.name: _istio_priority({options.site_label: m.site,
                                               options.member_label: m.name}, chain)
                      for m in view.members}
        active_names = {m.name for m in active}
        istio_active = {name for name, p in istio_tier.items() if p == 0}
        if istio_active != active_names:
            raise IstioRenderError(
                f"cluster {spec.name}: the active tier ({', '.join(sorted(active_names))}) "
                "is neither one member nor a whole first site, which Istio's "
                "failoverPriority cannot select")
        merged: dict[int, list[str]] = {}
        for name, priority in istio_tier.items():
            merged.setdefault(priority, []).append(name)
        for priority, names in sorted(merged.items()):
            tiers = {meshxl_tier[n] for n in names}
            if len(tiers) > 1:
                warnings.append(f"cluster {spec.name}: members {', '.join(names)} (meshxl "
                                f"priorities {', '.join(map(str, sorted(tiers)))}) share "
                                f"Istio priority {priority}")
        # The chain must never invert meshxl's order.
        for a in view.members:
            for b in view.members:
                if meshxl_tier[a.name] < meshxl_tier[b.name] and \
                        istio_tier[a.name] > istio_tier[b.name]:
                    raise IstioRenderError(
                        f"cluster {spec.name}: Istio would prefer {b.name} over {a.name}")
    return chain


def _locality(spec: ClusterSpec, options: IstioOptions,
              warnings: list[str]) -> dict[str, Any]:
    if options.site_failover == "region" and len(spec.sites) > 1:
        ranks = _site_ranks(spec)
        order = sorted(ranks, key=lambda s: (ranks[s], list(ranks).index(s)))
        if spec.stickiness is not None:
            warnings.append(
                f"cluster {spec.name}: region failover is relative to each client's "
                "region, so clients in different sites hash a session to different "
                "members (consistent hashing with locality load balancing)")
        return {"enabled": True,
                "failover": [{"from": site, "to": order[(i + 1) % len(order)]}
                             for i, site in enumerate(order)]}
    chain = _failover_chain(spec, options, warnings)
    if not chain:
        # One tier: turn Istio's locality preference off, or each client would prefer
        # members of its own zone and hash sessions differently from the others.
        return {"enabled": False}
    return {"enabled": True, "failoverPriority": [f"{k}={v}" for k, v in chain]}


def _outlier(spec: ClusterSpec) -> dict[str, Any]:
    od = spec.outlier_detection
    return {
        "splitExternalLocalOriginErrors": True,
        "consecutiveLocalOriginFailures": od.consecutive_local_origin_failure,
        "consecutive5xxErrors": od.consecutive_5xx,
        "consecutiveGatewayErrors": od.consecutive_gateway_failure,
        "interval": _duration(od.interval),
        "baseEjectionTime": _duration(od.base_ejection_time),
        "maxEjectionPercent": od.max_ejection_percent,
        # Istio's panic threshold: never send traffic to members known to be down.
        "minHealthPercent": 0,
    }


def destination_rule(spec: ClusterSpec, options: IstioOptions,
                     warnings: list[str]) -> dict[str, Any]:
    load_balancer = _load_balancer(spec)
    locality = _locality(spec, options, warnings)
    load_balancer["localityLbSetting"] = locality
    policy: dict[str, Any] = {
        "loadBalancer": load_balancer,
        "connectionPool": {"tcp": {"connectTimeout": _duration(spec.connect_timeout)}},
    }
    if spec.outlier_detection.enabled:
        policy["outlierDetection"] = _outlier(spec)
    elif locality.get("enabled"):
        raise IstioRenderError(
            f"cluster {spec.name}: Istio fails over between sites or members only with "
            "outlier detection; enable outlier_detection or use a single tier")
    if spec.retries.attempts > 0:
        policy["retryBudget"] = {"percent": spec.retries.budget_percent,
                                 "minRetryConcurrency": spec.retries.min_retry_concurrency}
    return {
        "apiVersion": _DR_API,
        "kind": "DestinationRule",
        "metadata": {"name": f"meshxl-{spec.name}", "namespace": options.namespace,
                     "labels": _labels(spec)},
        "spec": {"host": _host(spec.name, options), "trafficPolicy": policy},
    }


def _retry_policy(spec: ClusterSpec) -> dict[str, Any] | None:
    r = spec.retries
    if r.attempts == 0:
        return None
    policy: dict[str, Any] = {
        "retry_on": ",".join(r.retry_on),
        "num_retries": r.attempts,
        "retry_back_off": {"base_interval": _proto_duration(r.backoff_base),
                           "max_interval": _proto_duration(r.backoff_max)},
    }
    if r.per_try_timeout > 0:
        policy["per_try_timeout"] = _proto_duration(r.per_try_timeout)
    if r.previous_hosts:
        policy["retry_host_predicate"] = [{
            "name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": {"@type": f"type.googleapis.com/{_PREVIOUS_HOSTS}"},
        }]
        # A consistent hash re-picks the failed member unless Envoy may pick again.
        policy["host_selection_retry_max_attempts"] = r.host_selection_max_attempts
    previous_priorities = r.previous_priorities
    if previous_priorities is None:
        previous_priorities = spec.mode == "high-availability"
    if previous_priorities:
        policy["retry_priority"] = {
            "name": "envoy.retry_priorities.previous_priorities",
            "typed_config": {"@type": f"type.googleapis.com/{_PREVIOUS_PRIORITIES}",
                             "update_frequency": 1},
        }
    return policy


def _cluster_patch(spec: ClusterSpec) -> dict[str, Any]:
    value: dict[str, Any] = {
        "common_lb_config": {"healthy_panic_threshold": {"value": 0},
                             # Envoy batches health changes for 1 s by default.
                             "update_merge_window": _proto_duration(0)},
    }
    st = spec.stickiness
    if st is not None and st.algorithm == "ring_hash":
        value["ring_hash_lb_config"] = {"maximum_ring_size": st.ring_maximum_size}
    if st is not None and st.balance_factor is not None:
        # DestinationRule has no bounded-load setting: patch Envoy's own field.
        value["common_lb_config"]["consistent_hashing_lb_config"] = {
            "hash_balance_factor": round(st.balance_factor * 100)}
    hc = spec.health_check
    if hc.enabled:
        value["health_checks"] = [{
            "timeout": _proto_duration(hc.timeout),
            "interval": _proto_duration(hc.interval),
            "healthy_threshold": hc.healthy_threshold,
            "unhealthy_threshold": hc.unhealthy_threshold,
            "no_traffic_interval": _proto_duration(hc.no_traffic_interval),
            "unhealthy_interval": _proto_duration(hc.unhealthy_interval),
            "unhealthy_edge_interval": _proto_duration(hc.unhealthy_edge_interval),
            "healthy_edge_interval": _proto_duration(hc.healthy_edge_interval),
            "http_health_check": {
                "path": hc.path,
                "expected_statuses": [{"start": s, "end": s + 1}
                                      for s in sorted(set(hc.expected_statuses))],
            },
        }]
    return value


def envoy_filter(spec: ClusterSpec, options: IstioOptions) -> dict[str, Any]:
    host, port = _host(spec.name, options), _port(spec, options)
    patches: list[dict[str, Any]] = []
    retry = _retry_policy(spec)
    if retry is not None:
        patches.append({
            "applyTo": "HTTP_ROUTE",
            "match": {"context": "SIDECAR_OUTBOUND",
                      "routeConfiguration": {"vhost": {"name": f"{host}:{port}"}}},
            "patch": {"operation": "MERGE", "value": {"route": {"retry_policy": retry}}},
        })
    patches.append({
        "applyTo": "CLUSTER",
        "match": {"context": "SIDECAR_OUTBOUND",
                  "cluster": {"service": host, "portNumber": port}},
        "patch": {"operation": "MERGE", "value": _cluster_patch(spec)},
    })
    return {
        "apiVersion": _EF_API,
        "kind": "EnvoyFilter",
        "metadata": {"name": f"meshxl-{options.namespace}-{spec.name}",
                     "namespace": options.root_namespace, "labels": _labels(spec)},
        "spec": {"configPatches": patches},
    }


def render_cluster(spec: ClusterSpec, options: IstioOptions) -> Rendered:
    warnings: list[str] = []
    objects = [destination_rule(spec, options, warnings), envoy_filter(spec, options)]
    return Rendered(objects, warnings)


def render_model(model: ModelSpec, options: IstioOptions | None = None) -> Rendered:
    """A DestinationRule and an EnvoyFilter per cluster, in model order."""
    options = options or IstioOptions()
    unknown = sorted(set(options.ports) - {c.name for c in model.clusters} - {"*"})
    if unknown:
        raise IstioRenderError(f"--port names clusters not in the model: {', '.join(unknown)}")
    objects: list[dict[str, Any]] = []
    warnings: list[str] = []
    for spec in model.clusters:
        rendered = render_cluster(spec, options)
        objects += rendered.objects
        warnings += rendered.warnings
    for obj in objects:
        obj["metadata"].setdefault("annotations", {})["meshxl.io/generated-by"] = \
            f"meshxl {__version__}"
    return Rendered(objects, warnings)
