"""Session leases: how sessions expire in etcd.

Sessions expire through leases shared by time bucket: each bucket of ``ttl / 10`` has
one lease of ``ttl + bucket`` seconds, attached to every write in that bucket. A session
thus lives between ``ttl`` and ``ttl + bucket`` after its last write, with a handful of
leases instead of one per session.

A write with a TTL of its own (Dapr's ``ttlInSeconds``, :attr:`.record.SessionRecord.ttl`)
takes a lease of that TTL's, shared by the writes of the same TTL in the same second, of
``ttl + 1`` seconds: its session is in etcd between ``ttl`` and ``ttl + 1`` seconds (and
etcd's expiry check, half a second) after the write, and a read hides it from ``ttl``
exactly (the record's ``expires``). ``-1`` (:data:`.record.NO_EXPIRY`): no lease.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

import aetcd
from aetcd import rpc
from aetcd.exceptions import ClientError

from meshxl import etcd
from meshxl.etcd import EtcdUnavailable, MemberChanged

from .record import NO_EXPIRY

log = logging.getLogger(__name__)

__all__ = ["Leases"]


class Leases:
    """One lease per time bucket, granted on first use, shared by all writes in it."""

    def __init__(self, client: aetcd.Client, ttl: float):
        self._client = client
        self.ttl = ttl
        self.bucket = max(1.0, ttl / 10)
        self._leases: dict[int, int] = {}
        self._own: dict[tuple[int, int], int] = {}
        """(ttl, second) -> the lease of writes with that TTL of their own in it."""
        self._lock = asyncio.Lock()

    def cached(self) -> int | None:
        """The current bucket's lease if it was granted already (no await)."""
        return self._leases.get(int(time.time() // self.bucket))

    async def current(self) -> int:
        """The current bucket's lease, granted if need be (EtcdUnavailable without
        etcd: no session is written without its lease)."""
        bucket = int(time.time() // self.bucket)
        lease = self._leases.get(bucket)
        if lease is not None:
            return lease
        try:
            async with self._lock:
                lease = self._leases.get(bucket)
                if lease is None:
                    lease = self._leases[bucket] = await self._grant()
                    for old in [b for b in self._leases if b < bucket - 1]:
                        del self._leases[old]
                return lease
        except (ClientError, rpc.AioRpcError, TimeoutError, EtcdUnavailable,
                MemberChanged) as exc:
            raise EtcdUnavailable(f"etcd {type(exc).__name__} granting a session "
                                   f"lease: {exc}") from exc

    async def for_ttl(self, ttl: int) -> int:
        """The lease of a write with a TTL of its own (the module docstring): 0 for
        :data:`NO_EXPIRY`; granted on first use in the current second."""
        if ttl == NO_EXPIRY:
            return 0
        second = int(time.time())
        lease = self._own.get((ttl, second))
        if lease is not None:
            return lease
        try:
            async with self._lock:
                lease = self._own.get((ttl, second))
                if lease is None:
                    lease = self._own[ttl, second] = await self._grant(ttl + 1)
                    for old in [k for k in self._own if k[1] < second]:
                        del self._own[old]
                return lease
        except (ClientError, rpc.AioRpcError, TimeoutError, EtcdUnavailable,
                MemberChanged) as exc:
            raise EtcdUnavailable(f"etcd {type(exc).__name__} granting a session "
                                   f"lease: {exc}") from exc

    async def _grant(self, ttl: int | None = None) -> int:
        if ttl is None:
            ttl = math.ceil(self.ttl + self.bucket)
        granted = await etcd.balancer_of(self._client).call(
            lambda ep, timeout: ep.client.leasestub.LeaseGrant(
                rpc.LeaseGrantRequest(TTL=ttl), timeout=timeout, metadata=ep.client.metadata),
            what="session lease grant")
        lease: int = granted.ID
        return lease

    def forget(self) -> None:
        """After etcd refused a lease (revoked, or etcd lost it): grant anew."""
        log.warning("a session lease is gone; granting a new one")
        self._leases.clear()
        self._own.clear()
