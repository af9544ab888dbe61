"""One etcd cluster of sessions as a sidecar uses it: its client, store, cache and
session engine (:class:`Shard`). Every sidecar has one (the main cluster's); with a
shard map, one per shard (shards.py). Apart from shards.py, so a sidecar without
shards never loads the sharded engine (docs/performance.md, "Sidecar footprint")."""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

from meshxl.errors import Unavailable

if TYPE_CHECKING:
    import aetcd

    from .cache import SessionCache
    from .sessions import Sessions
    from .store import SessionStore

__all__ = ["DOWN_GRACE", "Shard"]

DOWN_GRACE = 1.0
"""Seconds a shard's watch may fail (a member switch, an election) before its sessions
are refused at once instead of each waiting for its deadline."""


@dataclasses.dataclass
class Shard:
    """One etcd cluster of sessions, as this sidecar uses it."""

    name: str
    client: aetcd.Client
    store: SessionStore
    cache: SessionCache
    engine: Sessions

    @property
    def reachable(self) -> bool:
        """Its cache's watch is not failing (it reads and follows the shard; a sidecar
        whose cache holds only what it uses runs no watch, and counts as reachable)."""
        return self.cache.down_since is None

    def refuse_if_down(self) -> None:
        """503 at once while the shard has not answered for :data:`DOWN_GRACE`: its
        sessions' writes and reads would each wait for their deadline, holding the
        application's requests (and their share of its concurrency) for nothing."""
        since = self.cache.down_since
        if since is not None and time.monotonic() - since > DOWN_GRACE:
            raise Unavailable(f"session shard {self.name} unreachable for "
                              f"{time.monotonic() - since:.1f} s: {self.cache.last_error}")

    def status(self) -> dict[str, Any]:
        cache = self.cache
        down = cache.down_since
        return {"name": self.name, "reachable": self.reachable, "synced": cache.synced.is_set(),
                "unreachable_for": None if down is None else round(time.monotonic() - down, 1),
                "revision": cache.applied, "cached_sessions": len(cache),
                "last_error": cache.last_error, "rewinds": cache.rewinds,
                "etcd_revision": cache.history.highest,
                "takeovers": self.engine.takeovers, "conflicts": self.engine.conflicts}
