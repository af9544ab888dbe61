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
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from meshxl.errors import InputError

__all__ = ["MOVE", "PREPARE", "Shard", "ShardMap", "hash_tag", "parse_shard_map",
           "shard_etag", "split_etag", "winner"]

PREPARE, MOVE = "prepare", "move"
"""The stages of a moving map (the module docstring)."""

NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")
"""A shard's name: what ETags carry, metrics label and keys never escape."""
MAX_SHARDS = 64


def hash_tag(session_id: str) -> str:
    """What a session's shard is hashed from (the module docstring)."""
    start = session_id.find("{")
    if start >= 0:
        end = session_id.find("}", start + 1)
        if end > start + 1:
            return session_id[start + 1:end]
    return session_id


def _score(name: str, tag: str) -> int:
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

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "etcd": self.etcd}


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

    @functools.cached_property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.shards)

    @property
    def moving(self) -> bool:
        return bool(self.previous)

    def of(self, session_id: str) -> Shard:
        return self._by_name[winner(self.names, session_id)]

    def source_of(self, session_id: str) -> Shard | None:
        """While moving: the shard ``session_id`` may still be in when its shard changed
        (None: it did not, or the map is not moving)."""
        if not self.previous:
            return None
        old = self._by_name[winner(self._previous_names, session_id)]
        return None if old.name == winner(self.names, session_id) else old

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
    fields = {"version", "shards", "previous", "stage"}
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
    urls = {s.name: s.etcd for s in shards}
    for old in previous:
        if urls.get(old.name, old.etcd) != old.etcd:
            raise InputError(f"shard {old.name} names other etcd URLs than before "
                             f"({urls[old.name]} vs {old.etcd}): give a moved cluster a "
                             "new name")
    return ShardMap(version, shards, previous, stage)


def _shard_list(items: Any, where: str) -> tuple[Shard, ...]:
    if not isinstance(items, list) or not items:
        raise InputError(f"the shard map needs a non-empty list of {where}")
    if len(items) > MAX_SHARDS:
        raise InputError(f"at most {MAX_SHARDS} shards, got {len(items)}")
    shards = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or set(item) - {"name", "etcd"}:
            raise InputError(f"{where}[{i}] must be {{name, etcd}}, got {item!r:.80}")
        name, etcd = item.get("name"), item.get("etcd")
        if not isinstance(name, str) or not NAME.match(name):
            raise InputError(f"{where}[{i}].name must be a lowercase name of letters, "
                             f"digits and '-' (1-32 characters), got {name!r:.40}")
        if not isinstance(etcd, str) or not etcd.strip():
            raise InputError(f"{where}[{i}].etcd must be the shard's etcd URLs, "
                             f"got {etcd!r:.80}")
        shards.append(Shard(name, ",".join(u.strip() for u in etcd.split(",") if u.strip())))
    names = [s.name for s in shards]
    if len(set(names)) != len(names):
        raise InputError(f"shard names must be unique, got {', '.join(names)}")
    return tuple(shards)


def shard_etag(shard: str, revision: int | str) -> str:
    """The ETag of a session at ``revision`` of ``shard`` (without quotes)."""
    return f"{shard}:{revision}"


def split_etag(tag: str) -> tuple[str | None, str]:
    """``east-1:42`` -> ("east-1", "42"); a tag without a shard -> (None, tag)."""
    shard, sep, rest = tag.rpartition(":")
    return (shard, rest) if sep else (None, tag)
