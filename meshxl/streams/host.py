"""The streams one application process serves: opened, taken over, committed together.

A :class:`StreamHost` holds the process's live streams (:class:`.server.ServerStream`)
and writes their records through the statesync sidecar (``meshxl.client``): one bulk
save carries the records of many streams, each item compared with ``If-Match`` against
the revision its stream last wrote and committed at once (``X-Meshxl-Sync: now``), so
the cost of a message is a share of one etcd transaction. A stream has one write in
flight at a time; what it sends meanwhile waits for the next.

Taking a stream over: a connection that resumes stream T on a process where T is not
live reads T's record, checks it belongs to the connection's session, raises its epoch
and writes it (``If-Match``): from then on a write by whoever served T before is refused
(412), and that server stops. Then the handler runs again from the committed position
and the client gets what it has not received. A resume on the process where T is live
goes through the same write, so a process that lost T to another meanwhile finds out.
Takeovers asked for while others are under way go together (one bulk read, one bulk
save of at most ``max_batch``): when a member dies or is drained, its streams all
resume on another at once, a thousand reads and writes of their own otherwise.

A write refused with 412 means the stream was taken over: it stops here (the client
was moved to its new server by the mesh, or will be). A sidecar that does not answer
is tried again with backoff; after ``commit_timeout`` without a commit the stream
stops here with :data:`~.protocol.TRY_AGAIN`, so its client resumes, here or, if this
member was cut off, elsewhere.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from meshxl.client import AsyncClient, Session, SidecarError, Upsert, Written
from meshxl.client.errors import (
    SidecarNotFound,
    SidecarPreconditionFailed,
    WriteUncertain,
)
from meshxl.errors import Conflict

from .protocol import (
    FORBIDDEN,
    MALFORMED,
    MOVED,
    TOO_FAR_BEHIND,
    TOO_MANY_STREAMS,
    TRY_AGAIN,
    UNKNOWN,
    Limits,
    Payload,
    Refusal,
    new_token,
)
from .record import RECORD_TYPE, StreamRecord, record_id
from .server import Conduit, Handler, ServerStream

log = logging.getLogger(__name__)

__all__ = ["Refused", "StreamHost"]

MAX_BATCH = 64
"""Stream records in one bulk save."""
MAX_INFLIGHT = 2
"""Bulk saves in flight at once (the next one fills while one commits)."""
MAX_TAKEOVERS = 4
"""Takeover batches (a bulk read, then a bulk save) in flight at once."""


class Refused(Conflict):
    """A stream cannot be opened or resumed here: ``refusal`` says why, as the
    transport will (close code, status)."""

    def __init__(self, refusal: Refusal, message: str = ""):
        super().__init__(message or refusal.meaning)
        self.refusal = refusal


class StreamHost:
    """This process's streams (the module docstring). ``sessions``: the sidecar's
    client; ``commit_timeout``: how long a stream may go without a commit while the
    sidecar does not answer before it stops here."""

    def __init__(self, sessions: AsyncClient, limits: Limits | None = None, *,
                 commit_timeout: float = 5.0, max_batch: int = MAX_BATCH,
                 max_inflight: int = MAX_INFLIGHT, max_takeovers: int = MAX_TAKEOVERS):
        self.sessions = sessions
        self.limits = limits or Limits()
        self.commit_timeout = commit_timeout
        self.max_batch = max_batch
        self.max_inflight = max_inflight
        self.max_takeovers = max_takeovers
        self.live: dict[str, ServerStream] = {}
        self._of_session: dict[str, set[str]] = {}
        self._dirty: collections.OrderedDict[str, ServerStream] = collections.OrderedDict()
        """Streams that want a commit and have none in flight, oldest first."""
        self._inflight = 0
        self._failing_since: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._rng = random.Random()
        self._takeovers: list[_Takeover] = []
        self._taking: set[asyncio.Task[None]] = set()
        self._tokens_taking: set[str] = set()
        """Streams in a takeover batch under way (one batch at a time each)."""
        self.commits = 0
        """Bulk saves sent (a statistic)."""
        self._moving_since: float | None = None
        self._move: asyncio.TimerHandle | None = None

    # -- opening and taking over --------------------------------------------------------

    async def open(self, session: str, kind: str, handler: Handler, conduit: Conduit,
                   request: Any = None) -> ServerStream:
        """A new stream of ``session``, its record committed before it is returned (the
        transport then tells the client its token)."""
        open_here = self._of_session.get(session, set())
        if len(open_here) >= self.limits.max_streams_per_session:
            raise Refused(TOO_MANY_STREAMS, f"session {session[:40]!r} has "
                          f"{len(open_here)} open streams here; the limit is "
                          f"{self.limits.max_streams_per_session}")
        token = new_token()
        record = StreamRecord(session=session, kind=kind, created=time.time())
        try:
            written = await self.sessions.put(record_id(token), _state_of(record),
                                              content_type=RECORD_TYPE, create_only=True,
                                              sync_now=True)
        except SidecarError as exc:
            raise Refused(TRY_AGAIN, f"the stream's record could not be committed: "
                          f"{exc}") from None
        stream = self._live(token, record, written.etag, resumed=False, request=request)
        stream.attach(conduit, 0)
        stream.start(handler)
        return stream

    async def resume(self, session: str, kind: str, token: str, recv: int, handler: Handler,
                     conduit: Conduit, request: Any = None
                     ) -> tuple[ServerStream, list[tuple[int, Payload]]]:
        """Stream ``token`` carried on over ``conduit``: taken over if need be (the
        module docstring); with the committed messages after ``recv`` to replay."""
        live = self.live.get(token)
        if live is not None:
            if live.session != session:
                raise Refused(FORBIDDEN)
            if await self._claim(live):
                _check_recv(live.record, recv)
                return live, live.attach(conduit, recv)
        record, etag = await self._take_over(_Takeover(token, session, kind, recv))
        live = self.live.get(token)
        if live is not None:  # resumed here twice at once: the later connection carries it
            live.stop(MOVED)
        stream = self._live(token, record, etag, resumed=True, request=request)
        replay = stream.attach(conduit, recv)
        stream.start(handler)
        return stream, replay

    # -- takeovers, in batches ------------------------------------------------------------

    async def _take_over(self, wanted: _Takeover) -> tuple[StreamRecord, str]:
        """The stream's record read and written with a raised epoch (from then on, its
        former server's writes are refused). The takeovers asked for while others are
        under way go together, in one bulk read and one bulk save: when a member dies
        or is drained, all its streams come here at once. Up to ``max_takeovers``
        batches go at a time (one after another, a thousand streams waited for sixteen
        round trips of two requests each); a stream is in one of them at most."""
        wanted.future = asyncio.get_running_loop().create_future()
        self._takeovers.append(wanted)
        self._start_takeovers()
        return await wanted.future

    def _start_takeovers(self) -> None:
        """Another worker while takeovers wait and fewer than ``max_takeovers`` run;
        each takes its batch when it runs, so the takeovers asked for meanwhile (a
        storm's, in the same turn of the loop) go together."""
        if self._takeovers and len(self._taking) < self.max_takeovers:
            task = asyncio.get_running_loop().create_task(self._take_overs())
            self._taking.add(task)
            task.add_done_callback(self._taking.discard)

    def _next_batch(self) -> list[_Takeover]:
        batch: list[_Takeover] = []
        later: list[_Takeover] = []
        tokens = self._tokens_taking
        for wanted in self._takeovers:  # a stream in one batch at a time (one key per txn)
            if len(batch) < self.max_batch and wanted.token not in tokens:
                tokens.add(wanted.token)
                batch.append(wanted)
            else:
                later.append(wanted)
        self._takeovers = later
        return batch

    async def _take_overs(self) -> None:
        while batch := self._next_batch():
            try:
                await self._take_over_batch(batch)
            except asyncio.CancelledError:  # the host closes
                for wanted in batch:
                    _refuse(wanted, Refused(TRY_AGAIN, "this server is closing"))
                raise
            except Exception as exc:  # a bug: every takeover of the batch refused
                log.exception("stream takeovers failed")
                for wanted in batch:
                    _refuse(wanted, Refused(TRY_AGAIN, f"the stream could not be taken "
                                                       f"over: {exc}"))
            finally:
                for wanted in batch:
                    self._tokens_taking.discard(wanted.token)

    async def _take_over_batch(self, batch: list[_Takeover]) -> None:
        try:
            found: Sequence[Session | SidecarError] = await self.sessions.bulk_get(
                [record_id(w.token) for w in batch])
        except SidecarError as exc:
            found = [exc] * len(batch)
        claims: list[tuple[_Takeover, StreamRecord]] = []
        for wanted, item in zip(batch, found, strict=True):
            try:
                record = _readable(wanted, item)
            except Refused as refused:
                _refuse(wanted, refused)
                continue
            record.epoch += 1
            wanted.etag = item.etag if isinstance(item, Session) else ""
            claims.append((wanted, record))
        if not claims:
            return
        try:
            answers: Sequence[Written | SidecarError] = await self.sessions.bulk_save([
                Upsert(session=record_id(w.token), state=_state_of(record),
                       content_type=RECORD_TYPE, if_match=w.etag, sync_now=True)
                for w, record in claims])
        except SidecarError as exc:
            answers = [exc] * len(claims)
        for (wanted, record), answer in zip(claims, answers, strict=True):
            if isinstance(answer, Written):
                if wanted.future is not None and not wanted.future.done():
                    wanted.future.set_result((record, answer.etag))
            elif isinstance(answer, SidecarPreconditionFailed) and wanted.attempts < 3:
                wanted.attempts += 1  # written meanwhile (its server): read it again
                self._takeovers.append(wanted)
            elif isinstance(answer, SidecarPreconditionFailed):
                _refuse(wanted, Refused(TRY_AGAIN, "the stream kept changing while it "
                                                   "was taken over"))
            else:
                _refuse(wanted, Refused(TRY_AGAIN, f"the stream could not be taken over: "
                                                   f"{answer}"))

    async def _claim(self, stream: ServerStream) -> bool:
        """Write ``stream``'s record with a raised epoch (its pending checkpoints
        with it); False when another server took it over meanwhile (it stops here)."""
        await stream.idle()
        stream.record.epoch += 1
        record, taken = stream.take()
        try:
            written = await self.sessions.put(record_id(stream.token), _state_of(record),
                                              content_type=RECORD_TYPE, if_match=stream.etag,
                                              sync_now=True)
        except (SidecarPreconditionFailed, WriteUncertain):
            stream.put_back(taken)
            stream.stop(MOVED)
            return False
        except SidecarError as exc:
            stream.put_back(taken)
            raise Refused(TRY_AGAIN, f"the stream could not be taken over: {exc}") from None
        await stream.committed(record, written.etag)
        return True

    def _live(self, token: str, record: StreamRecord, etag: str, *, resumed: bool,
              request: Any) -> ServerStream:
        stream = ServerStream(token, record, etag, self.limits, self._mark, self._forget,
                              resumed=resumed, request=request)
        self.live[token] = stream
        self._of_session.setdefault(record.session, set()).add(token)
        return stream

    def _forget(self, stream: ServerStream) -> None:
        if self.live.get(stream.token) is stream:
            del self.live[stream.token]
        tokens = self._of_session.get(stream.session)
        if tokens is not None:
            tokens.discard(stream.token)
            if not tokens:
                del self._of_session[stream.session]
        self._dirty.pop(stream.token, None)

    # -- commits --------------------------------------------------------------------------

    def _mark(self, stream: ServerStream) -> None:
        """``stream`` wants a commit. One whose commit is in flight is left out: the
        commit's end marks it again if it still wants one (:meth:`_commit`), so the
        streams waiting are never walked past (with them in, each mark, one a
        message, walked every stream of the process: 5 % of a WebSocket app's CPU at
        1,000 streams, ``bench/streams.py``)."""
        if stream.stopped is None and not stream.committing \
                and self.live.get(stream.token) is stream:
            self._dirty[stream.token] = stream
            self._kick()

    def _kick(self) -> None:
        while self._dirty and self._inflight < self.max_inflight:
            batch: list[ServerStream] = []
            while self._dirty and len(batch) < self.max_batch:
                _, stream = self._dirty.popitem(last=False)
                if stream.wants_commit and not stream.committing:
                    batch.append(stream)
            if not batch:
                return
            self._inflight += 1
            # Taken now, not when the task runs: a stream marked again meanwhile is
            # then committing, and waits for this write (one write in flight each).
            plans = [(stream, *stream.take()) for stream in batch]
            task = asyncio.get_running_loop().create_task(self._commit(plans))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _commit(self, plans: list[tuple[ServerStream, StreamRecord,
                                              list[tuple[int, Payload]]]]) -> None:
        try:
            answers: Sequence[Written | SidecarError] = await self.sessions.bulk_save([
                Upsert(session=record_id(stream.token), state=_state_of(record),
                       content_type=RECORD_TYPE, if_match=stream.etag, sync_now=True)
                for stream, record, _ in plans])
            self.commits += 1
        except SidecarError as exc:
            answers = [exc] * len(plans)
        except Exception as exc:  # a bug: counted as a failed commit, never lost
            log.exception("stream commit failed")
            answers = [SidecarError(str(exc))] * len(plans)
        finally:
            self._inflight -= 1
        retry = False
        for (stream, record, taken), answer in zip(plans, answers, strict=True):
            if isinstance(answer, Written):
                self._failing_since.pop(stream.token, None)
                await stream.committed(record, answer.etag)
                if stream.wants_commit:
                    self._mark(stream)
                elif stream.finished:
                    self._finished(stream)
            elif isinstance(answer, WriteUncertain):
                await self._settle(stream, record, taken)
            elif isinstance(answer, SidecarPreconditionFailed):
                stream.put_back(taken)
                log.info("stream %s was taken over elsewhere: it stops here",
                         stream.token[:6])
                stream.stop(MOVED)
            else:
                stream.put_back(taken)
                retry |= self._failed(stream, answer)
        if retry:
            await asyncio.sleep(0.02 + self._rng.random() * 0.08)
        self._kick()

    async def _settle(self, stream: ServerStream, record: StreamRecord,
                      taken: list[tuple[int, Payload]]) -> None:
        """A commit sent again after no answer, refused by its own compare: it applied
        if the record now is exactly the one written (same epoch, same position)."""
        try:
            found = await self.sessions.get(record_id(stream.token))
            now = StreamRecord.decode(found.state)
        except (SidecarError, ValueError):
            stream.put_back(taken)
            self._failed(stream, SidecarError("the stream's commit is uncertain"))
            return
        if (now.epoch, now.out, now.consumed, now.done) == \
                (record.epoch, record.out, record.consumed, record.done):
            await stream.committed(record, found.etag)
            self._mark(stream)
        else:
            stream.put_back(taken)
            stream.stop(MOVED)

    def _failed(self, stream: ServerStream, error: Exception) -> bool:
        """A commit the sidecar did not take: again soon, or the stream stops here
        after ``commit_timeout`` of failures. True: try it again."""
        since = self._failing_since.setdefault(stream.token, time.monotonic())
        if time.monotonic() - since > self.commit_timeout:
            log.warning("stream %s: no commit for %.1f s (%s): it stops here",
                        stream.token[:6], self.commit_timeout, error)
            self._failing_since.pop(stream.token, None)
            stream.stop(TRY_AGAIN)
            return False
        self._dirty[stream.token] = stream
        return True

    def _finished(self, stream: ServerStream) -> None:
        """The handler's end is committed: the stream needs this process no more once
        its client has what it sent (the record lives on for its resumes, until its
        TTL)."""
        if stream.conduit is None:
            stream.stop(None)

    # -- the whole process ---------------------------------------------------------------

    def note_moving(self, moving: bool, settle: float = 1.0) -> None:
        """What the sidecar's ``/readyz`` says (``moving``): a planned move away from this
        member (member down, site offline, a degraded judgement, a VS move) hands every
        stream on ``settle`` seconds after it is first seen (by then Envoy sends the
        sessions elsewhere), rather than when Envoy closes the connections at the end
        of the drain window. Once per move: streams resumed here afterwards stay."""
        if not moving:
            self._moving_since = None
            if self._move is not None:
                self._move.cancel()
                self._move = None
            return
        if self._moving_since is not None:
            return
        self._moving_since = time.monotonic()

        def move() -> None:
            self._move = None
            task = asyncio.get_running_loop().create_task(self._moved())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        self._move = asyncio.get_running_loop().call_later(settle, move)

    async def _moved(self) -> None:
        count = await self.move_all()
        if count:
            log.info("a planned move away from this member: %d streams handed on", count)

    async def follow(self, probe: AsyncClient, *, interval: float = 0.25,
                     settle: float = 1.0) -> None:
        """Ask the sidecar every ``interval`` whether a planned move is under way
        (:meth:`note_moving`); runs until cancelled. An application that polls
        ``/readyz`` already passes what it reads to :meth:`note_moving` instead."""
        while True:
            try:
                self.note_moving((await probe.ready()).moving, settle)
            except SidecarError:
                pass
            await asyncio.sleep(interval)

    async def move_all(self, timeout: float = 5.0) -> int:
        """Hand every stream on (a drain, a shutdown): what was checkpointed is
        committed (up to ``timeout``), then each connection is closed with
        :data:`~.protocol.MOVED` so its client resumes where the mesh sends it now.
        How many streams were moved."""
        streams = list(self.live.values())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.gather(*(s.flush() for s in streams), return_exceptions=True)
        for stream in streams:
            stream.stop(MOVED)
        return len(streams)

    async def aclose(self) -> None:
        if self._move is not None:
            self._move.cancel()
        for stream in list(self.live.values()):
            stream.stop(None)
        tasks = [*self._tasks, *self._taking]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for wanted in self._takeovers:
            _refuse(wanted, Refused(TRY_AGAIN, "this server is closing"))


@dataclass(slots=True)
class _Takeover:
    """A stream to take over (:meth:`StreamHost._take_over`)."""

    token: str
    session: str
    kind: str
    recv: int
    future: asyncio.Future[tuple[StreamRecord, str]] | None = None
    etag: str = ""
    attempts: int = 0


def _readable(wanted: _Takeover, item: Session | SidecarError) -> StreamRecord:
    """The record ``wanted`` read, if the connection may carry it on (else Refused)."""
    if isinstance(item, SidecarNotFound):
        raise Refused(UNKNOWN)
    if isinstance(item, SidecarError):
        raise Refused(TRY_AGAIN, f"the stream's record could not be read: {item}")
    try:
        record = StreamRecord.decode(item.state)
    except ValueError as exc:
        log.warning("stream %s: its record cannot be read: %s", wanted.token[:6], exc)
        raise Refused(UNKNOWN, "the stream's record is damaged") from None
    if record.session != wanted.session:
        raise Refused(FORBIDDEN)
    if record.kind != wanted.kind:
        raise Refused(MALFORMED, f"stream {wanted.token[:6]}... is a {record.kind} stream, "
                      f"not {wanted.kind}")
    _check_recv(record, wanted.recv)
    return record


def _refuse(wanted: _Takeover, refused: Refused) -> None:
    if wanted.future is not None and not wanted.future.done():
        wanted.future.set_exception(refused)


def _check_recv(record: StreamRecord, recv: int) -> None:
    if recv > record.out:
        raise Refused(MALFORMED, f"the client says it received message {recv}; the "
                      f"stream sent {record.out}")
    if recv < record.acked:
        raise Refused(TOO_FAR_BEHIND, f"the client resumes after message {recv}, but "
                      f"acknowledged {record.acked} before: those were dropped")


def _state_of(record: StreamRecord) -> bytes:
    """The record as the session client writes it: its JSON text, stored as the bytes it
    is (:data:`~.record.RECORD_TYPE`)."""
    return record.encode()
