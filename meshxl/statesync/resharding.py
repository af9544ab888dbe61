"""An online reshard as one sidecar follows it (docs/scaling.md, "Online resharding").

The sidecar reads the shard map in the main etcd cluster every :data:`POLL` seconds.
A new version is applied in this order: a client (store, cache, engine) for every shard
it names that the sidecar lacks, then the router (:meth:`.shards.ShardedSessions.apply`),
then the registration says which version the sidecar serves (``meshxl shards set``
waits for every registered sidecar to say so before any session moves), and last the
shards the map no longer names are closed.
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

from .shards import Shard, ShardedSessions

log = logging.getLogger("meshxl.statesync.app")

__all__ = ["POLL", "MapFollower"]

POLL = 1.0
"""Seconds between the sidecar's reads of the shard map."""


class MapFollower:
    """Applies every new shard map to a sidecar's shards (the module docstring).
    ``parts`` is the sidecar's list of shards, kept in the map's order in place."""

    def __init__(self, client: aetcd.Client, keys: Keys, sessions: ShardedSessions,
                 parts: list[Shard], make_part: Callable[[str, aetcd.Client], Shard],
                 security: EtcdSecurity | None,
                 watches: Callable[[], dict[str, asyncio.Task[None]] | None],
                 announce: Callable[[int], Awaitable[None]]):
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
        self.revision = 0
        """The map key's mod revision last read (0: none since the start)."""

    async def run(self) -> None:
        while True:
            await asyncio.sleep(POLL)
            try:
                got = await self.client.get(self.key)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # read again next round
                log.debug("shard map not read: %s", exc)
                continue
            if got is None or got.mod_revision == self.revision:
                continue
            self.revision = got.mod_revision
            try:
                found = parse_shard_map(got.value)
            except InputError as exc:
                log.error("the shard map in etcd is invalid (%s): keeping version %d", exc,
                          self.sessions.map.version)
                continue
            if found.version != self.sessions.map.version:
                await self.apply(found)

    async def _open(self, shard: ShardSpec) -> Shard:
        part = self.make_part(shard.name, etcd.client(shard.etcd, security=self.security))
        await part.client.connect()
        part.engine.on_takeover = self.sessions.on_takeover
        watches = self.watches()
        if watches is not None:
            watches[part.name] = asyncio.get_running_loop().create_task(part.cache.run())
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
        for shard in new.every:
            if shard.name not in have:
                have[shard.name] = await self._open(shard)
        self.parts[:] = [have[shard.name] for shard in new.every]
        self.sessions.apply(new, self.parts)
        log.info("shard map version %d: %s%s", new.version, ", ".join(new.names),
                 f" (moving from {', '.join(s.name for s in new.previous)}, {new.stage})"
                 if new.moving else "")
        await self.announce(new.version)
        wanted = {shard.name for shard in new.every}
        for name, part in have.items():
            if name not in wanted:
                await self._close(part)
                log.info("session shard %s closed: no longer in the shard map", name)
