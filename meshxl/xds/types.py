"""The xDS resource type URLs meshxl serves, defined once, their order and their short
names.

Every other module (the compiler, the snapshot cache, the SotW and delta streams, node
status, the metrics, the operator views) names a type through these constants and
shows one through :func:`short_type` (``CDS``) or :func:`type_label` (``Cluster``).
"""

from __future__ import annotations

from typing import Final

from meshxl.protowire import TYPE_URL_PREFIX, type_url

__all__ = ["CLUSTER", "ENDPOINT", "LISTENER", "ROUTE", "TYPE_ORDER", "TYPE_URL_PREFIX",
           "WILDCARD_TYPES", "short_type", "type_label"]

CLUSTER: Final = type_url("envoy.config.cluster.v3.Cluster")
ENDPOINT: Final = type_url("envoy.config.endpoint.v3.ClusterLoadAssignment")
LISTENER: Final = type_url("envoy.config.listener.v3.Listener")
ROUTE: Final = type_url("envoy.config.route.v3.RouteConfiguration")

#: ADS push order: clusters before their endpoints, listeners before their routes.
TYPE_ORDER: Final[tuple[str, ...]] = (CLUSTER, ENDPOINT, LISTENER, ROUTE)
#: Types where an empty ``resource_names`` means "everything" (SotW legacy wildcard).
WILDCARD_TYPES: Final = frozenset({CLUSTER, LISTENER})

_SHORT: Final = {CLUSTER: "CDS", ENDPOINT: "EDS", LISTENER: "LDS", ROUTE: "RDS"}


def type_label(type_url: str) -> str:
    """``type.googleapis.com/envoy.config.cluster.v3.Cluster`` -> ``Cluster`` (metric
    labels)."""
    return type_url.rsplit(".", 1)[-1] or type_url


def short_type(type_url: str) -> str:
    """The xDS name operators know (``CDS``, ``EDS``, ``LDS``, ``RDS``); another type by
    its :func:`type_label`."""
    return _SHORT.get(type_url, type_label(type_url))
