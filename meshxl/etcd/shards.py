"""Session shards: several etcd clusters for session state, and which one holds a
session. Pure code (docs/scaling.md, "Past one etcd cluster").

The shard map lives in the main etcd cluster (:meth:`meshxl.etcd.keys.Keys.shards`),
beside the model, the registrations and the admin state, which never move; only session
keys are sharded. A session's shard is chosen by rendezvous hashing (highest random
weight) of its id's hash tag over the shard names: adding a shard moves only the
sessions the new one wins (about 1/K), removing one moves only its own, and every
sidecar computes the same answer from the same map. A hash tag is the part of the id
between the first ``{`` and the next ``}`` when not empty (``{user42}:cart`` and
``{user42}:prefs`` share a shard, as in Redis Cluster); otherwise the whole id.

An ETag names its shard when sessions are sharded (``"east-1:42"``), so it is never
compared in another shard's revisions.

A map that is *moving* (``previous`` set) is an online reshard under way: sessions
belong to ``shards``, and a session whose shard changed may still be in its
``previous`` shard until it is moved (:mod:`meshxl.etcd.moving`). Its ``stage`` is
:data:`PREPARE` first (the sessions that move are read where they are, their writes
wait), then :data:`MOVE` (each is moved, by whoever touches it first): no sidecar
still on the old map ever writes beside one that moves sessions.

A shard *is* its etcd cluster: each entry carries the cluster id etcd answers with
(``cluster_id``, as ``meshxl shards set`` found it), so a shard renamed, or reached at
other URLs, is still the same shard, and a session whose old and new shards are one
cluster does not move (:meth:`ShardMap.source_of`). Two entries of one list never
name one cluster. Every shard's etcd also holds the map's *fence*
(:func:`fence_value`): the newest map version stored, which every session
transaction compares (docs/scaling.md, "The map version fence").
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from meshxl.errors import Conflict, InputError, Unavailable

from .endpoints import parse_urls

__all__ = ["MOVE", "PREPARE", "Shard", "ShardMap", "Step", "fence_value", "hash_tag",
           "next_map", "parse_fence", "parse_shard_map", "same_cluster", "shard_etag",
           "split_etag", "winner"]

PREPARE, MOVE = "prepare", "move"
"""The stages of a moving map (the module docstring)."""

NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")
"""A shard's name: what ETags carry, metrics label and keys never escape."""
CLUSTER_ID = re.compile(r"^[0-9a-f]{1,16}$")
"""An etcd cluster id as etcd prints it (a 64-bit number in hexadecimal)."""
MAX_SHARDS = 64
FENCE_DIGITS = 20
"""Digits of a fence value: any 64-bit version, zero-padded, so that etcd's byte-wise
comparison of values is the numeric one."""


def fence_value(version: int) -> bytes:
    """A shard's fence for map ``version``: ``00000000000000000042``."""
    if not 0 <= version < 10 ** FENCE_DIGITS:
        raise ValueError(f"shard map version {version} out of range")
    return b"%020d" % version


def parse_fence(raw: bytes | None) -> int:
    """The map version of a stored fence (0: none yet). A value that is not one (a
    hand edit) counts as 0: a fence is only ever raised past it."""
    if not raw or len(raw) != FENCE_DIGITS or not raw.isdigit():
        return 0
    return int(raw)


def hash_tag(session_id: str) -> str:
    """What a session's shard is hashed from (the module docstring)."""
    start = session_id.find("{")
    if start >= 0:
        end = session_id.find("}", start + 1)
        if end > start + 1:
            return session_id[start + 1:end]
    return session_id


def _score(name: str, tag: str) -> int:
    import hashlib  # only with shards (it loads OpenSSL's hashes)

    digest = hashlib.blake2b(f"{name}\0{tag}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def winner(names: Sequence[str], session_id: str) -> str:
    """The shard of ``session_id`` among ``names`` (rendezvous hashing)."""
    tag = hash_tag(session_id)
    return max(names, key=lambda name: (_score(name, tag), name))


@dataclass(frozen=True)
class Shard:
    name: str
    etcd: str
    """Its members' client URLs, comma-separated (as ``--etcd``)."""
    cluster_id: str = ""
    """The etcd cluster it is (hexadecimal, as etcd prints it); empty in a map stored
    before shards were known by their clusters."""

    def as_dict(self) -> dict[str, str]:
        out = {"name": self.name, "etcd": self.etcd}
        if self.cluster_id:
            out["cluster_id"] = self.cluster_id
        return out


def same_cluster(a: Shard, b: Shard) -> bool:
    """Whether ``a`` and ``b`` are one etcd cluster: one name (a name never changes its
    cluster: :func:`next_map`), or one known cluster id. Pure."""
    return a.name == b.name or bool(a.cluster_id and a.cluster_id == b.cluster_id)


@dataclass(frozen=True, eq=True)
class ShardMap:
    """The session shards: ``version`` counts the map's changes."""

    version: int
    shards: tuple[Shard, ...]
    previous: tuple[Shard, ...] = ()
    """While sessions move to ``shards`` (an online reshard): the shards they move
    from; empty once every moving session is in its new shard."""
    stage: str = ""
    """With ``previous``: :data:`PREPARE` or :data:`MOVE`."""
    spread: bool = False
    """At :data:`PREPARE`: sessions may be in either list already (a reshard that
    reached :data:`MOVE` was turned back), so going back is a reshard too."""
    problem: str = dataclasses.field(default="", compare=False)
    """Only in a sidecar that holds no usable map (none could be read or used): why;
    such a map has no shards, and every session answers 503 with it. Never stored."""

    @classmethod
    def unusable(cls, problem: str) -> ShardMap:
        """The map of a sidecar that could use none (see :attr:`problem`)."""
        return cls(0, (), problem=problem)

    @functools.cached_property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.shards)

    @property
    def moving(self) -> bool:
        return bool(self.previous)

    def of(self, session_id: str) -> Shard:
        if not self.shards:
            raise Unavailable(f"no usable session shard map: {self.problem}")
        return self._by_name[winner(self.names, session_id)]

    def named(self, name: str) -> Shard | None:
        """The shard called ``name`` in either list."""
        return self._by_name.get(name)

    def source_of(self, session_id: str) -> Shard | None:
        """While moving: the shard ``session_id`` may still be in when its shard changed
        to another cluster (None: it did not, or the map is not moving)."""
        if not self.previous:
            return None
        old = self._by_name[winner(self._previous_names, session_id)]
        return None if same_cluster(old, self.of(session_id)) else old

    @functools.cached_property
    def _previous_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.previous)

    @functools.cached_property
    def _by_name(self) -> dict[str, Shard]:
        return {s.name: s for s in (*self.previous, *self.shards)}

    @functools.cached_property
    def every(self) -> tuple[Shard, ...]:
        """Every shard a sidecar needs now: the map's, then those it moves away from."""
        names = set(self.names)
        return (*self.shards, *(s for s in self.previous if s.name not in names))

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": self.version,
                               "shards": [s.as_dict() for s in self.shards]}
        if self.previous:
            out["previous"] = [s.as_dict() for s in self.previous]
            out["stage"] = self.stage
            if self.spread:
                out["spread"] = True
        return out

    def encode(self) -> bytes:
        return json.dumps(self.as_dict(), sort_keys=True).encode()


def parse_shard_map(raw: bytes | str | dict[str, Any]) -> ShardMap:
    """A stored (or given) shard map, checked: InputError names what is wrong."""
    if isinstance(raw, bytes | str):
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise InputError(f"the shard map is not JSON: {exc}") from None
    else:
        data = raw
    if not isinstance(data, dict):
        raise InputError("the shard map must be an object with version and shards")
    version = data.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise InputError(f"shard map version must be a non-negative integer, got {version!r}")
    fields = {"version", "shards", "previous", "stage", "spread"}
    if set(data) - fields:
        raise InputError(f"the shard map has unknown fields: "
                         f"{', '.join(sorted(set(data) - fields))}")
    shards = _shard_list(data.get("shards"), "shards")
    previous = (_shard_list(data["previous"], "previous")
                if data.get("previous") is not None else ())
    stage = data.get("stage", "")
    if previous and stage not in (PREPARE, MOVE):
        raise InputError(f"a moving shard map's stage must be {PREPARE} or {MOVE}, "
                         f"got {stage!r:.40}")
    if not previous and stage:
        raise InputError("a shard map without previous shards has no stage")
    spread = data.get("spread", False)
    if not isinstance(spread, bool) or (spread and stage != PREPARE):
        raise InputError(f"spread is true or absent, and only at the stage {PREPARE}, "
                         f"got {spread!r:.20}")
    named = {s.name: s for s in shards}
    for old in previous:
        if named.get(old.name, old) != old:
            raise InputError(f"shard {old.name} is listed twice, as {named[old.name].as_dict()}"
                             f" and as {old.as_dict()}: a shard in both lists of a moving "
                             "map is one shard")
    return ShardMap(version, shards, previous, stage, spread)


def _shard_list(items: Any, where: str) -> tuple[Shard, ...]:
    if not isinstance(items, list) or not items:
        raise InputError(f"the shard map needs a non-empty list of {where}")
    if len(items) > MAX_SHARDS:
        raise InputError(f"at most {MAX_SHARDS} shards, got {len(items)}")
    shards = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or set(item) - {"name", "etcd", "cluster_id"}:
            raise InputError(f"{where}[{i}] must be {{name, etcd}}, got {item!r:.80}")
        name, etcd, cluster = item.get("name"), item.get("etcd"), item.get("cluster_id", "")
        if not isinstance(name, str) or not NAME.match(name):
            raise InputError(f"{where}[{i}].name must be a lowercase name of letters, "
                             f"digits and '-' (1-32 characters), got {name!r:.40}")
        if not isinstance(etcd, str) or not etcd.strip():
            raise InputError(f"{where}[{i}].etcd must be the shard's etcd URLs, "
                             f"got {etcd!r:.80}")
        try:
            parse_urls(etcd)
        except InputError as exc:
            raise InputError(f"shard {name}: {exc}") from None
        if not isinstance(cluster, str) or (cluster and not CLUSTER_ID.match(cluster)):
            raise InputError(f"{where}[{i}].cluster_id must be an etcd cluster id in "
                             f"hexadecimal, got {cluster!r:.40}")
        shards.append(Shard(name, ",".join(u.strip() for u in etcd.split(",") if u.strip()),
                            cluster))
    names = [s.name for s in shards]
    if len(set(names)) != len(names):
        raise InputError(f"shard names must be unique, got {', '.join(names)}")
    check_distinct(shards)
    return tuple(shards)


def check_distinct(shards: Sequence[Shard]) -> None:
    """InputError unless every shard of one list is its own etcd cluster. Pure."""
    seen: dict[str, str] = {}
    for shard in shards:
        if shard.cluster_id and shard.cluster_id in seen:
            raise InputError(
                f"shards {seen[shard.cluster_id]} and {shard.name} are one etcd cluster "
                f"(cluster id {shard.cluster_id}): each shard must be its own cluster, or "
                "a session's move would delete its only copy; list it once")
        seen.setdefault(shard.cluster_id, shard.name)


def shard_etag(shard: str, revision: int | str) -> str:
    """The ETag of a session at ``revision`` of ``shard`` (without quotes)."""
    return f"{shard}:{revision}"


def split_etag(tag: str) -> tuple[str | None, str]:
    """``east-1:42`` -> ("east-1", "42"); a tag without a shard -> (None, tag)."""
    shard, sep, rest = tag.rpartition(":")
    return (shard, rest) if sep else (None, tag)


# -- the next map: what `meshxl shards set` stores, decided without I/O -------------------

FIRST, UNCHANGED, IN_PLACE, RESHARD, RESUME, BACK, RETARGET = (
    "first", "unchanged", "in place", "reshard", "resume", "back", "retarget")


@dataclass(frozen=True)
class Step:
    """What setting a list of shards does to the map stored now (:func:`next_map`)."""

    kind: str
    """:data:`FIRST` (no map yet), :data:`UNCHANGED`, :data:`IN_PLACE` (new URLs of the
    same clusters), :data:`RESHARD` (sessions move), :data:`RESUME` (the reshard under
    way, to its end), :data:`BACK` (to the list it started from) or :data:`RETARGET`
    (at the stage prepare, to yet another list: nothing moved)."""
    map: ShardMap
    """The map to go on from: the stored one, or the one to store (:attr:`store`)."""
    store: bool


def _by_name(shards: Sequence[Shard]) -> dict[str, Shard]:
    return {s.name: s for s in shards}


def _updated(shards: Sequence[Shard], new: Sequence[Shard]) -> tuple[Shard, ...]:
    """``shards`` with those also in ``new`` (by name) as ``new`` has them (its URLs)."""
    given = _by_name(new)
    return tuple(given.get(s.name, s) for s in shards)


def check_identity(current: ShardMap, new: Sequence[Shard]) -> None:
    """InputError when a name of ``new`` reaches another etcd cluster than the shard of
    that name in ``current``: a shard's name stays with its cluster (sessions placed by
    the name would otherwise be looked for where they never were). Cluster ids unknown
    (a map stored without them whose shard does not answer): the URLs must be the same.
    Pure."""
    known = {s.name: s for s in (*current.previous, *current.shards)}
    for shard in new:
        was = known.get(shard.name)
        if was is None:
            continue
        if was.cluster_id and shard.cluster_id:
            if was.cluster_id == shard.cluster_id:
                continue
            raise InputError(
                f"shard {shard.name} is etcd cluster {was.cluster_id}, and {shard.etcd} "
                f"reaches another etcd cluster ({shard.cluster_id}): a shard keeps its "
                f"cluster. To move {shard.name}'s sessions there, give that cluster a new "
                f"name (--shard NEWNAME={shard.etcd}) and leave {shard.name} out, at its "
                f"URLs ({was.etcd}) until its sessions moved")
        if was.etcd == shard.etcd:
            continue
        raise Conflict(f"shard {shard.name} was stored without its cluster id and does not "
                       f"answer at {was.etcd}: whether {shard.etcd} is the same cluster "
                       "cannot be told; run again when it answers")


def next_map(current: ShardMap | None, new: Sequence[Shard], floor: int = 0) -> Step:
    """The step from ``current`` to the list ``new`` (shards with their cluster ids, as
    found: :func:`check_identity` passed). A new version is above ``current``'s and
    ``floor`` (the highest fence of the shards involved). Conflict when the list cannot
    be reached from the stage ``current`` is at. Pure; ``tests/unit/test_reshard_steps.py``."""
    new = tuple(new)
    check_distinct(new)
    version = max(current.version if current is not None else 0, floor) + 1
    names = {s.name for s in new}
    if current is None:
        return Step(FIRST, ShardMap(version, new), True)
    check_identity(current, new)
    if not current.moving:
        if names != set(current.names):
            return Step(RESHARD, ShardMap(version, new, _updated(current.shards, new),
                                          PREPARE), True)
        if all(_by_name(current.shards)[s.name].etcd == s.etcd for s in new):
            return Step(UNCHANGED, current, False)
        return Step(IN_PLACE, ShardMap(version, new), True)
    previous_names = {s.name for s in current.previous}
    if names == set(current.names):
        if all(_by_name(current.shards)[s.name].etcd == s.etcd for s in new):
            return Step(RESUME, current, False)
        return Step(RESUME, ShardMap(version, new, _updated(current.previous, new),
                                     current.stage, current.spread), True)
    if names == previous_names:
        if current.stage == PREPARE and not current.spread:
            return Step(BACK, ShardMap(version, new), True)  # nothing moved yet
        return Step(BACK, ShardMap(version, new, _updated(current.shards, new), PREPARE,
                                   spread=True), True)
    if current.stage == PREPARE and not current.spread:
        return Step(RETARGET, ShardMap(version, new, _updated(current.previous, new),
                                       PREPARE), True)
    raise Conflict(
        f"a reshard from {', '.join(sorted(previous_names))} to "
        f"{', '.join(sorted(current.names))} is under way (map version {current.version}, "
        "sessions may be in either): finish it (set those shards) or go back (set the "
        "shards it started from) before another list")
