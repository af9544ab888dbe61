"""One sidecar's parts, started and stopped together: the session engine of each etcd
cluster it keeps sessions in (the main one, or each shard's: a store, a cache and an
engine each), the member's registration, the mesh followed (following.py), the loops
that keep them (readiness, housekeeping, the statistics published for ``meshxl sync``)
and what ``/readyz``, ``/healthz`` and ``/v1/status`` report of them. The process
around it (sockets, the HTTP server, etcd's first answer) is app.py.

The member is registered at once but advertised (``ready``) only after the cache has
read every session of its cluster, so Envoy never sends a session to a member that
could not serve it. With ``sessions.replication: narrow`` the cache holds only what
this member wrote or read, and the member is ready at once (any other session is read
from etcd on first use; an idle probe asks each etcd cluster its revision, so a restore
is found without a watch: history.py); while it is ``standby`` (high availability) it
watches and holds every session, as in ``all`` mode, so the failover it exists for
finds the active's sessions local. Leaving the standby role it stops the watch and
keeps what it holds; expired sessions are pruned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import aetcd

from meshxl import etcd
from meshxl.addr import parse_hostport
from meshxl.etcd.keys import Keys
from meshxl.etcd.mesh import EtcdMeshSource
from meshxl.model.basics import Replication, choose
from meshxl.model.document import ModelSpec
from meshxl.model.runtime import MemberState

from .cache import SessionCache
from .config import StatesyncConfig
from .following import MeshFollower
from .membership import Membership
from .mesh_reads import cache_status, sync_stats_value
from .metrics import StatesyncMetrics
from .parts import Shard
from .quota import QuotaGuard, Usage, held, held_size
from .sessions import Sessions
from .starting import caches_synced
from .store import SessionStore
from .tracing import TakeoverTracer, follow_failovers
from .writes import Settings

if TYPE_CHECKING:  # loaded only with a shard map / with delayed sync (docs/performance.md)
    from meshxl.etcd.shards import ShardMap

    from .planned import PlannedFlush
    from .shards import ShardedSessions

# The sidecar's log, whichever of its modules speaks (as mesh_reads.py, resharding.py).
log = logging.getLogger("meshxl.statesync.app")

STOP_GRACE = 5.0  # seconds a stop waits for its cancelled tasks (the rest: logged, left)

#: ``sessions.replication`` -> whether the cache holds only what the member uses.
_HOLDS_ONLY_WHAT_IT_USES: dict[Replication, bool] = {"all": False, "narrow": True}


def _planned_flush() -> type[PlannedFlush]:
    """planned.py, loaded only with delayed sync (``sessions.sync_delay`` above 0)."""
    from .planned import PlannedFlush

    return PlannedFlush


class Sidecar:
    """Everything one sidecar runs, created in the app's cleanup context."""

    def __init__(self, config: StatesyncConfig, client: aetcd.Client, settings: Settings,
                 metrics: StatesyncMetrics | None = None,
                 shard_map: ShardMap | None = None,
                 mesh: EtcdMeshSource[ModelSpec] | None = None):
        """``mesh``: the mesh followed, when the process follows it for several clusters
        (hosting.py, which runs it); None: its own."""
        self.config = config
        self.keys = Keys(config.etcd_root)
        self.client = client
        self.metrics = metrics or StatesyncMetrics()
        self.metrics.member.labels(config.cluster, config.member, config.site or "").set(1)
        # Before the stores: their write batchers ask it how long to linger.
        self.quota = QuotaGuard(settings.quota, self._usage, self._session_size, self.metrics)
        if shard_map is None:  # sessions in the main cluster, beside everything else
            self.parts = [self._part("", client, settings)]
            self.sessions: Sessions | ShardedSessions = self.parts[0].engine
        else:
            from .shards import ShardedSessions

            self.parts = [self._part(s.name, etcd.client(s.etcd, security=config.etcd_security),
                                     settings) for s in shard_map.every]
            self.sessions = ShardedSessions(shard_map, self.parts, settings,
                                            self.keys.shard_fence.encode())
        host, port = parse_hostport(config.app)
        self.membership = Membership(client, self.keys, config.cluster, config.member,
                                     address=host, port=port, site=config.site,
                                     weight=config.weight, ttl=config.lease_ttl,
                                     sidecar=config.listen, istio=config.istio)
        self.membership.shard_map = shard_map.version if shard_map is not None else None
        self.membership.sync_delay = settings.sync_delay
        self.metrics.shard_map_version.set(shard_map.version if shard_map is not None else 0)
        self.metrics.shard_map_unusable.set(1 if shard_map and not shard_map.shards else 0)
        self.takeovers = TakeoverTracer(config.cluster, config.member)
        self.sessions.on_takeover = self.takeovers.record
        self.started = time.time()
        self.narrow = choose(_HOLDS_ONLY_WHAT_IT_USES, settings.replication,
                             "sessions replication")
        self.following = MeshFollower(config, client, self.keys, self.membership,
                                      self._scope if self.narrow else None, mesh)
        self._watches: dict[str, asyncio.Task[None]] | None = None
        """The caches' watches while they hold every session (always, unless narrow)."""
        self.planned = _planned_flush()(
            client, self.keys.member_flushed(config.cluster, config.member),
            lambda: (part.engine.local for part in self.parts), self.sessions.flush_due,
            lambda: self.sessions.local_sessions, lambda: self.membership.lease_id,
            self.metrics) if settings.sync_delay > 0 else None
        """Young sessions replicated before a planned move (None: no delayed sync)."""
        if self.planned is not None:
            self.following.on_moves = self.planned.update
        self._tasks: list[asyncio.Task[Any]] = []

    def _part(self, name: str, client: aetcd.Client, settings: Settings) -> Shard:
        """One etcd cluster's store, cache and session engine (the main cluster's, or a
        shard's: ``name``)."""
        config, metrics = self.config, self.metrics
        store = SessionStore(client, ttl=settings.ttl, max_batch_ops=config.batch_max_ops,
                             max_batch_bytes=config.batch_max_bytes,
                             max_inflight=config.max_inflight, on_batch=metrics.on_batch,
                             # Only a rate quota ever lingers: no call per batch without.
                             linger=self.quota.linger if self.quota.bucket else None)
        engine: list[Sessions] = []
        cache = SessionCache(client, self.keys.sessions_prefix(config.cluster),
                             on_lag=metrics.replication_lag.observe,
                             on_undecodable=metrics.undecodable.labels("watch").inc,
                             on_rewind=lambda: engine[0].ledger.observed.clear(),
                             history=store.history)
        engine.append(Sessions(store, cache, self.keys, config.cluster, config.member,
                               settings, metrics, shard=name))
        return Shard(name, client, store, cache, engine[0])

    async def start(self) -> None:
        if self.shard_map is not None:
            for part in self.parts:
                await part.client.connect()
        await self.following.recall()
        await self.membership.start()
        loop = asyncio.get_running_loop()
        if self.narrow:
            if self.following.owns_mesh:
                self._tasks.append(loop.create_task(self.following.mesh.run()))
            with contextlib.suppress(TimeoutError):  # see _follow_sync
                async with asyncio.timeout(5.0):
                    await self.following.mesh.synced.wait()
            # Without a usable shard map, not before one (_announce).
            await self.membership.set_ready(self.shard_map is None or bool(self.shard_map.shards))
        else:
            self._watches = {part.name: loop.create_task(part.cache.run())
                             for part in self.parts}
            self._tasks.append(loop.create_task(self._follow_sync()))
        self._tasks.append(loop.create_task(self._housekeeping()))
        if self.planned is not None:
            self._tasks.append(loop.create_task(self.planned.run()))
        self.metrics.signals.loop_lag.start()
        self._tasks.append(loop.create_task(self._publish_sync()))
        if not self.narrow and self.following.owns_mesh:
            self._tasks.append(loop.create_task(self.following.mesh.run()))
        if not isinstance(self.sessions, Sessions):
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
        self.metrics.signals.loop_lag.stop()
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

    def _scope(self, hold_all: bool) -> None:
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
            await caches_synced(self.parts, self.sessions.usable if not isinstance(
                self.sessions, Sessions) else None)
            # The mesh first: a member that comes back stands behind the members that
            # serve, which only the mesh tells (failback.py).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0):
                    await self.following.mesh.synced.wait()
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
            # Without the signals: the CPU pressure is read on demand, not on a timer.
            value = sync_stats_value({**self.status(signals=False),
                                      "publish_interval": interval},
                                     time.time())
            try:
                async with asyncio.timeout(max(interval, 1.0)):
                    await self.client.put(key, value, lease=lease)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the next round retries; stats are best effort
                log.debug("sync statistics not published: %s", exc)

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
        if self.membership.problems and self.following.view_state != MemberState.ATTENTION:
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

    def moving(self) -> bool:
        """A planned move away from this member is under way (following.py)."""
        return bool(self.following.moves_away)

    def warnings(self) -> list[str]:
        """What works only in part while the member stays ready."""
        warnings = [] if self.following.model_warning is None else [self.following.model_warning]
        if not isinstance(self.sessions, Sessions) and self.sessions.map_problem:
            warnings.append(f"{self.sessions.map_problem} (serving shard map version "
                            f"{self.sessions.map.version})")
        if self.following.view_state == MemberState.ATTENTION:
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
        return None if isinstance(sessions, Sessions) else sessions.map

    def _usage(self) -> Usage:
        """The cluster's sessions and their bytes as this sidecar holds them: its caches
        and the sessions delayed sync keeps here, each once (quota.py)."""
        return held([part.cache.entries for part in self.parts],
                    [part.engine.local.kept() for part in self.parts])

    def _session_size(self, session_id: str) -> int | None:
        return held_size(session_id, [part.cache.entries for part in self.parts],
                         [part.engine.local.kept() for part in self.parts])

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

    def status(self, signals: bool = True) -> dict[str, Any]:
        """The sidecar as ``/v1/status`` and ``meshxl sync`` show it. With shards, the
        cache's figures are the first shard's and ``shards`` has each one's.
        ``signals``: with those of a sick member (signals.py; ``/v1/status`` only)."""
        s, following = self.sessions, self.following
        shards = None if isinstance(s, Sessions) else s.status()
        return {
            "cluster": self.config.cluster, "member": self.config.member,
            "site": self.config.site, "app": self.config.app,
            "ready": not self.not_ready_reasons(), "reasons": self.not_ready_reasons(),
            "registered": self.membership.registered, "problems": self.membership.problems,
            "overload": self.membership.overload,
            "state": None if following.view_state is None else str(following.view_state),
            "returning": self.membership.rejoin.returning,
            "planned_moves": None if self.planned is None else self.planned.status(),
            "moves_away": list(following.moves_away),
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
            "role": str(following.role), "holds_all_sessions": self.holds_all,
            "started": self.started, "shards": shards, "quota": self.quota.status(),
            **({"signals": self.metrics.signals.status()} if signals else {}),
        }



__all__ = ["STOP_GRACE", "Sidecar"]
