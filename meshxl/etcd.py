"""Connecting to etcd: endpoint parsing and one aetcd client for a list of endpoints.

aetcd dials ``f"{host}:{port}"``; gRPC's ``ipv4:``/``ipv6:`` target syntax lists
several addresses in one target, so a multi-member ``--etcd`` list becomes one
channel that fails over between members without any change to aetcd.

TLS (``https://`` endpoints, a CA, a client certificate) and username/password
authentication (:class:`EtcdSecurity`) are one more thing aetcd 1.0 lacks: it always
dials in plaintext and fetches its auth token once, so a token etcd forgot (after a
restart, or an idle ``--auth-token-ttl``) would fail every later request. The
:class:`_SecureClient` subclass dials with TLS credentials, and a gRPC interceptor
adds the token to every call, fetches a new one when etcd says it is invalid and
retries the call once. Plain ``http://`` clients without credentials stay vanilla
aetcd clients, interceptor-free.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aetcd
import grpc
from aetcd import rpc, watcher

from meshxl import tls

log = logging.getLogger(__name__)


class EtcdEndpointError(ValueError):
    """An ``--etcd`` value that is not a list of http(s)://HOST:PORT URLs."""


class EtcdSecurityError(ValueError):
    """Unusable etcd TLS or credential settings: a file missing or bad, half a pair."""


class EtcdAuthError(aetcd.exceptions.ClientError):  # type: ignore[misc]
    """etcd refused the user name and password (a wrong setting, not a passing fault)."""


def parse_urls(urls: str) -> tuple[bool, list[tuple[str, int]]]:
    """``(tls, [(host, port), ...])`` of ``http(s)://h1:2379,...`` (scheme optional:
    http). All endpoints must use one scheme."""
    endpoints = []
    schemes = set()
    for raw in (u.strip() for u in urls.split(",")):
        if not raw:
            continue
        parts = urlsplit(raw if "://" in raw else f"http://{raw}")
        if parts.scheme not in ("http", "https"):
            raise EtcdEndpointError(f"unsupported etcd URL scheme {parts.scheme!r} in {raw!r}: "
                                    "use http://HOST:PORT or https://HOST:PORT")
        try:
            port = parts.port
        except ValueError:
            raise EtcdEndpointError(f"bad port in etcd URL {raw!r}") from None
        if not parts.hostname or port is None or parts.path not in ("", "/"):
            raise EtcdEndpointError(f"etcd URL must be http(s)://HOST:PORT, got {raw!r}")
        schemes.add(parts.scheme)
        endpoints.append((parts.hostname, port))
    if not endpoints:
        raise EtcdEndpointError("no etcd endpoint given")
    if len(schemes) > 1:
        raise EtcdEndpointError(f"etcd endpoints mix http:// and https:// in {urls!r}: "
                                "use one scheme")
    return schemes == {"https"}, endpoints


def parse_endpoints(urls: str) -> list[tuple[str, int]]:
    """Parse ``http://h1:2379,http://h2:2379`` (scheme optional) into (host, port)."""
    return parse_urls(urls)[1]


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
    """

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)

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


def _literal(host: str, port: int) -> list[tuple[str, int]]:
    """IP literals for a host (several members need them in one gRPC target)."""
    try:
        ipaddress.ip_address(host)
        return [(host, port)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise EtcdEndpointError(f"cannot resolve etcd host {host!r}: {exc}") from None
    return list(dict.fromkeys((str(i[4][0]), port) for i in infos))


def check_settings(urls: str, security: EtcdSecurity | None) -> None:
    """Endpoints, files and credentials usable together, or a one-line ValueError."""
    tls_endpoints, _ = parse_urls(urls)
    if security is None:
        return
    security.check()
    if security.tls_files and not tls_endpoints:
        raise EtcdSecurityError("--etcd-ca, --etcd-cert and --etcd-key need https:// etcd "
                                "endpoints")


def client(urls: str | list[tuple[str, int]], *, timeout: float | None = 5.0,
           security: EtcdSecurity | None = None) -> aetcd.Client:
    """An (unconnected) aetcd client for one or several etcd endpoints.

    ``https://`` endpoints dial with TLS; ``security`` adds a CA, a client certificate
    and credentials (see :class:`EtcdSecurity`).
    """
    tls, endpoints = parse_urls(urls) if isinstance(urls, str) else (False, urls)
    security = security or EtcdSecurity()
    if security.tls_files and not tls:
        raise EtcdSecurityError("--etcd-ca, --etcd-cert and --etcd-key need https:// etcd "
                                "endpoints")
    options: dict[str, Any] = {
        "grpc.keepalive_time_ms": 2000,
        "grpc.keepalive_timeout_ms": 2000,
        "grpc.keepalive_permit_without_calls": 1,
        "grpc.initial_reconnect_backoff_ms": 100,
        "grpc.max_reconnect_backoff_ms": 1000,
        # A page of sessions (each up to ~1 MiB) or a watch response can pass gRPC's
        # 4 MiB default; readers also shrink their pages when a response is too large.
        "grpc.max_receive_message_length": 32 * 1024 * 1024,
    }
    if len(endpoints) == 1:
        host, port = endpoints[0]
    else:
        if tls:
            # One channel, several addresses: every member's certificate is checked
            # against the first endpoint's name (etcd's own TLS guide gives members one
            # certificate naming them all; or list one DNS name that resolves to all).
            options["grpc.ssl_target_name_override"] = endpoints[0][0]
        literals = [lit for h, p in endpoints for lit in _literal(h, p)]
        v6 = {":" in h for h, _ in literals}
        if len(v6) > 1:
            raise EtcdEndpointError("etcd endpoints mix IPv4 and IPv6 addresses: use one family")
        family = "ipv6" if v6 == {True} else "ipv4"
        *rest, (last_host, last_port) = literals
        # aetcd appends ":{port}" to host: put every endpoint but the last port in "host".
        head = ",".join(f"{_host(h)}:{p}" for h, p in rest)
        host, port = f"{family}:{head},{_host(last_host)}", last_port
    if not tls and not security.user:
        return aetcd.Client(host=host, port=port, timeout=timeout, options=options)
    return _SecureClient(host=host, port=port, timeout=timeout, options=options,
                         credentials=security.channel_credentials() if tls else None,
                         auth=_TokenAuth(security.user, security.password or "", timeout)
                         if security.user else None)


async def check_credentials(client: aetcd.Client) -> None:
    """Authenticate now if ``client`` has credentials: :class:`EtcdAuthError` if etcd
    refuses them. An unreachable etcd is not an error here (callers retry)."""
    auth = getattr(client, "_auth", None)
    if not isinstance(auth, _TokenAuth):
        return
    await client.connect()
    try:
        await auth.token()
    except grpc.aio.AioRpcError as exc:
        log.warning("etcd authentication not checked yet: %s", exc.details())


def describe_error(exc: BaseException) -> str:
    """One line for an etcd failure, with a hint when it looks like a TLS mismatch."""
    if isinstance(exc, EtcdAuthError):
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


# -- TLS and authentication ------------------------------------------------------------------

_AUTHENTICATE = "/etcdserverpb.Auth/Authenticate"
_WATCH = "/etcdserverpb.Watch/Watch"
# etcd answers these when a request's token is unknown (expired, or etcd restarted and
# forgot its simple tokens) or missing (auth was enabled after the client connected).
_TOKEN_ERRORS = ("invalid auth token", "user name is empty")


def _method(details: grpc.aio.ClientCallDetails) -> str:
    method = details.method
    return method.decode() if isinstance(method, bytes) else str(method)


def _stale_token(code: grpc.StatusCode | None, message: str | None) -> bool:
    return code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT) \
        and any(e in (message or "") for e in _TOKEN_ERRORS)


class _TokenAuth:
    """One auth token per client, fetched on first use and again when etcd rejects it.

    A watch stream is checked against its token when each watch is created, and etcd
    3.4 refuses a watch with a stale token by cancelling it (no gRPC error), so a watch
    stream starts only with a token a call confirmed recently (:data:`WATCH_TOKEN_AGE`).
    """

    WATCH_TOKEN_AGE = 1.0

    def __init__(self, user: str, password: str, timeout: float | None):
        self._user = user
        self._password = password
        self._timeout = timeout
        self._token: str | None = None
        self._confirmed = 0.0
        self._disabled = False
        self._lock = asyncio.Lock()
        self.channel: grpc.aio.Channel | None = None
        self.authentications = 0

    async def token(self, max_age: float | None = None) -> str | None:
        """The current token; a new one if there is none (or it was last confirmed more
        than ``max_age`` seconds ago)."""
        if self._usable(max_age):
            return self._token
        async with self._lock:
            if not self._usable(max_age):
                await self._authenticate()
        return self._token

    def _usable(self, max_age: float | None) -> bool:
        if self._disabled:
            return True
        if self._token is None:
            return False
        return max_age is None or time.monotonic() - self._confirmed < max_age

    def confirm(self, token: str | None) -> None:
        """A call with ``token`` succeeded: etcd still knows it."""
        if token is not None and token == self._token:
            self._confirmed = time.monotonic()

    def invalidate(self, token: str | None) -> None:
        """Forget ``token`` (unless another call already replaced it)."""
        if token == self._token:
            self._token = None
            self._disabled = False

    @property
    def current(self) -> str | None:
        return self._token

    async def _authenticate(self) -> None:
        assert self.channel is not None
        stub = rpc.AuthStub(self.channel)
        request = rpc.AuthenticateRequest(name=self._user, password=self._password)
        try:
            response = await stub.Authenticate(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            details = exc.details() or ""
            if "authentication is not enabled" in details:
                # Like etcd's own client: credentials for an etcd without auth are
                # harmless, and auth can be enabled later (the next call authenticates).
                log.info("etcd authentication is not enabled; sending no token")
                self._disabled = True
                return
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise EtcdAuthError(f"etcd refused user {self._user!r}: "
                                    f"{details.removeprefix('etcdserver: ')}") from None
            raise
        self._token = response.token
        self._confirmed = time.monotonic()
        self._disabled = False
        self.authentications += 1

    def interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        return [_UnaryAuth(self), _UnaryStreamAuth(self), _StreamUnaryAuth(self),
                _StreamStreamAuth(self)]


def _with_token(details: grpc.aio.ClientCallDetails,
                token: str | None) -> grpc.aio.ClientCallDetails:
    if token is None:
        return details
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata["token"] = token
    return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata,
                                      details.credentials, details.wait_for_ready)


class _UnaryAuth(grpc.aio.UnaryUnaryClientInterceptor):
    """Unary calls carry the token; one rejected for its token is retried once."""

    def __init__(self, auth: _TokenAuth):
        self._auth = auth

    async def intercept_unary_unary(self, continuation: Callable[..., Awaitable[Any]],
                                    client_call_details: grpc.aio.ClientCallDetails,
                                    request: Any) -> Any:
        if _method(client_call_details) == _AUTHENTICATE:
            return await continuation(client_call_details, request)
        token = await self._auth.token()
        call = await continuation(_with_token(client_call_details, token), request)
        try:
            await call
        except grpc.aio.AioRpcError as exc:
            if not _stale_token(exc.code(), exc.details()):
                raise
            self._auth.invalidate(token)
            token = await self._auth.token()
            return await continuation(_with_token(client_call_details, token), request)
        self._auth.confirm(token)
        return call


class _StreamAuth:
    """Streams (watch, lease keep-alive) carry the token; a stream that fails for its
    token makes the next call authenticate again (the caller retries the stream).

    grpc.aio files an interceptor under the first kind it is an instance of, so each
    kind of stream gets its own subclass.
    """

    def __init__(self, auth: _TokenAuth):
        self._auth = auth

    async def _intercept(self, continuation: Callable[..., Awaitable[Any]],
                         details: grpc.aio.ClientCallDetails, request: Any) -> Any:
        watch = _method(details) == _WATCH
        token = await self._auth.token(_TokenAuth.WATCH_TOKEN_AGE if watch else None)
        call = await continuation(_with_token(details, token), request)

        def done(finished: Any) -> None:
            task = asyncio.ensure_future(_finished_status(finished))
            task.add_done_callback(lambda t: self._check(t, token))

        call.add_done_callback(done)
        return call

    def _check(self, task: asyncio.Future[tuple[grpc.StatusCode, str]],
               token: str | None) -> None:
        if not task.cancelled() and task.exception() is None and _stale_token(*task.result()):
            self._auth.invalidate(token)


class _UnaryStreamAuth(_StreamAuth, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Callable[..., Any],
                                     client_call_details: grpc.aio.ClientCallDetails,
                                     request: Any) -> Any:
        return await self._intercept(continuation, client_call_details, request)


class _StreamUnaryAuth(_StreamAuth, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Callable[..., Any],
                                     client_call_details: grpc.aio.ClientCallDetails,
                                     request_iterator: Any) -> Any:
        return await self._intercept(continuation, client_call_details, request_iterator)


class _StreamStreamAuth(_StreamAuth, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Callable[..., Any],
                                      client_call_details: grpc.aio.ClientCallDetails,
                                      request_iterator: Any) -> Any:
        return await self._intercept(continuation, client_call_details, request_iterator)


async def _finished_status(call: Any) -> tuple[grpc.StatusCode, str]:
    return await call.code(), await call.details()


class _SecureClient(aetcd.Client):
    """aetcd's client dialing with TLS credentials and/or sending an auth token.

    Only :meth:`connect` differs from aetcd's: the channel is secure when
    ``credentials`` are given, and the token comes from the interceptors (aetcd's
    ``metadata`` stays None), so a token etcd no longer knows is replaced on the fly.
    """

    def __init__(self, *, host: str, port: int, timeout: float | None,
                 options: dict[str, Any], credentials: grpc.ChannelCredentials | None,
                 auth: _TokenAuth | None):
        super().__init__(host=host, port=port, timeout=timeout,  # type: ignore[arg-type]
                         options=options)
        self._credentials = credentials
        self._auth = auth

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self._is_connecting:  # type: ignore[has-type]
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        try:
            self._is_connecting = True
            target = f"{self._host}:{self._port}"
            options = list(self._options.items())
            interceptors = self._auth.interceptors() if self._auth else None
            if self._credentials is not None:
                self.channel = grpc.aio.secure_channel(target, self._credentials, options,
                                                       interceptors=interceptors)
            else:
                self.channel = grpc.aio.insecure_channel(target, options,
                                                         interceptors=interceptors)
            if self._auth is not None:
                self._auth.channel = self.channel
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = _Watcher(rpc.WatchStub(self.channel), timeout=self._timeout,
                                     auth=self._auth)
            self._connected.set()
        finally:
            self._is_connecting = False


class _Watcher(watcher.Watcher):  # type: ignore[misc]
    """aetcd's watcher, except that a watch etcd cancels with a reason (refused for its
    token or its permissions) fails instead of waiting forever for events.

    aetcd registers a created-and-cancelled watch as if it were live. Raising here ends
    the stream like a connection error: every watch on it gets the error, and its
    owner starts a new one (on a new stream, with a new token).
    """

    def __init__(self, watchstub: Any, *, timeout: float | None, auth: _TokenAuth | None):
        super().__init__(watchstub, timeout=timeout, metadata=None)
        self._auth = auth

    async def _handle_response(self, response: Any) -> None:
        if response.canceled and response.cancel_reason:
            if self._auth is not None:
                self._auth.invalidate(self._auth.current)
            raise aetcd.exceptions.ClientError(
                f"etcd cancelled the watch: {response.cancel_reason}")
        await super()._handle_response(response)


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
