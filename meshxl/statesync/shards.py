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
  fenced with 409 in the new one);
* every read and write carries the map version it was planned under to its shard,
  which applies it only while its fence is that version (:mod:`meshxl.etcd.fence`): a
  request planned under a map that was replaced is refused with 503 there, never
  acknowledged, and the sidecar reads the map again at once; one that meets a shard
  the newer map closed before anything of it was sent is planned again under that map
  (:class:`ShardClosed`), not refused;
* while the sidecar holds no usable map (none stored could be used), every session
  answers 503 saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any, Literal, TypeVar, overload

from meshxl.errors import InputError, MeshxlError, NotFound, PreconditionFailed, Unavailable
from meshxl.etcd.fence import Fenced
from meshxl.etcd.moving import Mover
from meshxl.etcd.shards import PREPARE, ShardMap, same_cluster, shard_etag, split_etag

from .batches import PLANNED
from .conditions import parse_etag
from .parts import DOWN_GRACE, Shard
from .sessions import Sessions
from .store import Fencing
from .writes import Outcome, Settings, Stored, Takeover, Transacted, Write

__all__ = ["DOWN_GRACE", "PLANNED", "REPLANS", "Shard", "ShardClosed", "ShardedSessions"]

_Told = TypeVar("_Told", bound=Stored | Exception)
_T = TypeVar("_T")

REPLANS = 3
"""Times a request is planned again under a newer map that closed a shard it named
before anything of it was sent (:class:`ShardClosed`), before it is answered 503."""


@contextlib.contextmanager
def _planned_under(m: ShardMap) -> Iterator[None]:
    """Reads and writes made inside carry ``m``'s version to their shards."""
    token = PLANNED.set(m.version)
    try:
        yield
    finally:
        PLANNED.reset(token)


class ShardClosed(Unavailable):
    """A shard the request's map named was closed by a newer map before anything of the
    request was sent there: the request is planned again under the newer map."""


def _tagged(shard: str, outcome: _Told) -> _Told:
    """``outcome`` with its ETag naming ``shard`` (a session kept on this member only,
    ``L<n>``, has no shard yet)."""
    if isinstance(outcome, Stored) and not outcome.etag.startswith("L"):
        outcome.etag = shard_etag(shard, outcome.etag)
    return outcome


async def _send(engine: Sessions, writes: list[Write], early: bool,
                traceparent: str | None) -> Sequence[Outcome | asyncio.Task[Outcome]]:
    if early:
        return await engine.write(writes, early=True, traceparent=traceparent)
    return await engine.write(writes, traceparent=traceparent)


class ShardedSessions:
    """:class:`.sessions.Sessions`' interface over the shards of ``shard_map``.

    Every request is planned under one map version, the one served when it came in,
    and carries it to the shards (:data:`PLANNED`, then :class:`.store.Fencing`): its
    reads and writes apply only while the shard's fence is that version."""

    def __init__(self, shard_map: ShardMap, shards: Sequence[Shard], settings: Settings,
                 fence_key: bytes):
        self.map = shard_map
        self.settings = settings
        self.fence_key = fence_key
        self.mover = Mover(fence_key)
        self.usable = asyncio.Event()
        """Set once a map with shards is served (never cleared: a sidecar keeps the last
        usable map it had)."""
        if shard_map.shards:
            self.usable.set()
        self.map_problem: str | None = shard_map.problem or None
        """Why the stored map is not the one served (it could not be read as a map or
        used), None while it is (:mod:`.resharding` sets it)."""
        self.on_fenced: Callable[[int], None] = lambda version: None
        """Told when a shard's fence names a newer map than a request's."""
        self.fenced = 0
        """Batches and moves refused by a shard's fence."""
        self._on_takeover: Callable[[Takeover], None] | None = None
        self.shards: dict[str, Shard] = {}
        self._install(shards)

    def _install(self, shards: Sequence[Shard]) -> None:
        self.shards = {s.name: s for s in shards}
        for part in shards:
            part.store.fence(Fencing(self.fence_key, self._planned, self._fence_found,
                                     part.name))
            part.engine.on_takeover = self._on_takeover

    def _planned(self) -> int:
        version = PLANNED.get()
        return self.map.version if version is None else version

    def _fence_found(self, version: int) -> None:
        self.fenced += 1
        self.on_fenced(version)

    def apply(self, shard_map: ShardMap, shards: Sequence[Shard]) -> None:
        """Serve ``shard_map`` from now on; ``shards`` holds every one it names. What
        this member observed of a session in a shard that is no longer its own goes
        with it to its new shard (:meth:`_carry`)."""
        self._install(shards)
        self.map = shard_map
        self.map_problem = None
        if shard_map.shards:
            self.usable.set()
        for shard in self.shards.values():
            for session_id in [s for s in shard.engine.ledger.observed
                               if shard_map.of(s).name != shard.name]:
                self._carry(session_id, shard, self.shard_of(session_id), shard_map)
            local = shard.engine.local  # delayed sync: kept by the engine of its shard
            for session_id in [s for s in local.ids()
                               if shard_map.of(s).name != shard.name]:
                kept = local.drop(session_id)
                assert kept is not None
                self.shard_of(session_id).engine.local.adopt(session_id, kept)

    @staticmethod
    def _carry(session_id: str, old: Shard, new: Shard, shard_map: ShardMap) -> None:
        """This member's observation of ``session_id`` from ``old`` to ``new``: as
        "observed, revision unknown" (0), which keeps it the owner if the record still
        names it, and fences it (409) if another member wrote the session since; its
        revision as it is when the two are one etcd cluster (a shard renamed)."""
        seen = old.engine.ledger.observed.pop(session_id, None)
        if seen is not None and new.engine.ledger.observed_revision(session_id) is None:
            before, after = shard_map.named(old.name), shard_map.named(new.name)
            exact = before is not None and after is not None and same_cluster(before, after)
            new.engine.ledger.observe(session_id, seen[0] if exact else 0)

    def shard_of(self, session_id: str, shard_map: ShardMap | None = None) -> Shard:
        return self.part(shard_map or self.map, (shard_map or self.map).of(session_id).name)

    def part(self, shard_map: ShardMap, name: str) -> Shard:
        """Shard ``name`` of ``shard_map`` as this sidecar holds it; 503 when a newer map
        closed it while a request planned under ``shard_map`` was served."""
        found = self.shards.get(name)
        if found is None:
            raise ShardClosed(f"session shard {name} was closed: shard map version "
                              f"{shard_map.version} was replaced by {self.map.version} "
                              "while this request was served; send it again")
        return found

    async def settle(self, session_id: str, shard_map: ShardMap | None = None) -> Shard:
        """The shard that serves ``session_id`` now under ``shard_map`` (the one
        served): while the map is moving and its shard changed, it is first moved
        there if still in its old shard."""
        m = shard_map or self.map
        shard = self.shard_of(session_id, m)
        source = m.source_of(session_id)
        if source is None:
            return shard
        if m.stage == PREPARE:
            raise Unavailable(f"session {session_id!r} moves from shard {source.name} to "
                              f"{shard.name}: its writes wait until every sidecar has the "
                              "new shard map (a second or two); send it again")
        old = self.part(m, source.name)
        old.refuse_if_down()
        try:
            await self.mover.move(old.client, shard.client, old.engine.ledger.key(session_id),
                                  m.version, (old.name, shard.name))
        except asyncio.CancelledError:
            # Not this request's own cancellation: a call of the move was cancelled under
            # it, as closing a shard's client does. Nothing of the request was sent:
            # planned again under the newer map if it closed the old shard, else 503.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            self._raise_if_closed(session_id, old, shard, m)
            raise Unavailable(f"session {session_id!r} moves from shard {old.name} to "
                              f"{shard.name}, and that was interrupted; send it "
                              "again") from None
        except Fenced as exc:
            self._fence_found(exc.fence)
            raise
        except MeshxlError:
            raise
        except Exception as exc:
            # A shard's client closed before a call of the move started fails it
            # otherwise (aetcd's stubs are gone: "'NoneType' object has no attribute
            # 'Txn'", seen in an online reshard under load): planned again, as above.
            self._raise_if_closed(session_id, old, shard, m)
            raise Unavailable(f"session {session_id!r} moves from shard {old.name} to "
                              f"{shard.name}, and that failed: {type(exc).__name__}: "
                              f"{str(exc)[:200]}") from None
        self._carry(session_id, old, shard, m)  # a write in the old shard since apply()
        return shard

    def _raise_if_closed(self, session_id: str, old: Shard, new: Shard, m: ShardMap) -> None:
        """ShardClosed (the request is planned again under the newer map) when a newer
        map closed either shard of the move while it ran."""
        for part in (old, new):
            if self.shards.get(part.name) is not part:
                raise ShardClosed(f"session shard {part.name} was closed while session "
                                  f"{session_id!r} moved from {old.name} to {new.name}: "
                                  f"shard map version {m.version} was replaced by "
                                  f"{self.map.version}; send it again") from None

    async def _settle_all(self, session_ids: Sequence[str],
                          m: ShardMap) -> dict[str, Exception]:
        """:meth:`settle` of every moving session among ``session_ids``, side by side:
        the errors, by session."""
        moving = [s for s in dict.fromkeys(session_ids) if m.source_of(s) is not None]
        if not moving:
            return {}
        done = await asyncio.gather(*(self.settle(s, m) for s in moving),
                                    return_exceptions=True)
        errors: dict[str, Exception] = {}
        for session_id, outcome in zip(moving, done, strict=True):
            if isinstance(outcome, Exception):
                errors[session_id] = outcome
            elif isinstance(outcome, BaseException):  # a cancellation: never an answer
                raise outcome
        return errors

    def status(self) -> dict[str, Any]:
        """``/v1/status`` ``shards``: the map served, each shard, and what is wrong
        with the stored map if it is not the one served."""
        m = self.map
        return {"version": m.version, "stage": m.stage or None,
                "shards": [self.shards[s.name].status() for s in m.every
                           if s.name in self.shards],
                "map_error": self.map_problem, "fenced": self.fenced}

    # -- what the sidecar shows: sums over the shards ---------------------------------

    @property
    def on_takeover(self) -> Callable[[Takeover], None] | None:
        return self._on_takeover

    @on_takeover.setter
    def on_takeover(self, hook: Callable[[Takeover], None] | None) -> None:
        self._on_takeover = hook
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
        with _planned_under(self.map):
            counts = await asyncio.gather(*(s.engine.flush_due()
                                            for s in self.shards.values()))
        return sum(counts)

    # -- reads and writes -----------------------------------------------------------

    async def _replanned(self, call: Callable[[ShardMap], Coroutine[Any, Any, _T]],
                         m: ShardMap) -> _T:
        """``call(m)`` with ``m``'s version carried to the shards; again under the map
        served when a newer one closed a shard ``m`` named before anything was sent
        there (at most :data:`REPLANS` times): a request that comes in as the map is
        replaced is served under the new one, not refused."""
        for attempt in range(REPLANS + 1):
            try:
                with _planned_under(m):
                    return await call(m)
            except ShardClosed:
                if attempt == REPLANS or self.map is m:
                    raise
            m = self.map
        raise AssertionError("unreachable")

    async def get(self, session_id: str) -> Stored:
        return await self._replanned(lambda m: self._get(session_id, m), self.map)

    async def _get(self, session_id: str, m: ShardMap) -> Stored:
        source = m.source_of(session_id) if m.stage == PREPARE else None
        if source is not None:  # not moved yet: where it is, its old shard or its new
            old = self.part(m, source.name)
            old.refuse_if_down()
            try:
                return _tagged(old.name, await old.engine.get(session_id))
            except NotFound:
                pass
            shard = self.shard_of(session_id, m)
        else:
            shard = await self.settle(session_id, m)
        shard.refuse_if_down()
        return _tagged(shard.name, await shard.engine.get(session_id))

    def _in_shard(self, write: Write, shard: Shard, m: ShardMap) -> Write:
        """``write`` as its shard's engine takes it: an If-Match naming this shard (or
        another name of its etcd cluster in the map), with the shard taken off (412 for
        another shard's, or one naming none)."""
        tag = write.if_match
        if tag is None:
            return write
        value = parse_etag(tag)
        if value == "*" or value.startswith("L"):
            return write
        named, revision = split_etag(value)
        spec, tagged = m.named(shard.name), m.named(named) if named else None
        if named != shard.name and not (spec is not None and tagged is not None
                                        and same_cluster(spec, tagged)):
            where = f"shard {named}" if named else "no shard"
            raise PreconditionFailed(
                f"If-Match {tag.strip()[:80]} names {where}; session {write.session_id!r} "
                f"lives in shard {shard.name}: read it again for its ETag")
        return dataclasses.replace(write, if_match=revision)

    @overload
    def write(self, writes: Sequence[Write], *, atomic: Literal[True],
              traceparent: str | None = None) -> Coroutine[Any, Any, Transacted]: ...

    @overload
    def write(self, writes: Sequence[Write], *, early: Literal[True],
              traceparent: str | None = None
              ) -> Coroutine[Any, Any, list[Outcome | asyncio.Task[Outcome]]]: ...

    @overload
    def write(self, writes: Sequence[Write], *,
              traceparent: str | None = None) -> Coroutine[Any, Any, list[Outcome]]: ...

    def write(self, writes: Sequence[Write], *, atomic: bool = False,
              early: bool = False, traceparent: str | None = None
              ) -> Coroutine[Any, Any, Any]:
        """:meth:`.sessions.Sessions.write`, each write in its session's shard. Writes
        that all go to one shard, while the map is not moving (most: one session), are
        that shard's engine's own coroutine, given the map version they were planned
        under: the shard is chosen here, and nothing of this module stays on their way
        to etcd (docs/statesync.md, "Following one PUT")."""
        m = self.map
        if not atomic and not m.moving:
            routed = self._routed(writes, m)
            if routed is not None:
                engine, translated = routed
                if early:
                    return engine.write(translated, early=True, traceparent=traceparent,
                                        planned=m.version)
                return engine.write(translated, traceparent=traceparent, planned=m.version)
        return self._write_planned(writes, atomic, early, traceparent, m)

    def _routed(self, writes: Sequence[Write],
                m: ShardMap) -> tuple[Sessions, list[Write]] | None:
        """The one shard's engine every write goes to, and the writes as it takes them;
        None when they go to several, or one is refused here (:meth:`_write` answers
        each)."""
        if not writes:
            return None
        try:
            shard = self.shard_of(writes[0].session_id, m)
            shard.refuse_if_down()
            translated = []
            for write in writes:
                if self.shard_of(write.session_id, m) is not shard:
                    return None
                translated.append(self._in_shard(write, shard, m))
        except (InputError, PreconditionFailed, Unavailable):
            return None
        return shard.engine, translated

    async def _write_planned(self, writes: Sequence[Write], atomic: bool, early: bool,
                             traceparent: str | None, m: ShardMap
                             ) -> Transacted | list[Outcome | asyncio.Task[Outcome]]:
        if atomic:
            return await self._replanned(
                lambda m: self._transaction(writes, traceparent, m), m)
        outcomes: list[Any] = [None] * len(writes)
        todo = list(range(len(writes)))
        for _ in range(REPLANS + 1):  # again, the writes a newer map's closed shard refused
            with _planned_under(m):
                answers = await self._write([writes[i] for i in todo], early, traceparent, m)
            for i, outcome in zip(todo, answers, strict=True):
                outcomes[i] = outcome
            todo = [i for i in todo if isinstance(outcomes[i], ShardClosed)]
            if not todo or self.map is m:
                break
            m = self.map
        return outcomes

    async def _write(self, writes: Sequence[Write], early: bool, traceparent: str | None,
                     m: ShardMap) -> list[Outcome | asyncio.Task[Outcome]]:
        outcomes: list[Any] = [None] * len(writes)
        groups: dict[str, list[int]] = {}
        batches: dict[str, list[Write]] = {}
        unsettled = (await self._settle_all([w.session_id for w in writes], m)
                     if m.moving else {})  # at PREPARE: 503 for those that move
        for i, write in enumerate(writes):
            if write.session_id in unsettled:
                outcomes[i] = unsettled[write.session_id]
                continue
            try:
                shard = self.shard_of(write.session_id, m)
                shard.refuse_if_down()
                translated = self._in_shard(write, shard, m)
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
        for name, answer in zip(names, answers, strict=True):  # ETags: tagged by each shard
            for i, outcome in zip(groups[name], answer, strict=True):
                outcomes[i] = outcome
        return outcomes

    async def _transaction(self, writes: Sequence[Write], traceparent: str | None,
                           m: ShardMap) -> Transacted:
        """All or none: every session in one shard, or 400 naming the shards."""
        if not writes:
            if not self.shards:
                raise Unavailable(f"no usable session shard map: {m.problem}")
            return await next(iter(self.shards.values())).engine.write(
                [], atomic=True, traceparent=traceparent)
        shards = {self.shard_of(w.session_id, m).name for w in writes}
        if len(shards) == 1 and m.moving:
            for error in (await self._settle_all([w.session_id for w in writes],
                                                 m)).values():
                raise error
        if len(shards) > 1:
            spread = ", ".join(f"{w.session_id!r} in {self.shard_of(w.session_id, m).name}"
                               for w in writes[:8])
            raise InputError(
                f"a transaction stays in one shard, and these sessions live in "
                f"{len(shards)} ({spread}): give sessions that change together one hash "
                "tag, e.g. {user42}:cart and {user42}:prefs")
        (name,) = shards
        shard = self.part(m, name)
        shard.refuse_if_down()
        return await shard.engine.write([self._in_shard(w, shard, m) for w in writes],
                                        atomic=True, traceparent=traceparent)
