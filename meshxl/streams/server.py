"""A resumable stream as its server handler sees it, over whichever connection carries it.

The handler is a coroutine of one argument, the :class:`ServerStream`::

    async def chat(stream: ServerStream) -> None:
        async for message in stream:          # each client message once, in order
            await stream.send({"echo": message})

It runs on the member serving the stream; when another member takes the stream over
(its member died, was drained, or was cut off), the handler runs there again, from the
stream's committed position: ``stream.resumed`` is true, ``stream.state`` is the state
committed last, and iteration goes on with the first client message not consumed.

Exactly once, between the client library and the handler: a client message counts as
consumed when the handler asks for the next one (or returns), and what the handler sent
while handling it is committed together with that consumption, in one write of the
stream's record, before any of it reaches the client. A member that dies before that
commit leaves nothing behind: the next member hands the same message to the handler,
which sends again what it had sent. A handler that sends for a long time while handling
one message (tokens of a generated answer) commits as it goes by passing ``state``: a
send with a state is a checkpoint (what was sent so far, and the state to resume from),
and after a takeover the handler gets the same message again with that state. A send
while no message is being handled (a server that pushes: prices, a feed) is committed
at once. Side effects outside the stream are the application's: a handler restarted on
another member may repeat them (``stream.seq``, the number of the message being
handled, makes an idempotency key).

Sends are committed in batches with other streams' (:mod:`.host`); ``send`` returns
once the message is queued, and waits while the client has not acknowledged
``max_unacked_bytes``; ``flush`` waits until everything sent is committed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

from meshxl.errors import Unavailable

from .protocol import (
    ACK,
    END,
    FAILED,
    MESSAGE,
    TOO_FAR_BEHIND,
    Frame,
    Limits,
    Payload,
    ProtocolError,
    Refusal,
    compact_json,
    encoded_size,
    json_text,
)
from .record import StateText, StreamRecord

log = logging.getLogger(__name__)

__all__ = ["Conduit", "Handler", "ServerStream", "StreamClosed"]

_NO_STATE: Any = object()
NO_TEXTS: Mapping[int, str] = {}


class StreamClosed(Unavailable):
    """The stream stopped on this member: taken over elsewhere, given up, or closed (an
    :class:`~meshxl.errors.Unavailable` here; it goes on where it was taken over)."""


class Conduit(Protocol):
    """One connection carrying a stream, as a transport adapter provides it. Each
    method sends at once, or fails (the adapter then detaches it)."""

    async def send_messages(self, messages: Sequence[tuple[int, Payload]],
                            ack: int | None = None,
                            texts: Mapping[int, str] = NO_TEXTS) -> None:
        """``messages``, then ``ack`` (what the handler consumed, when it changed): in
        one frame or write where the transport can. ``texts``: JSON messages' text by
        seq where it was made already (:func:`~.protocol.json_text`)."""

    async def send_ack(self, consumed: int) -> None: ...

    async def send_end(self, last: int, failure: Refusal | None) -> None: ...

    async def close(self, refusal: Refusal | None) -> None: ...


Handler = Callable[["ServerStream"], Awaitable[None]]


class ServerStream:
    """One stream served here (see the module docstring). Made by :class:`.host.StreamHost`."""

    def __init__(self, token: str, record: StreamRecord, etag: str | None, limits: Limits,
                 dirty: Callable[[ServerStream], None],
                 on_stop: Callable[[ServerStream], None], *, resumed: bool,
                 request: Any = None):
        self.token = token
        self.session = record.session
        self.kind = record.kind
        self.limits = limits
        self.resumed = resumed
        """Not the first run of the handler for this stream: it goes on from ``state``."""
        self.request = request
        """What the client sent to open it (a gRPC server-streaming call's request)."""
        self.record = record
        """The stream as committed last."""
        self.etag = etag
        self._dirty = dirty
        self._on_stop = on_stop
        self._state: Any = record.state
        self._held: list[tuple[int, Payload]] = []
        self._pending: list[tuple[int, Payload]] = []
        self._pending_consumed = record.consumed
        self._pending_state: Any = record.state
        self._pending_done: tuple[bool, str | None] = (record.done, record.failure)
        self._next = record.out + 1
        self._inbox: collections.deque[tuple[int, Payload]] = collections.deque()
        self._received = record.consumed
        self._early: dict[int, Payload] = {}
        """Client messages that came before the ones they follow (``received``)."""
        self._early_bytes = 0
        self._delivered = record.consumed
        self._processing = False
        self._client_done: int | None = None
        self._client_acked = record.acked
        self._unacked: collections.deque[tuple[int, int]] = collections.deque(
            (seq, encoded_size(payload)) for seq, payload in record.journal)
        self._unacked_bytes = sum(size for _, size in self._unacked)
        self._changed = asyncio.Event()
        self.committing = False
        self.conduit: Conduit | None = None
        self._pushed = record.out
        self._ack_sent = -1
        """The last acknowledgement sent on ``conduit`` (-1: none yet on it)."""
        self._task: asyncio.Task[None] | None = None
        self._detached: asyncio.TimerHandle | None = None
        self.stopped: Refusal | None = None
        self._stopping = False

    # -- what the handler uses --------------------------------------------------------------

    @property
    def state(self) -> Any:
        """The handler's state (a JSON value): committed with the next checkpoint, and
        what a handler that resumes the stream starts from."""
        return self._state

    @state.setter
    def state(self, value: Any) -> None:
        self._state = value

    @property
    def seq(self) -> int:
        """The number of the client message being handled (the last one received)."""
        return self._delivered

    def __aiter__(self) -> ServerStream:
        return self

    async def __anext__(self) -> Payload:
        try:
            return await self.receive()
        except EOFError:
            raise StopAsyncIteration from None

    async def receive(self) -> Payload:
        """The next client message (EOFError once the client closed its side). Asking
        for it consumes the one before (the module docstring)."""
        if self._processing:
            self._checkpoint(self._delivered)
            self._processing = False
        while not self._inbox:
            if self._client_done is not None and self._delivered >= self._client_done:
                raise EOFError("the client closed its side of the stream")
            self._raise_if_stopped()
            self._changed.clear()
            await self._changed.wait()
        seq, payload = self._inbox.popleft()
        self._delivered = seq
        self._processing = True
        return payload

    async def send(self, payload: Payload, *, state: Any = _NO_STATE) -> int:
        """Queue a message for the client (a JSON value, or bytes); its number. With
        ``state``, a checkpoint: the message, what was sent before it and ``state`` are
        committed together (the module docstring). Waits while the client lags by
        ``max_unacked_bytes``; gives the stream up after ``lag_timeout`` of that."""
        if isinstance(payload, bytes | bytearray | memoryview):
            text, size = None, len(payload)
        else:
            text = json_text(payload)
            size = len(text.encode())
        if size > self.limits.max_message_bytes:
            raise ProtocolError(f"a message of {size} bytes; the limit is "
                                f"{self.limits.max_message_bytes}")
        await self._room(size)
        seq = self._next
        self._next += 1
        if text is not None:
            self.record.texts[seq] = text  # shared by the records that follow (take)
        self._unacked.append((seq, size))
        self._unacked_bytes += size
        self._held.append((seq, payload))
        if state is not _NO_STATE:
            self._state = state
            self._checkpoint(self._delivered - 1 if self._processing else self._delivered)
        elif not self._processing:
            self._checkpoint(self._delivered)
        return seq

    async def flush(self) -> None:
        """Until everything checkpointed before this call is committed: every message
        sent, but those sent while handling a client message without a state (they are
        committed when the handler moves on: the module docstring)."""
        target = self._pending[-1][0] if self._pending else self.record.out
        while self.record.out < target:
            self._raise_if_stopped()
            self._changed.clear()
            await self._changed.wait()

    # -- checkpoints and commits (the host drives them) ----------------------------------------

    def _checkpoint(self, consumed: int) -> None:
        self._pending.extend(self._held)
        self._held.clear()
        self._pending_consumed = max(self._pending_consumed, consumed)
        self._pending_state = _snapshot(self._state)
        self._dirty(self)

    @property
    def wants_commit(self) -> bool:
        return bool(self._pending) or self._pending_consumed != self.record.consumed \
            or self._pending_done != (self.record.done, self.record.failure) \
            or self._pending_state != self.record.state \
            or self._client_acked > self.record.acked

    def take(self) -> tuple[StreamRecord, list[tuple[int, Payload]]]:
        """The record to write next and the messages it commits (taken from the pending
        ones: they go back with :meth:`put_back` if the write fails)."""
        taken, self._pending = self._pending, []
        record = StreamRecord(
            session=self.record.session, kind=self.record.kind, epoch=self.record.epoch,
            consumed=self._pending_consumed,
            out=taken[-1][0] if taken else self.record.out, acked=self.record.acked,
            done=self._pending_done[0], failure=self._pending_done[1],
            state=self._pending_state, created=self.record.created,
            journal=[*self.record.journal, *taken], fragments=self.record.fragments,
            texts=self.record.texts)
        record.acknowledge(self._client_acked)
        self.committing = True
        return record, taken

    async def idle(self) -> None:
        """Until no write of this stream is in flight."""
        while self.committing:
            self._changed.clear()
            await self._changed.wait()

    def put_back(self, taken: list[tuple[int, Payload]]) -> None:
        self._pending[:0] = taken
        self.committing = False
        self._changed.set()

    async def committed(self, record: StreamRecord, etag: str) -> None:
        """``record`` is in etcd (at ``etag``): its new messages go to the client."""
        self.record, self.etag = record, etag
        self.committing = False
        self._changed.set()
        conduit = self.conduit
        if conduit is None:
            return
        fresh = [(s, p) for s, p in record.journal if s > self._pushed]
        # A stream that only pushes acknowledges once; one that answers, with its answer.
        ack = record.consumed if record.consumed != self._ack_sent else None
        try:
            if fresh:
                await conduit.send_messages(fresh, ack, record.texts)
                self._pushed = fresh[-1][0]
            elif ack is not None:
                await conduit.send_ack(ack)
            if ack is not None:
                self._ack_sent = ack
            if record.done:
                failure = FAILED if record.failure is not None else None
                await conduit.send_end(record.out, failure)
        except Exception as exc:  # the connection broke: the client resumes
            log.debug("stream %s: the connection broke: %s", self.token[:6], exc)
            self.detach(conduit)

    # -- what the connection brings -----------------------------------------------------------

    def attach(self, conduit: Conduit, recv: int) -> list[tuple[int, Payload]]:
        """Carry the stream over ``conduit`` from now on (a former connection is
        dropped); the committed messages after ``recv`` to replay on it."""
        old, self.conduit = self.conduit, conduit
        if self._detached is not None:
            self._detached.cancel()
            self._detached = None
        if old is not None and old is not conduit:
            asyncio.get_running_loop().create_task(_quietly(old.close(None)))
        self.acked(recv)
        self._pushed = self.record.out
        self._ack_sent = -1
        return self.record.after(recv)

    def detach(self, conduit: Conduit) -> None:
        """``conduit`` broke or closed: the handler goes on for ``detached_timeout`` in
        case the client resumes here, then stops."""
        if self.conduit is not conduit:
            return
        self.conduit = None
        if self.stopped is None and self._detached is None:
            self._detached = asyncio.get_running_loop().call_later(
                self.limits.detached_timeout, self._give_up_detached)

    def _give_up_detached(self) -> None:
        self._detached = None
        if self.conduit is None:
            self.stop(None)

    def received(self, seq: int, payload: Payload, *, ordered: bool = True) -> None:
        """A client message. One already received is ignored (the client sends again
        what was not consumed when it resumes). ``ordered``: the transport keeps the
        client's messages in order (one connection), so one beyond the next is a gap;
        else (each message its own request: SSE's POSTs, which may overtake one another
        when one sent before a resume is delivered after it) one that comes early waits
        here for those before it, up to ``max_unacked_bytes`` of them (what the client
        may have in flight)."""
        if seq <= self._received:
            return
        if seq != self._received + 1:
            if ordered:
                raise ProtocolError(f"client message {seq} after {self._received}: a gap")
            size = encoded_size(payload)
            if seq not in self._early:
                if self._early_bytes + size > self.limits.max_unacked_bytes:
                    raise ProtocolError(f"client message {seq} after {self._received}, "
                                        "with more than max_unacked_bytes early")
                self._early[seq] = payload
                self._early_bytes += size
            return
        self._accept(seq, payload)
        while self._received + 1 in self._early:
            early = self._early.pop(self._received + 1)
            self._early_bytes -= encoded_size(early)
            self._accept(self._received + 1, early)

    def _accept(self, seq: int, payload: Payload) -> None:
        if self._client_done is not None and seq > self._client_done:
            raise ProtocolError(f"client message {seq} after its end ({self._client_done})")
        self._received = seq
        self._inbox.append((seq, payload))
        self._changed.set()

    def client_frame(self, frame: Frame, *, ordered: bool = True) -> None:
        """A client's frame on a connection that carries them (a WebSocket's, an
        upload's): a message (:meth:`received`), an acknowledgement (:meth:`acked`) or
        its end (:meth:`client_ended`); any other is a :class:`ProtocolError`."""
        seq = frame.seq
        if frame.type == MESSAGE and seq is not None:
            self.received(seq, frame.payload, ordered=ordered)
            if frame.ack is not None:
                self.acked(frame.ack)
        elif frame.type == ACK and seq is not None:
            self.acked(seq)
        elif frame.type == END and seq is not None:
            self.client_ended(seq)
        else:
            raise ProtocolError(f"a client does not send {frame.type} frames")

    def client_ended(self, last: int) -> None:
        """The client closed its side after its message ``last``."""
        if last < self._received:
            raise ProtocolError(f"the client ended at {last} after sending {self._received}")
        self._client_done = last
        self._changed.set()

    def acked(self, seq: int) -> None:
        """The client received every server message up to ``seq``."""
        if seq > self._next - 1:
            raise ProtocolError(f"an acknowledgement of message {seq}, of "
                                f"{self._next - 1} sent")
        if seq <= self._client_acked:
            return
        self._client_acked = seq
        while self._unacked and self._unacked[0][0] <= seq:
            self._unacked_bytes -= self._unacked.popleft()[1]
        self._changed.set()

    async def _room(self, size: int) -> None:
        limit = self.limits.max_unacked_bytes
        if self._unacked_bytes + size <= limit:
            return
        deadline = time.monotonic() + self.limits.lag_timeout
        while self._unacked_bytes + size > limit:
            self._raise_if_stopped()
            left = deadline - time.monotonic()
            if left <= 0:
                self.stop(TOO_FAR_BEHIND)
                self._raise_if_stopped()
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._changed.wait()

    # -- the handler's run ------------------------------------------------------------------

    def start(self, handler: Handler) -> None:
        if self.record.done or self._task is not None:
            return
        self._task = asyncio.get_running_loop().create_task(self._run(handler))

    async def _run(self, handler: Handler) -> None:
        failure: str | None = None
        try:
            await handler(self)
        except asyncio.CancelledError:
            if self.stopped is not None or self._stopping:
                return
            raise
        except StreamClosed:
            return
        except Exception:
            log.exception("stream %s: its handler failed", self.token[:6])
            failure = FAILED.name
        if self._processing or self._held:
            self._checkpoint(self._delivered)
        self._pending_done = (True, failure)
        self._dirty(self)

    def stop(self, refusal: Refusal | None) -> None:
        """Stop serving the stream here: the handler is cancelled, the connection
        closed with ``refusal`` (None: it just ends here; the client resumes)."""
        if self._stopping:
            return
        self._stopping = True
        self.stopped = refusal
        if self._detached is not None:
            self._detached.cancel()
        self._changed.set()
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        conduit, self.conduit = self.conduit, None
        if conduit is not None:
            asyncio.get_running_loop().create_task(_quietly(conduit.close(refusal)))
        self._on_stop(self)

    def _raise_if_stopped(self) -> None:
        if self._stopping:
            raise StreamClosed(f"stream {self.token[:6]}... stopped here"
                               + (f": {self.stopped.meaning}" if self.stopped else ""))

    @property
    def finished(self) -> bool:
        """The handler's end is committed (the stream needs nothing more here)."""
        return self.record.done


def _snapshot(state: Any) -> Any:
    """The state as committed: its text, which the handler cannot change afterwards (a
    JSON value: anything else is a ProtocolError at the checkpoint). Encoded once, not
    copied through JSON and encoded again when the record is written."""
    if state is None or isinstance(state, bool | int | str):
        return state
    try:
        return StateText(compact_json(state))
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"a stream's state must be a JSON value: {exc}") from None


async def _quietly(closing: Awaitable[None]) -> None:
    with contextlib.suppress(Exception):
        await closing
