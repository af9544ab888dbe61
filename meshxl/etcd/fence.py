"""The shard map version fence in a session shard's etcd (docs/scaling.md, "The map
version fence").

Each session shard's etcd holds one key (:attr:`meshxl.etcd.keys.Keys.shard_fence`)
whose value is a shard map version, zero-padded (:func:`meshxl.etcd.shards.fence_value`)
so that etcd's byte-wise value comparison is the numeric one. ``meshxl shards set``
raises it in every shard of the old and the new map right after it stores a map
version, and whoever serves sessions under a version compares the fence *equal* to it
in the same transaction as every read and write there: a request planned under an
older map is refused at the shard (nothing applied, :class:`Fenced`) once a newer one
was stored, and the first request of a newer version that meets a lower fence raises
it first (compare-and-set, never lowered), so within a shard every request of a
version is ordered after every request of the versions before it.

etcd's value compare fails on a missing key: a shard without a fence yet (a map set
before fences, a new shard) has it created by the first raise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import aetcd
from aetcd import rpc

from meshxl.errors import Conflict, Unavailable

from .shards import fence_value, parse_fence

__all__ = ["TIMEOUT", "Fenced", "Probe", "cluster_hex", "fence_compare", "fence_read",
           "probe", "raise_fence", "under_fence"]

TIMEOUT = 5.0
"""Seconds one etcd request of these helpers may take."""
RAISES = 8
"""Compare-and-set attempts of one raise before it gives up (each lost only to
another raise)."""


class Fenced(Unavailable):
    """Refused at a shard, nothing applied: its fence names a newer shard map than the
    one the request was planned under. The sidecar reads the map again at once."""

    def __init__(self, version: int, fence: int, where: str = "") -> None:
        self.version, self.fence = version, fence
        shard = f"session shard {where}" if where else "the session shard"
        super().__init__(f"shard map version {version} was replaced: {shard} is fenced at "
                         f"map version {fence}; the sidecar takes the new map now, send it "
                         "again")


def cluster_hex(cluster_id: int) -> str:
    """An etcd cluster id as etcd prints it."""
    return f"{cluster_id:x}"


def fence_compare(key: bytes, version: int) -> rpc.Compare:
    """``value(fence) == version``, as a transaction compare."""
    return rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.VALUE, key=key,
                       value=fence_value(version))


def fence_read(key: bytes) -> rpc.RequestOp:
    return rpc.RequestOp(request_range=rpc.RangeRequest(key=key))


async def _txn(client: aetcd.Client, request: rpc.TxnRequest, timeout: float
               ) -> rpc.TxnResponse:
    """etcd's whole answer (its header too: which cluster answered)."""
    return await client.kvstub.Txn(request, timeout=timeout, metadata=client.metadata)


async def _range(client: aetcd.Client, key: bytes, timeout: float) -> rpc.RangeResponse:
    return await client.kvstub.Range(rpc.RangeRequest(key=key), timeout=timeout,
                                     metadata=client.metadata)


@dataclass(frozen=True)
class Probe:
    """What one read of a shard's fence says of the shard."""

    cluster_id: str
    """The etcd cluster that answered (hexadecimal)."""
    fence: int
    """Its fence (0: none yet)."""


async def probe(client: aetcd.Client, key: bytes, timeout: float = TIMEOUT) -> Probe:
    """Read the fence ``key`` (linearizable): which cluster answers, and its fence."""
    response = await _range(client, key, timeout)
    value = response.kvs[0].value if response.kvs else None
    return Probe(cluster_hex(response.header.cluster_id), parse_fence(value))


async def raise_fence(client: aetcd.Client, key: bytes, version: int,
                      timeout: float = TIMEOUT) -> int:
    """The fence at least ``version`` (compare-and-set on its revision, never lowered):
    the fence now."""
    for _ in range(RAISES):
        response = await _range(client, key, timeout)
        kv = response.kvs[0] if response.kvs else None
        now = parse_fence(kv.value if kv is not None else None)
        if now >= version:
            return now
        compare = (rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.MOD, key=key,
                               mod_revision=kv.mod_revision) if kv is not None else
                   rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.VERSION, key=key,
                               version=0))
        done = await _txn(client, rpc.TxnRequest(compare=[compare], success=[rpc.RequestOp(
            request_put=rpc.PutRequest(key=key, value=fence_value(version)))]), timeout)
        if done.succeeded:
            return version
    raise Conflict(f"the shard map fence kept changing while being raised to {version}")


async def under_fence(client: aetcd.Client, key: bytes, version: int,
                      compare: Sequence[rpc.Compare], success: Sequence[rpc.RequestOp],
                      failure: Sequence[rpc.RequestOp], timeout: float = TIMEOUT,
                      where: str = "") -> rpc.TxnResponse:
    """One transaction applied only while the fence ``key`` is ``version``: a lower
    fence is raised first, a higher one refuses it (:class:`Fenced`). The answer's
    ``responses`` are those of ``success`` or, ``succeeded`` false (one of ``compare``
    failed), of ``failure``."""
    request = rpc.TxnRequest(compare=[fence_compare(key, version), *compare],
                             success=list(success), failure=[*failure, fence_read(key)])
    for _ in range(RAISES):
        response = await _txn(client, request, timeout)
        if response.succeeded:
            return response
        read = response.responses[-1].response_range
        now = parse_fence(read.kvs[0].value if read.kvs else None)
        if now == version:
            del response.responses[-1]
            return response
        if now > version:
            raise Fenced(version, now, where)
        await raise_fence(client, key, version, timeout)
    raise Unavailable(f"the fence of session shard {where} kept changing: not applied")
