"""The sidecar's configuration (``meshxl serve statesync``'s options), checked when
made: a bad value is a ValueError naming it, before anything starts."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

from meshxl import etcd
from meshxl.addr import parse_hostport
from meshxl.etcd import EtcdSecurity
from meshxl.etcd.keys import DEFAULT_ROOT
from meshxl.model import limits
from meshxl.model.basics import NAME_PATTERN, check_member_address
from meshxl.model.records import IstioEndpoint

from .auth import check_exposure, valid_token
from .credentials import check_credentials_dir
from .store import MAX_TXN_WRITES

__all__ = ["DAPR_STORE", "DaprConfig", "StatesyncConfig"]

DAPR_STORE = "statestore"
"""The state store name a Dapr application uses unless told otherwise (every Dapr
quickstart's and SDK example's)."""
_DAPR_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_KEY_PREFIX = re.compile(r"^[A-Za-z0-9._~:{}-]{1,128}$")


@dataclass(frozen=True)
class DaprConfig:
    """Dapr's state API on this sidecar (``--dapr``, docs/dapr.md)."""

    http_port: int = 3500
    """``DAPR_HTTP_PORT``: where the SDKs look for Dapr's HTTP API (0: any free port)."""
    grpc_port: int = 50001
    """``DAPR_GRPC_PORT``: where they look for its gRPC API (0: any free port)."""
    app_id: str | None = None
    """The application's Dapr id (None: the cluster's name)."""
    key_prefix: str = "appid"
    """As a Dapr state store's ``keyPrefix``: ``appid``, ``name`` (the store's), ``none``
    or a literal prefix."""
    store: str = DAPR_STORE
    """The state store name that is the member's own cluster (each cluster served is a
    store by its own name too)."""

    def __post_init__(self) -> None:
        limits.DAPR_PORT.check(self.http_port, "--dapr-http-port")
        limits.DAPR_PORT.check(self.grpc_port, "--dapr-grpc-port")
        if self.http_port and self.http_port == self.grpc_port:
            raise ValueError("--dapr-http-port and --dapr-grpc-port must differ")
        for what, name in (("--dapr-app-id", self.app_id), ("--dapr-store", self.store)):
            if name is not None and not _DAPR_NAME.fullmatch(name):
                raise ValueError(f"invalid {what} {name[:80]!r}: 1-128 letters, digits, "
                                 "'.', '_' or '-', starting with a letter or digit")
        if self.key_prefix not in ("appid", "name", "none") and \
                not _KEY_PREFIX.fullmatch(self.key_prefix):
            raise ValueError(f"invalid --dapr-key-prefix {self.key_prefix[:80]!r}: appid, "
                             "name, none, or 1-128 of A-Z a-z 0-9 . _ ~ - : { }")


@dataclass(frozen=True)
class StatesyncConfig:
    cluster: str
    member: str
    app: str
    """HOST:PORT of the application: what Envoy sends the member's traffic to."""
    etcd: str
    listen: str = "127.0.0.1:7070"
    """HOST:PORT of the API: registered, and where health checks go."""
    unix_socket: str | None = None
    """A Unix socket path the API listens on too (``--listen unix:PATH``)."""
    socket_mode: int = 0o600
    site: str | None = None
    weight: int | None = None
    etcd_root: str = DEFAULT_ROOT
    session_ttl: float | None = None
    """None: the cluster's ``sessions.ttl`` from the model in etcd (default 30 min)."""
    sync_delay: float | None = None
    max_bytes: int | None = None
    lease_ttl: float = 3.0
    """The registration's lease: a dead sidecar leaves Envoy at most this long after."""
    batch_max_ops: int = MAX_TXN_WRITES
    """Writes per etcd transaction at most: as many as etcd takes (bulk saves from many
    writers measured faster than with 64, docs/performance.md; single writes rarely fill
    a batch anyway)."""
    batch_max_bytes: int = 1_000_000
    max_inflight: int = 1
    """etcd transactions in flight at once: with one, everything that arrives while it
    is out leaves in the next (group commit), which measured fastest."""
    max_connections: int | None = None
    """The API's client connections at most (None: :func:`~.http.default_max_connections`)."""
    sync_publish_interval: float = 2.0
    """Seconds between publications of this sidecar's statistics (``meshxl sync``)."""
    sidecar_name: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    etcd_security: EtcdSecurity | None = None
    """TLS and credentials for etcd (``--etcd-ca``, ``--etcd-user``...)."""
    etcd_credentials_dir: Path | None = None
    """``DIR/<cluster>/username`` and ``password``: a hosted cluster's own etcd user
    (credentials.py); clusters without an entry use :attr:`etcd_security`'s."""
    token: str | None = field(default=None, repr=False)
    """Bearer token every API request but the health checks must carry (auth.py)."""
    istio_workload: str | None = None
    """``NAME;NAMESPACE;CANONICAL_NAME;CANONICAL_REVISION`` of its pod, under Istio: it
    and :attr:`istio_tls_mode` go into the registration for the control plane's EDS
    (``--endpoints meshxl``; :class:`meshxl.model.IstioEndpoint`)."""
    istio_tls_mode: str = ""
    """Its pod's ``security.istio.io/tlsMode`` label (empty: no Istio proxy)."""
    dapr: DaprConfig | None = None
    """Dapr's state API on its own ports (None: off, nothing of it loaded)."""

    @property
    def istio(self) -> dict[str, str] | None:
        """The registration's ``istio`` object, None when not under Istio."""
        if self.istio_workload is None:
            return None
        return {"tls_mode": self.istio_tls_mode, "workload": self.istio_workload}

    def __post_init__(self) -> None:
        # The names go into etcd keys, every stored record (the owner) and the
        # registration: bounded here, as the model bounds them.
        for what, name in (("cluster", self.cluster), ("member", self.member),
                           ("site", self.site)):
            if name is not None and not re.fullmatch(NAME_PATTERN, name):
                raise ValueError(f"invalid {what} name {name[:80]!r}: 1-63 lowercase "
                                 "letters, digits, '.', '_' or '-', starting and ending "
                                 "with a letter or digit")
        app_host, _ = parse_hostport(self.app)
        try:  # what the member registers: the control plane's rule for member addresses
            check_member_address(app_host)
        except ValueError as exc:
            raise ValueError(f"invalid app address {app_host[:80]!r}: {exc}") from None
        host, _ = parse_hostport(self.listen, allow_zero=True)
        etcd.check_settings(self.etcd, self.etcd_security)
        if self.etcd_credentials_dir is not None:
            check_credentials_dir(self.etcd_credentials_dir)
        if self.token is not None:
            valid_token(self.token, "the configuration")
        check_exposure(host, self.token)
        for name, bound, value in self._numbers():
            if value is not None:
                bound.check(value, name)
        if self.socket_mode not in (0o600, 0o660):
            raise ValueError(f"--socket-mode: expected 0600 or 0660, got {self.socket_mode!r}")
        if self.dapr is not None and self.dapr.key_prefix == "appid":
            app_id = self.dapr.app_id or self.cluster
            if not _KEY_PREFIX.fullmatch(app_id):
                raise ValueError(f"--dapr-app-id {app_id[:80]!r} cannot prefix keys")
        if self.istio is not None:
            IstioEndpoint.from_dict(self.istio)
        elif self.istio_tls_mode:
            raise ValueError("an Istio tls mode needs the Istio workload (--istio-workload)")

    def _numbers(self) -> tuple[tuple[str, limits.Bound, float | None], ...]:
        """Each number of the configuration: the option (or field) naming it, its range
        (:mod:`meshxl.model.limits`, the command line's own), its value."""
        return (("--weight", limits.MEMBER_WEIGHT, self.weight),
                ("--session-ttl", limits.SESSION_TTL, self.session_ttl),
                ("--sync-delay", limits.SYNC_DELAY, self.sync_delay),
                ("--max-session-bytes", limits.SESSION_BYTES, self.max_bytes),
                ("--lease-ttl", limits.LEASE_TTL, self.lease_ttl),
                ("--batch-max-ops", limits.BATCH_MAX_OPS, self.batch_max_ops),
                ("batch_max_bytes", limits.BATCH_MAX_BYTES, self.batch_max_bytes),
                ("--max-inflight", limits.MAX_INFLIGHT, self.max_inflight),
                ("--max-connections", limits.MAX_CONNECTIONS, self.max_connections),
                ("sync_publish_interval", limits.PUBLISH_INTERVAL,
                 self.sync_publish_interval))
