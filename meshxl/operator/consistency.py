"""The drill's post-test data check (Maestro's drill compares the connection tables of
both sites after the failover; meshxl compares sessions).

Every session written before and during the drill is read back through sidecars of the
surviving site (``bulkGet``: what those members serve from their session cache on a
failover) and compared with what etcd committed, at the same revision: the sidecar
says which revision it has applied (``/v1/status``) before it is read, and each answer
must be etcd's session at that revision, or a newer version that etcd has at the
answer's own revision, byte for byte. So the check holds under a steady write load,
where "the latest" moves between two reads. A session the sidecar serves older than it
claims to have applied, different from etcd, or not at all, fails the check, named in
the report.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aetcd
import aiohttp
from aetcd import rpc
from aetcd.utils import prefix_range_end

from meshxl import headers as hdr
from meshxl.client import AsyncClient
from meshxl.client.errors import NotFound, SidecarError
from meshxl.etcd.keys import Keys
from meshxl.statesync.bulk import MAX_ITEMS as MAX_BULK_ITEMS
from meshxl.statesync.record import SessionRecord

__all__ = ["Sidecar", "committed", "compare_sessions", "sidecar_identity"]

LISTED = 20
"""Sessions named per kind of problem (the others are counted)."""


@dataclass
class Sidecar:
    """A sidecar the check reads through: its URL and what its ``/v1/status`` says."""

    url: str
    cluster: str = ""
    member: str = ""
    site: str = ""
    ready: bool = False
    revision: int = 0
    """The etcd revision its session cache has applied."""


async def sidecar_identity(url: str, token: str | None, timeout: float = 5.0) -> Sidecar:
    """``GET /v1/status``: the sidecar's cluster, member and site (raises on failure)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http:
        async with http.get(f"{url.rstrip('/')}/v1/status", headers=hdr.bearer(token)) as r:
            if r.status != 200:
                raise aiohttp.ClientResponseError(r.request_info, r.history, status=r.status,
                                                  message=(await r.text())[:200])
            status = await r.json(content_type=None)
    return Sidecar(url=url, cluster=str(status.get("cluster") or ""),
                   member=str(status.get("member") or ""), site=str(status.get("site") or ""),
                   ready=bool(status.get("ready", True)),
                   revision=int(status.get("revision") or 0))


async def committed(client: aetcd.Client, keys: Keys, cluster: str,
                    revision: int = 0) -> dict[str, tuple[int, bytes]]:
    """Every session of ``cluster`` as etcd has it now (or at ``revision``): id ->
    (revision, stored record)."""
    prefix = keys.sessions_prefix(cluster).encode()
    response = await client.kvstub.Range(
        rpc.RangeRequest(key=prefix, range_end=prefix_range_end(prefix), revision=revision),
        timeout=30, metadata=client.metadata)
    return {kv.key[len(prefix):].decode(): (kv.mod_revision, kv.value) for kv in response.kvs}


async def _at(client: aetcd.Client, keys: Keys, cluster: str, session: str,
              revision: int) -> tuple[int, bytes] | None:
    """One session as etcd had it at ``revision``."""
    key = keys.session(cluster, session).encode()
    response = await client.kvstub.Range(rpc.RangeRequest(key=key, revision=revision),
                                         timeout=30, metadata=client.metadata)
    return (response.kvs[0].mod_revision, response.kvs[0].value) if response.kvs else None


def _same(session: Any, raw: bytes) -> bool:
    """The sidecar's answer carries the stored record's state."""
    record = SessionRecord.decode(raw)
    if isinstance(session.state, bytes | bytearray):
        return bytes(session.state) == record.data
    try:
        return bool(json.loads(record.data) == session.state)
    except ValueError:
        return False


async def _read(sidecar: AsyncClient, ids: list[str]) -> dict[str, Any]:
    answers: dict[str, Any] = {}
    for start in range(0, len(ids), MAX_BULK_ITEMS):
        batch = ids[start:start + MAX_BULK_ITEMS]
        try:
            got = await sidecar.bulk_get(batch)
        except SidecarError as exc:
            got = [exc] * len(batch)
        answers.update(zip(batch, got, strict=True))
    return answers


async def compare_sessions(client: aetcd.Client, keys: Keys, sidecar: Sidecar,
                           token: str | None, baseline: Mapping[str, int]) -> dict[str, Any]:
    """Read every session of the sidecar's cluster (those of ``baseline``, id ->
    revision before the drill, and those etcd has now) through the sidecar and compare
    each with etcd at the revision it answered from. The report's entry for it."""
    cluster = sidecar.cluster
    problems: dict[str, list[str]] = {}
    applied = (await sidecar_identity(sidecar.url, token)).revision
    ids = sorted(set(baseline) | set(await committed(client, keys, cluster)))
    async with AsyncClient(sidecar.url, token=token) as api:
        answers = await _read(api, ids)
    truth = await committed(client, keys, cluster, applied)
    matched = 0
    for session in ids:
        answer, stored = answers[session], truth.get(session)
        if isinstance(answer, NotFound):
            if stored is None or await _at(client, keys, cluster, session, 0) is None:
                matched += 1  # not there at that revision, or deleted since
                continue
            problems.setdefault("missing", []).append(session)
            continue
        if isinstance(answer, SidecarError):
            problems.setdefault("unreadable", []).append(f"{session}: {answer}")
            continue
        revision = int(answer.etag.strip('W/"'))
        if revision > applied:  # written since the sidecar said where it was
            stored = await _at(client, keys, cluster, session, revision)
        if stored is None or stored[0] != revision:
            kind = "stale" if stored is not None and revision < stored[0] else "different"
            problems.setdefault(kind, []).append(
                f"{session}: sidecar revision {revision}, etcd "
                f"{stored[0] if stored else 'none'}")
        elif _same(answer, stored[1]):
            matched += 1
        else:
            problems.setdefault("different", []).append(f"{session}: other bytes at "
                                                        f"revision {revision}")
    written = sum(1 for s in ids if (now := truth.get(s)) and now[0] != baseline.get(s))
    return {"sidecar": sidecar.url, "member": sidecar.member, "site": sidecar.site,
            "cluster": cluster, "sessions": len(ids), "at_revision": applied,
            "written_during": written, "matched": matched,
            "problems": {k: len(v) for k, v in problems.items()},
            "named": {k: v[:LISTED] for k, v in problems.items()}, "ok": not problems}
