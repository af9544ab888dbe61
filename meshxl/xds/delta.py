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
  (name, version) of that response is quarantined for the node: on this stream it is
  not sent again, and later streams of the node get that resource as it was in the
  last version of the type the node accepted whole (or nothing, if it had none then);
  a node that never accepted a version is sent the current one, once per stream. A
  rejection thus never leaves a node below the last configuration it accepted. A new
  version of the resource is sent normally.
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

from meshxl.protowire import len_field
from meshxl.xds.cache import EncodedResources, Snapshot
from meshxl.xds.nodes import DeltaRequest, NodeStatus, Streams, StreamState
from meshxl.xds.types import CLUSTER, ENDPOINT, WILDCARD_TYPES

__all__ = ["PROTOCOL", "DeltaResources", "DeltaStream", "Rejected", "delta_resources",
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


def delta_resources(resources: EncodedResources, *, remember: bool = True) -> DeltaResources:
    """The delta form of ``resources``, built once per object whatever the streams.

    ``remember`` False: an older version (a node's fallback), not the base the next
    snapshot's entries are reused from."""
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
        entries[name] = len_field(_F_RESOURCES, len_field(_F_RESOURCE_VERSION, version.encode())
                               + entry + len_field(_F_RESOURCE_NAME, name.encode()))
    found = DeltaResources(resources, MappingProxyType(versions), MappingProxyType(entries))
    _MEMO[resources] = found
    if remember:
        _LAST[resources.type_url] = found
    return found


def _frame(type_url: str, version: str, body: bytes, removed: list[str], nonce: str) -> bytes:
    return b"".join((
        len_field(_F_SYSTEM_VERSION, version.encode()),
        body,
        len_field(_F_TYPE_URL, type_url.encode()),
        len_field(_F_NONCE, nonce.encode()),
        *(len_field(_F_REMOVED, name.encode()) for name in removed),
    ))


@dataclass(frozen=True)
class Rejected:
    """The quarantine key of one NACKed delta response: the (name, version) of every
    resource it carried. One key per response, like SotW's one key per type version, so
    a large rejected response does not push every other quarantine entry out."""

    resources: frozenset[tuple[str, str]]

    def recurs(self, current: DeltaResources) -> bool:
        """Whether every resource of the rejected response is at the same version now.
        Only then is each of them suspect: once one changed (the bad one, usually), the
        others are sent again, and one that is bad itself is rejected alone."""
        versions = current.versions
        return all(versions.get(name) == version for name, version in self.resources)


def _quarantined(node: NodeStatus, type_url: str,
                 current: DeltaResources) -> list[frozenset[tuple[str, str]]]:
    """The (name, version) sets the node rejected for ``type_url`` (on any stream) that
    recur whole in ``current``."""
    return [key.resources for (rejected_type, key) in node.rejected
            if rejected_type == type_url and isinstance(key, Rejected)
            and key.recurs(current)]


@dataclass
class _Sent:
    """A response awaiting its ACK or NACK."""

    version: str  # the type's snapshot version (system_version_info)
    resources: tuple[tuple[str, str], ...]  # (name, resource version) carried
    at: float  # time.monotonic() of the write
    complete: bool  # nothing wanted was held back: an ACK means the node has ``version``
    snapshot: EncodedResources  # the type's resources at ``version``
    held: tuple[tuple[str, str | None], ...] = ()  # (name, version Envoy held before)


@dataclass
class _Subscription:
    """One type on one delta stream."""

    wildcard: bool
    names: set[str]  # explicit subscriptions
    known: dict[str, str | None]  # what Envoy holds: a version, or None (told: no such name)
    force: set[str] = field(default_factory=set)  # send even if Envoy holds this version
    refused: dict[str, Rejected] = field(default_factory=dict)  # name -> response refused here
    held_back: dict[str, str] = field(default_factory=dict)  # name -> current version not sent
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
        self.refused.pop(name, None)
        self.held_back.pop(name, None)
        self.force.discard(name)


def _eds_name(clusters: DeltaResources, cluster: str) -> str:
    message = clusters.sources.get(cluster)
    config = getattr(message, "eds_cluster_config", None)
    return str(getattr(config, "service_name", "")) or cluster


class DeltaStream(StreamState[DeltaRequest]):
    """The delta protocol on one ADS stream; ``server`` keeps node status and hooks."""

    protocol = PROTOCOL

    def __init__(self, server: Streams) -> None:
        super().__init__(server)
        self.subscriptions: dict[str, _Subscription] = {}
        self.nonces = 0
        # EDS names whose cluster was just sent: Envoy re-warms the cluster and needs them.
        self._rewarm: set[str] = set()

    # -- requests ---------------------------------------------------------------------

    def handle(self, request: DeltaRequest) -> str | None:
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
            rejected = Rejected(frozenset(sent.resources))
            if sent.resources:
                node.quarantine(type_url, rejected)
            before = dict(sent.held)
            for name, version in sent.resources:
                sub.refused[name] = rejected
                if sub.known.get(name) == version:  # not superseded by a later response
                    # Envoy applied nothing of it: it holds what it held before.
                    sub.held_back[name] = version
                    previous = before.get(name)
                    if previous is None:
                        sub.known.pop(name, None)
                    else:
                        sub.known[name] = previous
            server.answered(node, type_url, sent.version, request.error_detail.message,
                             sent.at, nack=True)
        else:
            server.answered(node, type_url, sent.version if sent.complete else None, None,
                             sent.at, resources=sent.snapshot if sent.complete else None,
                             zone=self.zone)
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
        # Held-back names wait for the response they were rejected in to change.
        return set(current.changed_since(sub.served)) | sub.held_back.keys()

    def _response(self, node: NodeStatus, snapshot: Snapshot, type_url: str) -> bytes | None:
        """The bytes to send for ``type_url`` now, or None; records them as sent."""
        sub = self.subscriptions[type_url]
        encoded = snapshot.resources(type_url, self.zone)
        current = delta_resources(encoded)
        force, sub.force = sub.force, set()
        if type_url == ENDPOINT and self._rewarm:
            force |= self._rewarm
            self._rewarm = set()
        candidates = self._candidates(sub, current) | force
        sub.served, sub.dirty = current, False

        send: list[tuple[str, str, bytes]] = []  # (name, version, entry)
        removed: list[str] = []
        fallback = _Fallback(node, self.zone, type_url, current)
        for name in sorted(candidates):
            if not sub.wants(name):
                continue
            version = current.versions.get(name)
            if version is None:
                if name in sub.names:
                    if sub.known.get(name, "") is not None or name in force:
                        removed.append(name)
                    sub.known[name] = None
                    sub.held_back.pop(name, None)
                elif name in sub.known:  # a wildcard resource that is gone
                    removed.append(name)
                    sub.forget(name)
                continue
            if name not in force and sub.known.get(name) == version:
                sub.held_back.pop(name, None)
                continue
            target: tuple[str, bytes] | None = (version, current.entries[name])
            refused = sub.refused.get(name)
            if refused is not None and not refused.recurs(current):
                del sub.refused[name]  # the response it came in cannot recur
                refused = None
            if refused is not None or fallback.rejected(name, version):
                target = fallback.instead(name, version)
                if target is not None and refused is not None and \
                        (name, target[0]) in refused.resources:
                    target = None  # never again on the stream that refused it
                if target is not None and target[0] == version:
                    sub.held_back.pop(name, None)  # accepted before: the ACK outweighs
                else:
                    sub.held_back[name] = version
                log.debug("node %s: %s %s version %s is quarantined; %s", node.node_id,
                          type_url, name, version, "nothing sent" if target is None else
                          f"sending version {target[0]}, the last it accepted")
                if target is not None and name not in force \
                        and sub.known.get(name) == target[0]:
                    continue  # Envoy holds it already
            else:
                sub.held_back.pop(name, None)
            if target is not None:
                send.append((name, target[0], target[1]))
        complete = not any(sub.wants(name) for name in sub.held_back)
        if not send and not removed and (
            sub.version == current.version or not complete or not sub.interested()
        ):
            return None

        held = tuple((name, sub.known.get(name)) for name, _, _ in send)
        for name, version, _ in send:
            sub.known[name] = version
        server = self._server
        self.nonces += 1
        nonce = str(self.nonces)
        at = server.delivered(self, type_url, current.version)
        sub.version = current.version
        sub.pending[nonce] = _Sent(current.version,
                                   tuple((name, version) for name, version, _ in send),
                                   at, complete, encoded, held)
        while len(sub.pending) > _PENDING_MAX:
            del sub.pending[next(iter(sub.pending))]
        if type_url == CLUSTER and send:
            self._rewarm.update(_eds_name(current, name) for name, _, _ in send)
        log.debug("node %s: delta %s version %s: %d sent, %d removed", node.node_id,
                  type_url, current.version, len(send), len(removed))
        if all(entry is current.entries.get(name) for name, _, entry in send):
            body = current.body(tuple(name for name, _, _ in send))
        else:
            body = b"".join(entry for _, _, entry in send)
        return _frame(type_url, current.version, body, removed, nonce)


class _Fallback:
    """What a node gets instead of a resource version it rejected: that resource as
    it was in the last version of the type the node accepted whole, in the stream's
    zone."""

    def __init__(self, node: NodeStatus, zone: str, type_url: str,
                 current: DeltaResources) -> None:
        self._node = node
        self._zone = zone
        self._type_url = type_url
        self._current = current
        self._quarantined: list[frozenset[tuple[str, str]]] | None = None
        self._accepted: DeltaResources | None = None

    def rejected(self, name: str, version: str) -> bool:
        """Whether the node rejected ``name`` at ``version`` (on any of its streams) in
        a response that recurs whole now."""
        if self._quarantined is None:
            self._quarantined = _quarantined(self._node, self._type_url, self._current)
        return any((name, version) in rejected for rejected in self._quarantined)

    def instead(self, name: str, version: str) -> tuple[str, bytes] | None:
        """(version, entry) to send instead of ``name`` at ``version``: the accepted
        one (the same, if the node accepted that version: an ACK outweighs a NACK),
        None if the accepted configuration had no such resource, or the current one
        when the node never accepted a version of the type."""
        encoded = self._node.accepted_for(self._zone, self._type_url)
        if encoded is None:
            return version, self._current.entries[name]
        if self._accepted is None:
            self._accepted = delta_resources(encoded, remember=False)
        accepted = self._accepted.versions.get(name)
        if accepted is None:
            return None
        return accepted, self._accepted.entries[name]
