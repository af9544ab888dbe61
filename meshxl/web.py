"""What every meshxl HTTP server shares: JSON errors, bounded JSON bodies, timeouts.

* :func:`json_errors`, a middleware: every error answer is ``{"error": ..., "status":
  ...}`` JSON, the handlers' own (any :class:`~meshxl.errors.MeshxlError`, its status
  from :data:`HTTP_STATUS`), aiohttp's (404, 405, 413...) and an unexpected
  exception's (a 500 with a one-line message; the traceback goes to the log, never to
  the client).
* :data:`HTTP_STATUS` and :func:`http_status`: the one mapping of the
  :mod:`meshxl.errors` family to HTTP statuses, for every meshxl server.
* :class:`Runner`, an ``AppRunner`` whose answers to requests that never reach the
  application (a malformed request line, headers too long: aiohttp's own 400/431) are
  JSON too, with the server timeouts below.
* :func:`read_body` and :func:`read_json`: a body read with a size limit (the
  endpoint's, checked as the body arrives; the application's ``client_max_size`` is
  only the default of what aiohttp itself reads) and a time limit, JSON parsed with its
  nesting depth bounded (deep nesting is a 400, never a ``RecursionError``).
* Timeouts: a connection that has not sent a complete request head within
  :data:`HEADER_TIMEOUT` seconds (or stays idle that long between requests) is
  closed, and a body must arrive within :data:`BODY_TIMEOUT`, so slow clients cannot
  hold connections open indefinitely.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

from meshxl.errors import (
    Conflict,
    InputError,
    MeshxlError,
    NotFound,
    PreconditionFailed,
    TooLarge,
    Unavailable,
    detached,
)

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

HEADER_TIMEOUT = 30.0
"""Seconds a connection may take to send a complete request head, or stay idle between
requests (longer than the 15 s clients such as aiohttp keep idle connections, so a
pooled connection is not closed just as the client reuses it)."""
BODY_TIMEOUT = 30.0
"""Seconds a request body may take to arrive."""
MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays and objects a JSON body may have."""
MAX_HEADERS = 100
MAX_FIELD_SIZE = 8190


class BadJson(InputError):
    """A body that is not JSON, or nests too deep."""


class BodyTooLarge(TooLarge):
    """A body beyond the endpoint's limit."""


class BodyTimeout(InputError):
    """A body that did not arrive in time."""


HTTP_STATUS: dict[type[MeshxlError], int] = {
    MeshxlError: 500,
    InputError: 400,
    BodyTimeout: 408,
    TooLarge: 413,
    NotFound: 404,
    Conflict: 409,
    PreconditionFailed: 412,
    Unavailable: 503,
}
"""HTTP status per member of the :mod:`meshxl.errors` family (the nearest class in an
exception's hierarchy counts)."""


def http_status(exc: MeshxlError) -> int:
    """The HTTP status ``exc`` is answered with (:data:`HTTP_STATUS`)."""
    for cls in type(exc).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]  # type: ignore[index]
    return 500


def error_response(status: int, message: str, **details: Any) -> web.Response:
    return web.json_response({"error": message, "status": status, **details}, status=status)


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
            if isinstance(exc, MeshxlError):
                return error_response(http_status(exc), str(exc), **exc.details)
            log.exception("%s %s failed", request.method, request.path)
            return error_response(500, f"internal error: {type(exc).__name__}",
                                  path=request.path)
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


def check_json(data: bytes, *, what: str = "body", max_depth: int = MAX_JSON_DEPTH) -> None:
    """What :func:`loads` accepts, without the value (a session state is stored as it
    came): :class:`BadJson` for anything else.

    orjson says yes to most JSON at a fifth of the standard library's cost; whatever it
    refuses (NaN, a byte order mark, UTF-16, an escaped lone surrogate) the standard
    library, which accepts more, decides, so the verdict is :func:`loads`'s.
    """
    brackets = data.count(b"[") + data.count(b"{")
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        loads(data, what=what, max_depth=max_depth)
        return
    _check_depth(value, brackets, what, max_depth)


def loads(data: bytes | str, *, what: str = "body", max_depth: int = MAX_JSON_DEPTH,
          parse_float: Callable[[str], Any] | None = None,
          parse_constant: Callable[[str], Any] | None = None) -> Any:
    """Parse JSON whose arrays and objects nest at most ``max_depth`` deep
    (``parse_float`` and ``parse_constant``: as :func:`json.loads` takes them).

    :class:`BadJson` (a 400) for anything else: invalid JSON, invalid UTF-8, too deep.
    """
    if isinstance(data, bytes | bytearray):
        # Cheap bound first: fewer brackets in total than the limit cannot nest deeper.
        brackets = data.count(b"[") + data.count(b"{")
    else:
        brackets = data.count("[") + data.count("{")
    try:
        value = json.loads(data, parse_float=parse_float, parse_constant=parse_constant)
    except RecursionError:
        raise BadJson(f"{what} nests deeper than {max_depth} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadJson(f"{what} is not JSON: {exc}") from None
    _check_depth(value, brackets, what, max_depth)
    return value


def _check_depth(value: Any, brackets: int, what: str, max_depth: int) -> None:
    """BadJson if ``value`` nests deeper than ``max_depth`` (a text with fewer brackets
    than that cannot: the walk is skipped)."""
    if brackets > max_depth and json_depth(value) > max_depth:
        raise BadJson(f"{what} nests deeper than {max_depth} levels")


def json_depth(value: Any) -> int:
    """How deep arrays and objects nest in ``value`` (a scalar: 0), without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        depth += 1
        deepest = max(deepest, depth)
        stack.extend((child, depth) for child in children
                     if isinstance(child, dict | list))
    return deepest


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


__all__ = ["BODY_TIMEOUT", "HEADER_TIMEOUT", "HTTP_STATUS", "MAX_JSON_DEPTH", "BadJson",
           "BodyTimeout", "BodyTooLarge", "Runner", "application", "error_response",
           "http_status", "json_depth", "json_errors", "loads", "read_body", "read_json",
           "server_args"]
