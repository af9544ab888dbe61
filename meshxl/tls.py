"""TLS files: PEM certificates and keys read with one-line errors, and gRPC server
credentials that pick up renewed files without a restart.

Shared by the xDS server (``--tls-cert``/``--tls-key``/``--client-ca``) and the etcd
client settings; nothing here starts a server or opens a connection.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from pathlib import Path

import grpc

from meshxl.errors import InputError

__all__ = ["ServerTls", "TlsFileError", "check_ca", "check_pair", "read_pem"]

log = logging.getLogger(__name__)


class TlsFileError(InputError):
    """A certificate, key or CA file that cannot be used; the message names it."""


def read_pem(path: Path, what: str) -> bytes:
    """The bytes of a PEM file, or :class:`TlsFileError` naming ``what`` and the file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TlsFileError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise TlsFileError(f"{what} {path} is not a PEM file")
    return data


def check_pair(cert: Path, key: Path, what: str) -> None:
    """The certificate chain and its private key load and match."""
    read_pem(cert, f"{what} certificate")
    read_pem(key, f"{what} key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_cert_chain(str(cert), str(key))
    except ssl.SSLError as exc:
        raise TlsFileError(f"{what} certificate {cert} and key {key} do not load as a "
                           f"matching pair ({exc.reason or exc})") from None


def check_ca(path: Path, what: str) -> None:
    """The file holds at least one CA certificate."""
    read_pem(path, what)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=str(path))
    except ssl.SSLError as exc:
        raise TlsFileError(f"{what} {path} holds no usable certificate "
                           f"({exc.reason or exc})") from None


def _stamp(paths: tuple[Path, ...]) -> tuple[tuple[int, int, int], ...]:
    out = []
    for path in paths:
        st = os.stat(path)
        out.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


class ServerTls:
    """gRPC server credentials from a certificate, a key and (mutual TLS) a client CA.

    The files are checked when the credentials are made and re-read when they change
    (checked on each new connection, at most once a second), so a renewed certificate
    (cert-manager, a Secret update) is served to new connections without a restart.
    A renewal caught half-written keeps the previous files until it is complete.
    """

    RECHECK_SECONDS = 1.0

    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None):
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._paths = (cert, key) + ((client_ca,) if client_ca else ())
        self._lock = threading.Lock()
        self._checked = 0.0
        self.reloads = 0
        self._stamp, self._config = self._load()

    def _load(self) -> tuple[tuple[tuple[int, int, int], ...],
                             grpc.ServerCertificateConfiguration]:
        check_pair(self.cert, self.key, "TLS")
        if self.client_ca is not None:
            check_ca(self.client_ca, "client CA")
        stamp = _stamp(self._paths)
        pairs = [(read_pem(self.key, "TLS key"), read_pem(self.cert, "TLS certificate"))]
        root = read_pem(self.client_ca, "client CA") if self.client_ca else None
        return stamp, grpc.ssl_server_certificate_configuration(pairs, root_certificates=root)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC before each TLS handshake: a new configuration, or None."""
        import time

        now = time.monotonic()
        with self._lock:
            if now - self._checked < self.RECHECK_SECONDS:
                return None
            self._checked = now
            try:
                if _stamp(self._paths) == self._stamp:
                    return None
                self._stamp, self._config = self._load()
            except (OSError, TlsFileError) as exc:
                log.warning("TLS files changed but cannot be loaded yet (%s); still serving "
                            "the previous certificate", exc)
                return None
            self.reloads += 1
            log.info("TLS certificate reloaded from %s", self.cert)
            return self._config

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._config, self._fetch,
            require_client_authentication=self.client_ca is not None)
