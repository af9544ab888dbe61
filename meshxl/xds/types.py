"""The xDS resource type URLs meshxl serves, defined once, and their order.

Every other module (the compiler, the snapshot cache, the SotW and delta streams, node
status, the operator views) names a type through these constants.
"""

from __future__ import annotations

from typing import Final

__all__ = ["CLUSTER", "ENDPOINT", "LISTENER", "ROUTE", "TYPE_ORDER", "TYPE_URL_PREFIX",
           "WILDCARD_TYPES"]

#: What every xDS type URL starts with (google.protobuf.Any).
TYPE_URL_PREFIX: Final = "type.googleapis.com/"
CLUSTER: Final = TYPE_URL_PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT: Final = TYPE_URL_PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER: Final = TYPE_URL_PREFIX + "envoy.config.listener.v3.Listener"
ROUTE: Final = TYPE_URL_PREFIX + "envoy.config.route.v3.RouteConfiguration"

#: ADS push order: clusters before their endpoints, listeners before their routes.
TYPE_ORDER: Final[tuple[str, ...]] = (CLUSTER, ENDPOINT, LISTENER, ROUTE)
#: Types where an empty ``resource_names`` means "everything" (SotW legacy wildcard).
WILDCARD_TYPES: Final = frozenset({CLUSTER, LISTENER})
