"""Session state for gRPC servers: loaded from the sidecar before a call's handler runs,
saved after it if it changed, as the HTTP middleware does (:mod:`.middleware`).

The session id comes from the call's metadata (``x-session-id`` by default: the header
the model's stickiness hashes on, so Envoy sends the session's calls to its member); a
call without it passes through untouched. The handler finds the session with
:func:`current_session` (its ``state`` is ``default()``, ``{}``, for a new session) and
changes ``state`` in place or replaces it::

    client = meshxl.client.AsyncClient()
    server = grpc.aio.server(interceptors=[AsyncSessionInterceptor(client)])

    async def Increment(self, request, context):
        session = current_session()
        session.state["seq"] = session.state.get("seq", 0) + 1
        return Reply(seq=session.state["seq"])

The sync server is the same with :class:`SessionInterceptor` and a
:class:`meshxl.client.Client`.

Saving is the middleware's: only a changed state is written, with the ETag of the read
(``If-Match``; ``If-None-Match: *`` for a new session), so a concurrent change is never
overwritten. A streaming handler saves when it chooses with ``await commit()``
(``commit_sync()``), before it sends what depends on the write, and whatever it changed
after its last commit is saved when it ends. How failures reach the gRPC client:

========================================  ======================  ====================
the sidecar answered                      status                  why that status
========================================  ======================  ====================
409/412: the session changed meanwhile    ``ABORTED``             gRPC's status for a
(another call or member wrote it)                                 lost compare-and-set;
                                                                  the client retries
                                                                  the whole call
503, unreachable, token refused           ``UNAVAILABLE``         Envoy retries it on
                                                                  another member
429: over the cluster's quota             ``RESOURCE_EXHAUSTED``  the tenant's own
                                                                  limit: not retried
an invalid session id                     ``INVALID_ARGUMENT``    the caller's mistake
========================================  ======================  ====================

With ``retries=N`` a unary call whose save lost is run again on fresh state (up to N
more times) instead of answering ``ABORTED``: only for handlers whose one effect is the
session state. A streaming call is never run again (its messages have left).
"""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from grpc import aio

from meshxl import headers as hdr
from meshxl.errors import detached

from .aio import AsyncClient
from .errors import BadRequest, OverQuota, SidecarConflict, SidecarError
from .middleware import RequestSession, load, load_sync, save, save_sync
from .plans import check_session_id
from .sync import Client

__all__ = ["AsyncSessionInterceptor", "SessionInterceptor", "commit", "commit_sync",
           "current_session", "status_of"]


@dataclass
class _Call:
    session: RequestSession
    client: Any


_CALL: contextvars.ContextVar[_Call | None] = contextvars.ContextVar(
    "meshxl_grpc_session", default=None)


def current_session() -> RequestSession:
    """The session of the call being handled; LookupError outside one (a call without
    the session metadata, or code not run by the interceptor)."""
    call = _CALL.get()
    if call is None:
        raise LookupError("no meshxl session in this call (no session metadata, or not "
                          "under a meshxl session interceptor)")
    return call.session


async def commit() -> bool:
    """Save the call's session now if it changed (asyncio server); whether it wrote.
    Raises the sidecar's error (:class:`~meshxl.client.SidecarConflict`...)."""
    call = _CALL.get()
    if call is None:
        raise LookupError("no meshxl session in this call")
    return await save(call.client, call.session)


def commit_sync() -> bool:
    """:func:`commit` for the sync server."""
    call = _CALL.get()
    if call is None:
        raise LookupError("no meshxl session in this call")
    return save_sync(call.client, call.session)


def status_of(exc: SidecarError) -> tuple[grpc.StatusCode, str]:
    """The gRPC status a call ends with when its session cannot be loaded or saved."""
    if isinstance(exc, BadRequest) and exc.status is None:
        return grpc.StatusCode.INVALID_ARGUMENT, f"{hdr.SESSION}: {exc.message}"
    if isinstance(exc, SidecarConflict):
        return (grpc.StatusCode.ABORTED, f"the session changed while this call ran "
                f"({exc.message}); send the call again")
    if isinstance(exc, OverQuota):  # the tenant's own limit: no other member helps
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"session state over quota: {exc.message}"
    return grpc.StatusCode.UNAVAILABLE, f"session state unavailable: {exc}"


def _session_id(details: grpc.HandlerCallDetails, key: str) -> str | None:
    for name, value in details.invocation_metadata or ():  # type: ignore[attr-defined]
        if name == key and isinstance(value, str) and value.strip():
            return value.strip()
    return None


def _check_retries(retries: int) -> int:
    if not 0 <= retries <= 100:
        raise ValueError(f"retries must be 0 to 100, got {retries}")
    return retries


def _rebuilt(handler: grpc.RpcMethodHandler, **behaviour: Any) -> grpc.RpcMethodHandler:
    kind = next(iter(behaviour))
    make = {"unary_unary": grpc.unary_unary_rpc_method_handler,
            "unary_stream": grpc.unary_stream_rpc_method_handler,
            "stream_unary": grpc.stream_unary_rpc_method_handler,
            "stream_stream": grpc.stream_stream_rpc_method_handler}[kind]
    return make(behaviour[kind], request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


def _kind(handler: grpc.RpcMethodHandler) -> str:
    return (("stream_" if handler.request_streaming else "unary_")
            + ("stream" if handler.response_streaming else "unary"))


class AsyncSessionInterceptor(aio.ServerInterceptor):
    """Loads and saves the call's session for a ``grpc.aio`` server (module docstring)."""

    def __init__(self, client: AsyncClient, *, metadata: str = hdr.SESSION, retries: int = 0,
                 default: Callable[[], Any] = dict, passthrough: Iterable[str] = ()) -> None:
        """``passthrough``: services (``package.Service``) whose calls pass untouched:
        resumable streams (:mod:`meshxl.streams.grpcio`) keep their own state."""
        self.client = client
        self.metadata = metadata.lower()
        self.retries = _check_retries(retries)
        self.default = default
        self.passthrough = tuple(f"/{service}/" for service in passthrough)

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler]],
            handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        session_id = _session_id(handler_call_details, self.metadata)
        if handler is None or session_id is None or (
                self.passthrough and handler_call_details.method.startswith(self.passthrough)):
            return handler
        kind = _kind(handler)
        inner = getattr(handler, kind)
        if handler.response_streaming:
            return _rebuilt(handler, **{kind: self._streaming(inner, session_id)})
        return _rebuilt(handler, **{kind: self._unary(inner, session_id,
                                                      retry=not handler.request_streaming)})

    async def _load(self, session_id: str, context: aio.ServicerContext) -> _Call:
        try:
            session = await load(self.client, check_session_id(session_id), self.default)
        except SidecarError as exc:
            code, message = status_of(exc)
            await context.abort(code, message)
        return _Call(session, self.client)

    async def _save(self, call: _Call, context: aio.ServicerContext) -> SidecarError | None:
        try:
            await save(call.client, call.session)
        except SidecarError as exc:
            return detached(exc)
        return None

    def _unary(self, inner: Any, session_id: str, retry: bool) -> Any:
        async def behaviour(request: Any, context: aio.ServicerContext) -> Any:
            for attempt in range(self.retries + 1 if retry else 1):
                call = await self._load(session_id, context)
                token = _CALL.set(call)
                try:
                    reply = await inner(request, context)
                finally:
                    _CALL.reset(token)
                failure = await self._save(call, context)
                if failure is None:
                    return reply
                if isinstance(failure, SidecarConflict) and attempt < self.retries and retry:
                    continue
                await context.abort(*status_of(failure))
            raise AssertionError("unreachable")

        return behaviour

    def _streaming(self, inner: Any, session_id: str) -> Any:
        async def behaviour(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
            call = await self._load(session_id, context)
            token = _CALL.set(call)
            try:
                if inspect.isasyncgenfunction(inner):
                    async for reply in inner(request, context):
                        yield reply
                else:  # writes with context.write()
                    await inner(request, context)
            except SidecarError as exc:  # a commit() the handler did not catch
                await context.abort(*status_of(exc))
            finally:
                _CALL.reset(token)
            failure = await self._save(call, context)
            if failure is not None:
                await context.abort(*status_of(failure))

        return behaviour


class SessionInterceptor(grpc.ServerInterceptor):
    """Loads and saves the call's session for a sync ``grpc.server`` (module
    docstring); ``client`` is a :class:`meshxl.client.Client` (thread-safe)."""

    def __init__(self, client: Client, *, metadata: str = hdr.SESSION, retries: int = 0,
                 default: Callable[[], Any] = dict) -> None:
        self.client = client
        self.metadata = metadata.lower()
        self.retries = _check_retries(retries)
        self.default = default

    def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler],
            handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = continuation(handler_call_details)
        session_id = _session_id(handler_call_details, self.metadata)
        if handler is None or session_id is None:
            return handler
        kind = _kind(handler)
        inner = getattr(handler, kind)
        if handler.response_streaming:
            return _rebuilt(handler, **{kind: self._streaming(inner, session_id)})
        return _rebuilt(handler, **{kind: self._unary(inner, session_id,
                                                      retry=not handler.request_streaming)})

    def _load(self, session_id: str, context: grpc.ServicerContext) -> _Call:
        try:
            session = load_sync(self.client, check_session_id(session_id), self.default)
        except SidecarError as exc:
            context.abort(*status_of(exc))
        return _Call(session, self.client)

    def _unary(self, inner: Any, session_id: str, retry: bool) -> Any:
        def behaviour(request: Any, context: grpc.ServicerContext) -> Any:
            for attempt in range(self.retries + 1 if retry else 1):
                call = self._load(session_id, context)
                token = _CALL.set(call)
                try:
                    reply = inner(request, context)
                finally:
                    _CALL.reset(token)
                try:
                    save_sync(self.client, call.session)
                except SidecarConflict as exc:
                    if attempt < self.retries and retry:
                        continue
                    context.abort(*status_of(exc))
                except SidecarError as exc:
                    context.abort(*status_of(exc))
                return reply
            raise AssertionError("unreachable")

        return behaviour

    def _streaming(self, inner: Any, session_id: str) -> Any:
        def behaviour(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            call = self._load(session_id, context)
            token = _CALL.set(call)
            try:
                yield from inner(request, context)
            except SidecarError as exc:
                context.abort(*status_of(exc))
            finally:
                _CALL.reset(token)
            try:
                save_sync(self.client, call.session)
            except SidecarError as exc:
                context.abort(*status_of(exc))

        return behaviour
