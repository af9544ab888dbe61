"""What both of meshxl's HTTP stacks share, whatever framework serves the request.

meshxl runs two HTTP server stacks: aiohttp for the control plane, the webhook and the
demo (:mod:`meshxl.web`), and its own HTTP/1.1 server for the sidecar's session API
(:mod:`meshxl.statesync.http`, on llhttp: a write's cost is the application's). Both
import this module and nothing of each other, so what a client sees is defined once:

* the error answer's shape, ``{"error": "what went wrong", "status": 409, ...}``
  (:func:`error_body`), and the status of each member of the :mod:`meshxl.errors`
  family (:data:`HTTP_STATUS`, :func:`http_status`);
* the status texts of the status line (:data:`REASONS`);
* the limits of a request head (:data:`MAX_HEADERS`, :data:`MAX_FIELD_SIZE`) and the
  timeouts: a connection that has not sent a complete request head within
  :data:`HEADER_TIMEOUT` seconds (or stays idle that long between requests) is closed,
  and a body must arrive within :data:`BODY_TIMEOUT`, so slow clients cannot hold
  connections open indefinitely;
* JSON bodies parsed with their nesting bounded (:func:`loads`, :func:`check_json`):
  deep nesting is a 400, never a ``RecursionError``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import orjson

from meshxl.errors import (
    Conflict,
    InputError,
    MeshxlError,
    NotFound,
    PreconditionFailed,
    TooLarge,
    Unavailable,
)

__all__ = ["BODY_TIMEOUT", "HEADER_TIMEOUT", "HTTP_STATUS", "MAX_FIELD_SIZE", "MAX_HEADERS",
           "MAX_JSON_DEPTH", "REASONS", "WRITE_TIMEOUT", "BadJson", "BodyTimeout", "BodyTooLarge",
           "check_json", "error_answer", "error_body", "finite_float", "http_status",
           "json_depth", "loads", "refuse_constant"]

HEADER_TIMEOUT = 30.0
"""Seconds a connection may take to send a complete request head, or stay idle between
requests (longer than the 15 s clients such as aiohttp keep idle connections, so a
pooled connection is not closed just as the client reuses it)."""
BODY_TIMEOUT = 30.0
"""Seconds a request body may take to arrive."""
WRITE_TIMEOUT = 30.0
"""Seconds a client may leave its answers unread (the server's send buffer full) before
the connection is cut and what it holds dropped."""
MAX_HEADERS = 100
"""Header fields of one request at most (431 beyond)."""
MAX_FIELD_SIZE = 8190
"""Bytes of a request line or of one header field at most (414, 431 beyond)."""
MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays and objects a JSON body may have."""


class BadJson(InputError):
    """A body that is not JSON, or nests too deep."""


class BodyTooLarge(TooLarge):
    """A body beyond the endpoint's limit."""


class BodyTimeout(InputError):
    """A body that did not arrive in time."""


# -- statuses ---------------------------------------------------------------------------------


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
        status = HTTP_STATUS.get(cls)
        if status is not None:
            return status
    return 500


REASONS: dict[int, bytes] = {s.value: s.phrase.encode() for s in HTTPStatus}
"""The reason phrase of each status (``Not Found``), for a status line (a status without
one: ``Unknown``)."""


# -- error answers ------------------------------------------------------------------------------


def error_body(status: int, message: str, **details: Any) -> dict[str, Any]:
    """The JSON body of every meshxl error answer: the message, the status, and what the
    error adds (``field``, ``limit``, ``allowed``...)."""
    return {"error": message, "status": status, **details}


def error_answer(exc: Exception, path: str) -> tuple[int, dict[str, Any]]:
    """The status and body answering a handler's error: a family member's status, its
    message and details; anything else is a bug, answered 500 with its type only (the
    server logs the traceback, never sends it)."""
    if isinstance(exc, MeshxlError):
        status = http_status(exc)
        return status, error_body(status, str(exc), **exc.details)
    return 500, error_body(500, f"internal error: {type(exc).__name__}", path=path)


# -- JSON bodies ----------------------------------------------------------------------------------


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


def finite_float(text: str) -> float:
    """``parse_float`` that refuses a number no double holds (``1e400``): JSON has no
    Infinity, so a stored value must never become one."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def refuse_constant(name: str) -> Any:
    """``parse_constant`` that refuses ``NaN``, ``Infinity`` and ``-Infinity``, which the
    standard library reads and JSON (RFC 8259) does not have."""
    raise ValueError(f"{name} is not a JSON value")


def loads(data: bytes | str, *, what: str = "body", max_depth: int = MAX_JSON_DEPTH,
          parse_float: Callable[[str], Any] | None = None,
          parse_constant: Callable[[str], Any] | None = None) -> Any:
    """Parse JSON whose arrays and objects nest at most ``max_depth`` deep
    (``parse_float`` and ``parse_constant``: as :func:`json.loads` takes them; by
    default :func:`finite_float` and :func:`refuse_constant`, so only JSON passes).

    :class:`BadJson` (a 400) for anything else: invalid JSON (NaN, Infinity, a number out
    of range among it), invalid UTF-8, too deep.
    """
    if isinstance(data, bytes | bytearray):
        # Cheap bound first: fewer brackets in total than the limit cannot nest deeper.
        brackets = data.count(b"[") + data.count(b"{")
    else:
        brackets = data.count("[") + data.count("{")
    try:
        value = json.loads(data, parse_float=parse_float or finite_float,
                           parse_constant=parse_constant or refuse_constant)
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
