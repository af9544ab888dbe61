"""Versioned, encode-once xDS snapshots and the cache the ADS streams watch.

A :class:`Snapshot` serializes every resource exactly once and pre-encodes, per type,
the whole ``DiscoveryResponse`` minus its nonce. Streams then send bytes: the nonce is
appended by protobuf wire-format concatenation (a parser merges concatenated fields),
and a by-name subset is a concatenation of already encoded ``resources`` entries. So
the cost of a push is independent of the number of Envoys.

Versions are content hashes, not counters: two control-plane replicas fed the same
model produce the same versions, so an Envoy that reconnects to another replica sees
no change.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from google.protobuf.message import Message

from meshxl.protowire import len_field, type_name, varint
from meshxl.xds.types import TYPE_ORDER

__all__ = [
    "EncodeStats",
    "EncodedResources",
    "Snapshot",
    "SnapshotCache",
    "stats",
    "with_nonce",
]

# DiscoveryResponse field numbers (envoy/service/discovery/v3/discovery.proto).
_F_VERSION_INFO = 1
_F_RESOURCES = 2
_F_TYPE_URL = 4
_F_NONCE = 5
# google.protobuf.Any field numbers.
_F_ANY_TYPE_URL = 1
_F_ANY_VALUE = 2

_VERSION_HEX = 16
_SUBSET_MEMO_MAX = 1024


@dataclass
class EncodeStats:
    """Process-wide encode counters: the proof that encoding is once per version."""

    resources_encoded: int = 0
    snapshots_built: int = 0


stats = EncodeStats()
def with_nonce(response: bytes, nonce: str) -> bytes:
    """Append the nonce field to a pre-encoded response (parsers merge the fields)."""
    return response + len_field(_F_NONCE, nonce.encode())


@dataclass(frozen=True, eq=False)
class EncodedResources:
    """All resources of one type in a snapshot, already encoded.

    ``entries`` maps a resource name to its encoded ``resources`` field (tag, length,
    ``Any``), ready to be concatenated into a response.
    """

    type_url: str
    version: str
    entries: Mapping[str, bytes]
    response: bytes
    """The full ``DiscoveryResponse`` (all resources) without a nonce."""
    sources: Mapping[str, Message] = field(default_factory=dict, repr=False)
    """The message each entry was encoded from: a later build given the same object
    reuses the entry instead of encoding it again."""
    _subsets: dict[frozenset[str], bytes] = field(default_factory=dict, repr=False)
    _nonced: dict[tuple[frozenset[str] | None, str], bytes] = field(default_factory=dict,
                                                                   repr=False)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self.entries)

    def subset(self, names: frozenset[str]) -> bytes:
        """The response carrying only ``names`` (unknown names are left out).

        Many Envoys ask for the same names, so the concatenation is memoised.
        """
        if names >= self.entries.keys():
            return self.response
        cached = self._subsets.get(names)
        if cached is None:
            body = b"".join(self.entries[n] for n in sorted(names) if n in self.entries)
            cached = _frame(self.type_url, self.version, body)
            if len(self._subsets) >= _SUBSET_MEMO_MAX:
                self._subsets.clear()
            self._subsets[names] = cached
        return cached


    def message(self, names: frozenset[str] | None, nonce: str) -> bytes:
        """The response (all resources, or ``names``) with ``nonce``, ready to write.

        Streams that send the same names with the same nonce share one bytes object:
        a push to N Envoys builds one message, not N copies.
        """
        key = (names, nonce)
        cached = self._nonced.get(key)
        if cached is None:
            body = self.response if names is None else self.subset(names)
            cached = with_nonce(body, nonce)
            if len(self._nonced) >= _SUBSET_MEMO_MAX:
                self._nonced.clear()
            self._nonced[key] = cached
        return cached


def _frame(type_url: str, version: str, body: bytes) -> bytes:
    return (len_field(_F_VERSION_INFO, version.encode()) + body
            + len_field(_F_TYPE_URL, type_url.encode()))


def _encode_type(type_url: str, messages: Mapping[str, Message],
                 previous: EncodedResources | None = None,
                 sibling: EncodedResources | None = None) -> EncodedResources:
    """``previous``: this type's resources in the last snapshot (their entries are reused
    for the same message objects, and returned whole when nothing changed);
    ``sibling``: resources of the same type built just before (a zone's variant reuses
    the entries it shares with the global one)."""
    full_name = type_name(type_url)
    any_type_url = len_field(_F_ANY_TYPE_URL, type_url.encode())
    any_value_tag = varint(_F_ANY_VALUE << 3 | 2)
    entries: dict[str, bytes] = {}
    hashed: list[bytes] = []  # (name field, entry) per resource: what the version hashes
    empty: Mapping[str, Any] = {}
    old, old_entries = (previous.sources, previous.entries) if previous else (empty, empty)
    near, near_entries = (sibling.sources, sibling.entries) if sibling else (empty, empty)
    for name in sorted(messages):
        message = messages[name]
        if old.get(name) is message:  # the very object encoded last time
            entry = old_entries[name]
        elif near.get(name) is message:
            entry = near_entries[name]
        else:
            if message.DESCRIPTOR.full_name != full_name:
                raise ValueError(
                    f"resource {name!r} is a {message.DESCRIPTOR.full_name}, not {full_name}"
                )
            value = message.SerializeToString(deterministic=True)
            stats.resources_encoded += 1
            entry = len_field(_F_RESOURCES, any_type_url + any_value_tag + varint(len(value))
                           + value)
        entries[name] = entry
        hashed.append(len_field(1, name.encode()))
        hashed.append(entry)
    version = hashlib.sha256(b"".join(hashed)).hexdigest()[:_VERSION_HEX]
    if previous is not None and previous.version == version:
        return previous  # same bytes: keep its response and memoised subsets
    response = _frame(type_url, version, b"".join(entries.values()))
    return EncodedResources(type_url, version, MappingProxyType(entries), response,
                     MappingProxyType(dict(messages)))


class Snapshot:
    """An immutable, fully encoded set of resources of every type.

    Types absent from the input are served as empty, so a subscriber to a type the
    model does not use still gets an (empty) answer instead of waiting forever.
    Messages are kept (to recognise them in the next build) and must never be mutated
    after ``build``: a change is a new message object.
    """

    __slots__ = ("_types", "_zones")

    def __init__(self, types: Mapping[str, EncodedResources],
                 zones: Mapping[str, Mapping[str, EncodedResources]] | None = None) -> None:
        self._types = MappingProxyType(dict(types))
        self._zones = MappingProxyType({z: MappingProxyType(dict(t))
                                        for z, t in (zones or {}).items()})

    @classmethod
    def build(cls, resources: Mapping[str, Mapping[str, Message]],
              previous: Snapshot | None = None,
              zones: Mapping[str, Mapping[str, Mapping[str, Message]]] | None = None,
              ) -> Snapshot:
        """Encode ``{type_url: {name: message}}``; every message is serialized once.

        With ``previous``, a message that is the same object as one it encoded is not
        encoded again, so a rebuild after a one-member change encodes one resource.
        ``zones``: per Envoy locality zone, resources that replace the ones of the same
        type and name for that zone's Envoys (``site_affinity: local``); the rest of the
        type is shared, and encoded once.
        """
        old = previous._types if previous is not None else {}
        types = {t: _encode_type(t, resources.get(t, {}), old.get(t)) for t in TYPE_ORDER}
        for type_url, messages in resources.items():
            if type_url not in types:
                types[type_url] = _encode_type(type_url, messages, old.get(type_url))
        zoned: dict[str, dict[str, EncodedResources]] = {}
        for zone, replaced in (zones or {}).items():
            before: Mapping[str, EncodedResources] = (
                previous._zones.get(zone, {}) if previous is not None else {})
            zoned[zone] = {t: _encode_type(t, {**resources.get(t, {}), **messages},
                                           before.get(t), types.get(t))
                           for t, messages in replaced.items() if messages}
        stats.snapshots_built += 1
        return cls(types, zoned)

    def resources(self, type_url: str, zone: str = "") -> EncodedResources:
        """The type's resources as served to an Envoy in ``zone`` (its node locality)."""
        if zone and self._zones:
            types = self._zones.get(zone)
            variant = types.get(type_url) if types is not None else None
            if variant is not None:
                return variant
        found = self._types.get(type_url)
        if found is None:
            found = _encode_type(type_url, {})
        return found

    def version(self, type_url: str, zone: str = "") -> str:
        return self.resources(type_url, zone).version

    @property
    def versions(self) -> dict[str, str]:
        """The version of every type as served to Envoys outside any zone variant."""
        return {t: r.version for t, r in self._types.items()}

    def versions_for(self, zone: str) -> dict[str, str]:
        """The versions an Envoy in ``zone`` is served."""
        variant = self._zones.get(zone) if zone else None
        if not variant:
            return self.versions
        return {t: (variant[t] if t in variant else r).version for t, r in self._types.items()}

    @property
    def zones(self) -> dict[str, dict[str, str]]:
        """Per zone with a variant, the versions of its variant types."""
        return {z: {t: r.version for t, r in v.items()} for z, v in self._zones.items()}

    @property
    def type_urls(self) -> tuple[str, ...]:
        return tuple(self._types)

    def __repr__(self) -> str:
        counts = ", ".join(
            f"{t.rsplit('.', 1)[-1]}={r.version}({len(r.entries)})" for t, r in self._types.items()
        )
        return f"Snapshot({counts})"


class SnapshotCache:
    """The snapshot currently served; streams watch it for replacements.

    Starts empty (``snapshot is None``): streams hold their requests until the first
    snapshot arrives. Single event loop, no locks.
    """

    def __init__(self) -> None:
        self._snapshot: Snapshot | None = None
        self._generation = 0
        self._published_at: float | None = None
        self._watchers: set[asyncio.Event] = set()

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    @property
    def generation(self) -> int:
        """Incremented by every :meth:`set`; lets a waiter tell old from new."""
        return self._generation

    @property
    def published_at(self) -> float | None:
        """``time.monotonic()`` of the last :meth:`set` (None before the first): the start
        of a push, for the push-latency metric."""
        return self._published_at

    def set(self, snapshot: Snapshot) -> None:
        """Serve ``snapshot`` from now on and wake every watcher."""
        self._snapshot = snapshot
        self._generation += 1
        self._published_at = time.monotonic()
        for event in self._watchers:
            event.set()

    @contextmanager
    def watch(self) -> Iterator[asyncio.Event]:
        """An event set on every :meth:`set` while the ``with`` block lasts.

        The owner clears it; the ADS streams also set it themselves when a request
        arrives, so one event wakes a stream for either reason.
        """
        event = asyncio.Event()
        self._watchers.add(event)
        try:
            yield event
        finally:
            self._watchers.discard(event)

    async def wait(self, after: int = 0) -> Snapshot:
        """Return the snapshot once ``generation`` exceeds ``after``."""
        with self.watch() as changed:
            while self._snapshot is None or self._generation <= after:
                await changed.wait()
                changed.clear()
            return self._snapshot
