"""Session semantics: ownership, fencing, takeover, conditional writes, delayed sync.

Fencing is by revision, not by locks (locks alone are not safe; etcd is the judge):

* every write compares the session's mod_revision in the same etcd transaction;
* the revision compared is ``If-Match`` when the app sends one (412 on mismatch);
  otherwise the revision this member last *observed* for the session (its last read
  or write of it), so a member that lost the session to another one, for example
  after a pause or a partition, gets 409 however fresh its cache has become since
  (unless the session is gone meanwhile, deleted or expired: a write then creates it
  anew, as any member's would);
* a member that never touched the session (a takeover, or a new session) writes
  against the newest revision it can learn, and takes ownership;
* every read first asks etcd, linearizably and without the value, for the session's
  current revision; the cached state is served only if it is that revision (while etcd
  does not answer, it is served marked ``cache-unverified``, and a write based on it
  still compares the revision read).

Two members therefore can never both acknowledge conflicting writes: etcd accepts one
compare and refuses the other.

Several sessions at once follow the same rules: a bulk save (:meth:`Sessions.put_many`)
is each session's put, their first attempts queued together; a transaction
(:meth:`Sessions.transact`) puts each session's compare, chosen as for a single write,
into one etcd transaction that applies everything or nothing. Both hold the sessions'
locks, taken in sorted order.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import json_merge_patch

from meshxl import errors
from meshxl.etcdkeys import Keys
from meshxl.model.spec import Replication

from .cache import SessionCache
from .metrics import StatesyncMetrics
from .record import JSON_TYPE, SessionRecord, is_json, valid_session_id
from .store import MAX_TXN_WRITES, KeyState, SessionStore, StoreUnavailable, TxnWrite, WriteResult

log = logging.getLogger(__name__)

_BLIND_RETRIES = 3
UNVERIFIED = "cache-unverified"
"""``X-Meshxl-Source`` of a read served from the cache while etcd does not answer."""


class SessionError(errors.MeshxlError):
    """A failure of the session API (its HTTP status: :func:`meshxl.web.http_status`)."""


class BadRequest(SessionError, errors.InputError):
    pass


class NotFound(SessionError, errors.NotFound):
    pass


class Conflict(SessionError, errors.Conflict):
    pass


class Undecodable(Conflict):
    """The session's stored record cannot be decoded (a foreign or broken writer put it
    in etcd): reads and merge patches fail with this; PUT and DELETE replace it."""


class PreconditionFailed(SessionError, errors.PreconditionFailed):
    pass


class TooLarge(SessionError, errors.TooLarge):
    pass


class Unavailable(SessionError, errors.Unavailable):
    pass


@dataclass(frozen=True)
class Settings:
    ttl: float = 1800.0
    sync_delay: float = 0.0
    max_bytes: int = 1_048_576
    replication: Replication = "all"
    """``all`` or ``narrow`` (the model's ``sessions.replication``)."""


@dataclass(slots=True, kw_only=True)
class Stored:
    """A session's state as the API returns it (not frozen: made on every write, and a
    frozen dataclass sets each field through ``object.__setattr__``)."""

    session_id: str
    record: SessionRecord
    etag: str
    """``"<etcd revision>"``, or ``"L<n>"`` while only on this member (delayed sync)."""
    new_session: bool = False
    """This write created the session (the API answers 201 and ``"created": true``)."""
    previous_owner: str | None = None
    source: str = "etcd"

    @property
    def takeover(self) -> bool:
        return self.previous_owner is not None and self.previous_owner != self.record.owner


@dataclass(frozen=True)
class Takeover:
    """A session this member took over: from its first access here to the write that
    made this member the owner (wall clock, ns)."""

    session_id: str
    previous_owner: str
    owner: str
    start_ns: int
    end_ns: int
    previous_traceparent: str | None

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


@dataclass
class _Local:
    record: SessionRecord
    version: int


@dataclass(slots=True, kw_only=True)
class Change:
    """One operation of a transaction, a bulk save or a group of PUTs: write ``data``
    (None: delete the session). Not frozen: made for every session written."""

    session_id: str
    data: bytes | None
    content_type: str = JSON_TYPE
    if_match: str | None = None
    create_only: bool = False
    traceparent: str | None = None
    """The W3C trace context of its own request (a PUT's); None: the request's as a
    whole (a bulk save's)."""

    @property
    def op(self) -> str:
        return "put" if self.data is not None else "delete"

    @property
    def operation(self) -> str:
        """The multi-session API's name for it: ``upsert`` or ``delete``."""
        return "upsert" if self.data is not None else "delete"


@dataclass(frozen=True, kw_only=True)
class Transacted:
    """A transaction's answer. Committed: every upsert's :class:`Stored` (None for a
    delete), all at ``revision``. Not committed: nothing applied, and ``errors`` holds
    the failure of each operation that failed, by its index."""

    committed: bool
    revision: int = 0
    stored: tuple[Stored | None, ...] = ()
    errors: Mapping[int, SessionError] = field(default_factory=dict)


@dataclass
class _Planned:
    """A transaction's operation as it will be sent: the revision it compares."""

    change: Change
    key: bytes
    mode: str
    expected: int
    prior: SessionRecord | None
    local: bool = False
    """The session was kept on this member only (delayed sync): the transaction
    replicates it (a delete only forgets it, as a single delete does)."""


def parse_etag(value: str) -> str:
    """``"12"``, ``W/"12"`` or ``12`` -> ``12``; ``*`` stays ``*``."""
    text = value.strip()
    if text == "*":
        return text
    if text.startswith("W/"):
        text = text[2:]
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1]
    if not text or "," in text or '"' in text:
        raise BadRequest(f"If-Match must be one ETag such as \"42\", got {value[:80]!r}",
                         field="If-Match")
    return text


def check_if_match(value: str) -> str:
    """An If-Match value's tag, checked (BadRequest): ``*``, an etcd revision, or
    ``L<n>`` (a session kept on this member only)."""
    tag = parse_etag(value)
    if tag != "*" and not (tag[:1] == "L" and tag[1:].isdigit()):
        _revision(tag)
    return tag


def _check_put_conditions(if_match: str | None, create_only: bool) -> None:
    """A PUT takes If-Match or If-None-Match (``create_only``), not both."""
    if create_only and if_match is not None:
        raise BadRequest("send If-Match or If-None-Match, not both")


class _SessionLocks:
    """A lock per session, held while a write of it is under way.

    Most writes meet no other write of their session: the first takes it at once,
    without allocating a lock; later ones wait in order (FIFO) and get it handed over.
    """

    def __init__(self) -> None:
        self._held: dict[str, deque[asyncio.Future[None]] | None] = {}

    def __len__(self) -> int:
        return len(self._held)

    def try_acquire(self, session_id: str) -> bool:
        """Take the lock if nobody holds it (no await): the common case."""
        if session_id in self._held:
            return False
        self._held[session_id] = None
        return True

    async def acquire(self, session_id: str) -> None:
        future = self.reserve(session_id)
        if future is not None:
            await self.wait(session_id, future)

    def reserve(self, session_id: str) -> asyncio.Future[None] | None:
        """Take the lock now (None), or take a place in its line: the future is done
        when the lock is handed over (:meth:`wait` for it). Taking places in several
        lines at once, with no await in between, keeps writes in the order they came."""
        held = self._held
        if session_id not in held:
            held[session_id] = None
            return None
        waiters = held[session_id]
        if waiters is None:
            waiters = held[session_id] = deque()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters.append(future)
        return future

    async def wait(self, session_id: str, future: asyncio.Future[None]) -> None:
        """Wait for a place :meth:`reserve` took (given up if cancelled)."""
        try:
            await future
        except asyncio.CancelledError:
            self.give_up(session_id, future)
            raise

    def give_up(self, session_id: str, future: asyncio.Future[None] | None) -> None:
        """Leave a line (None: the lock was taken at once): release the lock if it was
        handed over already, else step out of the line."""
        if future is None or (future.done() and not future.cancelled()):
            self.release(session_id)  # held, or handed over just as this was given up
            return
        waiters = self._held.get(session_id)
        if waiters and future in waiters:
            waiters.remove(future)
        future.cancel()

    def release(self, session_id: str) -> None:
        waiters = self._held[session_id]
        while waiters:
            future = waiters.popleft()
            if not future.done():
                future.set_result(None)  # still held: by that waiter now
                return
        del self._held[session_id]


class _Exclusive:
    __slots__ = ("_locks", "_session_id")

    def __init__(self, locks: _SessionLocks, session_id: str):
        self._locks, self._session_id = locks, session_id

    async def __aenter__(self) -> None:
        await self._locks.acquire(self._session_id)

    async def __aexit__(self, *_exc: object) -> None:
        self._locks.release(self._session_id)


class Sessions:
    """One member's view of its cluster's sessions."""

    def __init__(self, store: SessionStore, cache: SessionCache, keys: Keys, cluster: str,
                 member: str, settings: Settings, metrics: StatesyncMetrics):
        self.store = store
        self.cache = cache
        self.keys = keys
        self.cluster = cluster
        self.member = member
        self.settings = settings
        self.metrics = metrics
        self._locks = _SessionLocks()
        self._prefix = keys.sessions_prefix(cluster).encode()
        """Every session key starts with it (``keys.session``), built once."""
        self._observed: dict[str, tuple[int, float]] = {}
        self._local: dict[str, _Local] = {}
        self._local_versions = 0
        self._first_access: dict[str, int] = {}
        self.takeovers = 0
        self.conflicts = 0
        self.on_takeover: Callable[[Takeover], None] | None = None
        """Called (in the request's context) when this member took a session over."""

    def key(self, session_id: str) -> bytes:
        if not valid_session_id(session_id):  # one etcd key segment, bounded
            raise BadRequest(f"invalid session id {session_id[:80]!r}", field="session_id")
        return self._prefix + session_id.encode()

    # -- per-session serialization ------------------------------------------------------

    def _exclusive(self, session_id: str) -> _Exclusive:
        """One write at a time per session on this member (its order is the app's)."""
        return _Exclusive(self._locks, session_id)

    @contextlib.asynccontextmanager
    async def _exclusive_all(self, session_ids: Sequence[str]) -> AsyncIterator[None]:
        """:meth:`_exclusive` for several sessions: a place in every session's line is
        taken at once (no await in between), then each handed-over lock awaited. Every
        write takes its places in the order writes came, so none waits for a later one:
        two transactions or bulk saves over overlapping sessions never wait for each
        other in a cycle, and a connection's pipelined writes keep their order
        (``server.py``, concurrent routes)."""
        locks = self._locks
        places = [(session_id, locks.reserve(session_id))
                  for session_id in sorted(set(session_ids))]
        waited = 0
        try:
            for _, future in places:
                if future is not None:
                    await future
                waited += 1
            yield
        finally:
            for i, (session_id, future) in enumerate(places):
                if i < waited:
                    locks.release(session_id)
                else:
                    locks.give_up(session_id, future)

    @contextlib.contextmanager
    def _writing(self, session_ids: Sequence[str]) -> Iterator[None]:
        """Writes of these sessions start now: a takeover among them is timed from here
        (unless a read of it started earlier)."""
        started = time.time_ns()
        first_access = self._first_access
        for session_id in session_ids:
            first_access.setdefault(session_id, started)
        try:
            yield
        finally:
            for session_id in session_ids:
                first_access.pop(session_id, None)

    def _observe(self, session_id: str, revision: int) -> None:
        self._observed[session_id] = (revision, time.monotonic())

    def prune_observed(self) -> int:
        """Forget observations older than any session can live (called periodically)."""
        horizon = time.monotonic() - (self.settings.ttl + self.store.leases.bucket) * 1.5
        stale = [s for s, (_, at) in self._observed.items() if at < horizon]
        for session_id in stale:
            del self._observed[session_id]
        # A read that no takeover write followed within a minute starts nothing.
        cutoff = time.time_ns() - 60_000_000_000
        for session_id in [s for s, at in self._first_access.items() if at < cutoff]:
            del self._first_access[session_id]
        return len(stale)

    # -- reads --------------------------------------------------------------------------

    async def get(self, session_id: str) -> Stored:
        local = self._local.get(session_id)
        if local is not None:
            self.metrics.read("local", "ok").inc()
            return Stored(session_id=session_id, record=local.record, etag=f"L{local.version}",
                          source="local")
        started = time.time_ns()
        stored = await self._read(session_id)
        self._observe(session_id, int(stored.etag))
        if stored.record.owner != self.member:  # a takeover may follow: it starts here
            self._first_access.setdefault(session_id, started)
        return stored

    async def _read(self, session_id: str) -> Stored:
        """The current state, proven current against etcd (linearizable); while etcd
        does not answer, the cached state marked ``cache-unverified`` (else 503)."""
        key = self.key(session_id)
        entry = self.cache.get(session_id)
        try:
            if entry is not None:
                revision = await self.store.check(key)
                if revision == entry.revision:
                    self.metrics.read("cache", "ok").inc()
                    return Stored(session_id=session_id, record=entry.record, etag=str(revision),
                                  source="cache")
                if revision == 0:
                    self.metrics.read("cache", "not_found").inc()
                    raise NotFound(f"no session {session_id!r}")
            state = await self.store.fetch(key)
        except StoreUnavailable as exc:
            entry = self.cache.get(session_id) or entry
            if entry is None:
                raise Unavailable(f"etcd unavailable: {exc}") from None
            # etcd cannot prove the cache current: serve it, marked. A write based on
            # it compares this revision, so it cannot overwrite anything newer.
            self.metrics.read(UNVERIFIED, "ok").inc()
            return Stored(session_id=session_id, record=entry.record, etag=str(entry.revision),
                          source=UNVERIFIED)
        if state.revision == 0 or state.value is None:
            self.metrics.read("etcd", "not_found").inc()
            raise NotFound(f"no session {session_id!r}")
        record = self._decode(session_id, state.revision, state.value, "read")
        if record is None:
            raise self._undecodable(session_id, state.revision)
        self.cache.write_through(session_id, state.revision, record)
        self.metrics.read("etcd", "ok").inc()
        return Stored(session_id=session_id, record=record, etag=str(state.revision), source="etcd")

    # -- writes -------------------------------------------------------------------------

    async def put(self, session_id: str, data: bytes, content_type: str,
                  if_match: str | None = None, traceparent: str | None = None, *,
                  create_only: bool = False) -> Stored:
        """Write a session; ``create_only`` (``If-None-Match: *``): only if it does not
        exist (412 if it does), so two creations never both succeed."""
        self._check_size(data)
        _check_put_conditions(if_match, create_only)
        locks = self._locks
        if not locks.try_acquire(session_id):
            await locks.acquire(session_id)
        try:
            return await self._put_held(session_id, data, content_type, if_match,
                                        traceparent, create_only)
        finally:
            locks.release(session_id)

    async def _put_held(self, session_id: str, data: bytes, content_type: str,
                        if_match: str | None, traceparent: str | None,
                        create_only: bool) -> Stored:
        """:meth:`put` with the session's lock held (the caller releases it)."""
        now = time.time()
        if self.settings.sync_delay > 0 and await self._keep_local(session_id, now):
            if create_only and session_id in self._local:
                raise PreconditionFailed(f"session {session_id!r} exists")
            return self._put_local(session_id, data, content_type, if_match, now,
                                   traceparent)
        entry = self.cache.get(session_id)
        cached = entry.revision if entry is not None else 0
        prior = entry.record if entry is not None else None
        make = functools.partial(self._new_record, content_type, data, now, traceparent)
        known = self._known_expectation("put", session_id, if_match, create_only, cached)
        lease = self.store.leases.cached()
        if known is None or lease is None:  # an etcd read first, or a new lease
            return await self._write("put", session_id, if_match, make, cached, prior,
                                     create_only=create_only)
        # The common write, its first attempt here: :meth:`_write` without the
        # coroutines between the request and etcd's answer.
        self._first_access.setdefault(session_id, time.time_ns())
        try:
            key = self.key(session_id)
            mode, expected = known
            record = make(prior)
            value = record.encode()
            self.cache.expect(key, session_id, value, record)
            try:
                answer: WriteResult | StoreUnavailable = await self.store.put_soon(
                    key, value, expected, lease)
            except StoreUnavailable as exc:
                answer = errors.detached(exc)
            finally:
                self.cache.settled(key)
            if isinstance(answer, WriteResult) and answer.ok:
                return self._acknowledged("put", session_id, answer, record,
                                          expected == 0, prior)
            return await self._attempts("put", session_id, key, mode, expected, if_match,
                                        make, prior, first=(record, answer))
        finally:
            self._first_access.pop(session_id, None)

    async def put_each(self, changes: Sequence[Change],
                       answer: Callable[[int, Stored | Exception], None]) -> None:
        """Independent writes, each made as :meth:`put` makes it and answered through
        ``answer(index, outcome)`` as soon as it has its outcome (a :class:`Stored`, a
        :class:`SessionError`, or an unexpected error): pipelined PUTs of one connection,
        taken up together (``SessionRoutes.put_group``).

        Every write takes its place in its session's line at once, in the order given,
        before anything waits, so a later write of a session (in this call or after it)
        stays behind it. The writes whose lock is free and whose compare needs no etcd
        read go to the write queue together, as a bulk save's do, with no task, future
        or wake-up each: what a PUT costs the sidecar beyond its HTTP is mostly that.
        Any other (its session busy with another write, ``If-Match: *``, delayed sync)
        goes on in a task of its own, so it holds back no other's answer.
        """
        locks = self._locks
        places: list[tuple[int, asyncio.Future[None] | None]] = []
        for i, change in enumerate(changes):
            try:  # what put() refuses before it waits (the size: as the write is made)
                if change.data is None:
                    raise BadRequest(f"session {change.session_id!r}: a PUT writes a state")
                _check_put_conditions(change.if_match, change.create_only)
            except SessionError as exc:
                answer(i, errors.detached(exc))
                continue
            places.append((i, locks.reserve(change.session_id)))
        together: list[int] = []
        alone: list[tuple[int, asyncio.Future[None] | None]] = []
        for i, place in places:
            change = changes[i]
            if place is not None or self.settings.sync_delay > 0:
                alone.append((i, place))
                continue
            if change.if_match is not None:  # If-Match: * reads etcd first
                try:
                    known = self._known_expectation("put", change.session_id,
                                                    change.if_match, False, 0)
                except SessionError as exc:
                    locks.release(change.session_id)
                    answer(i, errors.detached(exc))
                    continue
                if known is None:
                    alone.append((i, place))
                    continue
            together.append(i)

        async def one(i: int, place: asyncio.Future[None] | None) -> None:
            change = changes[i]
            held = place is None
            outcome: Stored | Exception
            try:
                if place is not None:
                    await place  # the lock, handed over in line
                    held = True
                assert change.data is not None
                self._check_size(change.data)
                outcome = await self._put_held(change.session_id, change.data,
                                               change.content_type, change.if_match,
                                               change.traceparent, change.create_only)
            except Exception as exc:  # a SessionError, or a bug: answered (500) all the same
                outcome = errors.detached(exc)
            finally:
                if held:
                    locks.release(change.session_id)
                else:
                    locks.give_up(change.session_id, place)
            answer(i, outcome)

        # Made before this coroutine first waits, each task takes charge of its place
        # (its try/finally) in its first step, before this one can be cancelled.
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(one(i, place)) for i, place in alone]
        try:
            if together:
                await self._put_together(changes, together, answer)
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _put_together(self, changes: Sequence[Change], indexes: list[int],
                            answer: Callable[[int, Stored | Exception], None]) -> None:
        """:meth:`put_each`'s writes whose locks it holds: one bulk save's worth."""
        ids = [changes[i].session_id for i in indexes]
        outcomes: list[Stored | SessionError] | None = None
        try:
            with self._writing(ids):
                outcomes = await self._put_many([changes[i] for i in indexes], None)
        except Exception as exc:
            error = errors.detached(exc)
            for i in indexes:
                answer(i, error)
        finally:
            locks = self._locks
            for session_id in ids:
                locks.release(session_id)
        if outcomes is not None:
            for i, outcome in zip(indexes, outcomes, strict=True):
                answer(i, outcome)

    async def put_many(self, changes: Sequence[Change],
                       traceparent: str | None = None) -> list[Stored | SessionError]:
        """Several sessions written as :meth:`put` writes each (a bulk save): each
        succeeds or fails on its own. Their first attempts go to the write queue
        together, so they leave in the same etcd transactions, with no task each; a
        write whose compare failed goes on alone, as put() would. The sessions' locks
        are taken in sorted order (as a transaction takes them)."""
        if len({c.session_id for c in changes}) != len(changes):
            raise BadRequest("a bulk save names each session once")
        if self.settings.sync_delay > 0:  # each may stay here: as put() decides, one by one
            outcomes = await asyncio.gather(*(
                self.put(c.session_id, c.data or b"", c.content_type, c.if_match,
                         traceparent, create_only=c.create_only) for c in changes),
                return_exceptions=True)
            return [_answer(o) for o in outcomes]
        ids = [c.session_id for c in changes]
        async with self._exclusive_all(ids):
            with self._writing(ids):
                return await self._put_many(changes, traceparent)

    async def _put_many(self, changes: Sequence[Change],
                        traceparent: str | None) -> list[Stored | SessionError]:
        results: list[Stored | SessionError | None] = [None] * len(changes)
        try:
            lease = await self.store.lease()
        except StoreUnavailable as exc:
            self.metrics.write("put", "unavailable").inc(len(changes))
            error = Unavailable(f"etcd unavailable, write not acknowledged: {exc}")
            return [error] * len(changes)
        now = time.time()
        member = self.member
        planned = []
        for i, change in enumerate(changes):
            session_id = change.session_id
            data = change.data
            try:
                if data is None:
                    raise BadRequest(f"session {session_id!r}: a bulk save writes states")
                self._check_size(data)
                key = self.key(session_id)
                entry = self.cache.get(session_id)
                cached = entry.revision if entry else 0
                known = self._known_expectation("put", session_id, change.if_match,
                                                change.create_only, cached)
                mode, expected = known if known is not None else await self._expectation(
                    "put", session_id, key, change.if_match, change.create_only, cached)
            except SessionError as exc:
                results[i] = errors.detached(exc)
                continue
            prior = entry.record if entry is not None else None
            record = SessionRecord(owner=member, content_type=change.content_type,
                                   created=prior.created if prior else now, updated=now,
                                   data=data, traceparent=change.traceparent or traceparent)
            planned.append((i, key, mode, expected, prior, record))
        puts = []
        expect = self.cache.expect
        for i, key, _, expected, _, record in planned:
            value = record.encode()
            expect(key, changes[i].session_id, value, record)
            puts.append((key, value, expected))
        try:
            answers = await self.store.put_all(puts, lease)
        finally:
            settled = self.cache.settled
            for _, key, *_ in planned:
                settled(key)
        acknowledged = 0
        for (i, key, mode, expected, prior, record), answer in zip(planned, answers,
                                                                   strict=True):
            change = changes[i]
            if isinstance(answer, WriteResult) and answer.ok:  # most: no second attempt
                results[i] = self._acknowledged("put", change.session_id, answer, record,
                                                expected == 0, prior, counted=False)
                acknowledged += 1
                continue
            make = functools.partial(self._new_record, change.content_type, change.data or b"",
                                     now, change.traceparent or traceparent)
            try:
                results[i] = await self._attempts(
                    "put", change.session_id, key, mode, expected, change.if_match, make,
                    prior, first=(record, answer))
            except SessionError as exc:
                results[i] = errors.detached(exc)
        self.metrics.write("put", "ok").inc(acknowledged)
        return [r for r in results if r is not None]

    def _new_record(self, content_type: str, data: bytes, now: float,
                    traceparent: str | None, prior: SessionRecord | None) -> SessionRecord:
        return SessionRecord(owner=self.member, content_type=content_type,
                             created=prior.created if prior else now, updated=time.time(),
                             data=data, traceparent=traceparent)

    async def patch(self, session_id: str, patch: Any, if_match: str | None = None,
                    traceparent: str | None = None) -> Stored:
        """RFC 7386 JSON merge patch of a JSON session."""
        async with self._exclusive(session_id):
            local = self._local.get(session_id)
            if local is not None:
                merged = self._merged(session_id, local.record, patch)
                return self._put_local(session_id, merged, JSON_TYPE, if_match, time.time(),
                                       traceparent)
            current = await self._read(session_id)

            def make(prior: SessionRecord | None) -> SessionRecord:
                if prior is None:
                    raise NotFound(f"no session {session_id!r}")
                return SessionRecord(owner=self.member, content_type=JSON_TYPE,
                                     created=prior.created, updated=time.time(),
                                     data=self._merged(session_id, prior, patch),
                                     traceparent=traceparent)

            return await self._write("patch", session_id, if_match, make,
                                     int(current.etag), current.record)

    async def delete(self, session_id: str, if_match: str | None = None) -> None:
        async with self._exclusive(session_id):
            if self._local.pop(session_id, None) is not None:
                self.metrics.write("delete", "ok").inc()
                return
            entry = self.cache.get(session_id)
            await self._write("delete", session_id, if_match, None,
                              entry.revision if entry else 0,
                              entry.record if entry else None)
            self._observed.pop(session_id, None)

    # -- transactions ---------------------------------------------------------------------

    async def transact(self, changes: Sequence[Change],
                       traceparent: str | None = None) -> Transacted:
        """Apply every change or none, in one etcd transaction.

        Each operation compares the revision a single write would (If-Match, create
        only, the revision this member observed, or the newest it knows for a session
        new to it), and fails the way a single write would (412, 409, 404); an
        operation whose compare failed only because the session moved under a write
        that may replace it (a takeover, an expired session) is compared again, as a
        single write is, and the transaction sent again. The sessions' locks are held
        throughout, taken in sorted order.
        """
        ids = [c.session_id for c in changes]
        if not 0 < len(changes) <= MAX_TXN_WRITES:
            raise BadRequest(f"a transaction holds 1 to {MAX_TXN_WRITES} operations, "
                             f"not {len(changes)}")
        if len(set(ids)) != len(ids):
            raise BadRequest("a transaction names each session once")
        keys = [self.key(session_id) for session_id in ids]
        for change in changes:
            if change.data is not None:
                self._check_size(change.data)
            if change.create_only and (change.if_match is not None or change.data is None):
                raise BadRequest("create-only applies to an upsert without If-Match")
        async with self._exclusive_all(ids):
            with self._writing(ids):
                return await self._transact(changes, keys, traceparent)

    async def _transact(self, changes: Sequence[Change], keys: list[bytes],
                        traceparent: str | None) -> Transacted:
        async def plan(change: Change, key: bytes) -> _Planned:
            local = self._local.get(change.session_id)
            if local is not None:
                self._local_precondition(change, local)
                return _Planned(change, key, "blind", 0, local.record, local=True)
            entry = self.cache.get(change.session_id)
            mode, expected = await self._expectation(
                change.op, change.session_id, key, change.if_match, change.create_only,
                entry.revision if entry else 0)
            return _Planned(change, key, mode, expected, entry.record if entry else None)

        planned = await asyncio.gather(*(plan(c, k) for c, k in zip(changes, keys, strict=True)),
                                       return_exceptions=True)
        refused: dict[int, SessionError] = {}
        plans: list[_Planned] = []
        for i, outcome in enumerate(planned):
            if isinstance(outcome, SessionError):
                refused[i] = outcome
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                plans.append(outcome)
        if refused:
            return self._aborted(refused)
        # A session kept only here and deleted: forgotten on commit, nothing in etcd.
        sent = [p for p in plans if not (p.local and p.change.data is None)]
        failed: list[int] = []
        for _ in range(_BLIND_RETRIES):
            now = time.time()
            records = [None if p.change.data is None else SessionRecord(
                owner=self.member, content_type=p.change.content_type,
                created=p.prior.created if p.prior else now, updated=now,
                data=p.change.data, traceparent=traceparent) for p in plans]
            by_plan = {id(p): r for p, r in zip(plans, records, strict=True)}
            revision = 0
            if sent:
                writes = [TxnWrite(p.key, p.expected, None if (r := by_plan[id(p)]) is None
                                   else r.encode()) for p in sent]
                try:
                    result = await self.store.transact(writes)
                except StoreUnavailable as exc:
                    self.metrics.transactions.labels("unavailable").inc()
                    raise Unavailable("etcd unavailable, transaction not acknowledged: "
                                      f"{exc}") from None
                if not result.ok:
                    failed = [i for i, (p, now_at) in enumerate(zip(sent, result.current,
                                                                     strict=True))
                              if now_at.revision != p.expected]
                    refused = await self._judge(sent, failed, result.current)
                    if refused:
                        index = {id(p): i for i, p in enumerate(plans)}
                        return self._aborted({index[id(sent[i])]: e for i, e in refused.items()})
                    continue
                revision = result.revision
            return self._committed(plans, records, revision)
        index = {id(p): i for i, p in enumerate(plans)}
        for i in failed:
            self.metrics.write(sent[i].change.op, "conflict").inc()
        return self._aborted({index[id(sent[i])]: Conflict(
            f"session {sent[i].change.session_id!r} kept changing under concurrent "
            "writers; read it and try again") for i in failed})

    async def _judge(self, sent: list[_Planned], failed: list[int],
                     current: Sequence[KeyState]) -> dict[int, SessionError]:
        """The failures among ``failed`` operations (their compares failed), by index;
        the others get the revision to compare next time (the transaction is sent
        again). Whether a session moved to another member takes its record, read now
        (the failure branch reads revisions only)."""
        wanted = [i for i in failed if current[i].revision
                  and sent[i].mode in ("owner", "blind")]
        try:
            fetched = dict(zip(wanted, await asyncio.gather(
                *(self.store.fetch(sent[i].key) for i in wanted)), strict=True))
        except StoreUnavailable as exc:
            self.metrics.transactions.labels("unavailable").inc()
            raise Unavailable(f"etcd unavailable, transaction not acknowledged: {exc}") \
                from None
        refused: dict[int, SessionError] = {}
        for i in failed:
            plan = sent[i]
            session_id = plan.change.session_id
            state = fetched.get(i, current[i])
            record = (self._decode(session_id, state.revision, state.value, "transaction")
                      if state.value else None)
            refusal = self._refusal(plan.change.op, session_id, plan.mode,
                                    plan.change.if_match, plan.expected, state, record)
            if refusal is not None:
                refused[i] = refusal
            else:
                plan.expected, plan.prior = state.revision, record
        return refused

    def _local_precondition(self, change: Change, local: _Local) -> None:
        """If-Match and create-only against a session kept only here (``L<n>``)."""
        current = f"L{local.version}"
        if change.create_only:
            raise PreconditionFailed(f"session {change.session_id!r} exists ({current})")
        if change.if_match is not None:
            tag = parse_etag(change.if_match)
            if tag not in ("*", current):
                raise PreconditionFailed(f"session {change.session_id!r} is at {current}, "
                                         f"not {change.if_match}")

    def _aborted(self, refused: dict[int, SessionError]) -> Transacted:
        self.metrics.transactions.labels(result_name(refused[min(refused)])).inc()
        return Transacted(committed=False, errors=refused)

    def _committed(self, plans: list[_Planned], records: list[SessionRecord | None],
                   revision: int) -> Transacted:
        stored: list[Stored | None] = []
        for plan, record in zip(plans, records, strict=True):
            session_id = plan.change.session_id
            if plan.local:
                self._local.pop(session_id, None)
            if record is None:
                self.metrics.write("delete", "ok").inc()
                if not plan.local:
                    self.cache.write_through(session_id, revision, None)
                    self._observed.pop(session_id, None)
                stored.append(None)
            else:
                stored.append(self._acknowledged(
                    "put", session_id, WriteResult(True, revision), record,
                    plan.prior is None if plan.local else plan.expected == 0, plan.prior))
        if any(plan.local for plan in plans):
            self.metrics.local.set(len(self._local))
        self.metrics.transactions.labels("committed").inc()
        return Transacted(committed=True, revision=revision, stored=tuple(stored))

    def _merged(self, session_id: str, record: SessionRecord, patch: Any) -> bytes:
        if not is_json(record.content_type):
            raise Conflict(f"session {session_id!r} holds {record.content_type}, not JSON: "
                           "it cannot be merge-patched")
        try:
            merged = json_merge_patch.merge(json.loads(record.data), patch)
        except ValueError as exc:
            raise Conflict(f"session {session_id!r} holds invalid JSON: {exc}") from None
        data = json.dumps(merged, separators=(",", ":")).encode()
        self._check_size(data)
        return data

    async def _write(self, op: str, session_id: str, if_match: str | None,
                     make: Any, cached_revision: int,
                     prior: SessionRecord | None, *, create_only: bool = False) -> Stored:
        """The compare-and-write loop shared by put, patch and delete."""
        self._first_access.setdefault(session_id, time.time_ns())
        try:
            key = self.key(session_id)
            known = self._known_expectation(op, session_id, if_match, create_only,
                                            cached_revision)
            mode, expected = known if known is not None else await self._expectation(
                op, session_id, key, if_match, create_only, cached_revision)
            return await self._attempts(op, session_id, key, mode, expected, if_match, make,
                                        prior)
        finally:
            self._first_access.pop(session_id, None)

    async def _attempts(self, op: str, session_id: str, key: bytes, mode: str,
                        expected: int, if_match: str | None, make: Any,
                        prior: SessionRecord | None,
                        first: tuple[SessionRecord, WriteResult | BaseException] | None = None
                        ) -> Stored:
        """Write, and again against the key as it is now while the rules allow
        (:meth:`_refusal`). ``first``: the record of a first attempt already sent (by
        :meth:`put_many`) and its answer."""
        for _ in range(_BLIND_RETRIES):
            record: SessionRecord | None
            answer: WriteResult | BaseException | None
            if first is not None:
                record, answer = first
                first = None
                if isinstance(answer, StoreUnavailable) and "lease not found" in str(answer):
                    answer = None  # refused whole for a lost lease: nothing applied, again
            else:
                record, answer = make(prior) if make is not None else None, None
            try:
                if isinstance(answer, BaseException):
                    raise answer
                if answer is not None:
                    result = answer
                elif record is None:
                    result = await self.store.delete(key, expected)
                else:
                    value = record.encode()
                    self.cache.expect(key, session_id, value, record)
                    try:
                        result = await self.store.put(key, value, expected)
                    finally:
                        self.cache.settled(key)
            except StoreUnavailable as exc:
                self.metrics.write(op, "unavailable").inc()
                raise Unavailable(f"etcd unavailable, write not acknowledged: {exc}") from None
            if result.ok:
                return self._acknowledged(op, session_id, result, record, expected == 0, prior)
            current = result.current or KeyState(0)
            current_record = (self._decode(session_id, current.revision, current.value, op)
                              if current.value else None)
            refusal = self._refusal(op, session_id, mode, if_match, expected, current,
                                    current_record)
            if refusal is not None:
                raise refusal
            if op == "patch" and current_record is None:
                if current.revision:
                    raise self._undecodable(session_id, current.revision)
                raise NotFound(f"no session {session_id!r}")
            # New to this member, expired meanwhile, our own unconfirmed write, or an
            # undecodable record (replaced): write against what is there now.
            expected, prior = current.revision, current_record
        self.metrics.write(op, "conflict").inc()
        raise Conflict(f"session {session_id!r} kept changing under concurrent writers; "
                       "read it and try again")

    def _known_expectation(self, op: str, session_id: str, if_match: str | None,
                           create_only: bool, cached_revision: int) -> tuple[str, int] | None:
        """:meth:`_expectation` when it needs no etcd read (most writes), else None."""
        if op == "delete":
            return None
        if create_only:
            return "if-absent", 0
        if if_match is not None:
            tag = parse_etag(if_match)
            return None if tag == "*" else ("if-match", _revision(tag))
        observed = self._observed.get(session_id)
        if observed is not None:
            return "owner", observed[0]
        return "blind", cached_revision

    async def _expectation(self, op: str, session_id: str, key: bytes, if_match: str | None,
                           create_only: bool, cached_revision: int) -> tuple[str, int]:
        """The revision a write compares and why (its mode): ``if-absent`` (create
        only), ``if-exists`` (``If-Match: *``), ``if-match``, ``owner`` (the revision this
        member last observed) or ``blind`` (new to this member: the newest it knows)."""
        observed = self._observed.get(session_id)
        if create_only:
            mode, expected = "if-absent", 0
        elif if_match is not None:
            tag = parse_etag(if_match)
            if tag == "*":  # "exists now": asked of etcd, never of a cache that may lag
                mode, expected = "if-exists", await self._check(key)
                if expected == 0:
                    raise PreconditionFailed(f"session {session_id!r} does not exist",
                                             current=None)
            else:
                mode, expected = "if-match", _revision(tag)
        elif observed is not None:
            mode, expected = "owner", observed[0]
        else:
            mode, expected = "blind", cached_revision
        if op == "delete" and expected == 0 and mode != "if-match":
            expected = await self._check(key)
            if expected == 0:
                raise NotFound(f"no session {session_id!r}")
        return mode, expected

    def _refusal(self, op: str, session_id: str, mode: str, if_match: str | None,
                 expected: int, current: KeyState,
                 current_record: SessionRecord | None) -> SessionError | None:
        """The answer to a write whose compare failed (counted), or None when it may be
        sent again against the key as it is now."""
        if mode == "if-absent":
            self.metrics.write(op, "precondition_failed").inc()
            return PreconditionFailed(f"session {session_id!r} exists (revision "
                                      f"{current.revision})", current=current.revision)
        if mode == "if-match" or (mode == "if-exists" and current.revision == 0):
            self.metrics.write(op, "precondition_failed").inc()
            return PreconditionFailed(
                f"session {session_id!r} is at revision {current.revision or 'none'}, "
                f"not {if_match}", current=current.revision or None)
        if current.revision == 0 and op == "delete":
            self.metrics.write(op, "not_found").inc()
            return NotFound(f"no session {session_id!r}")
        if (mode == "owner" and current_record is not None
                and current_record.owner != self.member):
            self.conflicts += 1
            self.metrics.conflicts.inc()
            self.metrics.write(op, "conflict").inc()
            self.cache.write_through(session_id, current.revision, current_record)
            return Conflict(
                f"session {session_id!r} was written by member {current_record.owner!r} "
                f"(revision {current.revision}) after this member last saw it "
                f"(revision {expected}): ownership lost",
                owner=current_record.owner, revision=current.revision)
        return None

    def _acknowledged(self, op: str, session_id: str, result: WriteResult,
                      record: SessionRecord | None, new_session: bool,
                      prior: SessionRecord | None, *, counted: bool = True) -> Stored:
        """The write is committed: cache, ownership, takeover. ``counted``: count it in
        the metrics here (a bulk save counts its writes at once)."""
        if counted:
            self.metrics.write(op, "ok").inc()
        self.cache.write_through(session_id, result.revision, record)
        if record is None:
            return Stored(session_id=session_id, record=prior or _GONE, etag=str(result.revision))
        self._observe(session_id, result.revision)
        previous_owner = prior.owner if prior is not None else None
        stored = Stored(session_id=session_id, record=record, etag=str(result.revision),
                        new_session=new_session, previous_owner=previous_owner)
        if stored.takeover:
            self.takeovers += 1
            self.metrics.takeovers.inc()
            log.info("took over session %s from member %s", session_id, previous_owner)
            if self.on_takeover is not None:
                assert prior is not None and previous_owner is not None
                self.on_takeover(Takeover(
                    session_id, previous_owner, self.member,
                    self._first_access.get(session_id, time.time_ns()), time.time_ns(),
                    prior.traceparent))
        return stored

    def _decode(self, session_id: str, revision: int, raw: bytes,
                where: str) -> SessionRecord | None:
        """A stored record, or None (counted, logged) when it cannot be decoded."""
        try:
            return SessionRecord.decode(raw)
        except ValueError as exc:
            self.metrics.undecodable.labels(where).inc()
            log.warning("session %s: stored record (revision %d) cannot be decoded: %s",
                        session_id, revision, str(exc)[:300])
            return None

    def _undecodable(self, session_id: str, revision: int) -> Undecodable:
        self.metrics.read("etcd", "undecodable").inc()
        return Undecodable(
            f"session {session_id!r}: the stored record (revision {revision}) cannot be "
            "decoded (written by another program?); PUT without If-Match replaces it, "
            "DELETE removes it", undecodable=True, revision=revision)

    async def _check(self, key: bytes) -> int:
        try:
            return await self.store.check(key)
        except StoreUnavailable as exc:
            raise Unavailable(f"etcd unavailable: {exc}") from None

    def _check_size(self, data: bytes) -> None:
        if len(data) > self.settings.max_bytes:
            raise TooLarge(f"session state is {len(data)} bytes; the limit is "
                           f"{self.settings.max_bytes}", limit=self.settings.max_bytes)

    # -- delayed sync ---------------------------------------------------------------------

    async def _keep_local(self, session_id: str, now: float) -> bool:
        """Young sessions stay here; a session etcd already has is never demoted (asked
        of etcd with a read, since the cache may not have seen a brand-new session)."""
        local = self._local.get(session_id)
        if local is not None:
            return now - local.record.created < self.settings.sync_delay
        if self.cache.get(session_id) is not None or session_id in self._observed:
            return False
        return await self._check(self.key(session_id)) == 0

    def _put_local(self, session_id: str, data: bytes, content_type: str,
                   if_match: str | None, now: float, traceparent: str | None) -> Stored:
        local = self._local.get(session_id)
        if if_match is not None:
            tag = parse_etag(if_match)
            current = f"L{local.version}" if local else None
            if not (tag == "*" and local) and tag != current:
                raise PreconditionFailed(f"session {session_id!r} is at "
                                         f"{current or 'nothing'}, not {if_match}")
        self._local_versions += 1
        record = SessionRecord(owner=self.member, content_type=content_type,
                               created=local.record.created if local else now, updated=now,
                               data=data, traceparent=traceparent)
        self._local[session_id] = _Local(record, self._local_versions)
        self.metrics.write("put", "local").inc()
        self.metrics.local.set(len(self._local))
        return Stored(session_id=session_id, record=record, etag=f"L{self._local_versions}",
                      new_session=local is None, source="local")

    async def flush_due(self) -> int:
        """Replicate local sessions that reached ``sync_delay``; returns how many."""
        now = time.time()
        due = [s for s, local in self._local.items()
               if now - local.record.created >= self.settings.sync_delay]
        flushed = 0
        for session_id in due:
            async with self._exclusive(session_id):
                local = self._local.get(session_id)
                if local is None:
                    continue
                record = local.record
                try:
                    await self._write("put", session_id, None, lambda _p, r=record: r, 0, None)
                except SessionError as exc:
                    log.warning("delayed sync of session %s failed: %s", session_id, exc)
                    continue
                del self._local[session_id]
                flushed += 1
        self.metrics.local.set(len(self._local))
        return flushed

    @property
    def local_sessions(self) -> int:
        return len(self._local)


def _answer(outcome: Stored | BaseException) -> Stored | SessionError:
    if isinstance(outcome, Stored | SessionError):
        return outcome
    raise outcome


def result_name(exc: SessionError) -> str:
    """The metrics' name of a failure (``result`` label)."""
    for cls, name in ((PreconditionFailed, "precondition_failed"), (Conflict, "conflict"),
                      (NotFound, "not_found"), (Unavailable, "unavailable"),
                      (TooLarge, "too_large"), (BadRequest, "bad_request")):
        if isinstance(exc, cls):
            return name
    return "failed"


_GONE = SessionRecord(owner="", content_type="", created=0.0, updated=0.0, data=b"")


def _revision(tag: str) -> int:
    try:
        revision = int(tag)
    except ValueError:
        raise BadRequest(f"If-Match must carry an etcd revision such as \"42\", got {tag[:80]!r}") \
            from None
    if revision <= 0:
        raise BadRequest(f"If-Match revision must be positive, got {tag[:40]}")
    if revision >= 1 << 63:  # etcd revisions are int64: compared, it would not encode
        raise BadRequest(f"If-Match revision {tag[:40]} is beyond etcd's revisions")
    return revision
