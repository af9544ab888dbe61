"""Connecting to etcd: endpoint parsing, TLS and credential settings, and one client
for a list of endpoints that routes every request to a member that answers.

:func:`client` is the one entry point. Several endpoints give a
:class:`~meshxl.etcd.balanced.BalancedClient` (one health-checked channel per member:
:mod:`meshxl.etcd.balancer`); TLS and token authentication, which aetcd 1.0 lacks, are in
:mod:`meshxl.etcd.auth`. :mod:`meshxl.etcd` re-exports what callers use of them all. The
modules of TLS, authentication and several endpoints are loaded only by a client that
uses them: a sidecar on one plain endpoint carries none of them.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import aetcd
import grpc

from meshxl import tls
from meshxl.addr import bracketed
from meshxl.errors import InputError
from meshxl.etcd import h2c
from meshxl.etcd.balancer import Endpoint
from meshxl.etcd.endpoints import EtcdEndpointError, parse_urls

log = logging.getLogger("meshxl.etcd")

__all__ = ["EtcdEndpointError", "EtcdSecurity", "EtcdSecurityError", "check_credentials",
           "check_settings", "client", "credentials_refused", "describe_error", "parse_urls",
           "read_secret_file"]


class EtcdSecurityError(InputError):
    """Unusable etcd TLS or credential settings: a file missing or bad, half a pair."""


def read_secret_file(path: Path, what: str) -> str:
    """The first line of a password or token file, or a one-line error naming it."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise EtcdSecurityError(f"cannot read {what} {path}: {reason}") from None
    value = text.splitlines()[0].strip() if text.strip() else ""
    if not value:
        raise EtcdSecurityError(f"{what} {path} is empty")
    return value


def _read_pem(path: Path, what: str) -> bytes:
    try:
        return tls.read_pem(path, what)
    except tls.TlsFileError as exc:
        raise EtcdSecurityError(str(exc)) from None


@dataclass(frozen=True)
class EtcdSecurity:
    """How a meshxl process proves itself to etcd and checks etcd: TLS and credentials.

    ``ca`` verifies etcd's server certificate (default: the system's roots); ``cert`` and
    ``key`` are this client's certificate for etcd's ``--client-cert-auth``; ``user`` and
    ``password`` authenticate to etcd's RBAC (``etcdctl auth enable``). Files are read
    when a client is made; :meth:`check` reads them once up front for a clear error.
    ``user_file`` and ``password_file``: where ``user`` and ``password`` were read from,
    read again each time the client authenticates anew (:meth:`credentials`), so a
    password rotated in its file and then in etcd needs no restart.
    """

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    user_file: Path | None = None
    password_file: Path | None = None

    @property
    def rereads(self) -> bool:
        return self.user_file is not None or self.password_file is not None

    def credentials(self) -> tuple[str, str]:
        """The user and password as their files hold them now (those not from a file:
        as given); a one-line :class:`EtcdSecurityError` naming a file that cannot be
        read or is empty."""
        user = (read_secret_file(self.user_file, "etcd user name file")
                if self.user_file is not None else self.user or "")
        password = (read_secret_file(self.password_file, "etcd password file")
                    if self.password_file is not None else self.password or "")
        return user, password

    @property
    def tls_files(self) -> bool:
        return any(p is not None for p in (self.ca, self.cert, self.key))

    def check(self) -> None:
        """Raise :class:`EtcdSecurityError` (one line) unless every setting is usable."""
        if (self.cert is None) != (self.key is None):
            raise EtcdSecurityError("--etcd-cert and --etcd-key go together: give both or "
                                    "neither")
        if self.user is not None and not self.user.strip():
            raise EtcdSecurityError("--etcd-user is empty")
        if self.user and not self.password:
            raise EtcdSecurityError("--etcd-user needs a password: --etcd-password-file FILE "
                                    "or the MESHXL_ETCD_PASSWORD variable")
        if self.password and not self.user:
            raise EtcdSecurityError("an etcd password was given without --etcd-user")
        try:
            if self.ca is not None:
                tls.check_ca(self.ca, "--etcd-ca")
            if self.cert is not None and self.key is not None:
                tls.check_pair(self.cert, self.key, "--etcd-cert/--etcd-key")
        except tls.TlsFileError as exc:
            raise EtcdSecurityError(str(exc)) from None

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read_pem(self.ca, "--etcd-ca") if self.ca else None,
            private_key=_read_pem(self.key, "--etcd-key") if self.key else None,
            certificate_chain=_read_pem(self.cert, "--etcd-cert") if self.cert else None)


def check_settings(urls: str, security: EtcdSecurity | None) -> None:
    """Endpoints, files and credentials usable together, or a one-line ValueError."""
    tls_endpoints, _ = parse_urls(urls)
    if security is None:
        return
    security.check()
    if security.tls_files and not tls_endpoints:
        raise EtcdSecurityError("--etcd-ca, --etcd-cert and --etcd-key need https:// etcd "
                                "endpoints")


_CHANNEL_OPTIONS: dict[str, Any] = {
    "grpc.keepalive_time_ms": 2000,
    "grpc.keepalive_timeout_ms": 2000,
    "grpc.keepalive_permit_without_calls": 1,
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 500,
    # Also the deadline of one connection attempt (gRPC's default is 20 s): a member
    # whose connection attempt went into a partition is tried again soon after it heals.
    "grpc.min_reconnect_backoff_ms": 500,
    # A page of sessions (each up to ~1 MiB) or a watch response can pass gRPC's
    # 4 MiB default; readers also shrink their pages when a response is too large.
    "grpc.max_receive_message_length": 32 * 1024 * 1024,
}


def client(urls: str | list[tuple[str, int]], *, timeout: float | None = 5.0,
           security: EtcdSecurity | None = None) -> aetcd.Client:
    """An (unconnected) aetcd client for one or several etcd endpoints.

    Several endpoints give a :class:`BalancedClient` (one health-checked channel per
    member). ``https://`` endpoints dial with TLS; ``security`` adds a CA, a client
    certificate and credentials (see :class:`EtcdSecurity`).
    """
    tls, endpoints = parse_urls(urls) if isinstance(urls, str) else (False, urls)
    security = security or EtcdSecurity()
    if security.tls_files and not tls:
        raise EtcdSecurityError("--etcd-ca, --etcd-cert and --etcd-key need https:// etcd "
                                "endpoints")
    options = dict(_CHANNEL_OPTIONS)
    if len(endpoints) > 1 and tls:
        # Every member's certificate is checked against the first endpoint's name (etcd's
        # own TLS guide gives members one certificate naming them all).
        options["grpc.ssl_target_name_override"] = endpoints[0][0]
    members = [_one_client(h, p, tls, security, timeout, options) for h, p in endpoints]
    if len(members) == 1:
        return members[0]
    from meshxl.etcd.balanced import BalancedClient

    return BalancedClient([
        Endpoint(f"{bracketed(h)}:{p}", c, partial(_one_client, h, p, tls, security, timeout,
                                               options))
        for (h, p), c in zip(endpoints, members, strict=True)], timeout=timeout)


def _one_client(host: str, port: int, tls: bool, security: EtcdSecurity,
                timeout: float | None, options: dict[str, Any]) -> aetcd.Client:
    host = bracketed(host)
    if not tls and not security.user:
        return h2c.Client(host=host, port=port, timeout=timeout, options=options)
    from meshxl.etcd.auth import SecureClient, TokenAuth

    return SecureClient(host=host, port=port, timeout=timeout, options=options,
                         credentials=security.channel_credentials() if tls else None,
                         auth=TokenAuth(security.user, security.password or "", timeout,
                                        reread=security.credentials if security.rereads
                                        else None)
                         if security.user else None)


async def check_credentials(client: aetcd.Client) -> None:
    """Authenticate now if ``client`` has credentials: :class:`EtcdAuthError` if etcd
    refuses them. An unreachable etcd is not an error here (callers retry)."""
    from meshxl.etcd.auth import token_auth

    auth = token_auth(client)
    if auth is None:
        return
    await client.connect()
    try:
        await auth.token()
    except grpc.aio.AioRpcError as exc:
        log.warning("etcd authentication not checked yet: %s", exc.details())


def credentials_refused(exc: BaseException) -> bool:
    """``exc`` is etcd refusing the user name and password
    (:class:`meshxl.etcd.auth.EtcdAuthError`). Only a client with credentials raises it,
    which loaded that module: none loaded, none raised."""
    auth = sys.modules.get("meshxl.etcd.auth")
    return auth is not None and isinstance(exc, auth.EtcdAuthError)


def describe_error(exc: BaseException) -> str:
    """One line for an etcd failure, with a hint when it looks like a TLS mismatch."""
    if credentials_refused(exc):
        return str(exc)
    text = str(exc) or type(exc).__name__
    hints = (
        ("CERTIFICATE_VERIFY_FAILED", "etcd's certificate is not signed by --etcd-ca or does "
                                      "not name the endpoint's host"),
        ("TSI_DATA_CORRUPTED", "etcd refused this client's certificate (--etcd-cert and "
                               "--etcd-key, signed by a CA etcd trusts)"),
        ("BAD_CERTIFICATE", "etcd refused this client's certificate (--etcd-cert and "
                            "--etcd-key, signed by a CA etcd trusts)"),
        ("WRONG_VERSION_NUMBER", "etcd does not speak TLS there: use http://"),
        ("Socket closed", "if etcd serves TLS, use https:// endpoints"),
        ("user name is empty", "etcd has authentication enabled: give --etcd-user and a "
                               "password"),
        ("permission denied", "the etcd user (or client certificate name) lacks access to "
                              "meshxl's keys"),
    )
    for needle, hint in hints:
        if needle in text:
            return f"{type(exc).__name__}: {text} ({hint})"
    return f"{type(exc).__name__}: {text}"
