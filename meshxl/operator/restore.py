"""After etcd is restored from a snapshot: its revision must move past every revision
handed out before, or old ETags and owner fences name new writes.

meshxl's ETags, ``If-Match`` compares and owner fences are etcd revisions. A restore
brings etcd back at the snapshot's revision, below the revisions clients and sidecars
were given after the snapshot; once new writes reach those numbers again, an
``If-Match`` made with a post-snapshot ETag could succeed on a session it never saw.
etcd >= 3.5 moves the revision at restore time (``etcdutl snapshot restore
--bump-revision N --mark-compacted``); for etcd 3.4, which has neither flag,
:func:`bump` does the same on the running cluster before traffic returns: it writes one
key until the revision is past ``past``, deletes it, and compacts at the new revision,
so a watch from any older revision (a sidecar that lived through the restore) is told
its history is gone and reads everything again.

:func:`check` is the test before traffic returns (``meshxl restore check``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aetcd import rpc

from meshxl.errors import InputError
from meshxl.etcd.keys import Keys

__all__ = ["CONCURRENCY", "Bumped", "Checked", "bump", "check", "revision_now"]

CONCURRENCY = 64
"""Writes in flight at once while bumping: each is its own revision."""


@dataclass(frozen=True)
class Checked:
    revision: int
    past: int
    compacted: bool
    """Whether the revisions up to ``past`` are compacted away (watches from them fail
    and resync, as after ``--mark-compacted``)."""

    @property
    def safe(self) -> bool:
        return self.revision > self.past and self.compacted


@dataclass(frozen=True)
class Bumped:
    before: int
    after: int
    writes: int
    seconds: float


async def revision_now(client: Any) -> int:
    """etcd's revision (a count-only range of one key: no data moves)."""
    response = await client.kvstub.Range(rpc.RangeRequest(key=b"\0", count_only=True),
                                         timeout=10, metadata=client.metadata)
    return int(response.header.revision)


async def _compacted_through(client: Any, revision: int) -> bool:
    """Whether ``revision`` is compacted: a read at it is refused as out of range."""
    if revision <= 0:
        return True
    try:
        await client.kvstub.Range(rpc.RangeRequest(key=b"\0", count_only=True,
                                                   revision=revision),
                                  timeout=10, metadata=client.metadata)
    except rpc.AioRpcError as exc:
        if exc.code() == rpc.StatusCode.OUT_OF_RANGE:
            return True
        raise
    return False


async def check(client: Any, past: int) -> Checked:
    """Whether the cluster is past ``past`` and its history up to it compacted."""
    if past < 0:
        raise InputError(f"--past must be a revision (>= 0), got {past}")
    revision = await revision_now(client)
    compacted = revision > past and await _compacted_through(client, past)
    return Checked(revision, past, compacted)


async def bump(client: Any, keys: Keys, past: int,
               progress: Callable[[int, int], None] | None = None,
               concurrency: int = CONCURRENCY) -> Bumped:
    """Write :attr:`Keys.revision_bump` until the revision is past ``past``, delete it,
    and compact at the final revision. ``progress(revision, past)`` about every second."""
    if past < 0:
        raise InputError(f"--past must be a revision (>= 0), got {past}")
    started = time.monotonic()
    before = revision = await revision_now(client)
    key = keys.revision_bump.encode()
    writes = 0
    told = started
    request = rpc.PutRequest(key=key, value=b"")

    async def put() -> int:
        answer = await client.kvstub.Put(request, timeout=10, metadata=client.metadata)
        return int(answer.header.revision)

    while revision <= past:
        batch = min(concurrency, past - revision + 1)
        revisions = await asyncio.gather(*(put() for _ in range(batch)))
        writes += batch
        revision = max(revision, *revisions)
        if progress is not None and time.monotonic() - told >= 1.0:
            told = time.monotonic()
            progress(revision, past)
    deleted = await client.kvstub.DeleteRange(rpc.DeleteRangeRequest(key=key), timeout=10,
                                              metadata=client.metadata)
    revision = max(revision, int(deleted.header.revision))
    await client.kvstub.Compact(rpc.CompactionRequest(revision=revision, physical=True),
                                timeout=60, metadata=client.metadata)
    return Bumped(before, revision, writes, time.monotonic() - started)
