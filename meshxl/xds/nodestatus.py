"""This control-plane replica's lease and the status of each Envoy connected to it,
written to etcd under that lease (``meshxl status`` and the other replicas read them;
they vanish with the replica). Many statuses per transaction, and etcd trouble costs
status updates, nothing more."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

import aetcd

from meshxl.etcd.keys import Keys

__all__ = ["NodeStatuses"]

log = logging.getLogger(__name__)

_NODE_TXN_OPS = 64
"""Node statuses per etcd transaction (etcd's default --max-txn-ops is 128)."""

_NODE_VALUE_MAX = 64 * 1024
"""Largest node-status record written (they are a few hundred bytes: node ids and NACK
texts are bounded at the ADS edge)."""


class NodeStatuses:
    """The replica's status lease (the sick-member judgements are written under it too)
    and the node statuses it writes; ``client`` is set once etcd is connected."""

    def __init__(self, keys: Keys, replica: str, ttl: float):
        self.keys = keys
        self.replica = replica
        self.ttl = ttl
        self.client: aetcd.Client | None = None
        self.lease: Any = None
        self._lease_lock = asyncio.Lock()
        self._node_values: dict[str, bytes] = {}
        self._undeleted: dict[str, bytes] = {}  # records whose removal failed

    async def take_lease(self) -> bool:
        """Take this replica's status lease unless it has one (one at a time, so the
        lease keeper and an early status write never make two); True if it took one."""
        assert self.client is not None
        async with self._lease_lock:
            if self.lease is not None:
                return False
            self.lease = await self.client.lease(self.ttl)
            return True

    async def keep_lease(self) -> None:
        """Keep this replica's lease alive; node-status keys die with the replica."""
        assert self.client is not None
        while True:
            try:
                if await self.take_lease() and self._node_values:
                    await self._rewrite()
                await asyncio.sleep(self.ttl / 3)
                reply = await self.lease.refresh()
                if reply is None or reply.TTL <= 0:
                    # etcd answers a refresh of an expired lease (this replica paused or
                    # cut off past its TTL) with TTL 0, not an error: the statuses went.
                    raise LookupError("the lease expired")
                await self.retry_deletes()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("status lease refresh failed (%s); taking a new lease", exc)
                self.lease = None
                await asyncio.sleep(0.5)

    async def publish(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        """Write node statuses to etcd, many per transaction (a push to 1,000 Envoys
        brings 1,000 ACKs); etcd trouble costs status updates, nothing more."""
        if self.client is None:
            return
        if self.lease is None:
            # The first ACKs may come before the lease keeper's first lease: take one
            # now rather than drop their statuses.
            try:
                if await self.take_lease() and self._node_values:
                    await self._rewrite()
            except Exception as exc:
                log.warning("%d node status(es) not written to etcd: no lease: %s",
                            len(batch), exc)
                return
        tx = self.client.transactions
        puts = []
        for node_id, status in batch:
            # One entry that cannot be stored costs that entry only, never the batch.
            try:
                key = self.keys.node(node_id).encode()
                value = json.dumps({**status, "replica": self.replica}).encode()
            except (ValueError, TypeError) as exc:
                log.warning("node status not written to etcd: %s", exc)
                continue
            if status.get("streams", 0) > 0:
                if len(value) > _NODE_VALUE_MAX:
                    log.warning("node status not written to etcd: %d bytes (at most %d)",
                                len(value), _NODE_VALUE_MAX)
                    continue
                self._node_values[node_id] = value
                self._undeleted.pop(node_id, None)
                puts.append(tx.put(key, value, lease=self.lease))
                continue
            # Disconnected: remove the record only if no other replica rewrote it since.
            # (Records are bounded, so the compare always fits in an etcd request.)
            last = self._node_values.pop(node_id, None) or self._undeleted.pop(node_id, None)
            if last is not None and not await self._quietly(
                    "node status not removed from etcd (retried later)",
                    compare=[tx.value(key) == last], success=[tx.delete(key)]):
                self._undeleted[node_id] = last
        for start in range(0, len(puts), _NODE_TXN_OPS):
            await self._quietly(f"{len(puts[start:start + _NODE_TXN_OPS])} node "
                                     "status(es) not written to etcd", compare=[],
                                     success=puts[start:start + _NODE_TXN_OPS])

    async def _rewrite(self) -> None:
        """The connected nodes' statuses again, under a new lease (the old one expired
        and took them along; without this they would stay gone until a node's next
        ACK, and `meshxl status` and `verify` would see its Envoy connected to no replica)."""
        assert self.client is not None
        tx = self.client.transactions
        puts = [tx.put(self.keys.node(node_id).encode(), value, lease=self.lease)
                for node_id, value in self._node_values.items()]
        for start in range(0, len(puts), _NODE_TXN_OPS):
            await self._quietly("node statuses not written again under the new lease",
                                compare=[], success=puts[start:start + _NODE_TXN_OPS])

    async def retry_deletes(self) -> None:
        """Remove the records of disconnected nodes whose removal failed (etcd trouble):
        a record left behind would count as a connected Envoy until this replica dies."""
        if self.client is None or not self._undeleted:
            return
        tx = self.client.transactions
        for node_id, last in list(self._undeleted.items()):
            if node_id in self._node_values:
                del self._undeleted[node_id]  # connected again: its record is current
                continue
            key = self.keys.node(node_id).encode()
            if await self._quietly("node status not removed from etcd (retried later)",
                                        compare=[tx.value(key) == last],
                                        success=[tx.delete(key)]):
                self._undeleted.pop(node_id, None)

    async def _quietly(self, what: str, **txn: Any) -> bool:
        assert self.client is not None
        try:
            await self.client.transaction(failure=[], **txn)
        except Exception as exc:
            log.warning("%s: %s: %s", what, type(exc).__name__, exc)
            return False
        return True

    async def revoke(self) -> None:
        """Let the statuses go with the lease (a replica stopping)."""
        if self.lease is not None:
            with contextlib.suppress(Exception):
                await self.lease.revoke()
