"""One sidecar process hosting several clusters: every virtual system of a pool
(``meshxl serve statesync --pool web``), a list of clusters (``--cluster`` given more
than once), or both.

Each hosted cluster is a :class:`~.sidecar.Sidecar` of its own, exactly as a
single-cluster sidecar runs it: its registration (its own lease), its session engine
and cache, its failback, its statistics (published for ``meshxl sync``) and its
metrics. The process shares between them one event loop, one HTTP server
(cluster_routes.py routes each request by the cluster its path names), the signals of
a sick member (the loop's lag, etcd's commit time, CPU pressure), one watch of the mesh
(model, registrations, admin state: each cluster's follower is told of every change)
and one etcd client per set of etcd settings (:meth:`Hosting.client_for`): a cluster
with credentials of its own (``--etcd-credentials-dir``, credentials.py) gets a client
of its own, talking to etcd as its own user, so etcd itself refuses it every other
cluster's keys; the others share the process's. The process-wide parts (the watch of
the mesh) use the process's credentials: they need only read on the mesh's keys.

With a pool, the process also proves its member live in the pool: the pool-level key
only the pool's credential may write (pool_liveness.py), written before the virtual
systems start and withdrawn after they stop. The hosted clusters follow the model: a
virtual system added to the pool is started within a moment of the model's change, one
removed is stopped (its member deregistered). The pool's clusters are started a few at a time
(:data:`START_CONCURRENCY`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from typing import Any

import aetcd
import grpc

from meshxl import etcd
from meshxl.etcd.keys import Keys
from meshxl.etcd.mesh import EtcdMeshSource
from meshxl.model.document import ModelSpec
from meshxl.model.load import parse_unexpanded
from meshxl.model.vsls import pool_systems

from .api import SessionRoutes, SidecarParts
from .cluster_routes import hosted_router
from .config import StatesyncConfig
from .credentials import cluster_security
from .http import RequestRefused, Router
from .mesh_reads import session_settings, shard_map
from .metrics import StatesyncMetrics, render_hosted
from .pool_liveness import PoolLiveness
from .sidecar import Sidecar

log = logging.getLogger("meshxl.statesync.app")

__all__ = ["CLOSE_GRACE", "HOSTED_PUBLISH_INTERVAL", "START_CONCURRENCY", "Hosting"]

START_CONCURRENCY = 8
"""Hosted clusters started at once (each: a lease, reads, a registration)."""
CLOSE_GRACE = 2.0
"""Seconds an etcd client's close may take at the end (then: left to the exit)."""
HOSTED_PUBLISH_INTERVAL = 10.0
"""Seconds between publications of each hosted cluster's statistics (``meshxl sync``;
2 s for a single-cluster sidecar): sixty clusters would otherwise write thirty keys a
second to etcd from every member, idle."""


class Hosting:
    """The clusters one process serves, started and stopped together."""

    def __init__(self, config: StatesyncConfig, metrics: StatesyncMetrics,
                 clusters: tuple[str, ...] = (), pool: str | None = None):
        """``config``: the process's settings (its ``cluster`` names it in logs only);
        ``metrics``: the process's (its HTTP server's, its signals)."""
        self.config = config
        self.metrics = metrics
        self.listed = tuple(dict.fromkeys(clusters))
        self.pool = pool
        self.keys = Keys(config.etcd_root)
        self.sidecars: dict[str, Sidecar] = {}
        self.routes: dict[str, SessionRoutes] = {}
        self.clients: dict[tuple[str, Any], aetcd.Client] = {}
        self.mesh: EtcdMeshSource[ModelSpec] | None = None
        self.liveness: PoolLiveness | None = None
        """The member's liveness key in the pool (None: no pool, or not started)."""
        self._liveness_error: str | None = None
        """Why the pool's credential could not be used (None: it could)."""
        self.pool_problem: str | None = None
        """Why the pool's clusters are not known (no model, no such pool), or None."""
        self._failed: dict[str, str] = {}
        """Clusters that did not start, and why (tried again on the next change)."""
        self._users: dict[str, str | None] = {}
        """The etcd user each cluster last started as (None: none)."""
        self._tasks: list[asyncio.Task[Any]] = []
        self._changed = asyncio.Event()
        self._settle: asyncio.Task[None] | None = None
        self.started = time.time()

    # -- lifetime ---------------------------------------------------------------------

    async def client_for(self, config: StatesyncConfig) -> aetcd.Client:
        """The (connected) etcd client of a cluster's settings: one per distinct set
        (endpoints, TLS and credentials), shared by the clusters that have the same."""
        key = (config.etcd, config.etcd_security)
        client = self.clients.get(key)
        if client is None:
            client = etcd.client(config.etcd, security=config.etcd_security)
            try:
                await client.connect()
                # Credentials etcd refuses: a one-line reason now (the cluster's
                # readiness shows it), not a failure on its first read.
                await etcd.check_credentials(client)
            except BaseException:
                with contextlib.suppress(Exception):
                    await client.close()
                raise
            self.clients[key] = client
        return client

    def config_of(self, cluster: str) -> StatesyncConfig:
        """A hosted cluster's settings: the process's, for that cluster, with its own
        etcd credentials if ``--etcd-credentials-dir`` has an entry for it (read now:
        a cluster started later picks up its entry then)."""
        security = cluster_security(self.config.etcd_credentials_dir, cluster,
                                    self.config.etcd_security)
        return dataclasses.replace(self.config, cluster=cluster, etcd_security=security,
                                   sync_publish_interval=max(
                                       self.config.sync_publish_interval,
                                       HOSTED_PUBLISH_INTERVAL))

    async def start(self) -> None:
        """Connect, follow the mesh, start every cluster wanted now."""
        client = await self.client_for(self.config)
        self.mesh = EtcdMeshSource(client, self.keys, self._mesh_changed, parse_unexpanded)
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self.mesh.run()))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5.0):
                await self.mesh.synced.wait()
        self.metrics.signals.loop_lag.start()
        await self._start_liveness()
        await self._settle_once()
        self._tasks.append(loop.create_task(self._follow()))

    async def _start_liveness(self) -> None:
        """Keep the member's liveness key in the pool, with the pool's own credential
        (its entry in --etcd-credentials-dir, else the process's): no virtual system's
        may write the pool's keys. A credential etcd refuses is a warning, tried again
        after a pause."""
        if self.pool is None or self.liveness is not None:
            return
        try:
            client = await self.client_for(self.config_of(self.pool))
        except Exception as exc:
            why = self._why(self.pool, exc)
            if why != self._liveness_error:
                log.error("pool %s: member %s's liveness key not written: %s", self.pool,
                          self.config.member, why)
            self._liveness_error = why
            self._changed.set()  # tried again
            return
        self._liveness_error = None
        self.liveness = PoolLiveness(client, self.keys, self.pool, self.config)
        await self.liveness.start()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await asyncio.gather(*(s.stop() for s in self.sidecars.values()),
                             return_exceptions=True)
        self.sidecars.clear()
        self.routes.clear()
        if self.liveness is not None:
            with contextlib.suppress(Exception):
                await self.liveness.stop()
        for client in self.clients.values():
            # Bounded: with a hundred watches cancelled at once, aetcd's close can wait
            # for ever on its watcher's full request queue, and the process would never
            # end (the leases are revoked by now).
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_GRACE):
                    await client.close()
        self.metrics.signals.loop_lag.stop()

    # -- which clusters ---------------------------------------------------------------

    def wanted(self) -> list[str]:
        """The clusters to serve now: those listed, then the pool's virtual systems in
        the model's order."""
        wanted = list(self.listed)
        if self.pool is not None:
            model = self.mesh.model if self.mesh is not None else None
            if model is None:
                self.pool_problem = (f"pool {self.pool!r}: no valid model in etcd"
                                     + (f" ({self.mesh.model_error})" if self.mesh is not None
                                        and self.mesh.model_error else ""))
            elif model.pool(self.pool) is None:
                self.pool_problem = f"pool {self.pool!r} is not in the model in etcd"
            else:
                self.pool_problem = None
                wanted += [n for n in pool_systems(model, self.pool) if n not in wanted]
        return wanted

    def _mesh_changed(self) -> None:
        for sidecar in self.sidecars.values():
            sidecar.following.changed()
        if self.liveness is not None and self.mesh is not None and self.pool is not None:
            model = self.mesh.model
            pool = model.pool(self.pool) if model is not None else None
            self.liveness.seen(self.mesh.runtime,
                               tuple(m.name for m in pool.members) if pool is not None
                               else None)
        self._changed.set()

    async def _follow(self) -> None:
        """Start and stop clusters as the model changes (a pool's virtual systems)."""
        while True:
            await self._changed.wait()
            self._changed.clear()
            # A burst of changes settled once; a cluster that failed to start, retried
            # after a pause.
            await asyncio.sleep(1.0 if self._failed or self._liveness_error else 0.1)
            await self._settle_once()

    async def _settle_once(self) -> None:
        await self._start_liveness()
        wanted = self.wanted()
        gone = [name for name in self.sidecars if name not in wanted]
        for name in gone:
            log.info("cluster %s is no longer hosted (not in pool %s of the model)",
                     name, self.pool)
            self.routes.pop(name, None)
            with contextlib.suppress(Exception):
                await self.sidecars.pop(name).stop()
        if gone:
            self.metrics.signals.loop_lag.start()  # a sidecar's stop stopped it
        new = [name for name in wanted if name not in self.sidecars]
        if not new:
            return
        limit = asyncio.Semaphore(START_CONCURRENCY)

        async def start(name: str) -> None:
            async with limit:
                try:
                    await self._start_one(name)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self._failed[name] = self._why(name, exc)
                    log.error("cluster %s did not start: %s", name, self._failed[name])
                    self._changed.set()  # tried again

        await asyncio.gather(*(start(name) for name in new))
        log.info("hosting %d clusters%s", len(self.sidecars),
                 f" (pool {self.pool})" if self.pool else "")

    def _why(self, name: str, exc: Exception) -> str:
        """One line: why cluster ``name`` did not start."""
        if not isinstance(exc, grpc.aio.AioRpcError):
            return f"{type(exc).__name__}: {exc}"
        if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
            user = self._users.get(name) or "(none)"
            return (f"etcd refused user {user} cluster {name}'s keys: {exc.details()} "
                    f"(grant them: meshxl etcd grant {name} --user {user}; or give the "
                    f"cluster its own user in --etcd-credentials-dir)")
        return f"etcd: {exc.code().name}: {exc.details()}"

    async def _start_one(self, name: str) -> None:
        config = self.config_of(name)
        security = config.etcd_security
        self._users[name] = security.user if security is not None else None
        client = await self.client_for(config)
        settings = await session_settings(client, config)
        metrics = StatesyncMetrics(signals=self.metrics.signals)
        sidecar = Sidecar(config, client, settings, metrics, await shard_map(client, config),
                          mesh=self.mesh)
        await sidecar.start()
        sidecar.following.changed()
        self.sidecars[name] = sidecar
        self.routes[name] = SessionRoutes(sidecar)
        self._failed.pop(name, None)

    # -- what the process-wide routes report ------------------------------------------

    def router(self) -> Router:
        return hosted_router(self, self._routes_of)

    def _routes_of(self, cluster: str) -> SessionRoutes | None:
        """A hosted cluster's routes; a cluster wanted but not started: a 503 naming
        why (its etcd credentials refused, say), nothing written."""
        routes = self.routes.get(cluster)
        if routes is None and cluster in self._failed:
            raise RequestRefused(503, f"cluster {cluster!r} is not started: "
                                      f"{self._failed[cluster]}", field="cluster")
        return routes

    def clusters(self) -> dict[str, SidecarParts]:
        return dict(self.sidecars)

    def liveness_problems(self) -> list[str]:
        problems = [f"{name}: {p}" for name, s in self.sidecars.items()
                    for p in s.liveness_problems()]
        for task in self._tasks:
            if task.done() and not task.cancelled():
                problems.append(f"{task.get_name()} stopped: {task.exception()!r}")
        return problems

    def not_ready_reasons(self) -> list[str]:
        reasons = [f"{name}: {r}" for name, s in self.sidecars.items()
                   for r in s.not_ready_reasons()]
        reasons += [f"{name}: not started: {why}" for name, why in self._failed.items()]
        if self.pool_problem is not None:
            reasons.append(self.pool_problem)
        elif not self.sidecars:
            reasons.append("no cluster to serve yet" + (
                f" (pool {self.pool!r} has no virtual system)" if self.pool else ""))
        return reasons

    def moving(self) -> bool:
        return any(s.moving() for s in self.sidecars.values())

    def warnings(self) -> list[str]:
        warnings = [f"{name}: {w}" for name, s in self.sidecars.items() for w in s.warnings()]
        if self.liveness is not None:
            warnings += self.liveness.warnings()
        elif self._liveness_error is not None:
            warnings.append(f"pool {self.pool}: member {self.config.member}'s liveness "
                            f"key is not written ({self._liveness_error})")
        model = self.mesh.model if self.mesh is not None else None
        pool = model.pool(self.pool) if model is not None and self.pool else None
        members = [m.name for m in pool.members] if pool is not None else None
        if members is not None and self.config.member not in members:
            warnings.append(f"member {self.config.member!r} is not a member of pool "
                            f"{self.pool!r} in the model (members: {', '.join(members)}): "
                            "no Envoy sends it the pool's traffic")
        return warnings

    def refresh_gauges(self) -> None:
        for sidecar in self.sidecars.values():
            sidecar.refresh_gauges()

    def render_metrics(self) -> bytes:
        self.refresh_gauges()
        return render_hosted(self.metrics, {n: s.metrics for n, s in self.sidecars.items()})

    def status(self, signals: bool = True) -> dict[str, Any]:
        """``/v1/status``: the process, then each cluster as a single-cluster sidecar's
        ``/v1/status`` shows it (without the process's signals, shown once)."""
        return {
            "member": self.config.member, "pool": self.pool, "listed": list(self.listed),
            "ready": not self.not_ready_reasons(), "reasons": self.not_ready_reasons(),
            "warnings": self.warnings(), "started": self.started,
            "clusters": {name: s.status(signals=False)
                         for name, s in sorted(self.sidecars.items())},
            **({"signals": self.metrics.signals.status()} if signals else {}),
        }
