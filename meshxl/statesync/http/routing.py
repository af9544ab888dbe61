"""The sidecar server's requests and routes: which handler answers a method at a path,
the body it takes, and how a request may run beside those pipelined before it on its
connection (:attr:`Route.access`, :func:`must_wait`)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import unquote

from meshxl.errors import MeshxlError, detached
from meshxl.httpbase import error_answer

from .messages import RequestRefused, Response, error, json_response

__all__ = ["ALONE", "IGNORED_BODY", "READ", "WRITE", "Answer", "GroupHandler", "Handler",
           "Refuse", "Request", "Route", "Router", "failure", "framing_refusal", "handled",
           "must_wait"]

log = logging.getLogger("meshxl.statesync.http")

IGNORED_BODY = 0
"""``max_body`` of a route that reads no body: whatever is sent is dropped."""
READ, WRITE, ALONE = "read", "write", "alone"
"""A route's :attr:`Route.access`."""

Handler = Callable[["Request"], Awaitable[Response]]
Refuse = Callable[["Request"], "Response | None"]
"""A refusal decided from a request's head (its route and path parameters known, its
body not read), or None: the request goes on to its handler."""
Answer = Callable[[int, "Response | Exception"], None]
"""``answer(index, outcome)``: the answer to a group's request ``index``, a response or
the error its handler would have raised."""
GroupHandler = Callable[[list["Request"], Answer], Awaitable[None]]
"""Takes up several requests of one route together and answers each through ``answer``
(in any order, each once) before it returns."""


class Request:
    """One request: ``headers`` by lower-case name (repeated fields joined with
    ``", "``), ``params`` the route's path parameters (percent-decoded)."""

    __slots__ = ("body", "headers", "hold", "keep_alive", "method", "params", "path",
                 "query", "refusal", "route", "session_id", "version")

    def __init__(self, method: str, path: str, query: str, version: str,
                 headers: dict[str, str], keep_alive: bool):
        self.method = method
        self.path = path
        self.query = query
        self.version = version
        self.headers = headers
        self.keep_alive = keep_alive
        self.body = b""
        self.params: dict[str, str] = {}
        self.route: Route | None = None
        self.refusal: Response | None = None
        """Decided from the head (401, 404, 405, 413...): answered instead of the route."""
        self.hold = 0.0
        """Seconds the refusal's answer may wait before it is sent, while nothing follows
        it on its connection (set by a route's ``refuse``: .admission.Hold)."""
        self.session_id: str | None = None
        """The one session it touches (the route's ``key`` parameter), None: any."""

    @property
    def content_type(self) -> str:
        """The media type without parameters, lower case ("" without one)."""
        value = self.headers.get("content-type")
        return value.split(";", 1)[0].strip().lower() if value else ""

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.path[:80]}>"


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    pattern: str
    """``/v1/sessions/{session_id}``: a ``{name}`` is one path segment."""
    handler: Handler
    max_body: int = IGNORED_BODY
    """Bytes of body the handler takes (413 beyond); 0: any body is dropped."""
    what: str = "request body"
    """Named in the 413's message."""
    access: str = ALONE
    """Beside which requests pipelined before it on its connection it may run:
    ``write``: beside any write (its handler keeps writes in the order they came: a
    session's lock, taken before it first waits) and beside reads of other sessions;
    ``read``: beside anything touching other sessions; ``alone``: after all of them."""
    key: str | None = None
    """The path parameter naming the one session it touches; None: it may touch any."""
    group: GroupHandler | None = None
    """Takes up, in one call, requests of this route pipelined one after the other on a
    connection, each touching another session (a ``write`` route with a ``key``):
    what a request costs besides its HTTP is then shared (no task each). Not while
    ``wrap`` is set: each request then runs inside its own wrap (its span)."""
    refuse: Refuse | None = None
    """Called once the head is read: a refusal that needs no body (a write over its
    cluster's rate quota), answered as a 404 or 413 from the head is, the body read and
    dropped, no handler run; it may set the request's :attr:`Request.hold`."""


class Router:
    """Exact paths in a dict, patterns by segment count; a ``{name}`` segment matches
    one non-empty path segment, percent-decoded (``a%2Fb`` is the segment ``a/b``)."""

    def __init__(self) -> None:
        self._exact: dict[str, dict[str, Route]] = {}
        self._patterns: dict[int, list[tuple[list[str | None], list[str], dict[str, Route]]]] = {}
        self._leading: dict[int, tuple[str, str, dict[str, Route]]] = {}
        """By segment count, when the first pattern of that count has one parameter, its
        last segment (``/v1/sessions/{session_id}``): its literal prefix, the parameter's
        name, its methods; a path without ``%`` is matched against it by its prefix."""
        self._routes: list[Route] = []
        self.fallback: Route | None = None
        """What answers a path no route matches, any method (None: 404)."""

    def set_fallback(self, handler: Handler) -> None:
        """``handler`` answers every request no route matches (its body dropped)."""
        self.fallback = Route("*", "*", handler, IGNORED_BODY, "request body", ALONE, None,
                              None)

    def add(self, method: str, pattern: str, handler: Handler, *,
            max_body: int = IGNORED_BODY, what: str = "request body",
            access: str = ALONE, key: str | None = None,
            group: GroupHandler | None = None, refuse: Refuse | None = None) -> None:
        if access not in (READ, WRITE, ALONE):
            raise ValueError(f"access is {READ!r}, {WRITE!r} or {ALONE!r}, not {access!r}")
        if group is not None and (access != WRITE or key is None):
            raise ValueError("a group handler takes writes of one session each "
                             "(access write, with a key)")
        route = Route(method, pattern, handler, max_body, what, access, key, group, refuse)
        self._routes.append(route)
        segments = pattern.split("/")
        if not any(s.startswith("{") for s in segments):
            self._exact.setdefault(pattern, {})[method] = route
            return
        literals: list[str | None] = [None if s.startswith("{") else s for s in segments]
        names = [s[1:-1] for s in segments if s.startswith("{")]
        for known, known_names, methods in self._patterns.get(len(segments), []):
            if known == literals and known_names == names:
                methods[method] = route
                return
        methods = {method: route}
        if len(segments) not in self._patterns and literals[-1] is None \
                and None not in literals[:-1]:
            self._leading[len(segments)] = ("/".join(segments[:-1]) + "/", names[0], methods)
        self._patterns.setdefault(len(segments), []).append((literals, names, methods))

    def routes(self) -> list[Route]:
        return list(self._routes)

    def resolve(self, path: str) -> tuple[dict[str, Route], dict[str, str]] | None:
        """The methods served at ``path`` (raw, as sent) and its parameters, or None."""
        plain = "%" not in path
        methods = self._exact.get(path if plain else unquote(path, errors="replace"))
        if methods is not None:
            return methods, {}
        if plain and (leading := self._leading.get(path.count("/") + 1)) is not None:
            prefix, name, methods = leading  # the first pattern, as the loop below tries it
            if len(path) > len(prefix) and path.startswith(prefix):
                return methods, {name: path[len(prefix):]}
        segments = path.split("/")
        for literals, names, methods in self._patterns.get(len(segments), ()):
            values: list[str] = []
            for literal, segment in zip(literals, segments, strict=True):
                if not plain and "%" in segment:
                    segment = unquote(segment, errors="replace")
                if literal is None:
                    if not segment:
                        break
                    values.append(segment)
                elif literal != segment:
                    break
            else:
                return methods, dict(zip(names, values, strict=True))
        return None


def must_wait(new: Request, running: Request) -> bool:
    """Whether ``new`` must wait for ``running``, pipelined before it on its connection."""
    a, b = new.route, running.route
    assert a is not None and b is not None
    if a.access == ALONE or b.access == ALONE:
        return True
    if a.access == WRITE and b.access == WRITE:
        return False  # ordered by the sessions' locks
    return (new.session_id is None or running.session_id is None
            or new.session_id == running.session_id)


def framing_refusal(request: Request) -> Response | None:
    """What llhttp lets through and RFC 9112 refuses, so that no request is read one way
    here and another by a proxy in front: a request without its Host (HTTP/1.1) or with
    two (section 3.2), and a transfer coding other than chunked alone (6.1: chunked not
    last is a 400; a coding before it, which this server does not decode, a 501). The
    answer (then the connection closes), or None."""
    headers = request.headers
    if request.version not in ("1.1", "1.0"):
        return error(505, f"HTTP/{request.version[:8]} is not supported: this server "
                          "speaks HTTP/1.1 and HTTP/1.0")
    host = headers.get("host")
    if host is None:
        if request.version == "1.1":
            return error(400, "an HTTP/1.1 request needs a Host header")
    elif ", " in host:  # fields joined: a Host value holds no space
        return error(400, "more than one Host header")
    coding = headers.get("transfer-encoding")
    if coding is not None:
        if request.version == "1.0":  # RFC 9112 section 6.1: the framing is faulty
            return error(400, "Transfer-Encoding in an HTTP/1.0 request: the body's "
                              "length cannot be trusted")
        codings = [c.strip().lower() for c in coding.split(",")]
        if codings[-1] != "chunked":
            return error(400, f"Transfer-Encoding {coding[:60]!r} does not end with "
                              "chunked: the body's length cannot be told")
        if len(codings) > 1:
            return error(501, f"Transfer-Encoding {coding[:60]!r}: only chunked is "
                              "supported")
    return None


async def handled(request: Request) -> Response:
    """The route handler's answer, its errors mapped to JSON answers."""
    assert request.route is not None
    try:
        return await request.route.handler(request)
    except Exception as exc:
        return failure(request, exc)


def failure(request: Request, exc: Exception) -> Response:
    """The JSON answer to a handler's error (logged with its traceback if unexpected)."""
    try:
        if isinstance(exc, RequestRefused):
            return error(exc.status, str(exc), exc.headers, **exc.details)
        if not isinstance(exc, MeshxlError):
            log.error("%s %s failed", request.method, request.path[:200], exc_info=exc)
        status, body = error_answer(exc, request.path)
        return json_response(body, status)
    finally:  # answered: the frames it passed through (and their data) go now
        detached(exc)
