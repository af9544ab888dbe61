"""A watch-fed copy of one cluster's sessions, revision-aware.

A full read (paged, all pages at one revision) then a watch from the next revision.
After a lost connection or etcd member the watch resumes from the last applied
revision; after a compaction (the revision is gone) everything is read again, and so
after etcd's history was replaced (restored from a backup, or another cluster): then
nothing cached is kept, since revisions now name other writes. Whether it was replaced
is :class:`~.history.History`'s to say, from every answer etcd gives this sidecar about
its sessions, watch or not (the session store's too): :meth:`SessionCache.forget` is
what any of them then does to the cache, and a watch under way reads everything again.
An
update is applied only if it is newer than what the cache holds for that key, so
nothing is applied twice or out of order, whatever mix of watch events, resyncs and
the sidecar's own acknowledged writes arrives first.

The member's own writes come back through the watch too, usually before etcd's answer
to the write: the sidecar says what it is writing (:meth:`SessionCache.expect`), and an
event carrying exactly those bytes takes the record already built instead of decoding
it again.

Resumable streams' records (:data:`~.record.STREAM_RECORDS`) are the exception: another
member's are neither decoded nor held. Each is written again with every message of its
stream, and a member reads one only when it takes the stream over, asking etcd then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import aetcd
from aetcd import rpc
from aetcd.exceptions import RevisionCompactedError

from meshxl import etcd

from .history import History, Rewound
from .record import STREAM_RECORDS, SessionRecord, storable_session_id

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Entry:
    revision: int
    record: SessionRecord


QUIET_PROBE = 1.0
"""Seconds a session watch may bring nothing before etcd is asked whether it answers."""
PROBE_TIMEOUT = 2.0
"""How long that question may take before the watch's etcd counts as not answering."""


class SessionCache:
    """Sessions under ``prefix`` by id; ``applied`` is the last revision fully applied."""

    def __init__(self, client: aetcd.Client, prefix: str, *, page_size: int = 2000,
                 on_lag: Callable[[float], None] | None = None,
                 on_undecodable: Callable[[], None] | None = None,
                 on_rewind: Callable[[], None] | None = None,
                 history: History | None = None):
        self._client = client
        self.history = history if history is not None else History()
        """etcd's history as this sidecar saw it (shared with the session store)."""
        self.history.listen(self.forget)
        self._prefix = prefix.encode()
        self._streams = self._prefix + STREAM_RECORDS.encode()
        """Keys of streams' records: another member's are not kept (:meth:`_apply`)."""
        self._page_size = page_size
        self._on_lag = on_lag
        self._on_rewind = on_rewind
        """Called when etcd's history was replaced: what was observed of it is void."""
        self.rewinds = 0
        self.replaced: tuple[int, int] | None = None
        """(low, high): revisions handed out from a history etcd no longer has (it went
        back to ``low``, or its cluster was replaced), which an ETag must not name."""
        self.entries: dict[str, Entry] = {}
        self.applied = 0
        self.synced = asyncio.Event()
        """Set after the first full read; cleared while a full re-read is needed."""
        self.resync_needed = asyncio.Event()
        """Set when ``synced`` is cleared (a compaction forced a full re-read)."""
        self.down_since: float | None = None
        """``time.monotonic()`` since when the watch fails to reach etcd, or a quiet
        watch's etcd does not answer (None: it reads and follows, or has not failed)."""
        self.full_syncs = 0
        self.watch_starts = 0
        self.last_full_sync: float | None = None
        self.last_error: str | None = None
        self.errors = 0
        self.bad_records = 0
        """Undecodable records met (a count of events)."""
        self.undecodable: dict[str, int] = {}
        """Session keys whose current record cannot be decoded -> its revision."""
        self._on_undecodable = on_undecodable
        self.last_lag: float | None = None
        self._expected: dict[bytes, tuple[bytes, SessionRecord, str]] = {}
        """Writes of this member under way: key -> (stored bytes, record, session)."""
        self._running = False
        """:meth:`run` follows etcd (a watch-fed cache)."""
        self._need_full = True
        self._asking: asyncio.Task[None] | None = None
        """:meth:`ask_if_quiet`'s question under way."""
        self._following: asyncio.Task[None] | None = None
        """The attempt of :meth:`run` under way, which a rewind found elsewhere ends."""
        self.on_seen: Callable[[str, Entry], None] | None = None
        """Called with each record of another writer the cache applies from etcd (a
        watch event, or a full read): delayed sync gives up a session kept on this
        member that another member wrote since (:meth:`.delayed.LocalSessions.seen`)."""

    # -- reading ---------------------------------------------------------------------------

    def get(self, session_id: str) -> Entry | None:
        return self.entries.get(session_id)

    def __len__(self) -> int:
        return len(self.entries)

    def owned_by(self, member: str) -> int:
        return sum(1 for e in self.entries.values() if e.record.owner == member)

    def ids(self) -> Iterator[str]:
        return iter(self.entries)

    def prune_expired(self, horizon: float) -> int:
        """Drop sessions last written before ``horizon`` (wall clock): their lease has
        ended in etcd. For a cache without a watch, which hears of no expiry; reads
        prove every entry against etcd anyway, so an early drop costs one fetch."""
        stale = [s for s, e in self.entries.items() if e.record.updated < horizon]
        for session_id in stale:
            del self.entries[session_id]
        return len(stale)

    # -- the sidecar's own writes ----------------------------------------------------------

    def expect(self, key: bytes, session_id: str, value: bytes, record: SessionRecord) -> None:
        """This member is writing ``value`` (``record`` encoded) at ``key``: if the watch
        brings it, the record is taken as it is. One write per session at a time (the
        session's lock), so one entry each; :meth:`settled` removes it."""
        self._expected[key] = (value, record, session_id)

    def settled(self, key: bytes) -> None:
        self._expected.pop(key, None)

    def write_through(self, session_id: str, revision: int, record: SessionRecord | None) -> None:
        """Apply an acknowledged write at once (None: a delete), unless the watch
        already went past it: then the watch's newer view stands."""
        if revision <= self.applied:
            return
        entry = self.entries.get(session_id)
        if entry is not None and entry.revision >= revision:
            return
        if record is None:
            self.entries.pop(session_id, None)
        else:
            self.entries[session_id] = Entry(revision, record)

    # -- a replaced history -----------------------------------------------------------

    def forget(self, exc: Rewound) -> None:
        """etcd's history was replaced (:class:`~.history.History` found it, on any
        path): nothing kept from it is served, no ETag naming one of its revisions is
        compared (:meth:`replaced_revision`), what the member observed of each session
        is void (``on_rewind``), and a watch under way reads everything again."""
        self.rewinds += 1
        log.error("session cache: %s (etcd restored from a backup, or replaced): "
                  "dropping every cached session%s", exc,
                  " and reading everything" if self._running else "")
        self.entries = {}  # revisions of the old history name other writes now
        self.undecodable = {}
        low = 0 if exc.cluster else exc.now
        high = max(exc.applied, self.replaced[1] if self.replaced else 0)
        self.replaced = (min(low, self.replaced[0]) if self.replaced else low, high)
        self.applied = 0
        if self._on_rewind is not None:
            self._on_rewind()
        if self._running:
            self._need_full = True
            self.synced.clear()
            self.resync_needed.set()
            following = self._following
            if following is not None and following is not asyncio.current_task():
                following.cancel()  # :meth:`run` takes it up: a full read

    # -- the watch loop -------------------------------------------------------------------

    async def run(self) -> None:
        """Read everything, then follow the watch, for good (cancel to stop): each
        attempt in a task of its own, which a rewind found elsewhere cancels
        (:meth:`forget`) to read everything again."""
        backoff = 0.05
        self._need_full = True
        self._running = True
        try:
            while True:
                attempt = asyncio.get_running_loop().create_task(self._follow())
                self._following = attempt
                try:
                    await asyncio.wait([attempt])
                finally:
                    self._following = None
                    if not attempt.done():
                        attempt.cancel()
                        with contextlib.suppress(BaseException):
                            await attempt
                if attempt.cancelled():  # :meth:`forget`'s: everything again, at once
                    continue
                exc = attempt.exception()
                if isinstance(exc, Rewound):  # :meth:`forget` was told
                    continue
                if isinstance(exc, RevisionCompactedError):
                    log.warning("session watch: revision %d compacted (%s); reading "
                                "everything", self.applied + 1, exc)
                    self._need_full = True
                    self.synced.clear()
                    self.resync_needed.set()
                    backoff = 0.05
                    continue
                if exc is None or not isinstance(exc, Exception):
                    raise exc or ConnectionError("session watch ended")
                # connection lost, etcd member gone: resume
                self.errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                if self.down_since is None:
                    self.down_since = time.monotonic()
                log.warning("session watch interrupted (%s); resuming from revision %d",
                            self.last_error, self.applied + 1)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
        finally:
            self._running = False

    async def _follow(self) -> None:
        """One attempt: a full read if one is due, then the watch (until it fails)."""
        if self._need_full:
            await self._full_sync()
            self._need_full = False
        await self._watch()

    async def _full_sync(self) -> None:
        """Read every session at one revision, page by page.

        etcd pages by count, not bytes: a page too large for one gRPC message is read
        again in smaller pages (down to one session, which always fits).
        """
        end = _prefix_end(self._prefix)
        entries: dict[str, Entry] = {}
        self.undecodable = {}  # a full read finds them all again
        key, revision, page = self._prefix, 0, self._page_size
        history = self.history
        while True:
            request = rpc.RangeRequest(key=key, range_end=end, limit=page, revision=revision)
            floor = history.floor()
            try:
                response = await self._client.kvstub.Range(
                    request, timeout=30, metadata=self._client.metadata)
            except rpc.AioRpcError as exc:
                if exc.code() == rpc.StatusCode.OUT_OF_RANGE:  # our revision got compacted
                    raise RevisionCompactedError(revision) from None
                if exc.code() == rpc.StatusCode.RESOURCE_EXHAUSTED and page > 1:
                    page = max(1, page // 8)
                    log.info("session page too large for one message; reading %d at a time",
                             page)
                    continue
                raise
            rewound = history.answered(response.header, floor)
            if rewound is not None:
                raise rewound
            if revision == 0:
                revision = response.header.revision
            for kv in response.kvs:
                if kv.key.startswith(self._streams):  # read when taken over (_apply)
                    continue
                session_id = self._session_id(kv.key)
                record = self._decode(session_id, kv.key, kv.value, kv.mod_revision)
                if record is not None and session_id is not None:
                    entries[session_id] = Entry(kv.mod_revision, record)
            if not response.more or not response.kvs:
                break
            key = response.kvs[-1].key + b"\0"
        # Own writes newer than the read stay; the watch from revision + 1 confirms them.
        for session_id, entry in self.entries.items():
            if entry.revision > revision and entry.revision > entries.get(
                    session_id, Entry(0, entry.record)).revision:
                entries[session_id] = entry
        self.entries = entries
        self.applied = revision
        self.full_syncs += 1
        seen = self.on_seen
        if seen is not None:
            for session_id, entry in list(entries.items()):
                seen(session_id, entry)
        self.last_full_sync = time.time()
        self.down_since = None
        self.synced.set()
        log.info("session cache: %d sessions at revision %d", len(entries), revision)

    async def _watch(self) -> None:
        start = self.applied + 1
        self.watch_starts += 1
        if self.watch_starts > self.full_syncs:
            # etcd watches a future revision without complaint: a cluster restored below
            # it would never send what it writes until it got there.
            rewound = await self.ask_revision()
            self.down_since = None  # etcd answers (the watch may bring no event for long)
            if rewound is not None:
                raise rewound
            log.info("session watch resumed from revision %d", start)
        apply = self._apply
        watched = self.history.watched
        prober = asyncio.get_running_loop().create_task(self._probe_while_quiet())
        try:
            async for response in etcd.watch_responses(self._client, self._prefix,
                                                       _prefix_end(self._prefix), start):
                self.down_since = None  # etcd answers this watch
                for event in response.events:
                    apply(event)
                watched(response.header.revision)
        finally:
            prober.cancel()
        raise ConnectionError("session watch ended")

    async def _probe_while_quiet(self) -> None:
        """While the watch applies nothing for :data:`QUIET_PROBE` seconds, ask etcd
        whether it answers (one key, linearizable). A member that went silent (a paused
        or hung process, a partition whose packets the kernel still acknowledges) ends
        no stream: gRPC's keepalive does not notice it on one endpoint, and without
        this the shard would count as reachable while every request to it waits for
        its deadline. Nothing on the watch's own path: a tick that finds ``applied``
        moved asks nothing."""
        request = rpc.RangeRequest(key=self._prefix, keys_only=True, limit=1)
        seen = self.applied
        while True:
            await asyncio.sleep(QUIET_PROBE)
            if self.applied != seen:
                seen = self.applied
                continue
            asked = time.monotonic()
            floor = self.history.floor()
            try:
                answer = await self._client.kvstub.Range(request, timeout=PROBE_TIMEOUT,
                                                         metadata=self._client.metadata)
            except Exception as exc:
                if self.down_since is None:
                    self.down_since = asked
                    log.warning("session watch: etcd does not answer (%s: %s)",
                                type(exc).__name__, str(exc)[:200])
                self.last_error = f"{type(exc).__name__}: {str(exc)[:200]}"
            else:
                if self.down_since is not None:
                    log.info("session watch: etcd answers again")
                self.down_since = None
                if self.history.answered(answer.header, floor) is not None:
                    return  # :meth:`forget` ends the watch

    def replaced_revision(self, revision: int) -> bool:
        """Whether ``revision`` was handed out from a history etcd no longer has: an
        ETag naming it is refused (412) rather than compared, since etcd may give that
        revision to another write."""
        replaced = self.replaced
        return replaced is not None and replaced[0] < revision <= replaced[1]

    async def ask_revision(self, timeout: float = 5.0) -> Rewound | None:
        """Ask etcd for its revision (a count-only range: no data moves), for
        :class:`~.history.History` to compare with what was seen: the rewind it shows
        (:meth:`forget` done), or None."""
        request = rpc.RangeRequest(key=self._prefix, count_only=True)
        floor = self.history.floor()
        response = await self._client.kvstub.Range(request, timeout=timeout,
                                                   metadata=self._client.metadata)
        return self.history.answered(response.header, floor)

    def ask_if_quiet(self) -> None:
        """Without a watch (a cache that holds only what the member uses): ask etcd
        for its revision when nothing has answered for :data:`QUIET_PROBE` seconds, so
        a restore is found within about that long of etcd answering again, as a watch
        finds it when it resumes, not at the next request, by when other writers may
        have moved the revision past everything seen. Its failures are the requests'
        to find (it says nothing)."""
        if self._running or self._asking is not None:
            return
        if time.monotonic() - self.history.answered_at < QUIET_PROBE:
            return

        async def ask() -> None:
            try:
                await self.ask_revision(PROBE_TIMEOUT)
            except Exception as exc:
                log.debug("etcd's revision not read: %s", exc)
            finally:
                self._asking = None

        self._asking = asyncio.get_running_loop().create_task(ask())

    def _apply(self, event: rpc.Event) -> None:
        """One event of the watch (etcd's ``mvccpb.Event``: type 0 put, 1 delete)."""
        kv = event.kv
        revision = kv.mod_revision
        if revision < self.applied:  # a replay: the cache already went past it
            return
        own = self._expected.get(kv.key)
        if own is not None and event.type == _PUT and own[0] == kv.value:
            # This member's own write: no decoding, and no replication lag (the lag
            # measured is other members' writes reaching this one).
            own_id = own[2]
            known = self.entries.get(own_id)
            if known is None or known.revision < revision:
                self.entries[own_id] = Entry(revision, own[1])
                self.undecodable.pop(own_id, None)
            if revision > self.applied:
                self.applied = revision
            return
        if kv.key.startswith(self._streams):
            self._drop_stream(kv.key, revision)
            return
        session_id = self._session_id(kv.key)
        if session_id is None:
            self._note_bad(kv.key, "not a session id", revision)
            self.applied = max(self.applied, revision)
            return
        entry = self.entries.get(session_id)
        if event.type == _PUT:
            if entry is None or entry.revision < revision:
                record = self._decode(session_id, kv.key, kv.value, revision)
                if record is None:  # what was cached is not the session any more
                    self.entries.pop(session_id, None)
                else:
                    self.entries[session_id] = added = Entry(revision, record)
                    if self.on_seen is not None:
                        self.on_seen(session_id, added)
                    lag = time.time() - record.updated
                    self.last_lag = lag
                    if self._on_lag is not None:
                        self._on_lag(lag)
        else:
            self.undecodable.pop(session_id, None)
            if entry is not None and entry.revision < revision:
                del self.entries[session_id]
        self.applied = max(self.applied, revision)

    def _drop_stream(self, key: bytes, revision: int) -> None:
        """Another member's write (or the expiry) of a stream's record: not kept. It is
        written again with every message of the stream, and only a member taking the
        stream over reads it, asking etcd (:data:`~.record.STREAM_RECORDS`); what this
        member holds of it is older now."""
        entry = self.entries.get(session_id := key[len(self._prefix):].decode(errors="replace"))
        if entry is not None and entry.revision < revision:
            del self.entries[session_id]
        self.applied = max(self.applied, revision)

    def _session_id(self, key: bytes) -> str | None:
        try:
            session_id = key[len(self._prefix):].decode()
        except UnicodeDecodeError:
            return None
        return session_id if storable_session_id(session_id) else None

    def _decode(self, session_id: str | None, key: bytes, value: bytes,
                revision: int) -> SessionRecord | None:
        if session_id is None:
            self._note_bad(key, "not a session id", revision)
            return None
        try:
            record = SessionRecord.decode(value)
        except ValueError as exc:
            self._note_bad(key, str(exc), revision, session_id)
            return None
        self.undecodable.pop(session_id, None)
        return record

    def _note_bad(self, key: bytes, why: str, revision: int,
                  session_id: str | None = None) -> None:
        """Count an undecodable record (kept out of the cache, reported in status)."""
        self.bad_records += 1
        if session_id is not None:
            self.undecodable[session_id] = revision
        if self._on_undecodable is not None:
            self._on_undecodable()
        log.warning("ignoring %s (revision %d): %s", key[:300].decode(errors="replace"),
                    revision, why[:300])


_PUT = rpc.Event.PUT


def _prefix_end(prefix: bytes) -> bytes:
    """The smallest key after every key starting with ``prefix``."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"
