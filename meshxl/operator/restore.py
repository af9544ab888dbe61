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

etcd moves its revision by one per write and offers no other way while it runs, so a
bump costs a write per revision: :func:`bump_refusal` refuses, before anything is
written, one of more than :data:`MAX_WRITES` (``--max-writes`` raises it), and a
``past`` beyond etcd's largest revision (a signed 64-bit number). A long bump compacts
its own history every :data:`COMPACT_EVERY` revisions, so it never fills etcd's quota
(NOSPACE, after which every ordinary write fails too); etcd >= 3.5 moves the revision
at restore time whatever the distance (``--bump-revision``), which is what is advised
beyond the bound.

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

__all__ = ["COMPACT_EVERY", "CONCURRENCY", "MAX_REVISION", "MAX_WRITES", "Bumped", "Checked",
           "bump", "bump_refusal", "check", "revision_now", "writes_to_pass"]

CONCURRENCY = 64
"""Writes in flight at once while bumping: each is its own revision."""
MAX_REVISION = 2**63 - 1
"""etcd's largest revision (a signed 64-bit number): no cluster passes it."""
MAX_WRITES = 10_000_000
"""Writes (revisions) one bump makes at most unless told otherwise: over an hour at the
2,200-2,400 a second a loaded 2-core machine's single member took (docs/kubernetes.md,
"Restore"), longer over a network."""
COMPACT_EVERY = 5_000
"""Revisions a bump writes between compactions of its own history (a few hundred KiB
of etcd's backend)."""


def writes_to_pass(revision: int, past: int) -> int:
    """Writes a bump makes from ``revision`` until etcd's revision is past ``past``."""
    return max(past - revision + 1, 0)


def bump_refusal(revision: int, past: int, max_writes: int = MAX_WRITES) -> str | None:
    """Why a bump from ``revision`` past ``past`` is not made (None: it is): etcd
    cannot reach it, or it takes more than ``max_writes`` writes. Pure."""
    if not 0 <= past < MAX_REVISION:
        return (f"--past {past} is not a revision etcd can pass: its revisions are signed "
                f"64-bit numbers, at most {MAX_REVISION} (2^63-1)")
    writes = writes_to_pass(revision, past)
    if writes <= max_writes:
        return None
    bound = "--max-writes, by default" if max_writes == MAX_WRITES else \
        f"--max-writes {max_writes}"
    return (f"--past {past} is {writes:,} revisions ahead of etcd's revision {revision:,}, "
            f"and a bump writes one revision per write, {max_writes:,} at most ({bound}): "
            f"{_elsewise(past)}")


def _elsewise(past: int) -> str:
    """What to do instead of a bump beyond the bound."""
    return (f"restore the snapshot again with etcd >= 3.5's `etcdutl snapshot restore ... "
            f"--bump-revision {min(past + 1000, MAX_REVISION - 1)} --mark-compacted` (its "
            "cost does not grow with the distance), check that --past is right, or raise "
            "--max-writes to write them all")


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

    @property
    def writes(self) -> int:
        """Writes a bump makes to pass ``past`` from here."""
        return writes_to_pass(self.revision, self.past)

    @property
    def bumpable(self) -> bool:
        """``meshxl restore bump --past`` would be made (not refused) from here."""
        return bump_refusal(self.revision, self.past) is None

    @property
    def advice(self) -> str:
        """What to run before traffic returns when not :attr:`safe`: the bump, or what
        to do instead when the bump would refuse."""
        if self.bumpable:
            return f"run `meshxl restore bump --past {self.past}` before traffic returns"
        return f"a bump would write {self.writes:,} revisions, more than {MAX_WRITES:,}: " \
            + _elsewise(self.past)


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
    if not 0 <= past < MAX_REVISION:
        raise InputError(bump_refusal(0, past) or f"--past {past}")
    revision = await revision_now(client)
    compacted = revision > past and await _compacted_through(client, past)
    return Checked(revision, past, compacted)


async def bump(client: Any, keys: Keys, past: int,
               progress: Callable[[int, int], None] | None = None,
               concurrency: int = CONCURRENCY, max_writes: int = MAX_WRITES) -> Bumped:
    """Write :attr:`Keys.revision_bump` until the revision is past ``past``, delete it,
    and compact at the final revision (and every :data:`COMPACT_EVERY` revisions on
    the way). Refused (InputError, nothing written) beyond :func:`bump_refusal`'s
    bounds. ``progress(revision, past)`` about every second."""
    if not 0 <= past < MAX_REVISION:
        raise InputError(bump_refusal(0, past) or f"--past {past}")
    started = time.monotonic()
    before = revision = await revision_now(client)
    refusal = bump_refusal(revision, past, max_writes)
    if refusal is not None:
        raise InputError(refusal)
    key = keys.revision_bump.encode()
    compacted = revision
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
        if revision - compacted >= COMPACT_EVERY:  # its own history: no quota filled
            await client.kvstub.Compact(rpc.CompactionRequest(revision=revision,
                                                              physical=True),
                                        timeout=60, metadata=client.metadata)
            compacted = revision
        if progress is not None and time.monotonic() - told >= 1.0:
            told = time.monotonic()
            progress(revision, past)
    deleted = await client.kvstub.DeleteRange(rpc.DeleteRangeRequest(key=key), timeout=10,
                                              metadata=client.metadata)
    revision = max(revision, int(deleted.header.revision))
    await client.kvstub.Compact(rpc.CompactionRequest(revision=revision, physical=True),
                                timeout=60, metadata=client.metadata)
    return Bumped(before, revision, writes, time.monotonic() - started)
