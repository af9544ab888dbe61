"""TLS and authentication for etcd clients (used through :func:`meshxl.etcd.client`).

TLS (``https://`` endpoints, a CA, a client certificate) and username/password
authentication (:class:`EtcdSecurity`) are one more thing aetcd 1.0 lacks: it always
dials in plaintext and fetches its auth token once, so a token etcd forgot (after a
restart, or an idle ``--auth-token-ttl``) would fail every later request. The
:class:`SecureClient` subclass dials with TLS credentials, and a gRPC interceptor
adds the token to every call, fetches a new one when etcd says it is invalid and
retries the call once. Plain ``http://`` clients without credentials for one endpoint
stay vanilla aetcd clients, interceptor-free.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aetcd
import grpc
from aetcd import rpc, watcher

from meshxl.errors import Unavailable

log = logging.getLogger("meshxl.etcd")


class EtcdAuthError(aetcd.exceptions.ClientError, Unavailable):  # type: ignore[misc]
    """etcd refused the user name and password (a wrong setting, not a passing fault)."""


_AUTHENTICATE = "/etcdserverpb.Auth/Authenticate"
_WATCH = "/etcdserverpb.Watch/Watch"
# etcd answers these when a request's token is unknown (expired after an idle
# --auth-token-ttl, dropped by a password change, or forgotten by a restart), missing
# (auth was enabled after the client connected), or was checked against users and roles
# that changed before the request applied ("revision of auth store is old": refused at
# apply, so nothing of it applied, as for the other two, refused before it is proposed).
# A call refused so is sent once more with a new token: never applied twice.
TOKEN_ERRORS = ("invalid auth token", "user name is empty", "revision of auth store is old")


def _method(details: grpc.aio.ClientCallDetails) -> str:
    method = details.method
    return method.decode() if isinstance(method, bytes) else str(method)


def stale_token(code: grpc.StatusCode | None, message: str | None) -> bool:
    """etcd refused a call for its token (:data:`TOKEN_ERRORS`), before applying it: the
    call may be sent again with a new one."""
    return code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT) \
        and any(e in (message or "") for e in TOKEN_ERRORS)


class TokenAuth:
    """One auth token per client, fetched on first use and again when etcd rejects it.

    A watch stream is checked against its token when each watch is created, and etcd
    3.4 refuses a watch with a stale token by cancelling it (no gRPC error), so a watch
    stream starts only with a token a call confirmed recently (:data:`WATCH_TOKEN_AGE`).
    """

    WATCH_TOKEN_AGE = 1.0

    def __init__(self, user: str, password: str, timeout: float | None,
                 reread: Callable[[], tuple[str, str]] | None = None):
        self._user = user
        self._password = password
        self._timeout = timeout
        self._reread = reread
        """The user and password as their files hold them now (a rotated password),
        asked each time a token is fetched; None: always the ones given."""
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

    @staticmethod
    def stale(token: str | None, code: grpc.StatusCode | None, message: str | None) -> bool:
        """Whether etcd refused a call sent with ``token`` for want of a valid one, so
        that it may be sent again with a new one: a token etcd no longer knows
        (:func:`stale_token`), or none at all while authentication was off, refused for
        its permissions since authentication came on (etcd then checks the call as the
        client certificate's user, which a bridge's certificate does not name). Either
        way etcd applied nothing of it."""
        if stale_token(code, message):
            return True
        return token is None and code == grpc.StatusCode.PERMISSION_DENIED \
            and "permission denied" in (message or "")

    def refused(self) -> None:
        """etcd cancelled a watch with a reason (a token it no longer knows, after a
        restart or the token's TTL: etcd 3.4 says so this way, with no gRPC error for
        the interceptors to see): the next call or stream authenticates again."""
        self.invalidate(self._token)

    @property
    def current(self) -> str | None:
        return self._token

    async def _authenticate(self) -> None:
        """Log in with the credentials as their files hold them now; while etcd refuses
        a password the files changed to, with the last one that worked (a password is
        rotated file first, then in etcd: in between, a token etcd dropped or let
        expire is renewed with the old one)."""
        assert self.channel is not None
        last = (self._user, self._password)
        candidates = [last]
        if self._reread is not None:
            try:
                now = self._reread()
            except Exception as exc:  # a file being replaced: the last good ones
                log.warning("etcd credentials not read again (%s); using the last ones", exc)
            else:
                if now != last:
                    candidates = [now, last] if self.authentications else [now]
        for user, password in candidates:
            try:
                response = await self._login(user, password)
            except EtcdAuthError:
                if (user, password) == candidates[-1]:
                    raise
                continue
            if response is None:
                return
            if (user, password) != last:
                log.info("etcd credentials read again from their files: %s",
                         "password changed" if user == last[0] else f"user {user!r}")
                self._user, self._password = user, password
            elif len(candidates) > 1:
                log.info("etcd refused the password now in its file for user %r; the "
                         "previous one still works (until etcd is given the new one)", user)
            self._token = response.token
            self._confirmed = time.monotonic()
            self._disabled = False
            self.authentications += 1
            return

    async def _login(self, user: str, password: str) -> Any:
        """etcd's answer to Authenticate; None when authentication is off (sending no
        token then); :class:`EtcdAuthError` when etcd refuses the password."""
        assert self.channel is not None
        stub = rpc.AuthStub(self.channel)
        request = rpc.AuthenticateRequest(name=user, password=password)
        try:
            return await stub.Authenticate(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            details = exc.details() or ""
            if "authentication is not enabled" in details:
                # Like etcd's own client: credentials for an etcd without auth are
                # harmless, and auth can be enabled later (the next call authenticates).
                log.info("etcd authentication is not enabled; sending no token")
                self._disabled = True
                return None
            # A wrong password is INVALID_ARGUMENT; a password for a user made without
            # one (--no-password: a certificate's user), an UNKNOWN with the same words.
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT \
                    or "authentication failed" in details:
                raise EtcdAuthError(f"etcd refused user {user!r}: "
                                    f"{details.removeprefix('etcdserver: ')}") from None
            raise

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


class _UnaryAuth(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Unary calls carry the token; one rejected for its token is retried once."""

    def __init__(self, auth: TokenAuth):
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
            if not self._auth.stale(token, exc.code(), exc.details()):
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

    def __init__(self, auth: TokenAuth):
        self._auth = auth

    async def _intercept(self, continuation: Callable[..., Awaitable[Any]],
                         details: grpc.aio.ClientCallDetails, request: Any) -> Any:
        watch = _method(details) == _WATCH
        token = await self._auth.token(TokenAuth.WATCH_TOKEN_AGE if watch else None)
        call = await continuation(_with_token(details, token), request)

        def done(finished: Any) -> None:
            task = asyncio.ensure_future(_finished_status(finished))
            task.add_done_callback(lambda t: self._check(t, token))

        call.add_done_callback(done)
        return call

    def _check(self, task: asyncio.Future[tuple[grpc.StatusCode, str]],
               token: str | None) -> None:
        if not task.cancelled() and task.exception() is None \
                and self._auth.stale(token, *task.result()):
            self._auth.invalidate(token)


class _UnaryStreamAuth(_StreamAuth, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_stream(self, continuation: Callable[..., Any],
                                     client_call_details: grpc.aio.ClientCallDetails,
                                     request: Any) -> Any:
        return await self._intercept(continuation, client_call_details, request)


class _StreamUnaryAuth(_StreamAuth, grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_stream_unary(self, continuation: Callable[..., Any],
                                     client_call_details: grpc.aio.ClientCallDetails,
                                     request_iterator: Any) -> Any:
        return await self._intercept(continuation, client_call_details, request_iterator)


class _StreamStreamAuth(_StreamAuth, grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_stream_stream(self, continuation: Callable[..., Any],
                                      client_call_details: grpc.aio.ClientCallDetails,
                                      request_iterator: Any) -> Any:
        return await self._intercept(continuation, client_call_details, request_iterator)


async def _finished_status(call: Any) -> tuple[grpc.StatusCode, str]:
    return await call.code(), await call.details()


class SecureClient(aetcd.Client):  # type: ignore[misc]
    """aetcd's client dialing with TLS credentials and/or sending an auth token.

    Only :meth:`connect` differs from aetcd's: the channel is secure when
    ``credentials`` are given, and the token comes from the interceptors (aetcd's
    ``metadata`` stays None), so a token etcd no longer knows is replaced on the fly.
    """

    def __init__(self, *, host: str, port: int, timeout: float | None,
                 options: dict[str, Any], credentials: grpc.ChannelCredentials | None,
                 auth: TokenAuth | None):
        super().__init__(host=host, port=port, timeout=timeout,
                         options=options)
        self._credentials = credentials
        self._auth = auth

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self._is_connecting:  # type: ignore[has-type]
            async with asyncio.timeout(self._connect_wait_timeout):
                await self._connected.wait()
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

    def __init__(self, watchstub: Any, *, timeout: float | None, auth: TokenAuth | None):
        super().__init__(watchstub, timeout=timeout, metadata=None)
        self._auth = auth

    async def _handle_response(self, response: Any) -> None:
        if response.canceled and response.cancel_reason:
            if self._auth is not None:
                self._auth.refused()
            raise aetcd.exceptions.ClientError(
                f"etcd cancelled the watch: {response.cancel_reason}")
        await super()._handle_response(response)


def token_auth(client: aetcd.Client) -> TokenAuth | None:
    """The token authentication of ``client`` (None: a client without a password)."""
    auth = getattr(client, "_auth", None)
    return auth if isinstance(auth, TokenAuth) else None


def watch_refused(client: aetcd.Client) -> None:
    """etcd cancelled a watch of ``client`` with a reason: :meth:`TokenAuth.refused`
    (a client without a password: nothing to do)."""
    auth = token_auth(client)
    if auth is not None:
        auth.refused()
