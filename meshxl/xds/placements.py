"""The pools' stored base placements, kept in etcd by the control plane.

A virtual system keeps its active and standby while the model allows it
(:func:`meshxl.model.sticky.sticky_placement`): the placement each replica and each
sidecar computes takes the pool's stored one (``pools/POOL/placement``) as an input.
Whenever the model or the runtime state changes, the replica computes each pool's base
placement from the stored record as it reads it now, and writes it where it differs,
in a transaction that compares the key's revision with the one it read (absent: it
creates it): every replica computes the same function of the same record, so a replica
that loses the race finds the record already written, or computes again from the
winner's. No sidecar's credential writes the key (:func:`meshxl.etcd.roles.
pool_permissions`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Callable
from typing import Any

from meshxl.etcd.keys import Keys
from meshxl.model import ModelSpec, RuntimeState
from meshxl.model.sticky import StoredPlacement
from meshxl.model.vsls import stored_placements

log = logging.getLogger(__name__)

__all__ = ["WRITE_ATTEMPTS", "PlacementWriter"]

WRITE_ATTEMPTS = 3
"""Reads and transactions one pool's write tries while other replicas write it."""


class PlacementWriter:
    """Keeps every pool's stored placement equal to the one this replica computes."""

    def __init__(self, client: Any, keys: Keys, model: Callable[[], ModelSpec | None],
                 runtime: Callable[[], RuntimeState]) -> None:
        self.client = client
        self.keys = keys
        self.model = model
        self.runtime = runtime
        self._wake = asyncio.Event()
        self.written = 0
        """Records this replica wrote (tests and the log)."""

    def poke(self) -> None:
        """The model or the runtime state changed: compare again."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("storing the pools' placements failed (tried again on the "
                              "next change)")

    async def sync(self) -> None:
        """Write each pool's placement where the stored one differs."""
        model = self.model()
        if model is None:
            return
        for pool in sorted(stored_placements(model, self.runtime())):
            await self._write(model, pool)

    async def _write(self, model: ModelSpec, pool: str) -> None:
        key = self.keys.pool_placement(pool).encode()
        tx = self.client.transactions
        for _ in range(WRITE_ATTEMPTS):
            got = await self.client.get(key)
            runtime = self.runtime()
            placements = dict(runtime.placements)
            if got is None:
                placements.pop(pool, None)
            else:
                try:
                    placements[pool] = StoredPlacement.from_record(json.loads(got.value))
                except ValueError as exc:  # unreadable: placed afresh, and replaced
                    log.warning("replacing %s: %s", key.decode(), exc)
                    placements.pop(pool, None)
            fresh = dataclasses.replace(runtime, placements=placements)
            record = stored_placements(model, fresh).get(pool)
            if record is None:
                return  # stored as this replica computes it
            value = json.dumps(record.to_record(), sort_keys=True).encode()
            revision = 0 if got is None else got.mod_revision
            succeeded, _ = await self.client.transaction(
                compare=[tx.mod(key) == revision], success=[tx.put(key, value)], failure=[])
            if succeeded:
                self.written += 1
                log.info("pool %s: placement stored (%d virtual systems)", pool,
                         len(record.roles))
                return
        log.info("pool %s: placement written by others under every attempt; compared "
                 "again on the next change", pool)
