"""The demo's stateful service: a per-session counter whose state lives only in its sidecar.

``POST /counter`` (header ``x-session-id``) reads the session from the member's
statesync sidecar, increments ``seq`` and writes it back; the answer carries the new
``seq`` and the member that served it (also as ``x-meshxl-member``). Because nothing is
kept in the process, any member can carry on a session after another one died: that
is what ``meshxl demo`` shows.

The increment is a compare-and-set: the write carries the read's ETag (``If-Match``), so
two requests for one session that overlap (a retry racing the original, say, or requests
a paused member resumes with) never both write the same next value; the loser reads
again, up to :data:`CAS_ATTEMPTS` times, then answers 409. It is
:meth:`meshxl.client.AsyncClient.update`, with no retries of 503s in the app (Envoy
retries them on another member, rather than the request waiting for a dead sidecar).

Errors map onto what Envoy's retry policy understands: sidecar 5xx or unreachable ->
503 (retried as ``gateway-error``); sidecar 409 (ownership lost: another member wrote
the session since) -> 409, not retried; over the cluster's quota (the sidecar's 429)
-> 429 with ``Retry-After``, not retried (another member's sidecar has a bucket of its
own: a retry there would pass the quota and take the session off its member); an
invalid session id -> 400. ``GET /healthz``
follows the sidecar's ``/readyz``, so a member whose sidecar is gone or still syncing
fails Envoy's health check.

Faults on purpose (``--faults FILE``, :mod:`meshxl.demo.faults`): a JSON file the app
re-reads within 0.1 s of a change, ``{"delay_ms": 30, "fail_fraction": 0.2}`` say, makes every
``/counter`` request wait 30 ms and one in five fail with 503 before touching the
session; jitter and process-wide pauses are knobs there too. It is a local file, so no
client reaches it through Envoy, and ``/healthz`` is never affected: the member stays
healthy while it is sick (``bench/grayfailure.py``).

``/streams/ws``: a running tally over a resumable stream (:mod:`meshxl.demo.tally`).

Beside a sidecar serving several clusters (``meshxl serve statesync --pool``, the
virtual systems of a pool: docs/vsls.md), ``--clusters-by-host`` takes each request's
cluster from its Host header's first label (``t07.tenants.example`` -> ``t07``: how a
pool's listener routes a virtual system by default), and reads and writes the session
in that cluster (``AsyncClient.for_cluster``).

When the sidecar requires a token (``meshxl serve statesync --token-file``), the app
sends it from ``MESHXL_STATESYNC_TOKEN_FILE`` (the injected pods' Secret volume) or
``MESHXL_STATESYNC_TOKEN``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from meshxl import headers as hdr
from meshxl import web as mweb
from meshxl.addr import parse_hostport
from meshxl.client import (
    AsyncClient,
    Backoff,
    BadRequest,
    ClientSettings,
    Conflict,
    Contended,
    NotFound,
    OverQuota,
)
from meshxl.client.middleware import cluster_from_host, over_quota_body
from meshxl.client.plans import check_session_id
from meshxl.demo.faults import FaultFile, Faults
from meshxl.demo.signals import until_stopped
from meshxl.demo.tally import add_routes as add_tally_routes
from meshxl.errors import MeshxlError
from meshxl.streams import StreamHost
from meshxl.telemetry import tracing

log = logging.getLogger("meshxl.demo.app")

READY_POLL = 0.2
CAS_ATTEMPTS = 3
SIDECAR_TIMEOUT = 5.0

_member = web.AppKey("member", str)
_sidecar = web.AppKey("sidecar", str)
_token = web.AppKey("token", str)
_client = web.AppKey("client", AsyncClient)
_probe = web.AppKey("probe", AsyncClient)
_ready = web.AppKey("ready", dict)
_faults = web.AppKey("faults", FaultFile)
_rng = web.AppKey("rng", random.Random)
_by_host = web.AppKey("by_host", dict)
_streams = web.AppKey("streams", StreamHost)
"""The process's resumable streams (:mod:`meshxl.demo.tally`)."""
"""With --clusters-by-host: each cluster's client by its name (sharing connections)."""
MAX_HOSTED = 1024
"""Clients of clusters kept (a Host header names any: past this, one per request)."""

SETTINGS = ClientSettings(
    timeout=SIDECAR_TIMEOUT,
    # No retries of its own: a 503 goes back to Envoy at once, which retries it on the
    # next member (a dead sidecar would otherwise hold the request here).
    unavailable=Backoff(attempts=1),
    conflicts=Backoff(attempts=CAS_ATTEMPTS, first=0.0),
)


STREAM_SETTINGS = ClientSettings(timeout=SIDECAR_TIMEOUT,
                                 unavailable=Backoff(attempts=2, first=0.02))
"""The streams' client: a stream's commits are tried again by its host."""


class _NoCounter(Exception):
    """The session holds something else than a counter."""


def _answer(status: int, body: dict[str, Any], member: str,
            headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(body, status=status,
                             headers={hdr.MEMBER: member, **(headers or {})})


def _error(status: int, message: str, member: str, **extra: Any) -> web.Response:
    return _answer(status, {"error": message, "status": status, "member": member, **extra},
                   member)


def _seq(session: str, state: Any) -> int:
    """The counter in a session's state (0 for a new session)."""
    if state is None:
        return 0
    try:
        return int(state.get("seq", 0))
    except (ValueError, AttributeError, TypeError) as exc:
        raise _NoCounter(f"session {session} holds no counter: {str(state)[:200]!r}") \
            from exc


def _session_of(request: web.Request) -> str | None:
    session = request.headers.get(hdr.SESSION, "").strip()
    return session or None


def _faults_now(app: web.Application) -> Faults:
    """The injected faults in force (none without ``--faults``)."""
    if _faults not in app:
        return Faults()
    return app[_faults].current()


def _client_of(request: web.Request) -> AsyncClient:
    """The client of the request's cluster: the sidecar's one cluster, or with
    ``--clusters-by-host`` the Host header's first label (InputError if that is no
    cluster's name)."""
    client, clients = request.app[_client], request.app.get(_by_host)
    if clients is None:
        return client
    name = cluster_from_host(request)
    found: AsyncClient | None = clients.get(name)
    if found is None:
        found = client.for_cluster(name)
        if len(clients) < MAX_HOSTED:
            clients[name] = found
    return found


async def _counter(request: web.Request, *, increment: bool) -> web.Response:
    """Read the session's counter from the sidecar and, for POST, write it back + 1
    (``update``: If-Match the read's ETag, read again if the session changed)."""
    member = request.app[_member]
    try:
        client = _client_of(request)
    except MeshxlError as exc:
        return _error(400, f"Host: {exc}", member)
    faults, rng = _faults_now(request.app), request.app[_rng]
    if faults.fails(rng):  # before the session is read: nothing was written
        return _error(503, "injected fault (--faults)", member)
    delay = faults.delay(rng)
    if delay > 0:
        await asyncio.sleep(delay)
    session = _session_of(request)
    if session is None:
        return _error(400, f"the {hdr.SESSION} header is required", member)
    try:
        check_session_id(session)
    except BadRequest as exc:  # the client's request, not the sidecar: no retry helps
        return _error(400, f"{hdr.SESSION}: {exc}", member)
    try:
        if increment:
            updated = await client.update(
                session, lambda state: {"seq": _seq(session, state) + 1, "member": member})
            seq = int(updated.state["seq"])
        else:
            try:
                seq = _seq(session, (await client.get(session)).state)
            except NotFound:
                seq = 0
    except Contended:
        return _error(409, f"session {session} kept changing during the increment "
                           f"({CAS_ATTEMPTS} attempts)", member, session=session)
    except Conflict as exc:  # ownership lost: another member wrote the session since
        return _error(409, str(exc), member, session=session)
    except OverQuota as exc:  # the tenant's own limit: no other member helps
        return _answer(429, {**over_quota_body(exc), "member": member, "session": session},
                       member, {"Retry-After": exc.retry_after_header})
    except (MeshxlError, _NoCounter) as exc:  # sidecar 5xx, unreachable, refused
        log.warning("session %s: answered 503 (%s)", session, exc)
        return _error(503, str(exc), member, session=session)
    return _answer(200, {"member": member, "session": session, "seq": seq}, member)


async def increment(request: web.Request) -> web.Response:
    return await _counter(request, increment=True)


async def current(request: web.Request) -> web.Response:
    return await _counter(request, increment=False)


async def counter_ws(request: web.Request) -> web.StreamResponse:
    """``GET /counter/ws`` (WebSocket, header ``x-session-id``): each text message
    ``inc`` (or ``get``) is answered like ``POST`` (``GET``) ``/counter``, as JSON. When
    the session cannot be served here the socket closes (1013, try again later), so the
    client reconnects through Envoy to a member that can."""
    member = request.app[_member]
    try:
        client = _client_of(request)
    except MeshxlError as exc:
        return _error(400, f"Host: {exc}", member)
    session = _session_of(request)
    if session is None:
        return _error(400, f"the {hdr.SESSION} header is required", member)
    try:
        check_session_id(session)
    except BadRequest as exc:
        return _error(400, f"{hdr.SESSION}: {exc}", member)
    ws = web.WebSocketResponse(heartbeat=None)
    await ws.prepare(request)
    async for message in ws:
        if message.type != web.WSMsgType.TEXT or message.data not in ("inc", "get"):
            await ws.send_json({"error": "send 'inc' or 'get'", "member": member})
            continue
        try:
            if message.data == "inc":
                updated = await client.update(
                    session, lambda state: {"seq": _seq(session, state) + 1, "member": member})
                seq = int(updated.state["seq"])
            else:
                try:
                    seq = _seq(session, (await client.get(session)).state)
                except NotFound:
                    seq = 0
        except OverQuota as exc:  # the socket stays: the next message may be in quota
            await ws.send_json({**over_quota_body(exc), "member": member, "session": session})
            continue
        except (MeshxlError, _NoCounter) as exc:
            await ws.send_json({"error": str(exc), "member": member, "session": session})
            await ws.close(code=1013, message=b"session unavailable here")
            break
        await ws.send_json({"member": member, "session": session, "seq": seq})
    return ws


async def healthz(request: web.Request) -> web.Response:
    member = request.app[_member]
    state = request.app[_ready]
    if state["ready"]:
        return _answer(200, {"member": member, "ready": True}, member)
    return _error(503, f"sidecar not ready: {state['reason']}", member)


async def _watch_ready(app: web.Application) -> None:
    """Poll the sidecar's /readyz; health follows it (a dead sidecar fails the member)."""
    state, probe = app[_ready], app[_probe]
    while True:
        try:
            readiness = await probe.ready()
            app[_streams].note_moving(readiness.moving)
            state["ready"] = readiness.ready
            state["reason"] = "" if readiness.ready else \
                f"/readyz: {'; '.join(readiness.reasons) or 'not ready'}"
        except MeshxlError as exc:
            state["ready"], state["reason"] = False, str(exc)
        await asyncio.sleep(READY_POLL)


async def _pauses(app: web.Application) -> None:
    """Stall the whole process now and then when the faults ask for it (a GC pause:
    the event loop blocked on purpose)."""
    rng = app[_rng]
    while True:
        faults = _faults_now(app)
        if faults.pause_ms <= 0:
            await asyncio.sleep(1.0)
            continue
        await asyncio.sleep(faults.next_pause(rng))
        if _faults_now(app).pause_ms > 0:
            # Blocking on purpose: the whole process stalls, as in a GC pause.
            time.sleep(faults.pause_ms / 1000.0)  # noqa: ASYNC251


async def _resources(app: web.Application) -> Any:
    configs = None
    if tracing.enabled():
        from meshxl.telemetry.http import client_trace_configs

        configs = client_trace_configs()
    app[_client] = AsyncClient(app[_sidecar], token=app[_token] or None, settings=SETTINGS,
                               trace_configs=configs)
    # Readiness is polled outside of any request: an untraced client, no span noise.
    app[_probe] = AsyncClient(app[_sidecar], settings=ClientSettings(
        timeout=READY_POLL * 2, connect_timeout=READY_POLL * 2, unavailable=Backoff(attempts=1)))
    tasks = [asyncio.create_task(_watch_ready(app))]
    if _faults in app:
        tasks.append(asyncio.create_task(_pauses(app)))
    yield
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await app[_client].close()
    await app[_probe].close()
    await app[_streams].aclose()
    await app[_streams].sessions.close()


def make_app(member: str, sidecar: str, token: str | None = None,
             faults: Path | None = None, clusters_by_host: bool = False) -> web.Application:
    """``faults``: the file of injected faults (module docstring), None for none;
    ``clusters_by_host``: each request's cluster from its Host (module docstring)."""
    # W3C trace context through the app, when its spans go somewhere (OpenTelemetry's
    # aiohttp instrumentation is imported only then: a tenth of a second of start-up).
    middlewares = []
    if tracing.enabled():
        from meshxl.telemetry.http import server_middleware

        middlewares.append(server_middleware())
    app = mweb.application(middlewares=middlewares)
    app[_member] = member
    app[_sidecar] = sidecar.rstrip("/")
    app[_token] = token or ""
    app[_ready] = {"ready": False, "reason": "not polled yet"}
    app[_rng] = random.Random()
    if clusters_by_host:
        app[_by_host] = {}
    if faults is not None:
        app[_faults] = FaultFile(faults)
    app.cleanup_ctx.append(_resources)
    app.router.add_post("/counter", increment)
    app.router.add_get("/counter/ws", counter_ws)
    app.router.add_get("/counter", current)
    app.router.add_get("/healthz", healthz)
    app[_streams] = StreamHost(AsyncClient(app[_sidecar], token=app[_token] or None,
                                           settings=STREAM_SETTINGS))
    add_tally_routes(app, app[_streams], member)
    return app


async def serve(member: str, listen: str, sidecar: str, token: str | None = None,
                faults: Path | None = None, clusters_by_host: bool = False) -> None:
    """Serve until SIGTERM or SIGINT."""
    host, port = parse_hostport(listen)
    runner = mweb.Runner(make_app(member, sidecar, token, faults, clusters_by_host))
    await runner.setup()
    # A member takes over every stream of a peer that dies at once: two connections
    # an event stream (its GET and its upload), one a WebSocket. aiohttp's default
    # backlog (128) overflowed (bench/streams.py: 2,368 dropped SYNs in one SSE run);
    # a dropped SYN outlasts Envoy's connect timeout, so the request went to another
    # member, which refused it (421), and the stream resumed again and again.
    await web.TCPSite(runner, host, port, backlog=socket.SOMAXCONN).start()
    log.info("member %s serving on %s, state in %s", member, listen, sidecar)
    try:
        await until_stopped()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshxl.demo.app", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="this member's name")
    parser.add_argument("--listen", required=True, metavar="HOST:PORT")
    parser.add_argument("--sidecar", required=True, metavar="URL",
                        help="the member's statesync sidecar, e.g. http://127.0.0.1:7070")
    parser.add_argument("--cluster", default="demo")
    parser.add_argument("--clusters-by-host", action="store_true",
                        help="the sidecar serves several clusters (--pool): each request's "
                             "cluster is its Host header's first label")
    parser.add_argument("--trace-file", help="write this process's spans as OTLP JSON lines")
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--faults", type=Path, metavar="FILE",
                        help="inject faults from this JSON file, re-read when it changes "
                             "(module docstring; for tests and benchmarks)")
    args = parser.parse_args(argv)
    from meshxl.bearer import (
        STATESYNC_TOKEN_ENV,
        STATESYNC_TOKEN_FILE_ENV,
        TokenError,
        read_token,
    )

    token_file = os.environ.get(STATESYNC_TOKEN_FILE_ENV)
    try:
        token = read_token(Path(token_file) if token_file else None, os.environ,
                           STATESYNC_TOKEN_ENV, STATESYNC_TOKEN_FILE_ENV)
    except TokenError as exc:
        parser.exit(1, f"meshxl.demo.app: {exc}\n")
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.WARNING),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Envoy health-checks every member several times a second: keep those out of traces.
    os.environ.setdefault("OTEL_PYTHON_AIOHTTP_SERVER_EXCLUDED_URLS", "healthz")
    from meshxl.telemetry.tracing import setup_tracing, shutdown_tracing

    setup_tracing("app", attributes={"meshxl.cluster": args.cluster,
                                     "meshxl.member": args.name},
                  trace_file=args.trace_file)
    try:
        asyncio.run(serve(args.name, args.listen, args.sidecar, token, args.faults,
                          args.clusters_by_host))
    finally:
        shutdown_tracing()
    return 0


if __name__ == "__main__":
    from meshxl.exiting import run_main

    run_main(main)
