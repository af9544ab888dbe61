"""The Envoy cluster that carries a cluster's WebSockets, and its name (pure).

Envoy counts the end of every WebSocket, a graceful close included, as a local-origin
failure of the member that served it (envoyproxy/envoy#24690). One cluster cannot both
eject a member on its first refused connect (what plain requests need to fail over at
once) and keep a member whose WebSockets end normally. So a cluster that allows
WebSocket upgrades becomes two Envoy clusters sharing one EDS resource: the plain one
(the model's name) for requests, ejecting on the first local-origin failure, and its
upgrades twin (``NAME~ws``) for upgrade requests, which counts those failures without
ejecting on them (:func:`build_upgrade_cluster`). A route before
the cluster's own sends upgrade requests to the twin, with the same hash, pins and
retries, so a WebSocket still lands on its session's member.

Whatever reads Envoy's cluster names (access logs, ``/clusters``, stats) maps the twin
back to its model cluster with :func:`model_cluster`.

A cluster without a listener has no meshxl route, so no twin: whatever routes to it
may send it WebSockets, and it keeps the WebSockets' rule (counted, not ejected on,
where a health check removes dead members).
"""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_components_pb2

from meshxl.model import ClusterSpec

__all__ = ["UPGRADES_SUFFIX", "UPGRADE_HEADER", "WEBSOCKET", "build_upgrade_cluster",
           "build_upgrade_route", "has_upgrade_cluster", "is_upgrade_cluster", "model_cluster",
           "upgrade_cluster"]

WEBSOCKET = "websocket"
"""The upgrade type (Envoy's ``upgrade_configs``) and the ``upgrade`` header's value."""
UPGRADE_HEADER = "upgrade"

UPGRADES_SUFFIX = "~ws"
"""The twin's suffix: ``~`` is outside the model's name alphabet (``NAME_PATTERN``), so
no model cluster has a name that ends with it."""


def upgrade_cluster(name: str) -> str:
    """The Envoy cluster of model cluster ``name``'s WebSockets."""
    return name + UPGRADES_SUFFIX


def is_upgrade_cluster(envoy_name: str) -> bool:
    return envoy_name.endswith(UPGRADES_SUFFIX)


def model_cluster(envoy_name: str) -> str:
    """The model cluster an Envoy cluster serves (itself, or its twin's origin)."""
    return envoy_name.removesuffix(UPGRADES_SUFFIX)


def has_upgrade_cluster(spec: ClusterSpec) -> bool:
    """``spec``'s WebSockets have a cluster of their own: it allows them and meshxl
    routes to it (it has a listener)."""
    return spec.websocket_upgrades and spec.listener is not None


def build_upgrade_cluster(plain: cluster_pb2.Cluster, ejects: bool) -> cluster_pb2.Cluster:
    """The upgrades twin of ``plain``. The same in all but four fields: its name; its EDS
    ``service_name``, the plain cluster's resource, so one ClusterLoadAssignment and
    every push of it reach both; its outlier detection, which counts local-origin
    failures without ejecting on them unless ``ejects``
    (:func:`meshxl.xds.resources.upgrades_eject_on_local_origin`); and the closing of a
    failed member's connections (the WebSockets are here; the plain cluster carries
    none)."""
    c = cluster_pb2.Cluster()
    c.CopyFrom(plain)
    c.name = upgrade_cluster(plain.name)
    c.eds_cluster_config.service_name = plain.eds_cluster_config.service_name or plain.name
    if c.HasField("outlier_detection") and not ejects:
        c.outlier_detection.enforcing_consecutive_local_origin_failure.value = 0
    c.close_connections_on_host_health_failure = True
    return c


def build_upgrade_route(plain: route_components_pb2.Route) -> route_components_pb2.Route:
    """The route of a cluster's WebSockets, just before ``plain``: its upgrade requests
    (``upgrade: websocket`` in any case, as Envoy's HTTP connection manager matches the
    upgrade type) go to the upgrades twin, with the same hash policy (same session, same
    member), pins, retries and timeouts."""
    r = route_components_pb2.Route()
    r.CopyFrom(plain)
    r.name = upgrade_cluster(plain.name)
    r.route.cluster = upgrade_cluster(plain.route.cluster)
    header = r.match.headers.add(name=UPGRADE_HEADER)
    header.string_match.exact = WEBSOCKET
    header.string_match.ignore_case = True
    return r
