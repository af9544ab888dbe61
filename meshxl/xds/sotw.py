"""State of the world ADS (``StreamAggregatedResources``): one outstanding response per
type and stream, nonces, ACK/NACK.

The stream loop, node status and metrics are shared with delta
(:class:`meshxl.xds.server.AdsServer` runs both over :class:`meshxl.xds.nodes.Streams`);
resources and versions come from :mod:`meshxl.xds.cache`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from meshxl.xds.cache import EncodedResources, Snapshot
from meshxl.xds.nodes import NodeStatus, SotwRequest, Streams, StreamState
from meshxl.xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE, WILDCARD_TYPES

__all__ = ["PROTOCOL", "SotwStream"]

log = logging.getLogger(__name__)

#: The ``protocol`` label of SotW streams (metrics); delta streams: ``delta.PROTOCOL``.
PROTOCOL = "sotw"

# Versions per subscription whose send count is kept for nonces (older ones recur
# only with identical content, where a repeated nonce is harmless).
_NONCE_VERSIONS = 8
# A CDS (LDS) response makes Envoy re-warm changed clusters (listeners); it then asks
# for their EDS (RDS) again with the current nonce, which looks like an ACK. That
# request must be answered even if nothing changed, or the cluster stays warming.
_DEPENDENT = {CLUSTER: ENDPOINT, LISTENER: ROUTE}

# What a SotW response carried for one type: its version and the names asked for
# (None = wildcard). A NACKed key is quarantined for the node: later streams of the node
# get the version it accepted last instead (never nothing: without an accepted version
# the current one is sent, once per stream). Delta streams quarantine (name, resource
# version) keys of their own.
_Key = tuple[str, frozenset[str] | None]


@dataclass
class _Subscription:
    """One type on one SotW stream."""

    names: frozenset[str]
    wildcard: bool
    fresh: bool = True  # the client asked without a nonce: answer even if unchanged
    rewarm: bool = False  # the parent type was just sent: answer the next request
    nonce: str = ""
    answered: bool = False  # the response ``nonce`` names was ACKed or NACKed already
    sent: _Key | None = None
    sent_resources: EncodedResources | None = None  # what ``sent`` was cut from
    sent_at: float | None = None  # time.monotonic() of the write, for the ACK latency
    nacked: bool = False  # Envoy rejected ``sent``: it still holds ``holds``
    holds: _Key | None = None  # the last response Envoy ACKed on this stream
    repeats: dict[str, int] = field(default_factory=dict)  # sends per recent version

    def want(self, version: str) -> _Key | None:
        """The key a response would carry now; None when nothing is subscribed."""
        if self.wildcard:
            return (version, None)
        if not self.names:
            return None
        return (version, self.names)


def _is_wildcard(type_url: str, names: frozenset[str]) -> bool:
    """SotW: "*" asks for everything; so does no name at all for CDS and LDS."""
    return "*" in names or (type_url in WILDCARD_TYPES and not names)


class SotwStream(StreamState[SotwRequest]):
    """State of the world on one stream: one outstanding response per type."""

    protocol = PROTOCOL

    def __init__(self, server: Streams) -> None:
        super().__init__(server)
        self._server: Streams = server
        self.subscriptions: dict[str, _Subscription] = {}

    def handle(self, request: SotwRequest) -> str | None:
        server = self._server
        node = self.node or server.connect(self, request.node)
        type_url = request.type_url
        problem = self.check_type(type_url)
        if problem is not None:
            return problem
        names = server.shared_names(frozenset(request.resource_names))
        wildcard = _is_wildcard(type_url, names)
        sub = self.subscriptions.get(type_url)
        if sub is None:
            # First request for the type on this stream: answer whatever nonce it
            # carries (it may come from another control-plane replica).
            self.subscriptions[type_url] = _Subscription(names, wildcard)
            node.status(type_url)
            return None
        nonce = request.response_nonce
        if nonce and nonce != sub.nonce:
            server.stale(node, type_url, nonce)
            return None
        sub.names, sub.wildcard = names, wildcard
        if not nonce:
            sub.fresh = True  # a re-request; answer it even if nothing changed
            return None
        # The xDS protocol: a request naming the last response's nonce NACKs it when it
        # carries error_detail, ACKs it when its version_info is the version sent, and
        # otherwise (Envoy's subscriptions changed; after a NACK it repeats the nonce
        # with the version it still holds) acknowledges nothing.
        if request.HasField("error_detail"):
            if sub.answered:
                return None  # that response was answered already
            sub.answered, sub.nacked = True, True
            if sub.sent is not None:
                node.quarantine(type_url, sub.sent)
            server.answered(node, type_url, sub.sent[0] if sub.sent else None,
                             request.error_detail.message, sub.sent_at, nack=True)
        elif sub.sent is not None and request.version_info == sub.sent[0]:
            if not sub.answered:
                sub.answered, sub.holds = True, sub.sent
                server.answered(node, type_url, sub.sent[0], None, sub.sent_at,
                                resources=sub.sent_resources, zone=self.zone)
            if sub.rewarm:
                sub.fresh, sub.rewarm = True, False
        return None

    def _response(self, node: NodeStatus, snapshot: Snapshot, type_url: str) -> bytes | None:
        """The bytes to send for ``type_url`` now, or None; records them as sent."""
        sub = self.subscriptions[type_url]
        resources = self._serving(node, self.zone, type_url, sub,
                                  snapshot.resources(type_url, self.zone))
        key = sub.want(resources.version)
        # Nothing is sent twice on a stream unless Envoy asks again (``fresh``): not the
        # response in flight or answered, nor, after a NACK, what Envoy kept.
        if key is None or (not sub.fresh and (
                key == sub.sent or (sub.nacked and key == sub.holds))):
            sub.fresh = False
            return None
        sub.fresh = False
        sub.rewarm = False  # this response reaches the re-warming resources after their parent
        # The nonce is the version and how often this stream was sent it before: unique
        # on the stream, and the same on every stream getting this version for the first
        # time, so they all share one encoded message.
        repeats = sub.repeats.pop(key[0], 0)
        sub.repeats[key[0]] = repeats + 1
        if len(sub.repeats) > _NONCE_VERSIONS:
            del sub.repeats[next(iter(sub.repeats))]
        sub.nonce = f"{key[0]}.{repeats}"
        sub.sent, sub.sent_resources, sub.answered, sub.nacked = key, resources, False, False
        sub.sent_at = self._server.delivered(self, type_url, key[0])
        dependent = self.subscriptions.get(_DEPENDENT.get(type_url, ""))
        if dependent is not None:
            dependent.rewarm = True
        return resources.message(key[1], sub.nonce)

    @staticmethod
    def _serving(node: NodeStatus, zone: str, type_url: str, sub: _Subscription,
                 current: EncodedResources) -> EncodedResources:
        """What this stream serves for the type: the current version, unless the node
        rejected it (on any stream) or this stream did; then the version the node
        accepted last in this stream's zone, if any. A rejection never leaves a node
        below the last configuration it accepted, never with nothing, and never with
        another zone's view."""
        key = sub.want(current.version)
        if key is None or not (node.is_rejected(type_url, key) or (
                sub.nacked and key == sub.sent)):
            return current
        accepted = node.accepted_for(zone, type_url)
        if accepted is None:
            return current  # nothing better: sent, but not again on this stream
        if accepted.version != current.version:
            log.debug("node %s: %s version %s is quarantined; serving version %s, the "
                      "last it accepted", node.node_id, type_url, current.version,
                      accepted.version)
        return accepted
