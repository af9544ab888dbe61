"""One write at a time per session on this member, in the order writes came (the
application's order): a lock per session, held while a write of it is under way.
Whether the write wins is etcd's to judge (:mod:`.conditions`); the lock keeps this
member's own writes of a session from racing each other."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Sequence

__all__ = ["SessionLocks"]


class SessionLocks:
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

    @contextlib.asynccontextmanager
    async def hold(self, session_ids: Sequence[str]) -> AsyncIterator[None]:
        """The locks of several sessions: a place in every session's line is taken at
        once (no await in between), then each handed-over lock awaited. Every write
        takes its places in the order writes came, so none waits for a later one: two
        transactions over overlapping sessions never wait for each other in a cycle,
        and a connection's pipelined writes keep their order (``http/connection.py``,
        concurrent routes)."""
        places = [(session_id, self.reserve(session_id))
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
                    self.release(session_id)
                else:
                    self.give_up(session_id, future)
