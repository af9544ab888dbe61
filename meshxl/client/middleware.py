"""Session state for web applications: loaded from the sidecar before the handler runs,
saved after it if it changed.

The session id comes from a header (``x-session-id`` by default, the one the model's
stickiness hashes on) or a cookie; a request naming none passes through untouched. The
handler finds a :class:`RequestSession` (its ``state`` is ``default()``, ``{}``, for a
session that does not exist yet) and changes ``state`` in place or replaces it:

* aiohttp: ``app = meshxl.web.application(middlewares=[aiohttp_middleware(client)])``,
  then ``request[SESSION]`` (``request.get(SESSION)`` where a request may name none);
* ASGI: ``app = SessionMiddleware(app, client)``, then
  ``scope["state"]["meshxl_session"]`` (Starlette: ``request.state.meshxl_session``).

Beside a sidecar serving several clusters (a pool's virtual systems), the aiohttp
middleware's ``cluster=`` names each request's cluster (``cluster_from_host``: the Host's
first label); an invalid name answers 400.

The state is written back only if it changed (its JSON differs from what was read),
with the ETag of the read (``If-Match``; ``If-None-Match: *`` for a new session), so a
concurrent change is never overwritten. When the write loses (another request or
member wrote the session meanwhile), the client gets **409** and a JSON error, in place
of the handler's answer; with ``retries=N`` the middleware reads the session again and
runs the handler again instead, up to N more times (``update`` semantics: only for
handlers whose one effect is the session state; the request body is replayed, so read
it with ``await request.read()``/``json()``/``text()``, not as a stream).

Other failures answer JSON too: an invalid session id 400, the sidecar unavailable,
unreachable or refusing this app's token 503 (Envoy retries those elsewhere).

When it is saved: aiohttp, after the handler returned its response (or raised a
redirect; a handler that raises saves nothing); ASGI, when the application starts its
response (held back until the write is acknowledged) and again at the end if the
state changed while the body was streaming. A streamed aiohttp response
(``StreamResponse.prepare``) has left before the state is saved: a lost write then
raises instead of answering 409.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from meshxl import headers as hdr
from meshxl.errors import InputError, detached

from .aio import AsyncClient
from .errors import (
    BadRequest,
    OverQuota,
    SidecarConflict,
    SidecarError,
    SidecarNotFound,
    retry_after_header,
)
from .plans import JSON, check_session_id, encode_state
from .sync import Client

__all__ = ["SCOPE_KEY", "SESSION", "RequestSession", "SessionMiddleware",
           "aiohttp_middleware", "cluster_from_host", "load", "load_sync",
           "over_quota_body", "save", "save_sync"]

MAX_CLUSTER_CLIENTS = 1024
"""Clients of clusters kept by a middleware given ``cluster`` (a request may name any)."""
SCOPE_KEY = "meshxl_session"
"""Where the ASGI middleware puts the session: ``scope["state"][SCOPE_KEY]``."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
AsgiApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(eq=False)
class RequestSession:
    """A session as one request sees it."""

    id: str
    state: Any
    etag: str | None
    """The ETag it was read (or last saved) at; None for a session not yet created."""
    owner: str | None = None
    content_type: str = JSON
    _saved: bytes = field(default=b"", repr=False)

    @property
    def new(self) -> bool:
        return self.etag is None

    @property
    def changed(self) -> bool:
        """The state differs from what was read or last saved."""
        return self._encoded() != self._saved

    def _encoded(self) -> bytes:
        try:
            return encode_state(self.state, self.content_type)[0]
        except BadRequest as exc:  # the handler's doing, not the client's
            raise TypeError(f"session {self.id!r}: {exc}") from None


async def load(client: AsyncClient, session_id: str,
               default: Callable[[], Any] = dict) -> RequestSession:
    """The session from the sidecar; ``default()`` as the state of a missing one."""
    try:
        found = await client.get(session_id)
    except SidecarNotFound:
        session = RequestSession(session_id, default(), None)
    else:
        session = RequestSession(session_id, found.state, found.etag, found.owner,
                                 found.content_type)
    session._saved = session._encoded()
    return session


async def save(client: AsyncClient, session: RequestSession) -> bool:
    """Write the state back if it changed, conditional on the ETag it was read at;
    whether it wrote. :class:`~meshxl.client.errors.SidecarConflict` (or its
    ``SidecarPreconditionFailed``) when the session changed meanwhile."""
    data = session._encoded()
    if data == session._saved:
        return False
    written = await client.put(session.id, session.state, content_type=session.content_type,
                               if_match=session.etag, create_only=session.etag is None)
    session.etag, session.owner, session._saved = written.etag, written.owner, data
    return True


def load_sync(client: Client, session_id: str,
              default: Callable[[], Any] = dict) -> RequestSession:
    """:func:`load` with the blocking :class:`~meshxl.client.Client` (threads, the sync
    gRPC server)."""
    try:
        found = client.get(session_id)
    except SidecarNotFound:
        session = RequestSession(session_id, default(), None)
    else:
        session = RequestSession(session_id, found.state, found.etag, found.owner,
                                 found.content_type)
    session._saved = session._encoded()
    return session


def save_sync(client: Client, session: RequestSession) -> bool:
    """:func:`save` with the blocking :class:`~meshxl.client.Client`."""
    data = session._encoded()
    if data == session._saved:
        return False
    written = client.put(session.id, session.state, content_type=session.content_type,
                         if_match=session.etag, create_only=session.etag is None)
    session.etag, session.owner, session._saved = written.etag, written.owner, data
    return True


def _failure(exc: SidecarError, session_id: str) -> tuple[int, dict[str, Any]]:
    """What the application's client gets when its session cannot be loaded or saved
    (a 429's ``Retry-After`` header: :func:`_headers`)."""
    if isinstance(exc, BadRequest) and exc.status is None:  # the request's session id
        return 400, {"error": exc.message, "status": 400}
    if isinstance(exc, SidecarConflict):
        return 409, {"error": f"session {session_id!r} changed while this request ran "
                              f"({exc.message}); send the request again",
                     "status": 409, "session": session_id}
    if isinstance(exc, OverQuota):  # the tenant's own limit: no other member helps
        return 429, {**over_quota_body(exc), "session": session_id}
    return 503, {"error": f"session state unavailable: {exc}", "status": 503,
                 "session": session_id}


def over_quota_body(exc: OverQuota) -> dict[str, Any]:
    """The JSON body of an application's 429 passing the sidecar's quota refusal on:
    its message, and the sidecar's ``quota``, ``limit`` and ``retry_after``."""
    return {"error": f"session state over quota: {exc.message}", "status": 429,
            **{k: v for k, v in exc.details.items() if k in ("quota", "limit", "retry_after")}}


def _session_id(header_value: str | None, cookie_value: str | None) -> str | None:
    for value in (header_value, cookie_value):
        if value is not None and value.strip():
            return value.strip()
    return None


def _check_retries(retries: int) -> int:
    if not 0 <= retries <= 100:
        raise ValueError(f"retries must be 0 to 100, got {retries}")
    return retries


# -- aiohttp --------------------------------------------------------------------------------

SESSION = web.RequestKey("meshxl_session", RequestSession)
"""``request[SESSION]``: the request's session (absent when it names none)."""


def aiohttp_middleware(client: AsyncClient, *, header: str | None = hdr.SESSION,
                       cookie: str | None = None, retries: int = 0,
                       default: Callable[[], Any] = dict,
                       cluster: Callable[[web.Request], str] | None = None) -> Middleware:
    """An aiohttp middleware loading and saving ``request[SESSION]`` (module docstring).
    ``cluster``: each request's cluster on a sidecar serving several (its session is
    that cluster's: ``client.for_cluster``), e.g. :func:`cluster_from_host`; None: the
    client's own."""
    _check_retries(retries)
    clients: dict[str, AsyncClient] = {}

    def client_of(request: web.Request) -> AsyncClient:
        if cluster is None:
            return client
        name = cluster(request)
        found = clients.get(name)
        if found is None:
            found = client.for_cluster(name)  # InputError: not a cluster's name
            if len(clients) < MAX_CLUSTER_CLIENTS:
                clients[name] = found
        return found

    @web.middleware
    async def meshxl_session(request: web.Request, handler: Handler) -> web.StreamResponse:
        session_id = _session_id(request.headers.get(header) if header else None,
                                 request.cookies.get(cookie) if cookie else None)
        if session_id is None:
            return await handler(request)
        try:
            client = client_of(request)
        except InputError as exc:
            return _json(400, {"error": str(exc), "status": 400, "field": "cluster"})
        for attempt in range(retries + 1):
            try:
                session = await load(client, check_session_id(session_id), default)
            except SidecarError as exc:
                return _json(*_failure(exc, session_id))
            request[SESSION] = session
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                if exc.status >= 400:
                    raise
                await save(client, session)  # a redirect after a change (log-in)
                raise
            try:
                await save(client, session)
            except SidecarConflict as exc:
                if response.prepared:
                    raise
                if attempt < retries:
                    continue
                return _json(*_failure(exc, session_id))
            except SidecarError as exc:
                if response.prepared:
                    raise
                return _json(*_failure(exc, session_id))
            return response
        raise AssertionError("unreachable")

    return meshxl_session


def cluster_from_host(request: web.Request) -> str:
    """A request's cluster as a pool's listener routes a virtual system by default: its
    Host's first label (``t07.tenants.example:10000`` -> ``t07``)."""
    return request.headers.get("Host", "").split(":", 1)[0].split(".", 1)[0].lower()


def _headers(status: int, body: dict[str, Any]) -> list[tuple[str, str]]:
    """A 429's ``Retry-After`` (the sidecar's wait, rounded up; :func:`_failure`)."""
    if status != 429:
        return []
    return [("Retry-After", retry_after_header(body.get("retry_after")))]


def _json(status: int, body: dict[str, Any]) -> web.Response:
    return web.json_response(body, status=status, headers=_headers(status, body))


# -- ASGI -----------------------------------------------------------------------------------


class SessionMiddleware:
    """ASGI middleware putting the request's session in ``scope["state"][SCOPE_KEY]``
    (module docstring). Needs a running event loop, as any ASGI app; ``client`` is
    the application's :class:`AsyncClient` (close it at shutdown)."""

    def __init__(self, app: AsgiApp, client: AsyncClient, *, header: str | None = hdr.SESSION,
                 cookie: str | None = None, retries: int = 0,
                 default: Callable[[], Any] = dict, key: str = SCOPE_KEY) -> None:
        self.app = app
        self.client = client
        self.header = header.lower().encode("latin-1") if header else None
        self.cookie = cookie
        self.retries = _check_retries(retries)
        self.default = default
        self.key = key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        session_id = self._session_id(scope)
        if session_id is None:
            await self.app(scope, receive, send)
            return
        replay = _Replay(receive)
        for attempt in range(self.retries + 1):
            try:
                session = await load(self.client, check_session_id(session_id), self.default)
            except SidecarError as exc:
                await _send_json(send, *_failure(exc, session_id))
                return
            scope.setdefault("state", {})[self.key] = session
            held = _Held(send, self.client, session)
            replay.rewind()
            await self.app(scope, replay, held.send)
            if held.failure is None:
                if held.started:  # changed while the body was streaming
                    await save(self.client, session)
                return
            if isinstance(held.failure, SidecarConflict) and attempt < self.retries:
                continue
            await _send_json(send, *_failure(held.failure, session_id))
            return

    def _session_id(self, scope: Scope) -> str | None:
        header_value = cookie_value = None
        for name, value in scope.get("headers") or ():
            if self.header is not None and name == self.header and header_value is None:
                header_value = value.decode("latin-1")
            elif self.cookie is not None and name == b"cookie":
                cookies = SimpleCookie()
                try:
                    cookies.load(value.decode("latin-1"))
                except CookieError:
                    continue
                if self.cookie in cookies and cookie_value is None:
                    cookie_value = cookies[self.cookie].value
        return _session_id(header_value, cookie_value)


class _Replay:
    """``receive`` that can be rewound: the request body again for a retried handler."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._seen: list[Message] = []
        self._next = 0

    def rewind(self) -> None:
        self._next = 0

    async def __call__(self) -> Message:
        if self._next < len(self._seen):
            self._next += 1
            return self._seen[self._next - 1]
        message = await self._receive()
        if message.get("type") == "http.request":
            self._seen.append(message)
            self._next += 1
        return message


class _Held:
    """``send`` that saves the session before the response starts, and drops the
    application's response when the save failed (the middleware answers instead)."""

    def __init__(self, send: Send, client: AsyncClient, session: RequestSession) -> None:
        self._send = send
        self._client = client
        self._session = session
        self.started = False
        self.failure: SidecarError | None = None

    async def send(self, message: Message) -> None:
        if self.failure is not None:
            return
        if message["type"] == "http.response.start" and not self.started:
            try:
                await save(self._client, self._session)
            except SidecarError as exc:
                self.failure = detached(exc)  # kept past this block (errors.detached)
                return
            self.started = True
        await self._send(message)


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(data)).encode()),
               *((k.lower().encode(), v.encode()) for k, v in _headers(status, body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
