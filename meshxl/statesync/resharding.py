"""An online reshard as one sidecar follows it (docs/scaling.md, "Online resharding").

The sidecar watches the shard map's key in the main etcd cluster, reads it again at
once when a shard refuses a request for its fence (a newer map was stored: the
sidecar's is old), and every :data:`POLL` seconds whatever happened (a watch can miss
an event while it reconnects). A new version is applied in this order: a client
(store, cache, engine) for every shard it names that the sidecar lacks, then the router
(:meth:`.shards.ShardedSessions.apply`), then the registration says which version the
sidecar serves (``meshxl shards set`` waits for every registered sidecar to say so
before any session moves), and last the shards the map no longer names are closed.

Nothing about the stored map ends the follower: a map that cannot be read as one, or
whose shards cannot be opened, leaves the sidecar on the last map it could use, says
why in ``/v1/status`` (``shards.map_error``), its warnings, the log and the metric
``meshxl_statesync_shard_map_unusable``, and is read again until a usable one is
stored. A sidecar that starts on such a map serves no session until then (503 saying
why) and is not ready, but runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import aetcd

from meshxl import etcd
from meshxl.errors import InputError
from meshxl.etcd import EtcdSecurity
from meshxl.etcd.keys import Keys
from meshxl.etcd.shards import Shard as ShardSpec
from meshxl.etcd.shards import ShardMap, parse_shard_map
from meshxl.etcd.watch import watch_responses

from .metrics import StatesyncMetrics
from .shards import Shard, ShardedSessions

log = logging.getLogger("meshxl.statesync.app")

__all__ = ["POLL", "MapFollower"]

POLL = 1.0
"""Seconds between the sidecar's reads of the shard map whatever its watch says."""
WATCH_RETRY = 1.0
"""Seconds before a failed watch of the map is started again."""


class MapFollower:
    """Applies every new shard map to a sidecar's shards (the module docstring).
    ``parts`` is the sidecar's list of shards, kept in the map's order in place."""

    def __init__(self, client: aetcd.Client, keys: Keys, sessions: ShardedSessions,
                 parts: list[Shard], make_part: Callable[[str, aetcd.Client], Shard],
                 security: EtcdSecurity | None,
                 watches: Callable[[], dict[str, asyncio.Task[None]] | None],
                 announce: Callable[[int], Awaitable[None]],
                 metrics: StatesyncMetrics | None = None):
        self.client = client
        self.key = keys.shards.encode()
        self.sessions = sessions
        self.parts = parts
        self.make_part = make_part
        """A shard's store, cache and engine over a client (the sidecar's)."""
        self.security = security
        self.watches = watches
        """The sidecar's cache watches by shard, None while its caches hold only what
        the member uses (no watch)."""
        self.announce = announce
        self.metrics = metrics
        self.revision = 0
        """The map key's mod revision last applied or found unusable (0: none yet)."""
        self.wake = asyncio.Event()
        """Set to read the map now: its key changed, or a shard's fence says it did."""
        self.fence_seen = 0
        """The highest fence a shard refused a request with."""
        sessions.on_fenced = self._fenced

    def _fenced(self, version: int) -> None:
        if self.metrics is not None:
            self.metrics.fenced.inc()
        if version > self.fence_seen:
            self.fence_seen = version
            log.info("a session shard is fenced at map version %d (serving %d): reading "
                     "the shard map", version, self.sessions.map.version)
        self.wake.set()

    async def run(self) -> None:
        watch = asyncio.get_running_loop().create_task(self._watch())
        try:
            while True:
                await self.follow_once()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(POLL):
                        await self.wake.wait()
                self.wake.clear()
        finally:
            watch.cancel()
            with contextlib.suppress(BaseException):
                await watch

    async def _watch(self) -> None:
        """Wake :meth:`run` whenever the map's key changes."""
        while True:
            try:
                async for _ in watch_responses(self.client, self.key, self.key + b"\0", 0):
                    self.wake.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the poll goes on meanwhile
                log.debug("shard map watch interrupted: %s", exc)
            await asyncio.sleep(WATCH_RETRY)

    async def follow_once(self) -> None:
        """Read the stored map and serve it if it is new and usable; never raises but
        for a cancel (a problem is kept in :attr:`ShardedSessions.map_problem`)."""
        try:
            got = await self.client.get(self.key)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # read again next round
            log.debug("shard map not read: %s", exc)
            return
        if got is None:
            self._unusable(0, f"no shard map is stored at {self.key.decode()} any more")
            return
        if got.mod_revision == self.revision:
            return
        try:
            found = parse_shard_map(got.value)
        except InputError as exc:
            self._unusable(got.mod_revision, f"the stored shard map cannot be used: {exc}")
            return
        served = self.sessions.map
        if found.version < self.fence_seen:
            self._unusable(0, f"a session shard is fenced at map version "
                              f"{self.fence_seen}, above the stored map's version "
                              f"{found.version} (the main etcd restored from a backup?): "
                              "its sessions answer 503 until a map of a higher version is "
                              "stored")
            return
        if found.version < served.version:
            self._unusable(got.mod_revision, f"the stored shard map is version "
                                             f"{found.version}, older than version "
                                             f"{served.version} served")
            return
        try:
            if found.version != served.version or not served.shards:
                await self.apply(found)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._unusable(0, f"shard map version {found.version} could not be applied: "
                              f"{type(exc).__name__}: {str(exc)[:300]}")
            return
        self.revision = got.mod_revision
        self.sessions.map_problem = None
        self._gauge(0)

    def _unusable(self, revision: int, problem: str) -> None:
        """Keep the map served; say why the stored one is not. ``revision``: the map
        key's, not read again until it changes (0: try again next round)."""
        if problem != self.sessions.map_problem:
            log.error("%s: serving shard map version %d", problem, self.sessions.map.version)
        self.sessions.map_problem = problem
        self.revision = revision
        self._gauge(1)

    def _gauge(self, value: int) -> None:
        if self.metrics is not None:
            self.metrics.shard_map_unusable.set(value)

    async def _open(self, shard: ShardSpec) -> Shard:
        part = self.make_part(shard.name, etcd.client(shard.etcd, security=self.security))
        await part.client.connect()
        part.engine.on_takeover = self.sessions.on_takeover
        return part

    async def _close(self, part: Shard) -> None:
        watch = (self.watches() or {}).pop(part.name, None)
        if watch is not None:
            watch.cancel()
            with contextlib.suppress(BaseException):
                await watch
        await part.store.close()
        with contextlib.suppress(Exception):
            await part.client.close()

    async def apply(self, new: ShardMap) -> None:
        have = {part.name: part for part in self.parts}
        opened: list[Shard] = []
        try:
            for shard in new.every:
                if shard.name not in have:
                    opened.append(await self._open(shard))
        except BaseException:
            for part in opened:  # none of this map is served: the last one stays
                await self._close(part)
            raise
        watches = self.watches()
        for part in opened:
            have[part.name] = part
            if watches is not None:
                watches[part.name] = asyncio.get_running_loop().create_task(part.cache.run())
        self.parts[:] = [have[shard.name] for shard in new.every]
        self.sessions.apply(new, self.parts)
        log.info("shard map version %d: %s%s", new.version, ", ".join(new.names),
                 f" (moving from {', '.join(s.name for s in new.previous)}, {new.stage})"
                 if new.moving else "")
        if self.metrics is not None:
            self.metrics.shard_map_version.set(new.version)
        await self.announce(new.version)
        wanted = {shard.name for shard in new.every}
        for name, part in have.items():
            if name not in wanted:
                await self._close(part)
                log.info("session shard %s closed: no longer in the shard map", name)

