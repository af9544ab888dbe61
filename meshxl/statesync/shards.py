"""Sessions over several etcd clusters (shards): each session to its shard's engine.

With a shard map in the main etcd cluster (:mod:`meshxl.etcd.shards`), the sidecar runs
one :class:`Shard` per etcd cluster: its own client, store (batcher), cache (watch) and
session engine (:class:`.sessions.Sessions`), so everything a session's write compares
(If-Match, ownership, create-only) and every linearizable read happens in the
session's own shard, exactly as with one cluster, and a slow or lost shard holds back
no other's writes. :class:`ShardedSessions` is the engine's face the API uses:

* a session goes to the shard its id hashes to (its hash tag: ``{user42}:cart``);
* an ETag names its shard (``"s1:42"``); an If-Match naming another shard, or none, is
  refused with 412 before anything is compared: a revision of one shard means nothing
  in another;
* a write of several sessions (bulk save, pipelined PUTs) goes to each shard's engine
  with that shard's sessions, side by side; the outcomes come back in order;
* a transaction stays in one shard (etcd's transaction is per cluster): one touching
  two shards is refused whole with 400 naming them, never half-applied;
* while the map is moving (an online reshard), a session whose shard changed is, at
  the stage ``prepare``, read where it is (its old shard, else its new one) and its
  writes refused with 503 (for the second or two until every sidecar has the map); at
  the stage ``move``, moved (:class:`meshxl.etcd.moving.Mover`) before it is read or
  written, so it is served from exactly one shard at any time; the ownership this
  member had of it in the old shard goes with it (a member that lost it there is still
  fenced with 409 in the new one).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import aetcd

from meshxl.errors import InputError, MeshxlError, NotFound, PreconditionFailed, Unavailable
from meshxl.etcd.moving import Mover
from meshxl.etcd.shards import PREPARE, ShardMap, shard_etag, split_etag

from .cache import SessionCache
from .conditions import parse_etag
from .sessions import Sessions
from .store import SessionStore
from .writes import Outcome, Settings, Stored, Transacted, Write

__all__ = ["DOWN_GRACE", "Shard", "ShardedSessions"]

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
                "takeovers": self.engine.takeovers, "conflicts": self.engine.conflicts}


def _tagged(shard: str, outcome: Any) -> Any:
    """``outcome`` with its ETag naming ``shard`` (a session kept on this member only,
    ``L<n>``, has no shard yet)."""
    if isinstance(outcome, Stored) and not outcome.etag.startswith("L"):
        outcome.etag = shard_etag(shard, outcome.etag)
    return outcome


async def _tagged_later(shard: str, task: asyncio.Task[Outcome]) -> Outcome:
    return _tagged(shard, await task)  # type: ignore[no-any-return]


async def _send(engine: Sessions, writes: list[Write], early: bool,
                traceparent: str | None) -> list[Any]:
    if early:
        return await engine.write(writes, early=True, traceparent=traceparent)
    return await engine.write(writes, traceparent=traceparent)


class ShardedSessions:
    """:class:`.sessions.Sessions`' interface over the shards of ``shard_map``."""

    def __init__(self, shard_map: ShardMap, shards: Sequence[Shard], settings: Settings):
        self.map = shard_map
        self.shards = {s.name: s for s in shards}
        self.settings = settings
        self.mover = Mover()

    def apply(self, shard_map: ShardMap, shards: Sequence[Shard]) -> None:
        """Serve ``shard_map`` from now on; ``shards`` holds every one it names. What
        this member observed of a session in a shard that is no longer its own goes
        with it to its new shard (:meth:`_carry`)."""
        self.shards = {s.name: s for s in shards}
        self.map = shard_map
        for shard in self.shards.values():
            for session_id in [s for s in shard.engine.ledger.observed
                               if shard_map.of(s).name != shard.name]:
                self._carry(session_id, shard, self.shard_of(session_id))
            local = shard.engine.local  # delayed sync: kept by the engine of its shard
            for session_id in [s for s in local.ids()
                               if shard_map.of(s).name != shard.name]:
                kept = local.drop(session_id)
                assert kept is not None
                self.shard_of(session_id).engine.local.adopt(session_id, kept)

    @staticmethod
    def _carry(session_id: str, old: Shard, new: Shard) -> None:
        """This member's observation of ``session_id`` from ``old`` to ``new``: as
        "observed, revision unknown" (0), which keeps it the owner if the record still
        names it, and fences it (409) if another member wrote the session since."""
        if old.engine.ledger.observed.pop(session_id, None) is not None:
            if new.engine.ledger.observed_revision(session_id) is None:
                new.engine.ledger.observe(session_id, 0)

    def shard_of(self, session_id: str) -> Shard:
        return self.shards[self.map.of(session_id).name]

    async def settle(self, session_id: str) -> Shard:
        """The shard that serves ``session_id`` now: while the map is moving and its
        shard changed, it is first moved there if still in its old shard."""
        shard = self.shard_of(session_id)
        source = self.map.source_of(session_id)
        if source is None:
            return shard
        if self.map.stage == PREPARE:
            raise Unavailable(f"session {session_id!r} moves from shard {source.name} to "
                              f"{shard.name}: its writes wait until every sidecar has the "
                              "new shard map (a second or two); send it again")
        old = self.shards[source.name]
        old.refuse_if_down()
        try:
            await self.mover.move(old.client, shard.client, old.engine.ledger.key(session_id))
        except MeshxlError:
            raise
        except Exception as exc:
            raise Unavailable(f"session {session_id!r} moves from shard {old.name} to "
                              f"{shard.name}, and that failed: {type(exc).__name__}: "
                              f"{str(exc)[:200]}") from None
        self._carry(session_id, old, shard)  # a write in the old shard since apply()
        return shard

    async def _settle_all(self, session_ids: Sequence[str]) -> dict[str, BaseException]:
        """:meth:`settle` of every moving session among ``session_ids``, side by side:
        the errors, by session."""
        moving = [s for s in dict.fromkeys(session_ids) if self.map.source_of(s) is not None]
        if not moving:
            return {}
        done = await asyncio.gather(*(self.settle(s) for s in moving), return_exceptions=True)
        return {s: e for s, e in zip(moving, done, strict=True)
                if isinstance(e, BaseException)}

    # -- what the sidecar shows: sums over the shards ---------------------------------

    @property
    def on_takeover(self) -> Any:
        return next(iter(self.shards.values())).engine.on_takeover

    @on_takeover.setter
    def on_takeover(self, hook: Any) -> None:
        for shard in self.shards.values():
            shard.engine.on_takeover = hook

    @property
    def takeovers(self) -> int:
        return sum(s.engine.takeovers for s in self.shards.values())

    @property
    def conflicts(self) -> int:
        return sum(s.engine.conflicts for s in self.shards.values())

    @property
    def local_sessions(self) -> int:
        return sum(s.engine.local_sessions for s in self.shards.values())

    def prune_observed(self) -> int:
        return sum(s.engine.prune_observed() for s in self.shards.values())

    async def flush_due(self) -> int:
        counts = await asyncio.gather(*(s.engine.flush_due() for s in self.shards.values()))
        return sum(counts)

    # -- reads and writes -----------------------------------------------------------

    async def get(self, session_id: str) -> Stored:
        source = self.map.source_of(session_id) if self.map.stage == PREPARE else None
        if source is not None:  # not moved yet: where it is, its old shard or its new
            old = self.shards[source.name]
            old.refuse_if_down()
            try:
                return _tagged(old.name, await old.engine.get(session_id))  # type: ignore[no-any-return]
            except NotFound:
                pass
            shard = self.shard_of(session_id)
        else:
            shard = await self.settle(session_id)
        shard.refuse_if_down()
        stored: Stored = _tagged(shard.name, await shard.engine.get(session_id))
        return stored

    def _in_shard(self, write: Write, shard: Shard) -> Write:
        """``write`` as its shard's engine takes it: an If-Match naming this shard, with
        the shard taken off (412 for another shard's, or one naming none)."""
        tag = write.if_match
        if tag is None:
            return write
        value = parse_etag(tag)
        if value == "*" or value.startswith("L"):
            return write
        named, revision = split_etag(value)
        if named != shard.name:
            where = f"shard {named}" if named else "no shard"
            raise PreconditionFailed(
                f"If-Match {tag.strip()[:80]} names {where}; session {write.session_id!r} "
                f"lives in shard {shard.name}: read it again for its ETag")
        return dataclasses.replace(write, if_match=revision)

    async def write(self, writes: Sequence[Write], *, atomic: bool = False,
                    early: bool = False, traceparent: str | None = None) -> Any:
        """:meth:`.sessions.Sessions.write`, each write in its session's shard."""
        if atomic:
            return await self._transaction(writes, traceparent)
        outcomes: list[Any] = [None] * len(writes)
        groups: dict[str, list[int]] = {}
        batches: dict[str, list[Write]] = {}
        unsettled = (await self._settle_all([w.session_id for w in writes])
                     if self.map.moving else {})  # at PREPARE: 503 for those that move
        for i, write in enumerate(writes):
            if write.session_id in unsettled:
                outcomes[i] = unsettled[write.session_id]
                continue
            try:
                shard = self.shard_of(write.session_id)
                shard.refuse_if_down()
                translated = self._in_shard(write, shard)
            except (InputError, PreconditionFailed, Unavailable) as exc:
                outcomes[i] = exc
                continue
            groups.setdefault(shard.name, []).append(i)
            batches.setdefault(shard.name, []).append(translated)
        names = list(groups)
        if len(names) == 1:  # most calls (one session): no task per shard
            answers = [await _send(self.shards[names[0]].engine, batches[names[0]], early,
                                   traceparent)]
        else:
            answers = await asyncio.gather(*(
                _send(self.shards[name].engine, batches[name], early, traceparent)
                for name in names))
        loop = asyncio.get_running_loop()
        for name, answer in zip(names, answers, strict=True):
            for i, outcome in zip(groups[name], answer, strict=True):
                outcomes[i] = (loop.create_task(_tagged_later(name, outcome))
                               if isinstance(outcome, asyncio.Task)
                               else _tagged(name, outcome))
        return outcomes

    async def _transaction(self, writes: Sequence[Write],
                           traceparent: str | None) -> Transacted:
        """All or none: every session in one shard, or 400 naming the shards."""
        if not writes:
            return await next(iter(self.shards.values())).engine.write(
                [], atomic=True, traceparent=traceparent)
        shards = {self.shard_of(w.session_id).name for w in writes}
        if len(shards) == 1 and self.map.moving:
            for error in (await self._settle_all([w.session_id for w in writes])).values():
                raise error
        if len(shards) > 1:
            spread = ", ".join(f"{w.session_id!r} in {self.shard_of(w.session_id).name}"
                               for w in writes[:8])
            raise InputError(
                f"a transaction stays in one shard, and these sessions live in "
                f"{len(shards)} ({spread}): give sessions that change together one hash "
                "tag, e.g. {user42}:cart and {user42}:prefs")
        (name,) = shards
        shard = self.shards[name]
        shard.refuse_if_down()
        transacted = await shard.engine.write([self._in_shard(w, shard) for w in writes],
                                              atomic=True, traceparent=traceparent)
        for stored in transacted.stored:
            _tagged(name, stored)
        return transacted
