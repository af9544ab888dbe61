"""Delayed sync and planned moves: before the mesh moves sessions away from this member
on purpose, its young sessions are replicated (:mod:`meshxl.model.moves`).

The sidecar follows the mesh (following.py), so it sees a record that moves sessions
away from its member (member down, site offline, a degraded judgement, a probe beside
it, a handback) as soon as the control plane does. Then every engine writes through
(delayed.py: nothing is young), every session kept here is replicated at once, and
once none is left the sidecar acknowledges the move under
``clusters/C/flushed/M``, leased like its registration: the control plane waits for
that (at most ``sync_delay`` + 1 s) before it takes the move's first step. When the
records go, the sidecar keeps young sessions again and deletes its acknowledgement.
Only a sidecar with ``sync_delay`` above 0 runs this.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

import aetcd

from .delayed import LocalSessions
from .metrics import StatesyncMetrics

log = logging.getLogger("meshxl.statesync.app")

__all__ = ["FLUSH_ROUNDS", "PlannedFlush", "ack_value"]

FLUSH_ROUNDS = 5
"""Flushes in a row before an acknowledgement is given up until the next try (a write
kept while the first ran is caught by the next)."""
RETRY = 0.5
"""Seconds before a failed flush or acknowledgement is tried again."""


def ack_value(acked: dict[str, float]) -> bytes:
    """The stored acknowledgement (:func:`meshxl.etcd.mesh.flushed_moves` reads it)."""
    return json.dumps({"moves": acked}, sort_keys=True).encode()


class PlannedFlush:
    """This member's young sessions, replicated before a planned move away from it."""

    def __init__(self, client: aetcd.Client, key: str,
                 engines: Callable[[], Iterable[LocalSessions]],
                 flush: Callable[[], Awaitable[int]], kept: Callable[[], int],
                 lease: Callable[[], int | None], metrics: StatesyncMetrics):
        self.client = client
        self.key = key.encode()
        self.engines = engines
        """The sessions kept by each engine (one per shard) now."""
        self.flush = flush
        self.kept = kept
        self.lease = lease
        self.metrics = metrics
        self.moves: tuple[str, ...] = ()
        """The planned moves away from this member now (their tokens)."""
        self.acked: dict[str, float] = {}
        """The moves acknowledged, with when (as stored)."""
        self._acked_under: int | None = None  # the lease the acknowledgement is under
        self._wake = asyncio.Event()

    def update(self, moves: tuple[str, ...]) -> None:
        """The planned moves away from this member, as the mesh says now."""
        if moves == self.moves:
            return
        if moves and not self.moves:
            log.info("planned move away from this member (%s): replicating its young "
                     "sessions and writing through", ", ".join(moves))
        elif not moves:
            log.info("no planned move away from this member any longer: delayed sync again")
        self.moves = moves
        self.write_through()
        self._wake.set()

    def status(self) -> dict[str, object]:
        """``/v1/status``' ``planned_moves``: the moves away from this member now and
        those acknowledged (with when)."""
        return {"moves": list(self.moves), "acknowledged": dict(self.acked)}

    def write_through(self) -> None:
        """Every engine writes through exactly while a move is under way."""
        for local in self.engines():
            local.writing_through = bool(self.moves)

    async def run(self) -> None:
        while True:
            if self.moves:  # wakes every second: a new lease needs a new acknowledgement
                try:
                    async with asyncio.timeout(1.0):
                        await self._wake.wait()
                except TimeoutError:
                    pass
            else:
                await self._wake.wait()
            self._wake.clear()
            try:
                await self.settle()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # etcd trouble: again shortly (the wait is bounded)
                log.warning("planned move: young sessions not replicated yet: %s", exc)
                await asyncio.sleep(RETRY)
                self._wake.set()

    async def settle(self) -> bool:
        """Flush and acknowledge the moves under way, or withdraw the acknowledgement
        once there are none; whether the stored acknowledgement matches them now."""
        moves = self.moves
        if not moves:
            if self.acked:
                await self.client.delete(self.key)
                self.acked, self._acked_under = {}, None
            return True
        lease = self.lease()
        if lease is None:
            return False
        if set(self.acked) == set(moves) and self._acked_under == lease:
            return True
        self.write_through()  # an engine added since (a reshard) writes through too
        for _ in range(FLUSH_ROUNDS):
            flushed = await self.flush()
            self.metrics.planned_flushed.inc(flushed)
            if not self.kept():
                break
        else:
            raise RuntimeError(f"{self.kept()} sessions still kept here after "
                               f"{FLUSH_ROUNDS} flushes")
        if moves != self.moves:
            return False  # changed meanwhile: the next round acknowledges the new ones
        now = time.time()
        acked = {m: self.acked.get(m, now) for m in moves}
        await self.client.put(self.key, ack_value(acked), lease=lease)
        self.acked, self._acked_under = acked, lease
        log.info("planned move acknowledged (%s): no young session kept here",
                 ", ".join(moves))
        return True
