"""What a connection decides from a request's head, before its body is read
(:func:`admit`: the token, the route, the method, the declared size, the route's
``refuse``), and when a refusal so decided is answered (:class:`Hold`).

A refusal that says when to come back (a write over its cluster's rate quota:
:attr:`.routing.Request.hold`) may be answered late, at most that long after the
request came: a client that ignores ``Retry-After`` but waits for each answer (any
HTTP/1.1 client that does not pipeline) then sends at most one such request per
connection in that time, instead of one each time its last one is answered at once. The
answer is the same, only later, and it never holds back another one: it is held only
while nothing follows it on its connection, and sent at once when the next request
begins, the client half-closes, the connection is shut down, or the server closes. A
held answer is one timer of its connection (there is at most one: whatever follows it
releases it), cancelled when the connection is lost."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from .messages import Response, error
from .routing import Request, failure
from .site import Site

__all__ = ["MAX_HOLD", "Held", "Hold", "admit"]

MAX_HOLD = 1.0
"""Seconds a refusal's answer is held at most, whatever its request asks
(:attr:`.routing.Request.hold`): a client's request timeout is rarely shorter."""

_HEAD_ONLY = {"HEAD": "GET"}
"""A method answered by another's route, its answer without the body (RFC 9110 9.3.2)."""


def admit(site: Site, request: Request) -> Response | None:
    """A refusal decided from the head (token, route, method, declared size, the
    route's ``refuse``), or None: the request goes on, its body bounded by its route's
    ``max_body`` (``request.route`` is set once the route is known)."""
    if site.authorize is not None:
        refusal = site.authorize(request)
        if refusal is not None:
            return refusal
    found = site.router.resolve(request.path)
    if found is None:
        fallback = site.router.fallback
        if fallback is None:
            return error(404, "Not Found", path=request.path)
        found = {request.method: fallback}, {}
    methods, params = found
    route = methods.get(request.method)
    if route is None and request.method in _HEAD_ONLY:
        route = methods.get(_HEAD_ONLY[request.method])
    if route is None:
        allowed = sorted({*methods, *(h for h, m in _HEAD_ONLY.items() if m in methods)})
        return error(405, "Method Not Allowed", [("Allow", ",".join(allowed))],
                     path=request.path, allowed=allowed)
    request.route = route
    request.params = params
    if route.key is not None:
        request.session_id = params.get(route.key)
    length = request.headers.get("content-length")
    if route.max_body and length is not None and length.isdigit() and \
            int(length) > route.max_body:
        site.hit("body_size")
        return error(413, f"{route.what} is {int(length)} bytes; the limit is "
                          f"{route.max_body}", limit=route.max_body)
    if route.refuse is None:
        return None
    try:
        return route.refuse(request)
    except Exception as exc:  # noqa: BLE001 - a refusal (its 4xx/503) or a defect (500)
        return failure(request, exc)


class Held(Protocol):
    """A connection's slot for a request taken up (``connection.Slot``)."""

    request: Request | None
    response: Response | None


class Hold:
    """The refusal of the request in ``slot`` (its connection's last), held: its timer
    calls ``expired`` after ``delay`` seconds (at most :data:`MAX_HOLD`), unless
    :meth:`answer` came first."""

    __slots__ = ("slot", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, slot: Held, delay: float,
                 expired: Callable[[], None]):
        self.slot = slot
        self.timer = loop.call_later(min(delay, MAX_HOLD), expired)

    def answer(self) -> Response:
        """The refusal, now in its slot; the timer is cancelled."""
        self.timer.cancel()
        request = self.slot.request
        assert request is not None and request.refusal is not None
        self.slot.response = request.refusal
        return request.refusal
