"""The sidecar's HTTP/1.1 server: its API's cost per request is the application's cost
per session write, so it is lean. Its modules, each below the next: :mod:`.messages`
(responses, error answers, the answer's head), :mod:`.routing` (requests, routes and
how pipelined requests may run beside each other), :mod:`.site` (what the connections
share), :mod:`.admission` (what is decided from a request's head, and when a refusal
so decided is answered), :mod:`.connection` (parsing, the queue of pipelined requests,
answers in order), :mod:`.server` (listening, timeouts, shutdown). What it shares with
meshxl's aiohttp servers is :mod:`meshxl.httpbase`.

Why not aiohttp's server, which the other meshxl servers run on: on the same machine,
aiohttp's request handling costs several times this server's CPU per request (llhttp
through ``httptools``, on uvloop), a handler doing nothing; the figures are in
docs/performance.md ("What was measured to help, and what not"). It serves one small
JSON API on loopback, so it does what that needs and refuses the rest clearly:

* HTTP/1.1 and 1.0; keep-alive (HTTP/1.1's default); pipelined requests answered in
  order (reading pauses while :data:`.connection.MAX_QUEUED` wait, or
  :data:`.connection.MAX_PIPELINED` are taken up, or the answers not yet sent reach the
  connection's answer budget, :data:`.site.ANSWER_BUDGET`: then nothing more is taken
  up either, and answers wait as they are, until the client reads). A request starts
  as soon as none of those before it on its connection that still run conflicts with
  it (:attr:`.routing.Route.access`): writes run beside writes
  (the session layer orders a session's writes by its lock, taken in the order they
  came), a read waits for the requests before it that touch its session, a write for
  the reads before it that do, and an ``alone`` request for everything. A route with a
  group handler (:attr:`.routing.Route.group`) takes the requests queued one after another for
  it, each of another session, in one call, each still answered on its own. Answers
  ready in the same turn of the event loop leave in one write;
* bodies by ``Content-Length`` or chunked, buffered whole, at most the route's
  ``max_body``: a larger one is read to its end and discarded (so the client, which
  may send it all before reading, gets the answer) and refused with 413, without
  being kept; ``Expect: 100-continue`` is answered ``100 Continue``, or at once with
  the refusal;
* request heads bounded: a request line or header field of at most
  :data:`~meshxl.httpbase.MAX_FIELD_SIZE` bytes (414, 431), at most
  :data:`~meshxl.httpbase.MAX_HEADERS` fields (431);
* a refusal decided from the head that may wait (:attr:`.routing.Request.hold`, set by
  a route's ``refuse``) is answered up to that long later, at most
  :data:`.admission.MAX_HOLD`, while nothing follows it on its connection: a request
  behind it, a half-close or a shutdown sends it at once, in order;
* timeouts: a complete head within ``header_timeout`` seconds of the connection's last
  answer (idle connections close then), a body within ``body_timeout`` (408);
* every error answer is JSON, ``{"error": ..., "status": ...}`` (:mod:`meshxl.httpbase`'s
  shape and its :func:`~meshxl.httpbase.http_status` mapping): the parser's 400, 404 with
  the path, 405 with the allowed methods, a handler's :class:`~meshxl.errors.MeshxlError`
  or :class:`.messages.RequestRefused`, and anything unexpected as a 500 (its traceback to
  the log only).

Handlers are ``async def handler(request: Request) -> Response``; a group handler,
``async def group(requests, answer)``, calls ``answer(index, response_or_error)`` once
for each. A request whose client went away still runs to its end (a write in flight to
etcd is not cut in half); its answer is dropped.
"""

from .connection import Connection
from .messages import JSON, RequestRefused, Response, error, json_response
from .routing import (
    ALONE,
    IGNORED_BODY,
    READ,
    WRITE,
    Answer,
    GroupHandler,
    Handler,
    Request,
    Route,
    Router,
)
from .server import MAX_CONNECTIONS, HttpServer, default_max_connections
from .site import LIMITS, Authorize, Site, Wrap

__all__ = ["ALONE", "IGNORED_BODY", "JSON", "LIMITS", "MAX_CONNECTIONS", "READ", "WRITE",
           "Answer", "Authorize", "Connection", "GroupHandler", "Handler", "HttpServer",
           "RequestRefused", "Request", "Response", "Route", "Router", "Site", "Wrap",
           "default_max_connections", "error", "json_response"]
