"""The compiler: the whole Envoy configuration for a model and the runtime state, and
what to reuse from its last output so a one-member change costs one cluster.

The resources themselves are built by :mod:`meshxl.xds.resources` (pure functions of a
cluster's spec and view); this module calls them per cluster, per listener and per
shape, and keeps what did not change.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from google.protobuf.message import Message

from meshxl.model import ClusterSpec, ModelSpec, Registration, RuntimeState, cluster_view
from meshxl.model.vsls import placed
from meshxl.xds import types
from meshxl.xds.alsconfig import http_access_log, measured, tcp_access_log
from meshxl.xds.protocols import build_tcp_listener, drain_generation
from meshxl.xds.resources import (
    build_cluster,
    build_listener,
    build_load_assignment,
    build_route,
    build_route_config,
    listener_name,
    upgrades_eject_on_local_origin,
)
from meshxl.xds.upgrades import build_upgrade_cluster, has_upgrade_cluster
from meshxl.xds.warmup import warmed_view

__all__ = ["ISTIO_CLUSTER_ID", "ISTIO_TLS_MATCH", "Compiler", "Resources", "compile_resources",
           "istio_mtls"]

#: The endpoint metadata key of Istio's transport socket matches (istiod sets
#: ``tlsMode: istio`` under it for pods with a sidecar).
ISTIO_TLS_MATCH = "envoy.transport_socket_match"
#: istiod's cluster id when not configured (``CLUSTER_ID``), the last part of the
#: endpoints' telemetry metadata (``serve xds --istio-cluster-id``).
ISTIO_CLUSTER_ID = "Kubernetes"


@dataclass
class Resources:
    """Envoy resources by type URL, then by resource name."""

    clusters: dict[str, cluster_pb2.Cluster] = field(default_factory=dict)
    endpoints: dict[str, endpoint_pb2.ClusterLoadAssignment] = field(default_factory=dict)
    listeners: dict[str, listener_pb2.Listener] = field(default_factory=dict)
    routes: dict[str, route_pb2.RouteConfiguration] = field(default_factory=dict)
    zones: dict[str, dict[str, endpoint_pb2.ClusterLoadAssignment]] = field(
        default_factory=dict)
    """Per site (an Envoy's locality zone), the EDS of the ``site_affinity: local``
    clusters as that site's Envoys see them; other Envoys get ``endpoints``."""

    def by_type(self) -> dict[str, Mapping[str, Message]]:
        return {
            types.CLUSTER: self.clusters,
            types.ENDPOINT: self.endpoints,
            types.LISTENER: self.listeners,
            types.ROUTE: self.routes,
        }

    def by_zone(self) -> dict[str, dict[str, Mapping[str, Message]]]:
        """Per zone, the resources its Envoys get instead (``Snapshot.build``'s zones)."""
        return {zone: {types.ENDPOINT: cla} for zone, cla in self.zones.items()}


def compile_resources(model: ModelSpec, state: RuntimeState | None = None,
                      resolved: Mapping[str, tuple[str, ...]] | None = None,
                      drained: frozenset[tuple[str, str]] = frozenset(),
                      warming: Mapping[str, Mapping[str, float]] | None = None,
                      released: Mapping[str, frozenset[str]] | None = None) -> Resources:
    """The whole Envoy configuration for a model and the runtime state; ``resolved``
    maps member addresses that are host names to their IP addresses
    (:mod:`meshxl.xds.dns`); ``drained``: the (cluster, member) pairs whose drain
    window has passed (:mod:`meshxl.xds.drains`); ``warming``: per cluster, the
    fraction of their weight the members that ramp or are judged get now
    (:mod:`meshxl.xds.warmup`, :mod:`meshxl.xds.stepdown`); ``released``: per cluster,
    the members whose pins Envoy no longer honours (:func:`meshxl.xds.stepdown.released`)."""
    return Compiler().compile(model, state, resolved, drained, warming, released)


def _listeners_of(model: ModelSpec) -> dict[tuple[str, int], list[ClusterSpec]]:
    listeners: dict[tuple[str, int], list[ClusterSpec]] = {}
    for spec in model.clusters:
        if spec.listener is not None:
            listeners.setdefault((spec.listener.address, spec.listener.port), []).append(spec)
    return listeners


def _compile_static(model: ModelSpec) -> Resources:
    """CDS and RDS: they depend on the model only, never on runtime state."""
    out = Resources()
    shapes = _Shapes()
    for i, spec in enumerate(model.clusters):
        plain = out.clusters[spec.name] = shapes.cluster(spec, f"clusters[{i}]")
        if has_upgrade_cluster(spec):  # its WebSockets' own cluster (meshxl.xds.upgrades)
            twin = build_upgrade_cluster(plain, upgrades_eject_on_local_origin(spec))
            out.clusters[twin.name] = twin
    paths = {spec.name: f"clusters[{i}]" for i, spec in enumerate(model.clusters)}
    for (address, port), specs in _listeners_of(model).items():
        if specs[0].protocol == "tcp":
            continue  # a TCP proxy listener: no routes
        name = listener_name(address, port)
        out.routes[name] = build_route_config(name, specs, paths, shapes.route)
    return out


def _compile_listeners(model: ModelSpec, drained: frozenset[tuple[str, str]],
                       ) -> dict[str, listener_pb2.Listener]:
    """LDS: from the model, and from the drains whose window has passed (a listener
    with long-lived connections to a drained member changes its drain generation)."""
    out: dict[str, listener_pb2.Listener] = {}
    http_log, tcp_log = http_access_log(), tcp_access_log()  # once per model, shared
    for (address, port), specs in _listeners_of(model).items():
        name = listener_name(address, port)
        generation = drain_generation(
            (cluster, member) for cluster, member in drained
            if any(s.name == cluster and s.long_lived for s in specs))
        if specs[0].protocol == "tcp":
            out[name] = build_tcp_listener(name, address, port, specs[0], generation,
                                           tcp_log if measured(specs) else None)
            continue
        pinned = any(s.stickiness is not None and s.stickiness.pin is not None for s in specs)
        out[name] = build_listener(name, address, port, model.telemetry, pinned=pinned,
                                   websocket=any(s.websocket_upgrades for s in specs),
                                   generation=generation,
                                   access_log=http_log if measured(specs) else None)
    return out


class Compiler:
    """:func:`compile_resources` that remembers its last output.

    The result is always what ``compile_resources(model, state)`` returns (marked for
    Istio's mutual TLS with ``istio_mtls``: :func:`istio_mtls`). While the
    model is the same object, CDS, LDS and RDS are reused, and a cluster's EDS is
    rebuilt only when its slice of the runtime state changed; reused resources are the
    same message objects, so ``Snapshot.build(..., previous=...)`` does not encode
    them again. A one-member change thus costs one cluster, not the whole mesh.
    """

    def __init__(self, *, istio_mtls: bool = False,
                 istio_cluster_id: str = ISTIO_CLUSTER_ID) -> None:
        self._istio_mtls = istio_mtls
        self._istio_cluster_id = istio_cluster_id
        self._model: ModelSpec | None = None
        self._static = Resources()
        self._endpoints: dict[tuple[str, str | None],
                              tuple[Any, endpoint_pb2.ClusterLoadAssignment]] = {}
        self._drained: frozenset[tuple[str, str]] = frozenset()

    def compile(self, model: ModelSpec, state: RuntimeState | None = None,
                resolved: Mapping[str, tuple[str, ...]] | None = None,
                drained: frozenset[tuple[str, str]] = frozenset(),
                warming: Mapping[str, Mapping[str, float]] | None = None,
                released: Mapping[str, frozenset[str]] | None = None) -> Resources:
        state = state or RuntimeState()
        model = placed(model, state)  # virtual systems: their roles for this state
        warming = warming or {}
        resolved = resolved or {}
        if model is not self._model:
            static = _compile_static(model)  # CompileError: the memo stays as it was
            static.listeners = _compile_listeners(model, drained)
            self._model, self._static, self._endpoints = model, static, {}
            self._drained = drained
        elif drained != self._drained:
            self._static.listeners = _compile_listeners(model, drained)
            self._drained = drained
        offline = frozenset(state.sites_offline)
        endpoints: dict[str, endpoint_pb2.ClusterLoadAssignment] = {}
        zones: dict[str, dict[str, endpoint_pb2.ClusterLoadAssignment]] = {}
        memo: dict[tuple[str, str | None], tuple[Any, endpoint_pb2.ClusterLoadAssignment]] = {}
        for spec in model.clusters:
            registrations = state.registrations_of(spec.name)
            inputs: tuple[Any, ...] = (registrations, state.members_down_of(spec.name),
                                       offline, state.health_of(spec.name))
            if resolved:
                inputs += (_resolved_for(spec, registrations, resolved),)
            ramp = warming.get(spec.name)
            if ramp:
                inputs += (("warmup", tuple(sorted(ramp.items()))),)
            gone = released.get(spec.name, frozenset()) if released else frozenset()
            if gone:
                inputs += (("released", gone),)
            local = spec.site_names() if spec.site_affinity == "local" else ()
            for site in (None, *local):
                cached = self._endpoints.get((spec.name, site))
                if cached is None or cached[0] != inputs:
                    view = cluster_view(spec, state, local_site=site)
                    cla = build_load_assignment(warmed_view(view, ramp) if ramp else view,
                                                resolved, gone)
                    cached = (inputs, istio_mtls(cla, registrations, self._istio_cluster_id)
                              if self._istio_mtls else cla)
                memo[(spec.name, site)] = cached
                if site is None:
                    endpoints[spec.name] = cached[1]
                else:
                    zones.setdefault(site, {})[spec.name] = cached[1]
        self._endpoints = memo
        return Resources(clusters=dict(self._static.clusters), endpoints=endpoints,
                         listeners=dict(self._static.listeners),
                         routes=dict(self._static.routes), zones=zones)


def istio_mtls(cla: endpoint_pb2.ClusterLoadAssignment,
               registrations: Mapping[str, Registration] | None = None,
               cluster_id: str = ISTIO_CLUSTER_ID) -> endpoint_pb2.ClusterLoadAssignment:
    """``cla`` with its endpoints marked as istiod marks pods: an Istio outbound cluster
    picks its ``tlsMode-istio`` transport socket (mutual TLS) for an endpoint with the
    ``tlsMode`` metadata, plain text for one without. A member whose registration says
    what its pod is (:class:`~meshxl.model.IstioEndpoint`, from its sidecar under Istio)
    gets its pod's tls mode (none for a pod without an Istio proxy) and istiod's
    telemetry metadata, ``istio.workload: NAME;NAMESPACE;CANONICAL_NAME;REVISION;CLUSTER``
    (pilot/pkg/networking/util, ``AppendLbEndpointMetadata``); any other endpoint is
    marked for mutual TLS. Envoys whose clusters have no such match (meshxl's own)
    ignore it."""
    registrations = registrations or {}
    for group in cla.endpoints:
        for endpoint in group.lb_endpoints:
            registration = registrations.get(endpoint.endpoint.hostname)
            pod = registration.istio if registration is not None else None
            mode = "istio" if pod is None else pod.tls_mode
            if mode and mode != "disabled":
                match = endpoint.metadata.filter_metadata[ISTIO_TLS_MATCH]
                match.fields["tlsMode"].string_value = mode
            if pod is not None:
                istio = endpoint.metadata.filter_metadata["istio"]
                istio.fields["workload"].string_value = f"{pod.workload};{cluster_id}"
    return cla


def _resolved_for(spec: ClusterSpec, registrations: Mapping[str, Any],
                  resolved: Mapping[str, tuple[str, ...]]) -> tuple[Any, ...]:
    """The resolutions one cluster's EDS depends on (its memo key)."""
    names = {m.address for m in spec.members if m.address in resolved}
    names.update(r.address for r in registrations.values() if r.address in resolved)
    return tuple((n, resolved[n]) for n in sorted(names))


# What a Cluster or a Route depends on besides the cluster's name (the Cluster: mode,
# stickiness, health check, outlier detection, retries, connect timeout; the Route:
# mode, stickiness, retries, route prefix and timeout). Many clusters share one policy,
# so each distinct shape is built once per compile and copied (docs/performance.md). One key
# covers both (one serialization per cluster): equal keys still mean equal shapes.
def _shape(spec: ClusterSpec) -> bytes:
    """What a cluster's resources depend on besides its name and members, as bytes."""
    return msgspec.json.encode((
        spec.protocol, spec.websocket, spec.mode, spec.stickiness, spec.health_check,
        spec.outlier_detection, spec.retries, spec.connect_timeout, spec.warmup,
        spec.route.prefix, spec.route.timeout))


class _Shapes:
    """Per-compile memo of built resources by shape (never shared across compiles)."""

    def __init__(self) -> None:
        self._clusters: dict[bytes, cluster_pb2.Cluster] = {}
        self._routes: dict[bytes, route_components_pb2.Route] = {}
        self._keys: dict[int, bytes] = {}  # id(spec) -> shape key; specs outlive the compile

    def cluster(self, spec: ClusterSpec, path: str) -> cluster_pb2.Cluster:
        if spec.overrides.cluster:
            return build_cluster(spec, path)
        c: cluster_pb2.Cluster = self._copy(self._clusters, spec, path, build_cluster)
        c.name = spec.name
        c.metadata.filter_metadata["meshxl"].fields["cluster"].string_value = spec.name
        return c

    def route(self, spec: ClusterSpec, path: str) -> route_components_pb2.Route:
        if spec.overrides.route:
            return build_route(spec, path)
        r: route_components_pb2.Route = self._copy(self._routes, spec, path, build_route)
        r.name = spec.name
        r.route.cluster = spec.name
        return r

    def _copy(self, memo: dict[bytes, Any], spec: ClusterSpec, path: str, build: Any) -> Any:
        """A fresh copy of the resource built for ``spec``'s shape (built on first use)."""
        key = self._keys.get(id(spec))
        if key is None:
            # Whether its WebSockets have a cluster of their own depends on its having a
            # listener, not on which: that alone enters the key.
            key = self._keys[id(spec)] = _shape(spec) + (
                b" upgrades apart" if has_upgrade_cluster(spec) else b"")
        template = memo.get(key)
        if template is None:
            template = memo[key] = build(spec, path)
        copy = type(template)()
        copy.CopyFrom(template)
        return copy
