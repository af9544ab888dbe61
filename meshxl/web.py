"""The aiohttp servers' layer (the control plane, the webhook, the demo): JSON errors,
bounded bodies, timeouts. What they share with the sidecar's own HTTP server (the error
shape and statuses, limits, timeouts, bounded JSON) is :mod:`meshxl.httpbase`.

* :func:`json_errors`, a middleware: every error answer is ``{"error": ..., "status":
  ...}`` JSON (:func:`meshxl.httpbase.error_body`), the handlers' own (any
  :class:`~meshxl.errors.MeshxlError`, its status from
  :data:`meshxl.httpbase.HTTP_STATUS`), aiohttp's (404, 405, 413...) and an unexpected
  exception's (a 500 with a one-line message; the traceback goes to the log, never to
  the client).
* :class:`Runner`, an ``AppRunner`` whose answers to requests that never reach the
  application (a malformed request line, headers too long: aiohttp's own 400/431) are
  JSON too, with :mod:`meshxl.httpbase`'s limits and timeouts.
* :func:`read_body` and :func:`read_json`: a body read with a size limit (the
  endpoint's, checked as the body arrives; the application's ``client_max_size`` is
  only the default of what aiohttp itself reads) and a time limit, JSON parsed with its
  nesting depth bounded (:func:`meshxl.httpbase.loads`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

from meshxl.errors import MeshxlError, detached
from meshxl.httpbase import (
    BODY_TIMEOUT,
    HEADER_TIMEOUT,
    MAX_FIELD_SIZE,
    MAX_HEADERS,
    MAX_JSON_DEPTH,
    BodyTimeout,
    BodyTooLarge,
    error_answer,
    error_body,
    loads,
)

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

def error_response(status: int, message: str, **details: Any) -> web.Response:
    return web.json_response(error_body(status, message, **details), status=status)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes a JSON body with a message (see the module docstring)."""
    try:
        response = await handler(request)
    except asyncio.CancelledError:
        raise
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _from_http_exception(request, exc)
    except Exception as exc:
        try:
            if not isinstance(exc, MeshxlError):
                log.exception("%s %s failed", request.method, request.path)
            status, body = error_answer(exc, request.path)
            return web.json_response(body, status=status)
        finally:  # answered: the frames it passed through (and their data) go now
            detached(exc)
    if response.status >= 400 and not _is_json(response):
        # A handler's own non-JSON error (web.Response(status=4xx, text=...)).
        text = getattr(response, "text", None) if isinstance(response, web.Response) else None
        return error_response(response.status, (text or response.reason or "").strip()[:500],
                              path=request.path)
    return response


def _from_http_exception(request: web.Request, exc: web.HTTPException) -> web.Response:
    message = exc.reason
    if exc.status == 413:
        message = f"request body too large: {exc.text}"
    details: dict[str, Any] = {"path": request.path}
    if isinstance(exc, web.HTTPMethodNotAllowed):
        details["allowed"] = sorted(exc.allowed_methods)
    response = error_response(exc.status, message, **details)
    for name in ("Allow", "Retry-After"):
        if name in exc.headers:
            response.headers[name] = exc.headers[name]
    return response


def _is_json(response: web.StreamResponse) -> bool:
    return (response.content_type or "").endswith("json")


# -- bodies ---------------------------------------------------------------------------------


async def read_body(request: web.Request, limit: int, *, what: str = "request body",
                    timeout: float = BODY_TIMEOUT) -> bytes:
    """The body, at most ``limit`` bytes (413 beyond), within ``timeout`` s (408)."""
    length = request.content_length
    if length is not None and length > limit:
        raise BodyTooLarge(f"{what} is {length} bytes; the limit is {limit}", limit=limit)
    content = request.content  # not request.read(), which stops at client_max_size
    if content.is_eof():  # the whole body came with the head (a small one): no waiting
        data = content.read_nowait()
        if len(data) > limit:
            raise BodyTooLarge(f"{what} is {len(data)} bytes; the limit is {limit}",
                               limit=limit)
        return data
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            while chunk := await content.readany():
                body += chunk
                if len(body) > limit:
                    raise BodyTooLarge(f"{what} is more than {limit} bytes; the limit is "
                                       f"{limit}", limit=limit)
    except TimeoutError:
        raise BodyTimeout(f"{what} did not arrive within {timeout:g} s") from None
    return bytes(body)


async def read_json(request: web.Request, limit: int, *, what: str = "body",
                    max_depth: int = MAX_JSON_DEPTH) -> Any:
    """:func:`read_body` then :func:`loads`."""
    return loads(await read_body(request, limit, what=what), what=what, max_depth=max_depth)


# -- the server -----------------------------------------------------------------------------


def server_args(header_timeout: float = HEADER_TIMEOUT) -> dict[str, Any]:
    """aiohttp request-handler settings every meshxl server runs with."""
    return {"keepalive_timeout": header_timeout, "max_headers": MAX_HEADERS,
            "max_field_size": MAX_FIELD_SIZE, "max_line_size": MAX_FIELD_SIZE,
            "lingering_time": 2.0}


class _JsonRequestHandler(RequestHandler):
    """aiohttp's handler of requests that fail before the application (bad request
    line, headers too long...), answering JSON instead of text/plain."""

    def handle_error(self, request: BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        plain = super().handle_error(request, status, exc, message)
        text = message if status != 500 else "internal error"
        reason = (text or plain.reason or "").strip().splitlines()
        response = error_response(status, reason[0][:500] if reason else "")
        response.force_close()
        return response


class _JsonServer(Server):
    def __call__(self) -> RequestHandler:
        return _JsonRequestHandler(self, loop=self._loop, **self._kwargs)


class Runner(web.AppRunner):
    """``web.AppRunner`` with JSON protocol errors and :func:`server_args`."""

    def __init__(self, app: web.Application, *, header_timeout: float = HEADER_TIMEOUT,
                 **kwargs: Any):
        kwargs.setdefault("access_log", None)
        super().__init__(app, **server_args(header_timeout), **kwargs)

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        server.__class__ = _JsonServer
        return server


def application(*, middlewares: list[Any] | None = None, client_max_size: int = 1024 ** 2,
                **kwargs: Any) -> web.Application:
    """A ``web.Application`` with :func:`json_errors` around ``middlewares`` (so their
    refusals are JSON as well)."""
    return web.Application(middlewares=[json_errors, *(middlewares or [])],
                           client_max_size=client_max_size, **kwargs)


__all__ = ["Runner", "application", "error_response", "json_errors", "read_body", "read_json",
           "server_args"]
