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

With ``--xds-tls`` (:class:`XdsClientTls`) the Google gRPC channel presents the
sidecar's own Istio workload certificate, which istio-agent writes as files when the
pod's proxy config sets ``OUTPUT_CERTS`` (as for Prometheus scraping with Istio's
certificates), and verifies meshxl's server against meshxl's xDS CA, mounted from a
ConfigMap: Istio's workload certificates name a SPIFFE ID and no DNS name, and gRPC
checks the server's certificate against the target's host name, so the server keeps a
certificate of its own. The server binds the sidecar's node id to the SPIFFE ID's
namespace (:mod:`meshxl.xds.auth`).
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from meshxl.addr import grpc_target, is_ip, parse_hostport
from meshxl.errors import InputError
from meshxl.model import ClusterSpec

__all__ = ["CA_CONFIG_MAP", "ENDPOINT_SOURCES", "EPOCH_KEY", "EndpointSource",
           "ISTIO_OUTPUT_CERTS", "SERVER_CA", "SERVER_NAMES", "STAT_PREFIX", "XdsClientTls",
           "eds_patch", "eds_sources", "source_warnings", "xds_destination_rule",
           "xds_target"]

EndpointSource = Literal["istiod", "meshxl"]
ENDPOINT_SOURCES: tuple[EndpointSource, ...] = ("istiod", "meshxl")
STAT_PREFIX = "meshxl_xds"
EPOCH_KEY = "x-meshxl-credentials-epoch"
"""The ``initial_metadata`` entry of an ``--xds-tls`` source: its credentials epoch,
which ``meshxl istio label`` moves on (:mod:`.credentials`)."""
"""The Google gRPC client's stats (``cluster.<outbound>.grpc.meshxl_xds.*``)."""
#: How long a new cluster waits for its first assignment before it starts empty. Istio's
#: own ``0s`` (wait for ever) would keep every client sidecar from becoming ready while
#: meshxl's xDS server is unreachable; an empty cluster fails only its own requests.
INITIAL_FETCH_TIMEOUT = "10s"
#: Where istio-agent writes the workload's certificate (``OUTPUT_CERTS``): its files.
ISTIO_OUTPUT_CERTS = "/etc/istio-output-certs"
CERT_CHAIN, PRIVATE_KEY, ISTIO_ROOT = "cert-chain.pem", "key.pem", "root-cert.pem"
#: meshxl's xDS CA in the client pods: the ConfigMap ``meshxl-xds-ca`` (key ``ca.crt``)
#: of their namespace, mounted into the istio-proxy container.
CA_CONFIG_MAP = "meshxl-xds-ca"
SERVER_CA = "/etc/meshxl-xds-ca/ca.crt"
#: What the istio-endpoints overlay's serving certificate names (cert-manager).
SERVER_NAMES = ("meshxl-xds.meshxl-system.svc", "meshxl-xds.meshxl-system.svc.cluster.local")
_OUTPUT_VOLUME = "istio-output-certs"


@dataclass(frozen=True)
class XdsClientTls:
    """``--xds-tls``: the sidecars' EDS streams over mutual TLS. Paths are those inside
    the istio-proxy container: ``certs_dir`` where istio-agent writes the workload's
    certificate, ``server_ca`` the CA that signed meshxl's server certificate."""

    certs_dir: str = ISTIO_OUTPUT_CERTS
    server_ca: str = SERVER_CA

    def __post_init__(self) -> None:
        for flag, path in (("--xds-certs-dir", self.certs_dir), ("--xds-ca", self.server_ca)):
            if not path.startswith("/") or path != posixpath.normpath(path) or \
                    any(c.isspace() or c in "\"'" for c in path):
                raise InputError(f"{flag}: {path!r} must be an absolute, normalized path "
                                 "inside the istio-proxy container")
        if self.server_ca == self.certs_dir:
            raise InputError("--xds-ca must name a file, not --xds-certs-dir")
        if posixpath.dirname(self.server_ca) == self.certs_dir and \
                posixpath.basename(self.server_ca) != ISTIO_ROOT:
            raise InputError(f"--xds-ca {self.server_ca} is in --xds-certs-dir, where "
                             f"istio-agent writes only {CERT_CHAIN}, {PRIVATE_KEY} and "
                             f"{ISTIO_ROOT}: give {self.certs_dir}/{ISTIO_ROOT} (a server "
                             "certificate Istio's root signed) or a file of its own")

    @property
    def trusts_istio_root(self) -> bool:
        return self.server_ca == posixpath.join(self.certs_dir, ISTIO_ROOT)

    def channel_credentials(self) -> dict[str, Any]:
        """Google gRPC's ``channel_credentials``: Envoy reads the files when it builds
        the cluster's EDS subscription."""
        return {"ssl_credentials": {
            "root_certs": {"filename": self.server_ca},
            "private_key": {"filename": posixpath.join(self.certs_dir, PRIVATE_KEY)},
            "cert_chain": {"filename": posixpath.join(self.certs_dir, CERT_CHAIN)},
        }}

    def pod_annotations(self) -> dict[str, str]:
        """What the client pods need (their template's annotations): istio-agent writes
        the certificate to a memory volume mounted in the istio-proxy container, and
        meshxl's CA comes from the ConfigMap (unless Istio's root is the server's)."""
        volumes: list[dict[str, Any]] = [
            {"name": _OUTPUT_VOLUME, "emptyDir": {"medium": "Memory"}}]
        mounts: list[dict[str, Any]] = [{"name": _OUTPUT_VOLUME, "mountPath": self.certs_dir}]
        if not self.trusts_istio_root:
            volumes.append({"name": CA_CONFIG_MAP, "configMap": {"name": CA_CONFIG_MAP, "items": [
                {"key": "ca.crt", "path": posixpath.basename(self.server_ca)}]}})
            mounts.append({"name": CA_CONFIG_MAP, "mountPath": posixpath.dirname(self.server_ca),
                           "readOnly": True})
        return {
            "proxy.istio.io/config": f"proxyMetadata:\n  OUTPUT_CERTS: {self.certs_dir}\n",
            "sidecar.istio.io/userVolume": json.dumps(volumes, separators=(",", ":")),
            "sidecar.istio.io/userVolumeMount": json.dumps(mounts, separators=(",", ":")),
        }


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


def source_warnings(target: str, tls: XdsClientTls | None, filter_namespace: str,
                    root_namespace: str) -> list[str]:
    """What may keep the sidecars from their endpoints, or leave the port open."""
    if tls is None:
        return ["--endpoints meshxl without --xds-tls: the sidecars' EDS streams carry no "
                "credentials, so meshxl's xDS server must ask for none (the "
                "istio-endpoints overlay asks for Istio's certificates: docs/istio.md)"]
    warnings = []
    host = target.rpartition(":")[0].strip("[]")
    if host not in SERVER_NAMES:
        warnings.append(f"--xds-tls: gRPC checks the server's certificate against {host!r}: "
                        "make sure it names that host (the istio-endpoints overlay's "
                        f"names {' and '.join(SERVER_NAMES)})")
    if filter_namespace == root_namespace:
        warnings.append("--xds-tls with EnvoyFilters in the root namespace: every sidecar "
                        "they patch needs the client pod annotations (printed at the top), "
                        "or its clusters of meshxl stay empty")
    return warnings


def xds_destination_rule(target: str, tls: XdsClientTls, namespace: str,
                         cluster_domain: str, root_namespace: str) -> dict[str, Any] | None:
    """The DestinationRule that gives the sidecars' other traffic to meshxl's server,
    their access logs (Istio's ``envoyHttpAls`` provider, docs/faults.md), the same
    mutual TLS: istiod builds that cluster, and takes client certificate files in a
    DestinationRule (istio-agent serves them over SDS).
    None for an IP address, which names no Service."""
    host, _, port = target.rpartition(":")
    host = host.strip("[]")
    if is_ip(host):
        return None
    if host.endswith(".svc"):
        host = f"{host}.{cluster_domain}"  # a DestinationRule's dotted host is taken whole
    spec: dict[str, Any] = {"host": host, "trafficPolicy": {"portLevelSettings": [{
        "port": {"number": int(port)},
        "tls": {"mode": "MUTUAL",
                "clientCertificate": posixpath.join(tls.certs_dir, CERT_CHAIN),
                "privateKey": posixpath.join(tls.certs_dir, PRIVATE_KEY),
                "caCertificates": tls.server_ca, "sni": host}}]}}
    if namespace != root_namespace:
        spec["exportTo"] = ["."]  # this namespace's sidecars only: those patched
    return {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
            "metadata": {"name": "meshxl-xds-tls", "namespace": namespace,
                         "labels": {"app.kubernetes.io/managed-by": "meshxl"}},
            "spec": spec}


def eds_patch(spec: ClusterSpec, target: str,
              tls: XdsClientTls | None = None) -> dict[str, Any]:
    """What the cluster's MERGE patch adds: EDS of meshxl cluster ``spec.name`` from
    the xDS server at ``target`` (state of the world over gRPC), over mutual TLS with
    ``tls``, whose credentials epoch ``meshxl istio label`` moves on (credentials.py)."""
    google_grpc: dict[str, Any] = {"target_uri": target, "stat_prefix": STAT_PREFIX}
    if tls is not None:
        google_grpc["channel_credentials"] = tls.channel_credentials()
    return {"eds_cluster_config": {
        "service_name": spec.name,
        "eds_config": {
            "api_config_source": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"google_grpc": google_grpc, **(
                    {"initial_metadata": [{"key": EPOCH_KEY, "value": "0"}]}
                    if tls is not None else {})}],
                "set_node_on_first_message_only": True,
            },
            "initial_fetch_timeout": INITIAL_FETCH_TIMEOUT,
            "resource_api_version": "V3",
        },
    }}


def eds_sources(envoy_filter: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Each gRPC service of the EDS sources an applied EnvoyFilter's CLUSTER patches
    name (as :func:`eds_patch` renders them), with its JSON pointer in the object; a
    hand-edited object is read, not trusted (what is not a mapping is skipped)."""
    def get(obj: Any, *keys: str) -> Any:
        for key in keys:
            obj = obj.get(key) if isinstance(obj, Mapping) else None
        return obj

    patches = get(envoy_filter, "spec", "configPatches")
    for i, patch in enumerate(patches if isinstance(patches, list) else []):
        if get(patch, "applyTo") != "CLUSTER":
            continue
        services = get(patch, "patch", "value", "eds_cluster_config", "eds_config",
                       "api_config_source", "grpc_services")
        for j, service in enumerate(services if isinstance(services, list) else []):
            if isinstance(service, Mapping):
                yield (f"/spec/configPatches/{i}/patch/value/eds_cluster_config/eds_config"
                       f"/api_config_source/grpc_services/{j}"), service
