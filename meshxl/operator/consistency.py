"""The drill's post-test data check (Maestro's drill compares the connection tables of
both sites after the failover; meshxl compares sessions).

Every session written before and during the drill is read back through sidecars of the
surviving site (``bulkGet``: what those members serve on a failover) and compared with
what etcd has acknowledged (:mod:`.changes`): each session's latest committed version,
read from etcd *before* the sidecar is asked. An answer older than that is ``stale``;
one at that revision must carry its bytes (else ``different``); a newer one was written
since, and must be etcd's version at the answer's own revision, byte for byte. So the
check holds under a steady write load, and does not take the sidecar's word for where
it is. A session etcd has but the sidecar does not serve is ``missing``, one it cannot
read ``unreadable``.

What was acknowledged: the sessions etcd had at the baseline (before the site went
offline), and every version written since, replayed from etcd's history. A session
whose last acknowledged version etcd no longer has is ``lost``, unless it was deleted
through the API (its deletion record, ``meshxl.statesync.deletions``, names that
version or a later one) or may have expired (its record's write time plus the
cluster's session TTL has passed): deleted behind the API (``etcdctl del``), or gone
with a restore from an older backup (etcd then has an older version, or none). A history
compacted since the baseline cannot be replayed: the report says so, and only the
baseline's sessions are checked for loss.

With sessions sharded over several etcd clusters (:mod:`meshxl.etcd.shards`), each
cluster counts its own revisions: every session is compared in its own shard's etcd,
with that shard's baseline, history and deletion records, and its ETag must name that
shard (``"s1:42"``). A session stored in a shard the map does not put it in is a problem
too (``misplaced``: no sidecar serves it from there). The report counts per shard and
names each problem session's shard. A map that is moving (an online reshard) is not
checked: a session may then sit in either of two shards.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aetcd
import aiohttp
from aetcd import rpc

from meshxl import headers as hdr
from meshxl.client import AsyncClient
from meshxl.client.errors import NotFound, SidecarError
from meshxl.errors import InputError
from meshxl.etcd.keys import Keys
from meshxl.etcd.shards import ShardMap, split_etag
from meshxl.statesync.bulk import MAX_ITEMS as MAX_BULK_ITEMS
from meshxl.statesync.conditions import parse_etag
from meshxl.statesync.record import SessionRecord

from . import changes
from .changes import HistoryCompacted, Known, newest

__all__ = ["Baseline", "Sharded", "Sidecar", "baseline", "compare_sessions",
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
    ttl: float = 0.0
    """Its sessions' TTL (``sessions.ttl``; 0: not said): how long a session it wrote
    may live without a write."""


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
                      revision=int(status.get("revision") or 0),
                      ttl=_ttl(status.get("settings")))
    shards = status.get("shards")
    if isinstance(shards, dict):
        entries = [e for e in shards.get("shards") or [] if isinstance(e, dict)]
        sidecar.shard_map = int(shards.get("version") or 0)
        sidecar.shards = {str(e.get("name")): int(e.get("revision") or 0) for e in entries}
        sidecar.unreachable = [str(e.get("name")) for e in entries
                               if not e.get("reachable", True)]
    return sidecar


def _ttl(settings: Any) -> float:
    """``settings.ttl`` of a sidecar's status (0: not said, or not a number)."""
    value = settings.get("ttl") if isinstance(settings, dict) else None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        and 0 < value < float("inf") else 0.0


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


@dataclass
class Baseline:
    """One cluster's sessions before the drill, as etcd had them."""

    sessions: dict[str, Known] = field(default_factory=dict)
    """Every session (with shards: in its own shard) -> its version then."""
    revisions: dict[str | None, int] = field(default_factory=dict)
    """etcd's revision then, by shard (None: the main cluster)."""


async def baseline(client: aetcd.Client, keys: Keys, cluster: str,
                   sharded: Sharded | None = None) -> Baseline:
    """Every session of ``cluster`` now and etcd's revision (with shards: each session
    in its own shard, where the map puts it, and each shard's revision)."""
    found = Baseline()
    places: list[tuple[str | None, aetcd.Client]] = [(None, client)] if sharded is None \
        else [(name, sharded.clients[name]) for name in sharded.map.names]
    for name, place in places:
        revision, sessions = await changes.committed(place, keys, cluster)
        found.revisions[name] = revision
        for session, (number, raw) in sessions.items():
            if sharded is None or sharded.map.of(session).name == name:
                found.sessions[session] = changes.known(number, raw)
    return found


@dataclass(frozen=True)
class _Place:
    """Where sessions are committed: the main cluster (``shard`` None) or a shard; what
    etcd had there before the drill and when the check read it."""

    shard: str | None
    client: aetcd.Client
    before: int
    """etcd's revision at the baseline."""

    def label(self, session: str) -> str:
        return session if self.shard is None else f"{session} (shard {self.shard})"


@dataclass
class _Etcd:
    """What one place's etcd says before the sidecar is read."""

    revision: int
    sessions: dict[str, tuple[int, bytes]]
    written: dict[str, Known]
    """Versions written since the baseline (its history, replayed)."""
    history: str | None
    """Why the history since the baseline was not replayed (None: it was)."""


async def _ask_etcd(place: _Place, keys: Keys, cluster: str) -> _Etcd:
    revision, sessions = await changes.committed(place.client, keys, cluster)
    written: dict[str, Known] = {}
    history = None
    if revision < place.before:  # went back: a restore (its history is another one)
        history = (f"etcd's revision went back from {place.before} at the baseline to "
                   f"{revision}: restored from a backup?")
    elif revision > place.before:
        try:
            written = await changes.written_since(place.client, keys, cluster,
                                                  place.before, revision)
        except HistoryCompacted as exc:
            history = str(exc)
    return _Etcd(revision, sessions, written, history)


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


async def _at(client: aetcd.Client, keys: Keys, cluster: str, session: str,
              revision: int) -> tuple[int, bytes] | None:
    """One session as etcd had it at ``revision`` (0: now)."""
    key = keys.session(cluster, session).encode()
    response = await client.kvstub.Range(rpc.RangeRequest(key=key, revision=revision),
                                         timeout=30, metadata=client.metadata)
    return (response.kvs[0].mod_revision, response.kvs[0].value) if response.kvs else None


def lost(acknowledged: Known | None, now: tuple[int, bytes] | None, deleted: int,
         ttl: float, clock: float) -> str | None:
    """Why a session whose last acknowledged version is ``acknowledged`` is lost, as
    etcd has it ``now`` (None: not at all), with ``deleted`` the highest version its
    deletion records name (0: none) and the sessions' ``ttl`` at ``clock`` (wall
    time); None: it is not. Pure."""
    if acknowledged is None or (now is not None and now[0] >= acknowledged.revision):
        return None
    if now is not None:
        return (f"etcd has revision {now[0]}, older than revision {acknowledged.revision} "
                "it acknowledged")
    if deleted >= acknowledged.revision:
        return None  # deleted through the API
    updated = acknowledged.updated
    if updated is not None and ttl > 0 and clock >= updated + ttl:
        return None  # may have expired
    return (f"revision {acknowledged.revision} acknowledged, gone from etcd without a "
            "deletion record" + (f", {clock - updated:.0f} s after its last write (TTL "
                                 f"{ttl:g} s)" if updated is not None else ""))


async def compare_sessions(client: aetcd.Client, keys: Keys, sidecar: Sidecar,
                           token: str | None, before: Baseline,
                           sharded: Sharded | None = None,
                           clock: Callable[[], float] = time.time) -> dict[str, Any]:
    """Read every session of the sidecar's cluster acknowledged before or during the
    drill through the sidecar and compare each with what etcd acknowledged (the module
    docstring): in the main cluster, or with ``sharded`` in the session's own shard.
    The report's entry for it."""
    cluster = sidecar.cluster
    problems: dict[str, list[str]] = {}
    per_shard: dict[str, Counter[str]] = {}
    now = await sidecar_identity(sidecar.url, token)
    places: dict[str | None, _Place]
    if sharded is None:
        places = {None: _Place(None, client, before.revisions.get(None, 0))}
    else:
        why = shard_mismatch(sharded.map, now)
        if why is not None:  # the map changed under the drill, or the sidecar lost a shard
            return _unchecked(sidecar, before.sessions, f"{sidecar.url} {why}")
        places = {name: _Place(name, sharded.clients[name], before.revisions.get(name, 0))
                  for name in sharded.map.names}

    def place_of(session: str) -> _Place:
        return places[None] if sharded is None else places[sharded.map.of(session).name]

    def note(kind: str, place: _Place, entry: str) -> None:
        problems.setdefault(kind, []).append(entry)
        if place.shard is not None:
            per_shard.setdefault(place.shard, Counter())[kind] += 1

    told = {name: await _ask_etcd(place, keys, cluster) for name, place in places.items()}
    deleted: dict[str, int] = {}
    for place in places.values():
        for session, number in (await changes.deletion_records(place.client, keys,
                                                                cluster)).items():
            deleted[session] = max(number, deleted.get(session, 0))
    truths: dict[str | None, dict[str, tuple[int, bytes]]] = {name: {} for name in places}
    for name, etcd_now in told.items():
        for session, value in etcd_now.sessions.items():
            if place_of(session) is places[name]:
                truths[name][session] = value
            else:
                note("misplaced", places[name], f"{places[name].label(session)}: the map "
                                                f"puts it in shard {place_of(session).shard}")
    ids = sorted(set(before.sessions) | {s for t in truths.values() for s in t}
                 | {s for name, e in told.items() for s in e.written
                    if place_of(s) is places[name]})
    async with AsyncClient(sidecar.url, token=token) as api:
        answers = await _read(api, ids)
    matched: Counter[str | None] = Counter()
    at = clock()
    for session in ids:
        place = place_of(session)
        answer, stored = answers[session], truths[place.shard].get(session)
        label = place.label(session)
        acknowledged = newest(before.sessions.get(session),
                              told[place.shard].written.get(session))
        why = lost(acknowledged, stored, deleted.get(session, 0), now.ttl or sidecar.ttl, at)
        if why is not None:
            note("lost", place, f"{label}: {why}")
            continue
        kind, detail = await _judge(place, keys, cluster, session, answer, stored,
                                    told[place.shard].revision)
        if kind is None:
            matched[place.shard] += 1
        else:
            note(kind, place, f"{label}{detail}")
    written = sum(1 for s in ids if s in told[place_of(s).shard].written
                  or ((got := truths[place_of(s).shard].get(s)) is not None
                      and (s not in before.sessions
                           or got[0] != before.sessions[s].revision)))
    report = {"sidecar": sidecar.url, "member": sidecar.member, "site": sidecar.site,
              "cluster": cluster, "sessions": len(ids),
              "at_revision": told[None].revision if sharded is None else None,
              "written_during": written, "matched": sum(matched.values()),
              "problems": {k: len(v) for k, v in problems.items()},
              "named": {k: v[:LISTED] for k, v in problems.items()}, "ok": not problems,
              "history": {(name or "main"): e.history for name, e in told.items()
                          if e.history is not None}}
    if sharded is not None:
        report["shards"] = [
            {"shard": name, "at_revision": told[name].revision,
             "sessions": sum(1 for s in ids if place_of(s) is places[name]),
             "matched": matched[name], "problems": dict(per_shard.get(name, {}))}
            for name in sharded.map.names]
    return report


async def _judge(place: _Place, keys: Keys, cluster: str, session: str, answer: Any,
                 stored: tuple[int, bytes] | None, read_at: int) -> tuple[str | None, str]:
    """The sidecar's ``answer`` against etcd's latest version ``stored`` (None: none),
    read at revision ``read_at`` before it: (the kind of problem, its detail), or
    (None, "") when it matches."""
    if isinstance(answer, NotFound):
        if stored is None or await _at(place.client, keys, cluster, session, 0) is None:
            return None, ""  # none acknowledged, or deleted since
        return "missing", f": etcd has revision {stored[0]}"
    if isinstance(answer, SidecarError):
        return "unreadable", f": {answer}"
    try:
        named, number = split_etag(parse_etag(answer.etag, strong=False))
        revision = int(number)
    except (InputError, ValueError):
        return "different", f": ETag {answer.etag[:40]} names no etcd revision"
    if named != place.shard:
        return "different", f": served from {f'shard {named}' if named else 'no shard'}"
    latest = stored[0] if stored is not None else 0
    if revision < latest or (stored is None and revision <= read_at):
        return "stale", (f": sidecar revision {revision}, etcd had acknowledged "
                         f"{latest or 'its deletion'} before it was asked")
    if revision > latest:  # written since etcd was read
        stored = await _at(place.client, keys, cluster, session, revision)
    if stored is None or stored[0] != revision:
        return "different", (f": sidecar revision {revision}, etcd "
                             f"{stored[0] if stored else 'none'}")
    if not _same(answer, stored[1]):
        return "different", f": other bytes at revision {revision}"
    return None, ""


def _unchecked(sidecar: Sidecar, sessions: Mapping[str, Any], why: str) -> dict[str, Any]:
    """The report's entry for a sidecar whose sessions could not be compared."""
    return {"sidecar": sidecar.url, "member": sidecar.member, "site": sidecar.site,
            "cluster": sidecar.cluster, "sessions": len(sessions), "at_revision": None,
            "written_during": 0, "matched": 0, "problems": {"shard map": 1},
            "named": {"shard map": [why]}, "ok": False, "history": {}, "shards": []}
