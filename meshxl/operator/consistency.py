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

With sessions sharded over several etcd clusters (:mod:`meshxl.etcd.shards`), each
cluster counts its own revisions: every session is read from its own shard's etcd, at
the revision the sidecar has applied *of that shard* (``/v1/status``, ``shards``), and
its ETag must name that shard (``"s1:42"``). A session stored in a shard the map does
not put it in is a problem too (``misplaced``: no sidecar serves it from there). The
report counts per shard and names each problem session's shard. A map that is moving
(an online reshard) is not checked: a session may then sit in either of two shards.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aetcd
import aiohttp
from aetcd import rpc
from aetcd.utils import prefix_range_end

from meshxl import headers as hdr
from meshxl.client import AsyncClient
from meshxl.client.errors import NotFound, SidecarError
from meshxl.errors import InputError
from meshxl.etcd.keys import Keys
from meshxl.etcd.shards import ShardMap, split_etag
from meshxl.statesync.bulk import MAX_ITEMS as MAX_BULK_ITEMS
from meshxl.statesync.conditions import parse_etag
from meshxl.statesync.record import SessionRecord

__all__ = ["Sharded", "Sidecar", "baseline_revisions", "committed", "compare_sessions",
           "data_check_refusals", "shard_mismatch", "sidecar_identity"]

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
    shard_map: int | None = None
    """The shard map version it serves (None: its sessions live in the main cluster)."""
    shards: dict[str, int] = field(default_factory=dict)
    """With shards: the revision its cache has applied of each one, by name (each etcd
    cluster counts its own)."""
    unreachable: list[str] = field(default_factory=list)
    """With shards: those whose etcd it cannot reach now."""


@dataclass(frozen=True)
class Sharded:
    """Sessions sharded: the map the check reads them by (not moving), and an etcd
    client for each of its shards, by name."""

    map: ShardMap
    clients: Mapping[str, aetcd.Client]


async def sidecar_identity(url: str, token: str | None, timeout: float = 5.0) -> Sidecar:
    """``GET /v1/status``: the sidecar's cluster, member, site and applied revisions
    (raises on failure)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http:
        async with http.get(f"{url.rstrip('/')}/v1/status", headers=hdr.bearer(token)) as r:
            if r.status != 200:
                raise aiohttp.ClientResponseError(r.request_info, r.history, status=r.status,
                                                  message=(await r.text())[:200])
            status = await r.json(content_type=None)
    sidecar = Sidecar(url=url, cluster=str(status.get("cluster") or ""),
                      member=str(status.get("member") or ""),
                      site=str(status.get("site") or ""),
                      ready=bool(status.get("ready", True)),
                      revision=int(status.get("revision") or 0))
    shards = status.get("shards")
    if isinstance(shards, dict):
        entries = [e for e in shards.get("shards") or [] if isinstance(e, dict)]
        sidecar.shard_map = int(shards.get("version") or 0)
        sidecar.shards = {str(e.get("name")): int(e.get("revision") or 0) for e in entries}
        sidecar.unreachable = [str(e.get("name")) for e in entries
                               if not e.get("reachable", True)]
    return sidecar


def shard_mismatch(shard_map: ShardMap | None, sidecar: Sidecar) -> str | None:
    """Why ``sidecar`` does not serve the sessions as ``shard_map`` places them (None:
    it does). Pure."""
    if shard_map is None:
        if sidecar.shard_map is not None:
            return (f"serves session shards (map version {sidecar.shard_map}), and the main "
                    "etcd cluster has no shard map")
        return None
    if sidecar.shard_map is None:
        return (f"serves sessions unsharded, and the main etcd cluster has shard map "
                f"version {shard_map.version}")
    if sidecar.shard_map != shard_map.version:
        return (f"serves shard map version {sidecar.shard_map}, and the main etcd cluster "
                f"has version {shard_map.version}")
    lacking = [name for name in shard_map.names if name not in sidecar.shards]
    if lacking:
        return f"does not serve session shard(s) {', '.join(lacking)}"
    return None


def data_check_refusals(shard_map: ShardMap | None, sidecars: list[Sidecar]) -> list[str]:
    """Why the data check cannot start with these sidecars and this shard map (pure): a
    moving map, a sidecar on another map, or one that cannot reach a shard."""
    reasons = []
    if shard_map is not None and shard_map.moving:
        reasons.append(
            f"--check-sidecar: the shard map (version {shard_map.version}, stage "
            f"{shard_map.stage}) is moving from {', '.join(s.name for s in shard_map.previous)}"
            f" to {', '.join(shard_map.names)}, and a moving session may sit in either "
            "shard, which the data check does not compare: finish the reshard (`meshxl "
            "shards set` with those shards) or run the drill without it")
    for sidecar in sidecars:
        why = shard_mismatch(shard_map, sidecar)
        if why is None and shard_map is not None:
            lost = [name for name in shard_map.names if name in sidecar.unreachable]
            if lost:
                why = f"cannot reach session shard(s) {', '.join(lost)}"
        if why is not None:
            reasons.append(f"--check-sidecar {sidecar.url} ({sidecar.member}) {why}")
    return reasons


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


async def baseline_revisions(client: aetcd.Client, keys: Keys, cluster: str,
                             sharded: Sharded | None = None) -> dict[str, int]:
    """Every session of ``cluster`` now: id -> its revision (with shards: in its own
    shard, where the map puts it)."""
    if sharded is None:
        return {k: revision for k, (revision, _) in (await committed(client, keys,
                                                                     cluster)).items()}
    out: dict[str, int] = {}
    for name in sharded.map.names:
        for session, (revision, _) in (await committed(sharded.clients[name], keys,
                                                       cluster)).items():
            if sharded.map.of(session).name == name:
                out[session] = revision
    return out


@dataclass(frozen=True)
class _Place:
    """Where sessions are committed: the main cluster (``shard`` None) or a shard, and
    the revision the sidecar has applied there."""

    shard: str | None
    client: aetcd.Client
    applied: int

    def label(self, session: str) -> str:
        return session if self.shard is None else f"{session} (shard {self.shard})"


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
                           token: str | None, baseline: Mapping[str, int],
                           sharded: Sharded | None = None) -> dict[str, Any]:
    """Read every session of the sidecar's cluster (those of ``baseline``, id ->
    revision before the drill, and those etcd has now) through the sidecar and compare
    each with etcd at the revision it answered from: in the main cluster, or with
    ``sharded`` in the session's own shard at that shard's revision. The report's
    entry for it."""
    cluster = sidecar.cluster
    problems: dict[str, list[str]] = {}
    per_shard: dict[str, Counter[str]] = {}
    now = await sidecar_identity(sidecar.url, token)
    places: dict[str | None, _Place]
    if sharded is None:
        places = {None: _Place(None, client, now.revision)}
    else:
        why = shard_mismatch(sharded.map, now)
        if why is not None:  # the map changed under the drill, or the sidecar lost a shard
            return _unchecked(sidecar, baseline, f"{sidecar.url} {why}")
        places = {name: _Place(name, sharded.clients[name], now.shards[name])
                  for name in sharded.map.names}

    def place_of(session: str) -> _Place:
        return places[None] if sharded is None else places[sharded.map.of(session).name]

    def note(kind: str, place: _Place, entry: str) -> None:
        problems.setdefault(kind, []).append(entry)
        if place.shard is not None:
            per_shard.setdefault(place.shard, Counter())[kind] += 1

    stored_now: set[str] = set()
    for place in places.values():
        for session in await committed(place.client, keys, cluster):
            if place_of(session) is place:
                stored_now.add(session)
            else:
                note("misplaced", place, f"{place.label(session)}: the map puts it in "
                                         f"shard {place_of(session).shard}")
    ids = sorted(set(baseline) | stored_now)
    async with AsyncClient(sidecar.url, token=token) as api:
        answers = await _read(api, ids)
    truths = {name: await committed(place.client, keys, cluster, place.applied)
              for name, place in places.items()}
    matched: Counter[str | None] = Counter()
    for session in ids:
        place = place_of(session)
        answer, stored = answers[session], truths[place.shard].get(session)
        label = place.label(session)
        if isinstance(answer, NotFound):
            if stored is None or await _at(place.client, keys, cluster, session, 0) is None:
                matched[place.shard] += 1  # not there at that revision, or deleted since
                continue
            note("missing", place, label)
            continue
        if isinstance(answer, SidecarError):
            note("unreadable", place, f"{label}: {answer}")
            continue
        try:
            named, number = split_etag(parse_etag(answer.etag, strong=False))
            revision = int(number)
        except (InputError, ValueError):
            note("different", place, f"{label}: ETag {answer.etag[:40]} names no etcd "
                                     "revision")
            continue
        if named != place.shard:
            note("different", place, f"{label}: served from "
                                     f"{f'shard {named}' if named else 'no shard'}")
            continue
        if revision > place.applied:  # written since the sidecar said where it was
            stored = await _at(place.client, keys, cluster, session, revision)
        if stored is None or stored[0] != revision:
            kind = "stale" if stored is not None and revision < stored[0] else "different"
            note(kind, place, f"{label}: sidecar revision {revision}, etcd "
                              f"{stored[0] if stored else 'none'}")
        elif _same(answer, stored[1]):
            matched[place.shard] += 1
        else:
            note("different", place, f"{label}: other bytes at revision {revision}")
    written = sum(1 for s in ids if (got := truths[place_of(s).shard].get(s))
                  and got[0] != baseline.get(s))
    report = {"sidecar": sidecar.url, "member": sidecar.member, "site": sidecar.site,
              "cluster": cluster, "sessions": len(ids),
              "at_revision": now.revision if sharded is None else None,
              "written_during": written, "matched": sum(matched.values()),
              "problems": {k: len(v) for k, v in problems.items()},
              "named": {k: v[:LISTED] for k, v in problems.items()}, "ok": not problems}
    if sharded is not None:
        report["shards"] = [
            {"shard": name, "at_revision": places[name].applied,
             "sessions": sum(1 for s in ids if place_of(s) is places[name]),
             "matched": matched[name], "problems": dict(per_shard.get(name, {}))}
            for name in sharded.map.names]
    return report


def _unchecked(sidecar: Sidecar, baseline: Mapping[str, int], why: str) -> dict[str, Any]:
    """The report's entry for a sidecar whose sessions could not be compared."""
    return {"sidecar": sidecar.url, "member": sidecar.member, "site": sidecar.site,
            "cluster": sidecar.cluster, "sessions": len(baseline), "at_revision": None,
            "written_during": 0, "matched": 0, "problems": {"shard map": 1},
            "named": {"shard map": [why]}, "ok": False, "shards": []}
