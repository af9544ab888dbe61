"""The statesync sidecar process: etcd client, store, cache, membership, HTTP API.

:func:`serve` owns the resource lifetimes: the API's sockets are bound first, then the
etcd client, the watch and the registration start, then the API serves (its own HTTP
server, :mod:`.http`); at the end they stop in the reverse order. The member is
registered at once but advertised (``ready``) only after the cache has read every
session of its cluster, so Envoy never sends a session to a member that could not
serve it.

With ``sessions.replication: narrow`` the cache holds only what this member wrote or
read, and the member is ready at once (any other session is read from etcd on first
use; an idle probe asks each etcd cluster its revision, so a restore is found without a
watch: history.py); the sidecar follows the mesh (model, registrations) for its role,
and while it is ``standby`` (high availability) it watches and holds every session, as
in ``all`` mode, so the failover it exists for finds the active's sessions local.
Leaving the standby role it stops the watch and keeps what it holds; expired sessions
are pruned.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import logging
import os
import socket
import time
from typing import Any

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
from meshxl.etcd.keys import Keys
from meshxl.etcd.mesh import EtcdMeshSource
from meshxl.etcd.shards import ShardMap
from meshxl.model.basics import ModelError, Replication, choose
from meshxl.model.light import parse_light
from meshxl.model.runtime import SERVING, MemberState, Role, cluster_view

from .api import SessionRoutes
from .auth import token_check
from .cache import SessionCache
from .config import StatesyncConfig
from .http import HttpServer, Router
from .membership import Membership
from .mesh_reads import (
    cache_status,
    model_mismatch,
    session_settings,
    shard_map,
    sync_stats_value,
)
from .metrics import StatesyncMetrics
from .sessions import Sessions
from .shards import Shard, ShardedSessions
from .starting import Waiting, caches_synced, start_when_etcd_answers
from .store import SessionStore
from .tracing import TakeoverTracer, follow_failovers
from .writes import Settings

log = logging.getLogger(__name__)

GC_YOUNG = 10_000
"""Allocations between collections of the youngest generation (Python's default: 700).
The collector counts allocations net of frees, never below zero, so the objects of the
requests in flight set it off many times a second at 700, though they die by their
reference counts anyway; at 10,000 it seldom runs (``bench/statesync_gc.py``, figures in
docs/performance.md)."""


STOP_GRACE = 5.0  # seconds a stop waits for its cancelled tasks (the rest: logged, left)

#: ``sessions.replication`` -> whether the cache holds only what the member uses.
_HOLDS_ONLY_WHAT_IT_USES: dict[Replication, bool] = {"all": False, "narrow": True}


class Sidecar:
    """Everything one sidecar runs, created in the app's cleanup context."""

    def __init__(self, config: StatesyncConfig, client: aetcd.Client, settings: Settings,
                 metrics: StatesyncMetrics | None = None,
                 shard_map: ShardMap | None = None):
        self.config = config
        self.keys = Keys(config.etcd_root)
        self.client = client
        self.metrics = metrics or StatesyncMetrics()
        self.metrics.member.labels(config.cluster, config.member, config.site or "").set(1)
        if shard_map is None:  # sessions in the main cluster, beside everything else
            self.parts = [self._part("", client, settings)]
            self.sessions: Sessions | ShardedSessions = self.parts[0].engine
        else:
            self.parts = [self._part(s.name, etcd.client(s.etcd, security=config.etcd_security),
                                     settings) for s in shard_map.every]
            self.sessions = ShardedSessions(shard_map, self.parts, settings,
                                            self.keys.shard_fence.encode())
        host, port = parse_hostport(config.app)
        self.membership = Membership(client, self.keys, config.cluster, config.member,
                                     address=host, port=port, site=config.site,
                                     weight=config.weight, ttl=config.lease_ttl,
                                     sidecar=config.listen)
        self.membership.shard_map = shard_map.version if shard_map is not None else None
        self.metrics.shard_map_version.set(shard_map.version if shard_map is not None else 0)
        self.metrics.shard_map_unusable.set(1 if shard_map and not shard_map.shards else 0)
        self.takeovers = TakeoverTracer(config.cluster, config.member)
        self.sessions.on_takeover = self.takeovers.record
        self.started = time.time()
        self.model_warning: str | None = None
        """Set while the model lacks this member's cluster or site."""
        self.narrow = choose(_HOLDS_ONLY_WHAT_IT_USES, settings.replication,
                             "sessions replication")
        self.mesh = EtcdMeshSource(client, self.keys, self._mesh_changed, parse_light)
        self.role = Role.NONE
        """This member's role in the cluster, as the control plane computes it."""
        self.view_state: MemberState | None = None
        """This member's state in the cluster's view (None: not in the model)."""
        self._watches: dict[str, asyncio.Task[None]] | None = None
        """The caches' watches while they hold every session (always, unless narrow)."""
        self._tasks: list[asyncio.Task[Any]] = []
        self.membership.rejoin.serving = self._serving_now

    def _part(self, name: str, client: aetcd.Client, settings: Settings) -> Shard:
        """One etcd cluster's store, cache and session engine (the main cluster's, or a
        shard's: ``name``)."""
        config, metrics = self.config, self.metrics
        store = SessionStore(client, ttl=settings.ttl, max_batch_ops=config.batch_max_ops,
                             max_batch_bytes=config.batch_max_bytes,
                             max_inflight=config.max_inflight, on_batch=metrics.on_batch)
        engine: list[Sessions] = []
        cache = SessionCache(client, self.keys.sessions_prefix(config.cluster),
                             on_lag=metrics.replication_lag.observe,
                             on_undecodable=metrics.undecodable.labels("watch").inc,
                             on_rewind=lambda: engine[0].ledger.observed.clear(),
                             history=store.history)
        engine.append(Sessions(store, cache, self.keys, config.cluster, config.member,
                               settings, metrics))
        return Shard(name, client, store, cache, engine[0])

    async def start(self) -> None:
        if self.shard_map is not None:
            for part in self.parts:
                await part.client.connect()
        await self._recall()
        await self.membership.start()
        loop = asyncio.get_running_loop()
        if self.narrow:
            self._tasks.append(loop.create_task(self.mesh.run()))
            with contextlib.suppress(TimeoutError):  # see _follow_sync
                async with asyncio.timeout(5.0):
                    await self.mesh.synced.wait()
            # Without a usable shard map, not before one (_announce).
            await self.membership.set_ready(self.shard_map is None or bool(self.shard_map.shards))
        else:
            self._watches = {part.name: loop.create_task(part.cache.run())
                             for part in self.parts}
            self._tasks.append(loop.create_task(self._follow_sync()))
        self._tasks.append(loop.create_task(self._housekeeping()))
        self._tasks.append(loop.create_task(self._publish_sync()))
        if not self.narrow:
            self._tasks.append(loop.create_task(self.mesh.run()))
        if isinstance(self.sessions, ShardedSessions):
            from .resharding import MapFollower  # only with shards

            settings = self.sessions.settings
            follower = MapFollower(
                self.client, self.keys, self.sessions, self.parts,
                lambda name, client: self._part(name, client, settings),
                self.config.etcd_security, lambda: self._watches,
                self._announce, self.metrics)
            self._tasks.append(loop.create_task(follower.run()))
        self._tasks.append(loop.create_task(follow_failovers(
            self.client, self.keys.failovers_prefix(self.config.cluster), self.takeovers)))

    async def _announce(self, version: int) -> None:
        """A shard map served from now on: in the registration (and, holding only what
        it uses, ready: a sidecar that started without a usable map was not)."""
        await self.membership.set_shard_map(version)
        if self.narrow:
            await self.membership.set_ready(True)

    async def stop(self) -> None:
        tasks = {*self._tasks, *(self._watches or {}).values()}
        for task in tasks:
            task.cancel()
        done, hung = await asyncio.wait(tasks, timeout=STOP_GRACE) if tasks else ((), ())
        for task in done:  # a task's failure is no stop's failure: retrieved, dropped
            _ = task.cancelled() or task.exception()
        for task in hung:
            log.warning("stopping: task %s outlived its cancel", task.get_name())
        for part in self.parts:
            await part.store.close()
            if part.client is not self.client:
                with contextlib.suppress(Exception):
                    await part.client.close()
        with contextlib.suppress(Exception):
            await self.membership.stop()

    # -- the mesh: model warnings, and the role that scopes a narrow cache ------------

    async def _recall(self) -> None:
        """Before the first registration: the cluster's failback policy, and whether
        this member served before its sidecar (re)started (the control plane counted a
        failover of it): then it comes back held (failback.py)."""
        rejoin = self.membership.rejoin
        try:
            model, history = await asyncio.gather(
                self.client.get(self.keys.model.encode()),
                self.client.get(self.keys.member_state(self.config.cluster,
                                                       self.config.member).encode()))
        except Exception as exc:  # the mesh watch configures it as soon as etcd answers
            log.warning("failback policy and member history not read: %s", exc)
            return
        if model is not None:
            with contextlib.suppress(ModelError, UnicodeDecodeError):
                spec = parse_light(model.value.decode(), source="model in etcd").cluster(
                    self.config.cluster)
                rejoin.configure(spec.failover if spec is not None else None)
        if history is not None:
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                rejoin.served = int(json.loads(history.value).get("failovers") or 0) > 0

    def _mesh_changed(self) -> None:
        self._check_model(self.mesh.model_text)
        model = self.mesh.model
        spec = model.cluster(self.config.cluster) if model is not None else None
        role = Role.NONE
        state = None
        self.membership.rejoin.configure(spec.failover if spec is not None else None)
        if spec is not None:
            me = cluster_view(spec, self.mesh.runtime).member(
                self.config.member)
            role = me.role if me is not None else Role.NONE
            state = me.state if me is not None else None
            registration = self.mesh.runtime.registrations_of(spec.name).get(
                self.config.member)
            # The view did not hold it (none of the members it stood behind serves):
            # returning, it would be shown returning; ready, it took its place.
            if (registration is not None and registration.returning is not None
                    and state == MemberState.READY):
                self.membership.rejoin.unheld()
        if state != self.view_state:
            if state == MemberState.ATTENTION:
                log.warning("member %s is active with problems: no other member can "
                            "serve, so it serves in spite of what it reported",
                            self.config.member)
            self.view_state = state
        if role != self.role:
            log.info("member %s is now %s", self.config.member, role)
            self.role = role
        if self.narrow:
            self._scope(hold_all=spec is not None and spec.high_availability
                        and role == Role.STANDBY)

    def _serving_now(self) -> tuple[str, ...]:
        """The first tier of members that serve now, in this sidecar's view (a member
        that comes back stands behind them: failback.py)."""
        model = self.mesh.model
        spec = model.cluster(self.config.cluster) if model is not None else None
        if spec is None:
            return ()
        serving = [m for m in cluster_view(spec, self.mesh.runtime).members
                   if m.state in SERVING and m.state != MemberState.RETURNING
                   and m.name != self.config.member]
        if not serving:
            return ()
        top = min(m.priority for m in serving)
        return tuple(m.name for m in serving if m.priority == top)

    def _scope(self, *, hold_all: bool) -> None:
        """Start or stop the watch that keeps every session of the cluster."""
        if hold_all and self._watches is None:
            log.info("standby: holding every session of cluster %s", self.config.cluster)
            loop = asyncio.get_running_loop()
            self._watches = {part.name: loop.create_task(part.cache.run())
                             for part in self.parts}
        elif not hold_all and self._watches is not None:
            log.info("no longer standby: holding only the sessions this member uses")
            for watch in self._watches.values():
                watch.cancel()
            self._watches = None

    @property
    def holds_all(self) -> bool:
        """The cache holds every session of the cluster (or is catching up to)."""
        return self._watches is not None

    async def _resync_needed(self) -> None:
        waits = [asyncio.ensure_future(part.cache.resync_needed.wait()) for part in self.parts]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        for part in self.parts:
            part.cache.resync_needed.clear()

    async def _follow_sync(self) -> None:
        """Advertise the member exactly while its caches are caught up with etcd."""
        while True:
            await caches_synced(self.parts, self.sessions.usable if isinstance(
                self.sessions, ShardedSessions) else None)
            # The mesh first: a member that comes back stands behind the members that
            # serve, which only the mesh tells (failback.py).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0):
                    await self.mesh.synced.wait()
            # Without a usable shard map, not before one (_announce).
            await self.membership.set_ready(self.shard_map is None or bool(self.shard_map.shards))
            log.info("cache caught up (%d sessions): member %s is ready", self.cached_sessions,
                     self.config.member)
            await self._resync_needed()
            await self.membership.set_ready(False)
            log.warning("cache must re-read everything: member %s withdrawn meanwhile",
                        self.config.member)

    async def _housekeeping(self) -> None:
        settings = self.sessions.settings
        period = min(1.0, settings.sync_delay / 2) if settings.sync_delay > 0 else 1.0
        last_prune = time.monotonic()
        while True:
            await asyncio.sleep(period)
            for part in self.parts:  # without a watch, an idle probe finds a restore
                part.cache.ask_if_quiet()
            if settings.sync_delay > 0:
                await self.sessions.flush_due()
            if time.monotonic() - last_prune > settings.ttl / 10:
                self.sessions.prune_observed()
                if not self.holds_all:  # no watch reports expiries: drop them here
                    for part in self.parts:
                        part.cache.prune_expired(
                            time.time() - settings.ttl - part.store.leases.bucket)
                last_prune = time.monotonic()

    async def _publish_sync(self) -> None:
        """Publish :meth:`status` for ``meshxl sync`` under the registration's lease
        (it vanishes with the sidecar) every ``sync_publish_interval`` seconds, changed
        or not: the record's age then tells ``meshxl sync`` whether this sidecar and its
        etcd connection still work (it flags records older than a few intervals)."""
        key = self.keys.sync_stats(self.config.cluster, self.config.member).encode()
        interval = self.config.sync_publish_interval
        while True:
            await asyncio.sleep(interval)
            lease = self.membership.lease_id
            if lease is None:
                continue
            value = sync_stats_value({**self.status(), "publish_interval": interval},
                                     time.time())
            try:
                async with asyncio.timeout(max(interval, 1.0)):
                    await self.client.put(key, value, lease=lease)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the next round retries; stats are best effort
                log.debug("sync statistics not published: %s", exc)

    def _check_model(self, raw: bytes | None) -> None:
        warning = model_mismatch(raw, self.config.cluster, self.config.site, self.keys.model)
        if warning is not None and warning != self.model_warning:
            log.warning("%s", warning)
        elif warning is None and self.model_warning is not None:
            log.info("the model now has cluster %s%s", self.config.cluster,
                     f" and site {self.config.site}" if self.config.site else "")
        self.model_warning = warning

    def not_ready_reasons(self) -> list[str]:
        reasons = []
        # Only the member's own state: a lease lost later is withdrawn by the control
        # plane; failing readiness for it would fail every member at once in an etcd
        # fault (membership.py).
        registration = self.membership.not_ready_reason()
        if registration is not None:
            reasons.append(registration)
        if self.shard_map is not None and not self.shard_map.shards:
            reasons.append(f"no usable session shard map: {self.shard_map.problem}")
        if not self.narrow:
            for part in self.parts:
                if not part.cache.synced.is_set() and (self.shard_map is None or part.reachable):
                    reasons.append("session cache still syncing with etcd" + (
                        f" (shard {part.name})" if part.name else ""))
        if self.membership.problems and self.view_state != MemberState.ATTENTION:
            # Active with problems: the cluster keeps it serving (failover.all_withdrawn),
            # so its health check must pass too, or Envoy would withdraw it all the same.
            reasons.append(f"problems reported: {', '.join(sorted(self.membership.problems))}")
        return reasons

    def liveness_problems(self) -> list[str]:
        """Why the process needs a restart (``/healthz`` 503): a background loop ended.
        Each one retries etcd trouble itself, so an end is a crash, and the sidecar
        would go on answering with stale sessions and no registration renewal."""
        problems = []
        for task in self._tasks:
            if task.done() and not task.cancelled():
                error = task.exception()
                name = getattr(task.get_coro(), "__qualname__", task.get_name())
                problems.append(f"{name} stopped" + (f": {error!r}" if error else ""))
        return problems

    def warnings(self) -> list[str]:
        """What works only in part while the member stays ready."""
        warnings = [] if self.model_warning is None else [self.model_warning]
        if isinstance(self.sessions, ShardedSessions) and self.sessions.map_problem:
            warnings.append(f"{self.sessions.map_problem} (serving shard map version "
                            f"{self.sessions.map.version})")
        if self.view_state == MemberState.ATTENTION:
            warnings.append("active with problems: no other member of the cluster can serve, "
                            "so this one serves in spite of its report"
                            + (f" ({', '.join(sorted(self.membership.problems))})"
                               if self.membership.problems else " (overloaded)"))
        returning = self.membership.rejoin.returning
        if returning is not None:
            warnings.append(f"returning since {returning['since']} ({returning['why']}): held "
                            "behind the members that serve until failback")
        unreachable = self.membership.unreachable_for
        if unreachable is not None:
            warnings.append(f"etcd unreachable for {unreachable:.1f} s: cached sessions are "
                            "read unverified, writes fail with 503")
        elif not self.membership.registered and self.membership.registrations:
            warnings.append("registration lease lost: registering again")
        return warnings

    @property
    def shard_map(self) -> ShardMap | None:
        """The session shards served now (None: sessions live in the main cluster)."""
        sessions = self.sessions
        return sessions.map if isinstance(sessions, ShardedSessions) else None

    @property
    def cached_sessions(self) -> int:
        return sum(len(part.cache) for part in self.parts)

    def refresh_gauges(self) -> None:
        self.metrics.cached.set(self.cached_sessions)
        self.metrics.revision.set(self.parts[0].cache.applied if self.parts else 0)
        if self.shard_map is not None:
            for part in self.parts:
                self.metrics.shard_up.labels(part.name).set(1 if part.reachable else 0)
                self.metrics.shard_sessions.labels(part.name).set(len(part.cache))
        self.metrics.local.set(self.sessions.local_sessions)
        self.metrics.ready.set(0 if self.not_ready_reasons() else 1)
        self.metrics.undecodable_sessions.set(sum(len(p.cache.undecodable) for p in self.parts))
        self.metrics.etcd_unreachable.set(self.membership.unreachable_for or 0.0)

    def status(self) -> dict[str, Any]:
        """The sidecar as ``/v1/status`` and ``meshxl sync`` show it. With shards, the
        cache's figures are the first shard's and ``shards`` has each one's."""
        s = self.sessions
        shards = s.status() if isinstance(s, ShardedSessions) else None
        return {
            "cluster": self.config.cluster, "member": self.config.member,
            "site": self.config.site, "app": self.config.app,
            "ready": not self.not_ready_reasons(), "reasons": self.not_ready_reasons(),
            "registered": self.membership.registered, "problems": self.membership.problems,
            "overload": self.membership.overload,
            "state": None if self.view_state is None else str(self.view_state),
            "returning": self.membership.rejoin.returning,
            "warnings": self.warnings(), "etcd_unreachable_for": self.membership.unreachable_for,
            **cache_status(self.parts[0].cache if self.parts else None),
            "cached_sessions": self.cached_sessions,
            "owned_sessions": sum(p.cache.owned_by(self.config.member) for p in self.parts),
            "local_sessions": s.local_sessions, "takeovers": s.takeovers,
            "failover_takeovers": self.takeovers.summary(),
            "write_conflicts": s.conflicts,
            "lease_losses": self.membership.lease_losses,
            "etcd_members": etcd.balancer_of(self.client).status(),
            "settings": {"ttl": s.settings.ttl, "sync_delay": s.settings.sync_delay,
                         "max_bytes": s.settings.max_bytes,
                         "replication": s.settings.replication},
            "role": str(self.role), "holds_all_sessions": self.holds_all,
            "started": self.started, "shards": shards,
        }


def routes(sidecar: Sidecar) -> Router:
    """The API's routes, bound to ``sidecar``."""
    settings = sidecar.sessions.settings
    return SessionRoutes(sidecar).router(settings.max_bytes,
                                         delayed_sync=settings.sync_delay > 0)


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


def _serve_api(server: HttpServer, sidecar: Sidecar) -> None:
    """``server`` serves ``sidecar``'s API from now on, with a SERVER span per request
    while spans go somewhere (it continues the request's ``traceparent``, so takeover
    spans land in the request's trace; off otherwise, as it costs a good part of a
    write's CPU)."""
    from meshxl.telemetry import tracing

    server.site.router = routes(sidecar)
    server.site.wrap = None
    if tracing.enabled():  # OpenTelemetry is loaded only then
        from meshxl.telemetry.spans import server_spans

        server.site.wrap = server_spans()


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


async def serve(config: StatesyncConfig) -> None:
    """Bind the API port (and socket) and serve on it: first the waiting answers of
    :mod:`.starting` while the sidecar starts (etcd, registration; retried until etcd
    answers), then the API.

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
    try:
        await server.listen(sock)
        if unix is not None:
            await server.listen(unix)
        from meshxl.telemetry import tracing as otel

        if otel.enabled():
            # Loaded before the member registers: seconds of imports on a busy host
            # would otherwise hold the loop while its lease's keepalives are due.
            import meshxl.telemetry.spans  # noqa: F401
        started = await start_when_etcd_answers(lambda: _start(config, metrics), waiting)
        _serve_api(server, started[1])
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
        if started is not None:
            await started[1].stop()
            with contextlib.suppress(Exception):
                await started[0].close()
        if unix is not None and config.unix_socket is not None:
            remove_unix(config.unix_socket, inode)


__all__ = ["Sidecar", "StatesyncConfig", "http_server", "routes", "serve"]
