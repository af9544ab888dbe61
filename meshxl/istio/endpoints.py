"""Endpoints from meshxl (``meshxl istio render --endpoints meshxl``): the client
sidecars take a cluster's endpoints from meshxl's xDS server instead of istiod.

istiod builds the outbound cluster ``outbound|PORT||HOST`` as an EDS cluster over its
ADS stream (``eds_config: {ads: {}, initial_fetch_timeout: 0s, resource_api_version:
V3}``) and has no per-endpoint weight for pods. The EnvoyFilter's CLUSTER MERGE then
also carries the fragment below: Istio merges it with protobuf merge semantics
(pkg/proto/merge), and ``api_config_source`` being another case of the config source's
``config_source_specifier`` oneof, setting it drops ``ads``. The cluster's EDS then
comes from meshxl's ``EndpointDiscoveryService`` (the same assignment meshxl's own
Envoys get: member weights, a degraded member's halved share, warm-up ramps, a probe's
share, priorities), while istiod keeps the cluster itself, its TLS and its routes.

The xDS server is named by a Google gRPC target, not by a cluster: Envoy accepts an
``envoy_grpc`` config source only on a cluster of its bootstrap, never on one added
over CDS (an EnvoyFilter CLUSTER ADD: "must have a statically defined non-EDS
cluster ... was added via api"), and Istio's proxy is built with the Google gRPC
client. docs/istio.md, "Endpoints from meshxl", says what meshxl must serve for it.
"""

from __future__ import annotations

from typing import Any, Literal

from meshxl.addr import grpc_target, parse_hostport
from meshxl.errors import InputError
from meshxl.model import ClusterSpec

__all__ = ["ENDPOINT_SOURCES", "EndpointSource", "STAT_PREFIX", "eds_patch", "xds_target"]

EndpointSource = Literal["istiod", "meshxl"]
ENDPOINT_SOURCES: tuple[EndpointSource, ...] = ("istiod", "meshxl")
STAT_PREFIX = "meshxl_xds"
"""The Google gRPC client's stats (``cluster.<outbound>.grpc.meshxl_xds.*``)."""
#: How long a new cluster waits for its first assignment before it starts empty. Istio's
#: own ``0s`` (wait for ever) would keep every client sidecar from becoming ready while
#: meshxl's xDS server is unreachable; an empty cluster fails only its own requests.
INITIAL_FETCH_TIMEOUT = "10s"


def xds_target(address: str | None) -> str:
    """``HOST:PORT`` of meshxl's xDS Service, checked (InputError naming the flag)."""
    if not address:
        raise InputError("--endpoints meshxl needs --xds-address HOST:PORT (the Service of "
                         "meshxl's xDS server, e.g. "
                         "meshxl-xds.meshxl-system.svc.cluster.local:18000)")
    try:
        host, port = parse_hostport(address)
    except ValueError as exc:
        raise InputError(f"--xds-address: {exc}") from None
    return grpc_target(host, port)


def eds_patch(spec: ClusterSpec, target: str) -> dict[str, Any]:
    """What the cluster's MERGE patch adds: EDS of meshxl cluster ``spec.name`` from
    the xDS server at ``target`` (state of the world over gRPC)."""
    return {"eds_cluster_config": {
        "service_name": spec.name,
        "eds_config": {
            "api_config_source": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"google_grpc": {"target_uri": target,
                                                   "stat_prefix": STAT_PREFIX}}],
                "set_node_on_first_message_only": True,
            },
            "initial_fetch_timeout": INITIAL_FETCH_TIMEOUT,
            "resource_api_version": "V3",
        },
    }}
