"""The statesync sidecar process: the API's sockets, etcd's first answer, the sidecar
(sidecar.py) and its HTTP API.

:func:`serve` owns the resource lifetimes: the API's sockets are bound first, then the
etcd client, the watch and the registration start (:class:`.sidecar.Sidecar`), then the
API serves (its own HTTP server, :mod:`.http`); at the end they stop in the reverse
order. Until etcd first answers, the API gives :mod:`.starting`'s waiting answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import socket
from typing import TYPE_CHECKING, Any

import aetcd

from meshxl import etcd
from meshxl.addr import (
    bind_tcp,
    bind_unix,
    bound_port,
    grpc_target,
    parse_hostport,
    remove_unix,
)

from .api import SessionRoutes
from .auth import token_check
from .cluster_routes import add_cluster_routes
from .config import StatesyncConfig
from .http import HttpServer, Router
from .mesh_reads import session_settings, shard_map
from .metrics import StatesyncMetrics
from .sidecar import Sidecar
from .starting import Waiting, start_when_etcd_answers

if TYPE_CHECKING:  # hosting.py (and the virtual systems' modules) only when hosting
    from .hosting import Hosting

log = logging.getLogger(__name__)

GC_YOUNG = 10_000
"""Allocations between collections of the youngest generation (Python's default: 700).
The collector counts allocations net of frees, never below zero, so the objects of the
requests in flight set it off many times a second at 700, though they die by their
reference counts anyway; at 10,000 it seldom runs (``bench/statesync_gc.py``, figures in
docs/performance.md)."""


def routes(sidecar: Sidecar) -> Router:
    """The API's routes, bound to ``sidecar``; under ``/v1/clusters/{its cluster}`` too
    (cluster_routes.py), as a sidecar hosting several clusters serves each."""
    settings = sidecar.sessions.settings
    own = SessionRoutes(sidecar)
    router = own.router(settings.max_bytes, delayed_sync=settings.sync_delay > 0)
    cluster = sidecar.config.cluster
    add_cluster_routes(router, lambda name: own if name == cluster else None,
                       lambda: [cluster])
    return router


def http_server(sidecar: Sidecar) -> HttpServer:
    """The API's server for a started sidecar (:func:`_server`, then :func:`_serve_api`)."""
    server = _server(sidecar.config, sidecar.metrics, routes(sidecar))
    _serve_api(server, sidecar)
    return server


def _server(config: StatesyncConfig, metrics: StatesyncMetrics, router: Router) -> HttpServer:
    """The API's server: the token check (if any) on every request's head, the
    connection cap, each limit hit counted."""
    token = config.token
    server = HttpServer(router, authorize=token_check(token) if token is not None else None,
                        max_connections=config.max_connections, on_limit=metrics.http_limit)
    metrics.connections.set_function(lambda: len(server.connections))
    return server


def _serve_api(server: HttpServer, sidecar: Sidecar | Hosting) -> None:
    """``server`` serves ``sidecar``'s API (or a hosting's: every cluster's) from now
    on, with a SERVER span per request while spans go somewhere (it continues the
    request's ``traceparent``, so takeover spans land in the request's trace; off
    otherwise, as it costs a good part of a write's CPU)."""
    from meshxl.telemetry import tracing

    server.site.router = routes(sidecar) if isinstance(sidecar, Sidecar) else sidecar.router()
    server.site.wrap = None
    if tracing.enabled():  # OpenTelemetry is loaded only then
        from meshxl.telemetry.spans import server_spans

        server.site.wrap = server_spans()


def _serve_dapr(dapr: Any, config: StatesyncConfig, served: Sidecar | Hosting | None) -> None:
    """Dapr's state API over the clusters served: each by its name as a state store, and
    a single cluster by ``--dapr-store`` (``statestore``) too."""
    from meshxl import __version__

    assert config.dapr is not None and served is not None
    if not isinstance(served, Sidecar):
        hosting = served
        dapr.serve(lambda name: hosting.clusters().get(name),
                   lambda: sorted(hosting.clusters()), config.dapr.app_id or config.cluster,
                   __version__)
        return
    sidecar = served
    names = list(dict.fromkeys((config.dapr.store, config.cluster)))
    dapr.serve(lambda name: sidecar if name in names else None, lambda: names,
               config.dapr.app_id or config.cluster, __version__)
    log.info("Dapr's state API on http://%s:%d and gRPC %s:%d (stores %s)", host_of(config),
             dapr.http_port, host_of(config), dapr.grpc_port, ", ".join(names))


def host_of(config: StatesyncConfig) -> str:
    return parse_hostport(config.listen, allow_zero=True)[0]


async def _start(config: StatesyncConfig, metrics: StatesyncMetrics | None = None,
                 ) -> tuple[aetcd.Client, Sidecar]:
    """Connect to etcd, read the session settings, start the sidecar (registers)."""
    client = etcd.client(config.etcd, security=config.etcd_security)
    try:
        await client.connect()
        settings = await session_settings(client, config)
        sidecar = Sidecar(config, client, settings, metrics, await shard_map(client, config))
        await sidecar.start()
    except BaseException:
        with contextlib.suppress(Exception):
            await client.close()
        raise
    log.info("statesync %s/%s on %s: sessions ttl %ss, sync delay %ss, max %d bytes, "
             "replication %s", config.cluster, config.member, config.listen,
             settings.ttl, settings.sync_delay, settings.max_bytes, settings.replication)
    return client, sidecar


async def _start_hosting(config: StatesyncConfig, metrics: StatesyncMetrics,
                         clusters: tuple[str, ...], pool: str | None) -> Hosting:
    """Start a sidecar hosting several clusters (hosting.py, loaded only then)."""
    from .hosting import Hosting

    hosting = Hosting(config, metrics, clusters, pool)
    try:
        await hosting.start()
    except BaseException:
        await hosting.stop()
        raise
    log.info("statesync member %s on %s: hosting %d clusters%s", config.member,
             config.listen, len(hosting.sidecars), f" (pool {pool})" if pool else "")
    return hosting


async def serve(config: StatesyncConfig, clusters: tuple[str, ...] = (),
                pool: str | None = None) -> None:
    """Bind the API port (and socket) and serve on it: first the waiting answers of
    :mod:`.starting` while the sidecar starts (etcd, registration; retried until etcd
    answers), then the API.

    ``pool`` (its virtual systems) or more than one of ``clusters``: one process
    hosting each of them (hosting.py), ``config.cluster`` naming it in logs only;
    otherwise ``config.cluster`` alone, as a single-cluster sidecar.

    The port is bound before the member registers: a busy port or a bad address fails
    the start (ListenError) with nothing registered, and the registration names the
    port actually bound (``--listen HOST:0`` included). The Unix socket, if any, serves
    the same API (no port, access by file permissions); health checks and the
    registration use TCP.
    """
    sock = bind_tcp(config.listen)
    unix: socket.socket | None = None
    try:
        if config.unix_socket is not None:
            unix = bind_unix(config.unix_socket, config.socket_mode)
            inode = os.stat(config.unix_socket).st_ino
        host, _ = parse_hostport(config.listen, allow_zero=True)
        config = dataclasses.replace(config, listen=grpc_target(host, bound_port(sock)))
    except BaseException:
        sock.close()
        if unix is not None and config.unix_socket is not None:
            unix.close()
            remove_unix(config.unix_socket, inode)
        raise
    metrics = StatesyncMetrics()
    waiting = Waiting(config.etcd, metrics)
    server = _server(config, metrics, waiting.router())
    started: tuple[aetcd.Client, Sidecar] | None = None
    hosting: Hosting | None = None
    hosted = pool is not None or len(set(clusters)) > 1
    dapr: Any = None
    try:
        await server.listen(sock)
        if unix is not None:
            await server.listen(unix)
        if config.dapr is not None:  # only then is anything of Dapr's API loaded
            from .dapr.servers import DaprServers

            dapr = DaprServers(config.dapr, host, config.token, waiting.reason,
                               config.max_connections)
            await dapr.start()
        from meshxl.telemetry import tracing as otel

        if otel.enabled():
            # Loaded before the member registers: seconds of imports on a busy host
            # would otherwise hold the loop while its lease's keepalives are due.
            import meshxl.telemetry.spans  # noqa: F401
        if hosted:
            hosting = await start_when_etcd_answers(
                lambda: _start_hosting(config, metrics, clusters, pool), waiting)
            _serve_api(server, hosting)
        else:
            started = await start_when_etcd_answers(lambda: _start(config, metrics), waiting)
            _serve_api(server, started[1])
        if dapr is not None:
            _serve_dapr(dapr, config, hosting if hosting is not None
                        else started[1] if started is not None else None)
        log.info("statesync API on http://%s%s", config.listen,
                 f" and unix:{config.unix_socket}" if unix is not None else "")
        # What exists now (modules, the model, the protobuf descriptors) lives as long
        # as the process: out of the collector's way, so its collections scan only what
        # requests create (fewer and shorter pauses under load), and fewer of them.
        gc.freeze()
        gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])
        await asyncio.Event().wait()
    finally:
        await server.close()
        if dapr is not None:
            await dapr.close()
        if hosting is not None:
            await hosting.stop()
        if started is not None:
            await started[1].stop()
            with contextlib.suppress(Exception):
                await started[0].close()
        if unix is not None and config.unix_socket is not None:
            remove_unix(config.unix_socket, inode)


__all__ = ["Sidecar", "StatesyncConfig", "http_server", "routes", "serve"]
