"""What etcd says was acknowledged of one cluster's sessions, for the drill's data check
(:mod:`meshxl.operator.consistency`): each session's state now and the revision of that
read, the versions written since a revision (etcd's history, replayed), and the deletion
records the sessions deleted through the API left (``meshxl.statesync.deletions``).

The history is replayed with a watch from the revision after the baseline. A watch says
nothing when it has caught up, so the replay writes a mark, the key right after the
cluster's sessions (``Keys.sessions_mark``: inside the watched range, outside every
sidecar's), and reads until the mark's own event: every write before it has come by
then, in revision order. The mark is deleted after. A history compacted since the
baseline cannot be replayed (:class:`HistoryCompacted`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any

import aetcd
from aetcd import rpc
from aetcd.exceptions import RevisionCompactedError
from aetcd.utils import prefix_range_end

from meshxl import etcd
from meshxl.errors import Conflict
from meshxl.etcd.keys import Keys
from meshxl.statesync.record import SessionRecord

__all__ = ["REPLAY_TIMEOUT", "HistoryCompacted", "Known", "committed", "deletion_records",
           "known", "newest", "written_since"]

REPLAY_TIMEOUT = 60.0
"""Seconds a replay of the history since the baseline may take."""


class HistoryCompacted(Conflict):
    """etcd compacted the history since the baseline: it cannot be replayed."""


@dataclass(frozen=True, slots=True)
class Known:
    """A version of a session etcd acknowledged: its revision and the record's write
    time (None: the record cannot be decoded)."""

    revision: int
    updated: float | None


def known(revision: int, raw: bytes) -> Known:
    try:
        return Known(revision, SessionRecord.decode(raw).updated)
    except ValueError:
        return Known(revision, None)


async def committed(client: aetcd.Client, keys: Keys, cluster: str,
                    revision: int = 0) -> tuple[int, dict[str, tuple[int, bytes]]]:
    """Every session of ``cluster`` as etcd has it now (or at ``revision``), and the
    revision etcd read at: (revision, id -> (its revision, stored record))."""
    prefix = keys.sessions_prefix(cluster).encode()
    response = await client.kvstub.Range(
        rpc.RangeRequest(key=prefix, range_end=prefix_range_end(prefix), revision=revision),
        timeout=30, metadata=client.metadata)
    return (revision or int(response.header.revision),
            {kv.key[len(prefix):].decode(): (kv.mod_revision, kv.value) for kv in response.kvs})


async def deletion_records(client: aetcd.Client, keys: Keys, cluster: str) -> dict[str, int]:
    """Sessions deleted through the API whose record etcd still holds: id -> the
    highest version deleted."""
    prefix = keys.deletions_prefix(cluster)
    response = await client.kvstub.Range(
        rpc.RangeRequest(key=prefix.encode(), range_end=prefix_range_end(prefix.encode()),
                         keys_only=True), timeout=30, metadata=client.metadata)
    found: dict[str, int] = {}
    for kv in response.kvs:
        parsed = keys.parse_deletion(cluster, kv.key.decode(errors="replace"))
        if parsed is not None and parsed[1] > found.get(parsed[0], 0):
            found[parsed[0]] = parsed[1]
    return found


async def written_since(client: aetcd.Client, keys: Keys, cluster: str, after: int,
                        until: int) -> dict[str, Known]:
    """The last version of each session written in ``(after, until]``, from etcd's
    history (the module docstring). HistoryCompacted when it is gone."""
    prefix = keys.sessions_prefix(cluster).encode()
    mark = keys.sessions_mark(cluster).encode()
    assert mark == prefix_range_end(prefix)
    written: dict[str, tuple[int, bytes]] = {}
    marked = 0
    replay = etcd.watch_responses(client, prefix, mark + b"\0", after + 1)
    try:
        async with asyncio.timeout(REPLAY_TIMEOUT):
            put = await client.put(mark, f"data check {time.time():.3f}".encode())
            marked = int(put.header.revision)
            async for response in replay:
                for event in response.events:
                    kv = event.kv
                    if kv.key == mark:
                        if kv.mod_revision >= marked:
                            return {s: known(*v) for s, v in written.items()}
                    elif event.type == rpc.Event.PUT and kv.mod_revision <= until:
                        written[kv.key[len(prefix):].decode(errors="replace")] = (
                            kv.mod_revision, kv.value)
    except RevisionCompactedError as exc:
        raise HistoryCompacted(f"etcd compacted its history through revision "
                               f"{exc.compacted_revision}, after the baseline "
                               f"({after})") from None
    finally:
        await _close(replay)
        if marked:  # left behind, it is harmless: no session, and the next check's own
            with contextlib.suppress(Exception):  # mark goes past it
                await client.delete(mark)
    raise ConnectionError("the replay of etcd's history ended before its mark")


async def _close(replay: Any) -> None:
    aclose = getattr(replay, "aclose", None)
    if aclose is not None:
        await aclose()


def newest(*versions: Known | None) -> Known | None:
    """The newest of ``versions`` (None: none known)."""
    found = [v for v in versions if v is not None]
    return max(found, key=lambda v: v.revision) if found else None
