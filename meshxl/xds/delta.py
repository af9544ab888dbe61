"""Incremental ADS (``DeltaAggregatedResources``), served beside state of the world.

A delta stream tells Envoy only what changed: each resource carries a version of its
own (a hash of its encoded bytes, so replicas agree), removals are named in
``removed_resources``, and Envoy subscribes to and unsubscribes from names as it goes.
What the two protocols share (node status, the quarantine of rejected resources, the
``on_sent``/``on_answer`` hooks, metrics) lives in :mod:`meshxl.xds.server`; this
module only runs the delta protocol on one stream.

Rules, from Envoy's xDS protocol document ("Incremental xDS") and Envoy's delta client:

* **Wildcard.** CDS and LDS are wildcard when the type's first request subscribes to
  no name (legacy) or to ``*``; unsubscribing ``*`` ends it.
* **What the client holds.** The first request's ``initial_resource_versions`` say what
  Envoy kept from its previous stream; resources it holds at the current version are
  not sent again, so reconnecting to another replica (same content, same versions)
  changes nothing. After that the stream assumes Envoy holds what it was sent.
* **Subscribing** to a name sends it even if Envoy should hold it (it may have
  forgotten it). A subscribed name that does not exist is answered in
  ``removed_resources`` at once, so Envoy need not wait for its fetch timeout.
  Unsubscribing needs no answer, except a name that is also covered by a wildcard:
  it is sent again so Envoy knows to keep it.
* **Nonces** pair ACKs and NACKs with responses, several of which may be in flight;
  a request with an unknown nonce still changes the subscriptions (the protocol says
  so) but acknowledges nothing.
* **NACK.** Envoy applies nothing of a rejected response and keeps its versions. Each
  (name, version) of that response is quarantined for the node: never sent to it
  again, on this stream or after a reconnect; a new version is.
* **Re-warming.** An updated cluster is re-created in Envoy and warms until its
  endpoints arrive; its EDS name is already subscribed, so Envoy asks for nothing, and
  without an answer the new cluster would warm until ``initial_fetch_timeout``. So
  after a cluster is sent, its ClusterLoadAssignment is sent again (consul does the
  same). Listeners need nothing alike: Envoy reuses the route configuration it holds.
* **Status.** Every response carries the type's snapshot version as
  ``system_version_info``, and a type whose snapshot version changed gets a response
  even when none of the node's resources did: so ``acked_version`` per type, the
  failover tracer and convergence read delta nodes exactly like SotW ones. A response
  that had to leave a quarantined resource out does not count as that version ACKed.

Encoding stays "once per snapshot": per type, each resource's delta entry (``Resource``
with name, version and the already encoded ``Any``) and its version are computed once
per :class:`~meshxl.xds.cache.EncodedResources` object and shared by all streams, and so is
the concatenation for a set of names many streams send alike.
"""

from __future__ import annotations

import hashlib
import logging
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from meshxl.xds.cache import EncodedResources, Snapshot, _field
from meshxl.xds.nodes import NodeStatus, Streams, StreamState
from meshxl.xds.types import CLUSTER, ENDPOINT, WILDCARD_TYPES

__all__ = ["PROTOCOL", "DeltaResources", "DeltaSession", "Rejected", "delta_resources",
           "resource_version"]

log = logging.getLogger(__name__)

#: The ``protocol`` label of delta streams (metrics).
PROTOCOL = "delta"
WILDCARD = "*"

_VERSION_HEX = 16
# Responses awaiting an answer per type and stream; Envoy answers each in order, so
# more than a few means it stopped answering: the oldest are forgotten.
_PENDING_MAX = 64
_BODY_MEMO_MAX = 256
_CHANGES_MEMO_MAX = 4

# DeltaDiscoveryResponse field numbers (envoy/service/discovery/v3/discovery.proto).
_F_SYSTEM_VERSION = 1
_F_RESOURCES = 2
_F_TYPE_URL = 4
_F_NONCE = 5
_F_REMOVED = 6
# Resource field numbers (the ``resource`` Any is field 2, as in DiscoveryResponse).
_F_RESOURCE_VERSION = 1
_F_RESOURCE_NAME = 3


class DeltaResources:
    """One type's resources of a snapshot as delta ``Resource`` entries.

    ``versions`` maps a name to its resource version, ``entries`` a name to its encoded
    ``resources`` field (tag, length, ``Resource``), ready to be concatenated. It holds
    no reference to its :class:`~meshxl.xds.cache.EncodedResources` (it is memoised beside it,
    weakly), only to the mappings it was built from.
    """

    __slots__ = ("__weakref__", "_bodies", "_changes", "entries", "raw", "sources", "type_url",
                 "version", "versions")

    def __init__(self, resources: EncodedResources, versions: Mapping[str, str],
                 entries: Mapping[str, bytes]) -> None:
        self.type_url = resources.type_url
        #: The type's snapshot version (``system_version_info``).
        self.version = resources.version
        #: The snapshot's entries and source messages these were built from.
        self.raw = resources.entries
        self.sources = resources.sources
        self.versions = versions
        self.entries = entries
        self._bodies: dict[tuple[str, ...], bytes] = {}
        self._changes: dict[int, tuple[weakref.ref[DeltaResources], frozenset[str]]] = {}

    def body(self, names: tuple[str, ...]) -> bytes:
        """The ``resources`` fields of ``names`` (all present, in order), memoised:
        streams in step send the same changes."""
        found = self._bodies.get(names)
        if found is None:
            found = b"".join(self.entries[n] for n in names)
            if len(self._bodies) >= _BODY_MEMO_MAX:
                self._bodies.clear()
            self._bodies[names] = found
        return found

    def changed_since(self, older: DeltaResources) -> frozenset[str]:
        """Names added, removed or changed from ``older`` to this (memoised per pair)."""
        cached = self._changes.get(id(older))
        if cached is not None and cached[0]() is older:
            return cached[1]
        before, after = older.versions, self.versions
        names = frozenset(n for n in before.keys() | after.keys()
                          if before.get(n) != after.get(n))
        if len(self._changes) >= _CHANGES_MEMO_MAX:
            self._changes.clear()
        self._changes[id(older)] = (weakref.ref(older), names)
        return names


_MEMO: weakref.WeakKeyDictionary[EncodedResources, DeltaResources] = weakref.WeakKeyDictionary()
# The last one built per type: a rebuild reuses unchanged entries (same bytes object).
_LAST: dict[str, DeltaResources] = {}


def resource_version(entry: bytes) -> str:
    """A resource's version: a hash of its encoded ``Any`` (stable across replicas)."""
    return hashlib.sha256(entry).hexdigest()[:_VERSION_HEX]


def delta_resources(resources: EncodedResources) -> DeltaResources:
    """The delta form of ``resources``, built once per object whatever the streams."""
    found = _MEMO.get(resources)
    if found is not None:
        return found
    last = _LAST.get(resources.type_url)
    previous = last.raw if last is not None else {}
    versions: dict[str, str] = {}
    entries: dict[str, bytes] = {}
    for name, entry in resources.entries.items():
        if last is not None and previous.get(name) is entry:
            versions[name], entries[name] = last.versions[name], last.entries[name]
            continue
        version = resource_version(entry)
        versions[name] = version
        entries[name] = _field(_F_RESOURCES, _field(_F_RESOURCE_VERSION, version.encode())
                               + entry + _field(_F_RESOURCE_NAME, name.encode()))
    found = DeltaResources(resources, MappingProxyType(versions), MappingProxyType(entries))
    _MEMO[resources] = found
    _LAST[resources.type_url] = found
    return found


def _frame(type_url: str, version: str, body: bytes, removed: list[str], nonce: str) -> bytes:
    return b"".join((
        _field(_F_SYSTEM_VERSION, version.encode()),
        body,
        _field(_F_TYPE_URL, type_url.encode()),
        _field(_F_NONCE, nonce.encode()),
        *(_field(_F_REMOVED, name.encode()) for name in removed),
    ))


@dataclass(frozen=True)
class Rejected:
    """The quarantine key of one NACKed delta response: the (name, version) of every
    resource it carried. One key per response, like SotW's one key per type version, so
    a large rejected response does not push every other quarantine entry out."""

    resources: frozenset[tuple[str, str]]


def _quarantined(node: NodeStatus, type_url: str) -> list[frozenset[tuple[str, str]]]:
    """The (name, version) sets the node rejected for ``type_url`` (on any stream)."""
    return [key.resources for (rejected_type, key) in node.rejected
            if rejected_type == type_url and isinstance(key, Rejected)]


@dataclass
class _Sent:
    """A response awaiting its ACK or NACK."""

    version: str  # the type's snapshot version (system_version_info)
    resources: tuple[tuple[str, str], ...]  # (name, resource version) carried
    at: float  # time.monotonic() of the write
    complete: bool  # nothing wanted was held back: an ACK means the node has ``version``


@dataclass
class _Subscription:
    """One type on one delta stream."""

    wildcard: bool
    names: set[str]  # explicit subscriptions
    known: dict[str, str | None]  # what Envoy holds: a version, or None (told: no such name)
    force: set[str] = field(default_factory=set)  # send even if Envoy holds this version
    rejected: dict[str, str] = field(default_factory=dict)  # name -> version Envoy refused
    served: DeltaResources | None = None  # what the last diff ran against
    dirty: bool = True  # subscriptions changed: diff everything, not only what changed
    version: str | None = None  # system version last sent
    pending: dict[str, _Sent] = field(default_factory=dict)  # nonce -> response, in order

    def wants(self, name: str) -> bool:
        return self.wildcard or name in self.names

    def interested(self) -> bool:
        return self.wildcard or bool(self.names) or bool(self.known)

    def forget(self, name: str) -> None:
        self.known.pop(name, None)
        self.rejected.pop(name, None)
        self.force.discard(name)


def _eds_name(clusters: DeltaResources, cluster: str) -> str:
    message = clusters.sources.get(cluster)
    config = getattr(message, "eds_cluster_config", None)
    return str(getattr(config, "service_name", "")) or cluster


class DeltaSession(StreamState):
    """The delta protocol on one ADS stream; ``server`` keeps node status and hooks."""

    protocol = PROTOCOL

    def __init__(self, server: Streams) -> None:
        super().__init__(server)
        self.subscriptions: dict[str, _Subscription] = {}
        self.nonces = 0
        # EDS names whose cluster was just sent: Envoy re-warms the cluster and needs them.
        self._rewarm: set[str] = set()

    # -- requests ---------------------------------------------------------------------

    def handle(self, request: Any) -> str | None:
        server = self._server
        node = self.node or server.connect(self, request.node)
        type_url = request.type_url
        problem = self.check_type(type_url)
        if problem is not None:
            return problem
        subscribe = list(request.resource_names_subscribe)
        unsubscribe = list(request.resource_names_unsubscribe)
        sub = self.subscriptions.get(type_url)
        if sub is None:
            # First request for the type on this stream: it states the whole interest
            # and what Envoy holds. A nonce on it belongs to another stream (or replica).
            legacy = type_url in WILDCARD_TYPES and not subscribe and not unsubscribe
            self.subscriptions[type_url] = _Subscription(
                wildcard=legacy or WILDCARD in subscribe,
                names=set(subscribe) - set(unsubscribe) - {WILDCARD},
                known=dict(request.initial_resource_versions),
            )
            node.status(type_url)
            return None
        self._subscribe(sub, subscribe)
        self._unsubscribe(sub, unsubscribe)
        nonce = request.response_nonce
        if not nonce:
            return None  # a spontaneous change of subscriptions
        sent = self._answered(sub, nonce)
        if sent is None:
            server.stale(node, type_url, nonce)
        elif request.HasField("error_detail"):
            if sent.resources:
                node.quarantine(type_url, Rejected(frozenset(sent.resources)))
            for name, version in sent.resources:
                if sub.known.get(name) == version:  # not superseded by a later response
                    sub.rejected[name] = version
            server.answered(node, type_url, sent.version, request.error_detail.message,
                             sent.at, nack=True)
        else:
            server.answered(node, type_url, sent.version if sent.complete else None, None,
                             sent.at)
        return None

    @staticmethod
    def _subscribe(sub: _Subscription, names: list[str]) -> None:
        for name in names:
            if name == WILDCARD:
                if not sub.wildcard:
                    sub.wildcard, sub.dirty = True, True
                continue
            sub.names.add(name)
            sub.force.add(name)  # Envoy may have forgotten it: always answer

    @staticmethod
    def _unsubscribe(sub: _Subscription, names: list[str]) -> None:
        for name in names:
            if name == WILDCARD:
                if sub.wildcard:
                    sub.wildcard = False
                    for gone in [n for n in sub.known if n not in sub.names]:
                        sub.forget(gone)
                continue
            if name not in sub.names:
                continue  # a phantom unsubscription: nothing to do
            sub.names.discard(name)
            if sub.wildcard:
                # Envoy cannot tell whether the wildcard still carries it: say so.
                sub.force.add(name)
            else:
                sub.forget(name)

    @staticmethod
    def _answered(sub: _Subscription, nonce: str) -> _Sent | None:
        """The response ``nonce`` answers, dropping older unanswered ones; None if unknown."""
        if nonce not in sub.pending:
            return None
        while True:
            key = next(iter(sub.pending))
            sent = sub.pending.pop(key)
            if key == nonce:
                return sent

    # -- responses --------------------------------------------------------------------

    def _candidates(self, sub: _Subscription, current: DeltaResources) -> set[str]:
        """Names whose state may differ between Envoy and ``current``."""
        if sub.dirty or sub.served is None:
            if sub.wildcard:
                return set(current.versions) | sub.names | set(sub.known)
            return set(sub.names)
        if sub.served is current:
            return set()
        return set(current.changed_since(sub.served))

    def _response(self, node: NodeStatus, snapshot: Snapshot, type_url: str) -> bytes | None:
        """The bytes to send for ``type_url`` now, or None; records them as sent."""
        sub = self.subscriptions[type_url]
        current = delta_resources(snapshot.resources(type_url))
        force, sub.force = sub.force, set()
        if type_url == ENDPOINT and self._rewarm:
            force |= self._rewarm
            self._rewarm = set()
        candidates = self._candidates(sub, current) | force
        sub.served, sub.dirty = current, False

        send: list[str] = []
        removed: list[str] = []
        quarantined = _quarantined(node, type_url)
        for name in sorted(candidates):
            if not sub.wants(name):
                continue
            version = current.versions.get(name)
            if version is None:
                if name in sub.names:
                    if sub.known.get(name, "") is not None or name in force:
                        removed.append(name)
                    sub.known[name] = None
                    sub.rejected.pop(name, None)
                elif name in sub.known:  # a wildcard resource that is gone
                    removed.append(name)
                    sub.forget(name)
                continue
            if name not in force and sub.known.get(name) == version:
                continue
            if sub.rejected.get(name) == version or any(
                    (name, version) in rejected for rejected in quarantined):
                sub.rejected[name] = version
                log.debug("node %s: %s %s version %s is quarantined", node.node_id,
                          type_url, name, version)
                continue
            send.append(name)
        complete = not any(sub.wants(name) for name in sub.rejected.keys() - set(send))
        if not send and not removed and (
            sub.version == current.version or not complete or not sub.interested()
        ):
            return None

        for name in send:
            sub.known[name] = current.versions[name]
            sub.rejected.pop(name, None)
        server = self._server
        self.nonces += 1
        nonce = str(self.nonces)
        at = server.delivered(self, type_url, current.version)
        sub.version = current.version
        sub.pending[nonce] = _Sent(current.version,
                                   tuple((name, current.versions[name]) for name in send),
                                   at, complete)
        while len(sub.pending) > _PENDING_MAX:
            del sub.pending[next(iter(sub.pending))]
        if type_url == CLUSTER and send:
            self._rewarm.update(_eds_name(current, name) for name in send)
        log.debug("node %s: delta %s version %s: %d sent, %d removed", node.node_id,
                  type_url, current.version, len(send), len(removed))
        return _frame(type_url, current.version, current.body(tuple(send)), removed, nonce)
