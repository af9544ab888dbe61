"""Servers: ``meshxl serve xds``, ``serve statesync``, ``serve otlp-receiver`` and
``serve webhook`` (defined with the other Kubernetes commands in :mod:`.kube`).

``meshxl serve statesync`` runs in every pod: it imports the sidecar and nothing else
(``tests/integration/test_sidecar_imports.py``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from meshxl.model import limits

from . import serving
from .errors import checked, run
from .options import (
    FILE,
    LazyGroup,
    bounded,
    etcd_security,
    etcd_security_options,
    root_option,
    trace_file_option,
)
from .serving import setup_logging, statesync_listens, traced

__all__ = ["COMMANDS", "SERVERS", "serve_statesync", "serve_xds", "statesync_listens", "traced"]


@click.group(cls=LazyGroup, lazy={"webhook": "kube:serve_webhook"})
def serve() -> None:
    """Run a meshxl server process."""


@click.command("xds")
@click.option("--listen", default="127.0.0.1:18000", show_default=True, metavar="HOST:PORT",
              help="gRPC ADS address Envoys connect to.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Model file, reloaded when it changes (otherwise the model in etcd).")
@click.option("--etcd", "etcd_urls", metavar="URL[,URL...]", envvar="MESHXL_ETCD",
              help="etcd endpoints: stored model, member registrations, admin state.")
@etcd_security_options
@root_option
@click.option("--tls-cert", type=FILE, metavar="FILE",
              help="Serve ADS over TLS with this PEM certificate chain (with --tls-key); "
                   "renewed files are picked up without a restart.")
@click.option("--tls-key", type=FILE, metavar="FILE", help="PEM private key of --tls-cert.")
@click.option("--client-ca", type=FILE, metavar="FILE",
              help="Mutual TLS: accept only Envoys presenting a client certificate signed "
                   "by this CA (needs --tls-cert).")
@click.option("--node-binding", type=click.Choice(["san", "none"]),
              help="How the client certificate binds the node id: 'san' (the default with "
                   "--client-ca): it must name the node as a DNS name, or a node id "
                   "NAME.NAMESPACE (or Istio's TYPE~IP~POD.NAMESPACE~NAMESPACE.svc.DOMAIN) "
                   "by a SPIFFE ID spiffe://TRUST-DOMAIN/ns/NAMESPACE/...; "
                   "'none': any node id.")
@click.option("--trust-domain", default="cluster.local", show_default=True,
              help="SPIFFE trust domain of the client certificates' IDs (--node-binding san).")
@click.option("--token-file", type=FILE, envvar="MESHXL_XDS_TOKEN_FILE", metavar="FILE",
              help="Require 'authorization: Bearer TOKEN' on every ADS stream, TOKEN being "
                   "this file's first line (or the MESHXL_XDS_TOKEN variable); needs TLS "
                   "unless --listen is loopback.")
@click.option("--credentials", "credentials_file", type=FILE, metavar="FILE",
              envvar="MESHXL_XDS_CREDENTIALS_FILE",
              help="Per-node or per-site credentials (YAML): each token (by its SHA-256) or "
                   "client certificate name, the node ids and zones it may speak for "
                   "(docs/security.md); read again when it changes.")
@click.option("--max-nodes", type=bounded(limits.MAX_NODES), default=10_000,
              show_default=True, envvar="MESHXL_XDS_MAX_NODES",
              help="Node ids connected at once, at most; a new one past it is refused "
                   "(RESOURCE_EXHAUSTED).")
@click.option("--max-nodes-per-credential", type=bounded(limits.MAX_NODES), default=1_024,
              show_default=True, envvar="MESHXL_XDS_MAX_NODES_PER_CREDENTIAL",
              help="Node ids one credential (a token or certificate of --credentials, or a "
                   "certificate bound by --node-binding san) speaks for at once, unless "
                   "its entry sets max_nodes.")
@click.option("--admin", metavar="HOST:PORT", help="HTTP status endpoint (/v1/status) and "
              "live view (/ui/); plain HTTP: keep it on loopback or a private network.")
@click.option("--ui/--no-ui", default=True, show_default=True,
              help="Serve the live view (/ui/ and /v1/view: what 'meshxl status' shows) "
                   "on the --admin port.")
@click.option("--replica", help="This replica's name (default: host-pid).")
@click.option("--debounce", type=bounded(limits.DEBOUNCE), default=0.01, show_default=True,
              help="Quiet period (s) that ends a burst of changes.")
@click.option("--max-delay", type=bounded(limits.MAX_DELAY), default=0.1, show_default=True,
              help="Longest delay (s) from a change to its push.")
@click.option("--dns-interval", type=bounded(limits.DNS_INTERVAL), default=5.0,
              show_default=True,
              help="Seconds between resolutions of member addresses that are host names.")
@click.option("--istio-mtls", is_flag=True,
              help="Mark the endpoints as istiod marks pods, for Istio sidecars taking "
                   "their endpoints from meshxl (meshxl istio render --endpoints meshxl): "
                   "a member's pod's tls mode and workload, as its sidecar registered "
                   "them; a member without them gets Istio's mutual TLS (tlsMode: istio).")
@click.option("--istio-cluster-id", default="Kubernetes", show_default=True,
              metavar="ID", help="istiod's cluster id (its CLUSTER_ID), in the endpoints' "
                                 "telemetry metadata (with --istio-mtls).")
@trace_file_option
@click.option("--log-level", default="info", show_default=True)
def serve_xds(listen: str, config_path: Path | None, etcd_urls: str | None, etcd_root: str,
              tls_cert: Path | None, tls_key: Path | None, client_ca: Path | None,
              node_binding: str | None, trust_domain: str, token_file: Path | None,
              credentials_file: Path | None, max_nodes: int, max_nodes_per_credential: int,
              admin: str | None, ui: bool, replica: str | None, debounce: float,
              max_delay: float, dns_interval: float, istio_mtls: bool,
              istio_cluster_id: str, trace_file: Path | None, log_level: str) -> None:
    """The xDS control server (gRPC ADS) for Envoy."""
    import os

    from meshxl.bearer import read_token
    from meshxl.xds.app import AdminPages, ControlPlane
    from meshxl.xds.config import ControlPlaneConfig

    setup_logging(log_level)

    def settings() -> ControlPlaneConfig:
        token = read_token(token_file, os.environ, "MESHXL_XDS_TOKEN")
        config = ControlPlaneConfig(listen=listen, config_path=config_path, etcd=etcd_urls,
                                    etcd_root=etcd_root, admin=admin, debounce=debounce,
                                    max_delay=max_delay, etcd_security=etcd_security(),
                                    tls_cert=tls_cert, tls_key=tls_key, client_ca=client_ca,
                                    node_binding=node_binding,  # type: ignore[arg-type]
                                    trust_domain=trust_domain, token=token,
                                    credentials=credentials_file, max_nodes=max_nodes,
                                    max_nodes_per_credential=max_nodes_per_credential,
                                    dns_interval=dns_interval, istio_mtls=istio_mtls,
                                    istio_cluster_id=istio_cluster_id)
        if replica:
            config = dataclasses.replace(config, replica=replica)
        config.server_tls()  # the TLS files are usable: fail now, in one line
        return config

    config = checked(settings)
    pages: AdminPages | None = None
    if ui:
        from meshxl.ui import install

        pages = install
    traced("xds", trace_file, {"meshxl.replica": config.replica},
           lambda: ControlPlane(config, admin_pages=pages).run_forever())


@click.command("statesync")
@click.option("--cluster", "clusters", multiple=True,
              help="The meshxl cluster this member belongs to. Give it more than once "
                   "for one process serving several clusters (each under "
                   "/v1/clusters/CLUSTER of the API).")
@click.option("--pool", help="Serve every virtual system of this pool of the model "
                             "(docs/vsls.md), following the model as they are added or "
                             "removed: one process, each VS under /v1/clusters/VS.")
@click.option("--member", required=True, help="This member's name (unique in the cluster).")
@click.option("--app", "app_address", required=True, metavar="HOST:PORT",
              help="The application's address: registered for Envoy to send traffic to.")
@click.option("--site", help="The member's site (failover order comes from the model).")
@click.option("--weight", type=bounded(limits.MEMBER_WEIGHT), help="Load-sharing weight.")
@click.option("--listen", "listens", multiple=True, metavar="HOST:PORT|unix:PATH",
              help="The sidecar's HTTP API (default 127.0.0.1:7070; keep it on loopback, "
                   "any other address needs a token). Give it twice to serve the API on "
                   "a Unix socket too (unix:/run/meshxl/statesync.sock): no port, access by "
                   "file permissions; health checks and the registration stay on HOST:PORT.")
@click.option("--socket-mode", type=click.Choice(["0600", "0660"]), default="0600",
              show_default=True, help="Permissions of the Unix socket: its user only, or "
                                      "its group too (an app running as another user of "
                                      "the group).")
@click.option("--token-file", type=FILE, envvar="MESHXL_STATESYNC_TOKEN_FILE",
              metavar="FILE", help="Require 'Authorization: Bearer TOKEN' on every request "
              "but /healthz and /readyz, TOKEN being this file's first line (or the "
              "MESHXL_STATESYNC_TOKEN variable; also MESHXL_STATESYNC_TOKEN_FILE).")
@click.option("--etcd", "etcd_urls", metavar="URL[,URL...]", envvar="MESHXL_ETCD",
              default="http://127.0.0.1:2379", show_default=True,
              help="etcd endpoints, http:// or https://.")
@etcd_security_options
@click.option("--etcd-credentials-dir", type=click.Path(path_type=Path), metavar="DIR",
              envvar="MESHXL_ETCD_CREDENTIALS_DIR",
              help="Each cluster's own etcd user: DIR/CLUSTER/username and "
                   "DIR/CLUSTER/password (a basic-auth Secret mounted per cluster). A "
                   "cluster with an entry talks to etcd as that user; one without uses "
                   "--etcd-user. The process's own user then needs only read on the mesh "
                   "(docs/security.md).")
@root_option
@click.option("--session-ttl", type=bounded(limits.SESSION_TTL), metavar="SECONDS",
              help="Sessions expire this long after their last write "
                   "(default: the cluster's sessions.ttl in the model, else 1800).")
@click.option("--sync-delay", type=bounded(limits.SYNC_DELAY), metavar="SECONDS",
              help="Keep sessions younger than this on this member only (default: model, "
                   "else 0).")
@click.option("--max-session-bytes", type=bounded(limits.SESSION_BYTES),
              help="Largest session state (default: model, else 1 MiB).")
@click.option("--lease-ttl", type=bounded(limits.LEASE_TTL), default=3.0, show_default=True,
              metavar="SECONDS", help="Registration lease: a dead sidecar leaves Envoy "
                                      "within about this long.")
# 127: etcd's 128 operations per transaction level, less the batch's own level
# (meshxl.statesync.store.MAX_TXN_WRITES; tests/unit/test_statesync_pure.py checks).
@click.option("--batch-max-ops", type=bounded(limits.BATCH_MAX_OPS), default=127, show_default=True,
              help="Writes per etcd transaction at most (1: no batching).")
@click.option("--max-inflight", type=bounded(limits.MAX_INFLIGHT), default=1, show_default=True,
              help="etcd transactions in flight at once; writes arriving meanwhile batch.")
@click.option("--max-connections", type=bounded(limits.MAX_CONNECTIONS),
              envvar="MESHXL_STATESYNC_MAX_CONNECTIONS",
              help="Client connections of the API at most; at the cap the one stuck "
                   "longest in a slow head or body (else the longest idle) is closed for "
                   "a new one (default: 4096, or the open-file limit less 128).")
@click.option("--istio-workload", envvar="MESHXL_ISTIO_WORKLOAD",
              metavar="NAME;NAMESPACE;CANONICAL_NAME;CANONICAL_REVISION",
              help="Under Istio: the pod's workload as istiod names it, registered for "
                   "the control plane's EDS (serve xds --istio-mtls; set by the injector).")
@click.option("--istio-tls-mode", envvar="MESHXL_ISTIO_TLS_MODE", default="",
              help="Under Istio: the pod's security.istio.io/tlsMode label ('istio': its "
                   "endpoint takes Istio's mutual TLS; empty: plain text; set by the "
                   "injector).")
@click.option("--dapr", type=click.Choice(["off", "on"]), default="off", show_default=True,
              envvar="MESHXL_DAPR",
              help="Serve Dapr's state API (HTTP and gRPC) for the member's cluster, so a "
                   "Dapr application's SDK keeps its state here unchanged (docs/dapr.md).")
@click.option("--dapr-http-port", type=bounded(limits.DAPR_PORT), default=3500,
              show_default=True, envvar="DAPR_HTTP_PORT",
              help="Dapr's HTTP API, on --listen's host (where the SDKs look: "
                   "DAPR_HTTP_PORT; 0: any free port).")
@click.option("--dapr-grpc-port", type=bounded(limits.DAPR_PORT), default=50001,
              show_default=True, envvar="DAPR_GRPC_PORT",
              help="Dapr's gRPC API, dapr.proto.runtime.v1.Dapr (DAPR_GRPC_PORT; 0: any "
                   "free port).")
@click.option("--dapr-app-id", envvar="MESHXL_DAPR_APP_ID",
              help="The application's Dapr id, the keys' prefix (default: the cluster).")
@click.option("--dapr-key-prefix", default="appid", show_default=True,
              help="As a Dapr state store's keyPrefix: appid (APPID||key), name (the "
                   "store's), none (the key is the session id), or a literal prefix.")
@click.option("--dapr-store", default="statestore", show_default=True,
              help="The state store name that is the member's own cluster (each cluster "
                   "served is a store by its own name too).")
@trace_file_option
@click.option("--log-level", default="info", show_default=True)
def serve_statesync(clusters: tuple[str, ...], pool: str | None, member: str,
                    app_address: str, site: str | None,
                    weight: int | None, listens: tuple[str, ...], socket_mode: str,
                    token_file: Path | None, etcd_urls: str,
                    etcd_credentials_dir: Path | None, etcd_root: str,
                    session_ttl: float | None, sync_delay: float | None,
                    max_session_bytes: int | None, lease_ttl: float, batch_max_ops: int,
                    max_inflight: int, max_connections: int | None,
                    istio_workload: str | None, istio_tls_mode: str, dapr: str,
                    dapr_http_port: int, dapr_grpc_port: int, dapr_app_id: str | None,
                    dapr_key_prefix: str, dapr_store: str, trace_file: Path | None,
                    log_level: str) -> None:
    """The session-state sidecar: replicates sessions through etcd, registers the member."""
    serving.serve_statesync(
        clusters, pool, member, app_address, site, weight, listens, socket_mode, token_file,
        etcd_urls, etcd_credentials_dir, etcd_root, session_ttl, sync_delay,
        max_session_bytes, lease_ttl, batch_max_ops, max_inflight, max_connections,
        trace_file, log_level, etcd_security=etcd_security,
        istio_workload=istio_workload, istio_tls_mode=istio_tls_mode, dapr=dapr,
        dapr_http_port=dapr_http_port, dapr_grpc_port=dapr_grpc_port, dapr_app_id=dapr_app_id,
        dapr_key_prefix=dapr_key_prefix, dapr_store=dapr_store)


@click.command("otlp-receiver")
@click.option("--listen", default="127.0.0.1:4317", show_default=True, metavar="HOST:PORT",
              help="OTLP/gRPC address (point Envoy's bootstrap --otlp here).")
@click.option("--file", "path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Append received spans to this file as OTLP JSON lines.")
@click.option("--log-level", default="info", show_default=True)
def serve_otlp_receiver(listen: str, path: Path, log_level: str) -> None:
    """A small OTLP/gRPC trace receiver writing JSON lines (local runs and tests)."""
    from meshxl.addr import parse_listen
    from meshxl.telemetry.receiver import serve_receiver

    checked(lambda: parse_listen(listen))
    setup_logging(log_level)
    run(lambda: serve_receiver(listen, str(path)), sigterm=True)


SERVERS: list[click.Command] = [serve_xds, serve_statesync, serve_otlp_receiver]
"""Defined here; ``serve webhook`` is with the other Kubernetes commands (:mod:`.kube`),
imported only when it runs."""
for _server in SERVERS:
    serve.add_command(_server)

COMMANDS: list[click.Command] = [serve]
