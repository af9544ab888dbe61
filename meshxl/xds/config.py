"""What a control-plane replica is given: :class:`ControlPlaneConfig`, validated when it
is made (the CLI turns its errors into one-line messages)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from meshxl import etcd
from meshxl.addr import parse_listen
from meshxl.etcd import EtcdSecurity
from meshxl.etcd.keys import DEFAULT_ROOT
from meshxl.model import limits
from meshxl.tls import ServerTls

from .auth import DEFAULT_TRUST_DOMAIN, AdsAuth, Binding, ads_auth
from .credentials import MAX_NODES, MAX_NODES_PER_CREDENTIAL, CredentialsFile
from .dns import DEFAULT_INTERVAL as DNS_INTERVAL

__all__ = ["ControlPlaneConfig"]


@dataclass(frozen=True)
class ControlPlaneConfig:
    """Everything a control-plane replica needs; validated by the CLI."""

    listen: str = "127.0.0.1:18000"
    config_path: Path | None = None
    etcd: str | None = None
    etcd_root: str = DEFAULT_ROOT
    admin: str | None = None
    """HOST:PORT of the HTTP status endpoint (/healthz, /readyz, /v1/status)."""
    replica: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    debounce: float = 0.01
    max_delay: float = 0.1
    status_ttl: int = 10
    """Lease TTL (s) of the node-status keys: they vanish with a dead replica."""
    etcd_security: EtcdSecurity | None = None
    """TLS and credentials for etcd (``--etcd-ca``, ``--etcd-user``...)."""
    tls_cert: Path | None = None
    """Serve ADS over TLS with this certificate chain and ``tls_key``."""
    tls_key: Path | None = None
    client_ca: Path | None = None
    """Mutual TLS: accept only Envoys whose client certificate this CA signed."""
    node_binding: Binding | None = None
    """How a client certificate binds the node id (``san``, ``none``); None: ``san``
    with ``client_ca``, else ``none``."""
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    """The SPIFFE trust domain whose ``spiffe://DOMAIN/ns/NS/...`` IDs name namespaces."""
    token: str | None = field(default=None, repr=False)
    """Require ``authorization: Bearer TOKEN`` on every ADS stream (the shared token)."""
    credentials: Path | None = None
    """Per-node and per-site credentials: node ids and zones bound per token or
    certificate name (:mod:`meshxl.xds.credentials`)."""
    max_nodes: int = MAX_NODES
    """Node ids connected at once, at most (each has a status record in etcd)."""
    max_nodes_per_credential: int = MAX_NODES_PER_CREDENTIAL
    """Node ids one credential speaks for at once, unless its entry says otherwise."""
    dns_interval: float = DNS_INTERVAL
    """Seconds between resolutions of member addresses that are host names."""
    istio_mtls: bool = False
    """Mark the endpoints as istiod marks pods (``--istio-mtls``): client sidecars
    taking their endpoints from meshxl (docs/istio.md, "Endpoints from meshxl")."""
    istio_cluster_id: str = "Kubernetes"
    """istiod's cluster id, in the endpoints' telemetry metadata (``--istio-cluster-id``)."""

    def __post_init__(self) -> None:
        parse_listen(self.listen, "--listen")
        if self.admin is not None:
            parse_listen(self.admin, "--admin")
        if self.config_path is None and self.etcd is None:
            raise ValueError("give a model file (--config), etcd (--etcd), or both")
        if self.etcd is not None:
            etcd.check_settings(self.etcd, self.etcd_security)
        elif self.etcd_security is not None and self.etcd_security != EtcdSecurity():
            raise ValueError("etcd TLS or credential options need --etcd")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together: give both or neither")
        if self.client_ca is not None and self.tls_cert is None:
            raise ValueError("--client-ca (mutual TLS) needs --tls-cert and --tls-key")
        for option, bound, value in (
                ("--debounce", limits.DEBOUNCE, self.debounce),
                ("--max-delay", limits.MAX_DELAY, self.max_delay),
                ("status_ttl", limits.STATUS_TTL, self.status_ttl),
                ("--max-nodes", limits.MAX_NODES, self.max_nodes),
                ("--max-nodes-per-credential", limits.MAX_NODES, self.max_nodes_per_credential),
                ("--dns-interval", limits.DNS_INTERVAL, self.dns_interval)):
            bound.check(value, option)  # the command line's own ranges
        self.auth()  # a bad binding, trust domain, token or credentials file fails here

    def auth(self) -> AdsAuth:
        """Who may open an ADS stream, and for which node id."""
        credentials = None if self.credentials is None else CredentialsFile(self.credentials)
        return ads_auth(host=parse_listen(self.listen)[0], tls=self.tls_cert is not None,
                        client_ca=self.client_ca is not None, binding=self.node_binding,
                        trust_domain=self.trust_domain, token=self.token,
                        credentials=credentials)

    def server_tls(self) -> ServerTls | None:
        """The ADS server's TLS (files checked now), or None for plaintext."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        return ServerTls(self.tls_cert, self.tls_key, self.client_ca)
