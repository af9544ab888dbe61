"""What both ADS protocols share about the Envoys they serve: each node's status (what
operators see: streams, versions sent and ACKed, the last NACK), the quarantine of
rejected responses and the last accepted version of each type (what a node falls back
to when the current one is quarantined), and the two interfaces that tie a stream's protocol state
(:class:`Stream`, state of the world in :mod:`meshxl.xds.sotw`, delta in
:mod:`meshxl.xds.delta`) to the server that runs it (:class:`Streams`).
"""

from __future__ import annotations

import abc
import time
from collections import deque
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from meshxl.errors import InputError
from meshxl.xds.cache import EncodedResources, Snapshot
from meshxl.xds.types import ENDPOINT, TYPE_ORDER

__all__ = ["NACK_TEXT_MAX", "AdsRequest", "BadDiscoveryRequest", "DeltaRequest", "EnvoyNode",
           "LogLimiter", "Nack", "NodeStatus", "Peer", "RequestStream", "SotwRequest", "Stream",
           "StreamState", "Streams", "TypeStatus", "bound_text", "routed"]

# Rejected responses remembered per node; old entries fall out first.
QUARANTINE_MAX = 64
ZONES_KEPT = 8
"""Zones per node whose accepted versions are kept (the oldest go first): a node's
streams normally share one zone, and each zone falls back only to its own versions."""

NODE_CLUSTER_MAX = 256
"""Longest ``node.cluster`` kept (longer ones are truncated)."""
NACK_TEXT_MAX = 1024
"""A NACK's ``error_detail`` message is kept (in memory, in etcd, in log lines) up to
this many characters; the rest is replaced by a note of how much was cut. Envoy's own
messages name the resource and the field and are far shorter."""
TYPE_URL_MAX = 256
"""Longest type URL a stream may subscribe to (Envoy's are under 100 characters)."""
TYPES_MAX = 32
"""Most distinct types one stream may subscribe to (Envoy uses at most a dozen)."""
LOG_REPEAT_SECONDS = 60.0
"""An identical warning about one node is logged at most once per this many seconds."""
# Names of a client certificate listed in a refusal, at most, and characters of each.
_SHOWN_NAMES = 4
_NAME_SHOWN_MAX = 128


class BadDiscoveryRequest(InputError):
    """A request the stream cannot serve: it ends with INVALID_ARGUMENT and this text."""


def bound_text(text: str, limit: int = NACK_TEXT_MAX) -> str:
    """``text`` cut to at most ``limit`` characters, keeping its start and its end (Envoy
    puts the reason of a rejection after a dump of the resource) and saying how much of
    the middle was cut."""
    if len(text) <= limit:
        return text
    width = len(str(len(text)))  # the note's length whatever the count it shows
    room = max(limit - len(f" [...{'9' * width} characters cut...] "), 0)
    head = room // 3
    tail = room - head
    cut = len(text) - head - tail
    note = f" [...{cut} characters cut...] "
    return text[:head] + note + (text[len(text) - tail:] if tail else "")


class LogLimiter:
    """Lets an identical line (per key) through once per ``interval`` seconds and
    counts what it held back, so a client repeating itself cannot fill the disk."""

    def __init__(self, interval: float = LOG_REPEAT_SECONDS, size: int = 4096) -> None:
        self._interval = interval
        self._size = size
        self._last: dict[Hashable, tuple[float, int]] = {}

    def allow(self, key: Hashable) -> tuple[bool, int]:
        """(log it now, how many identical lines were held back since the last one)."""
        now = time.monotonic()
        found = self._last.get(key)
        if found is not None and now - found[0] < self._interval:
            self._last[key] = (found[0], found[1] + 1)
            return False, 0
        if found is None and len(self._last) >= self._size:
            self._last.pop(next(iter(self._last)))
        self._last[key] = (now, 0)
        return True, found[1] if found is not None else 0


@dataclass(frozen=True)
class Peer:
    """What the transport proved about a stream's client: the DNS and URI subject
    alternative names of its verified certificate (empty without one) and its
    address, for log lines."""

    address: str = ""
    dns: tuple[str, ...] = ()
    uris: tuple[str, ...] = ()

    @property
    def certified(self) -> bool:
        return bool(self.dns or self.uris)

    def names(self) -> str:
        """The certificate's names as a refusal shows them (bounded)."""
        shown = [bound_text(f"DNS:{n}", _NAME_SHOWN_MAX) for n in self.dns] + \
            [bound_text(f"URI:{u}", _NAME_SHOWN_MAX) for u in self.uris]
        more = len(shown) - _SHOWN_NAMES
        text = ", ".join(shown[:_SHOWN_NAMES]) + (f" and {more} more" if more > 0 else "")
        return text or "no DNS or URI name"


@dataclass
class TypeStatus:
    sent_version: str | None = None
    acked_version: str | None = None
    ack_time: float | None = None
    responses: int = 0


@dataclass
class Nack:
    type_url: str
    version: str | None
    error: str
    time: float


@dataclass
class NodeStatus:
    node_id: str
    cluster: str = ""
    zone: str = ""
    """The locality zone of the node's longest connected stream (of its last stream
    once none is connected), for status: what a stream is served follows its own zone
    (:attr:`StreamState.zone`), never this."""
    stream_zones: dict[int, str] = field(default_factory=dict)
    """Each connected stream's zone, oldest stream first."""
    streams: int = 0
    connected_at: float | None = None
    disconnected_at: float | None = None
    nacks: int = 0
    last_nack: Nack | None = None
    types: dict[str, TypeStatus] = field(default_factory=dict)
    rejected: dict[tuple[str, Hashable], None] = field(default_factory=dict)
    accepted: dict[str, dict[str, EncodedResources]] = field(default_factory=dict)
    """Per zone and type, the resources of the last version a stream of this node in
    that zone ACKed whole: served to the node's streams of that zone instead of a
    quarantined version, so a rejection never leaves the node below the last
    configuration it accepted there (and never gives it another zone's view). Held
    while the node is connected; the server keeps a bounded number of versions for
    disconnected nodes."""
    accepted_versions: dict[str, dict[str, str]] = field(default_factory=dict)
    """Per zone and type, the version of :attr:`accepted` (kept while disconnected)."""

    def as_dict(self) -> dict[str, Any]:
        nack = self.last_nack
        return {
            "node_id": self.node_id,
            "cluster": self.cluster,
            "zone": self.zone,
            "zones": list(dict.fromkeys(self.stream_zones.values())),
            "streams": self.streams,
            "connected_at": self.connected_at,
            "disconnected_at": self.disconnected_at,
            "nacks": self.nacks,
            "last_nack": None
            if nack is None
            else {
                "type_url": nack.type_url,
                "version": nack.version,
                "error": nack.error,
                "time": nack.time,
            },
            "types": {
                t: {
                    "sent_version": s.sent_version,
                    "acked_version": s.acked_version,
                    "ack_time": s.ack_time,
                    "responses": s.responses,
                }
                for t, s in self.types.items()
            },
        }

    def status(self, type_url: str) -> TypeStatus:
        """The type's status, created when the node first asks for the type."""
        found = self.types.get(type_url)
        if found is None:
            found = self.types[type_url] = TypeStatus()
        return found

    def quarantine(self, type_url: str, key: Hashable) -> None:
        self.rejected[(type_url, key)] = None
        while len(self.rejected) > QUARANTINE_MAX:
            del self.rejected[next(iter(self.rejected))]

    def is_rejected(self, type_url: str, key: Hashable) -> bool:
        return (type_url, key) in self.rejected

    def accept(self, type_url: str, zone: str, resources: EncodedResources) -> None:
        """A stream of the node in ``zone`` ACKed all of ``resources`` (one type at one
        snapshot version)."""
        for kept in (self.accepted, self.accepted_versions):
            if zone not in kept and len(kept) >= ZONES_KEPT:
                del kept[next(iter(kept))]
        self.accepted.setdefault(zone, {})[type_url] = resources
        self.accepted_versions.setdefault(zone, {})[type_url] = resources.version

    def accepted_for(self, zone: str, type_url: str) -> EncodedResources | None:
        """What the node's streams in ``zone`` fall back to for ``type_url``."""
        return self.accepted.get(zone, {}).get(type_url)

    def stream_zone(self, stream: object, zone: str | None) -> None:
        """A stream of the node connected in ``zone`` (None: it ended); :attr:`zone`
        follows the oldest connected stream."""
        if zone is None:
            self.stream_zones.pop(id(stream), None)
        else:
            self.stream_zones[id(stream)] = zone
        if self.stream_zones:
            self.zone = next(iter(self.stream_zones.values()))


# -- what an ADS request carries, as the streams read it ---------------------------------
# gRPC hands each stream the protobuf messages of envoy.service.discovery.v3
# (DiscoveryRequest, DeltaDiscoveryRequest); these protocols name the fields read of
# them, so the hop from gRPC to a stream's protocol state is typed.


class Locality(Protocol):
    zone: str


class EnvoyNode(Protocol):
    """An Envoy's ``Node`` (envoy.config.core.v3): who is asking."""

    id: str
    cluster: str
    locality: Locality


class ErrorDetail(Protocol):
    message: str  # google.rpc.Status: why Envoy rejected the last response


class AdsRequest(Protocol):
    """What both protocols' requests carry."""

    node: EnvoyNode
    type_url: str
    response_nonce: str
    error_detail: ErrorDetail

    def HasField(self, field_name: str) -> bool: ...  # noqa: N802 (protobuf's name)


class SotwRequest(AdsRequest, Protocol):
    """A state-of-the-world ``DiscoveryRequest``."""

    version_info: str
    resource_names: Sequence[str]


class DeltaRequest(AdsRequest, Protocol):
    """A ``DeltaDiscoveryRequest``."""

    resource_names_subscribe: Sequence[str]
    resource_names_unsubscribe: Sequence[str]
    initial_resource_versions: Mapping[str, str]


RequestT = TypeVar("RequestT", bound=AdsRequest)


class Stream(Protocol):
    """One ADS stream's protocol state, as the server counts and serves it."""

    protocol: str  # the metrics label: "sotw" or "delta"
    opened_at: float  # time.monotonic() when the stream was accepted
    closed: bool
    node: NodeStatus | None
    peer: Peer  # what the transport proved about the client (its certificate's names)
    grant: Any  # the credentials it presented (meshxl.xds.auth.Grant)
    zone: str  # its node's locality zone, as its first request declared it
    counted: list[str]  # the credentials its node id counts against
    subscriptions: dict[str, Any]  # per type URL: its names and whether it is a wildcard

    def responses(self, snapshot: Snapshot) -> Iterator[bytes]:
        """What to write now, in push order; each response is recorded as it is made."""


def routed(streams: Iterable[Stream]) -> frozenset[str] | None:
    """The clusters a node routes to as these, its open streams, are served: the
    endpoint (EDS) names they subscribe to; None for a wildcard (every cluster)."""
    names: set[str] = set()
    for stream in streams:
        sub = stream.subscriptions.get(ENDPOINT)
        if sub is not None:
            if sub.wildcard:
                return None
            names.update(sub.names)
    return frozenset(names)


class RequestStream(Stream, Protocol[RequestT]):
    """A stream as the shared stream loop drives it: the requests of its protocol."""

    inbox: deque[RequestT]

    def handle(self, request: RequestT) -> str | None:
        """Apply one request; a returned message ends the stream (INVALID_ARGUMENT)."""




class StreamState(abc.ABC, Generic[RequestT]):
    """What every protocol's per-stream state starts with (the :class:`Stream` fields)."""

    protocol = ""

    def __init__(self, server: Streams) -> None:
        self._server = server
        self.opened_at = time.monotonic()
        self.inbox: deque[RequestT] = deque()
        self.closed = False
        self.node: NodeStatus | None = None
        self.peer = Peer()
        self.grant: Any = None
        self.zone = ""
        """The zone this stream's node declared: what it is served follows it alone."""
        self.counted: list[str] = []
        self.subscriptions: dict[str, Any] = {}

    def check_type(self, type_url: str) -> str | None:
        """Why a request for ``type_url`` cannot be served on this stream, or None."""
        if not type_url:
            return "type_url is required on an ADS stream"
        if type_url in self.subscriptions:
            return None
        if len(type_url) > TYPE_URL_MAX:
            return f"type_url is {len(type_url)} characters long (at most {TYPE_URL_MAX})"
        if len(self.subscriptions) >= TYPES_MAX:
            return f"more than {TYPES_MAX} types subscribed on one stream"
        return None

    def order(self) -> list[str]:
        """Subscribed types, in push order (CDS, EDS, LDS, RDS, then the rest)."""
        known = [t for t in TYPE_ORDER if t in self.subscriptions]
        return known + [t for t in self.subscriptions if t not in TYPE_ORDER]

    def responses(self, snapshot: Snapshot) -> Iterator[bytes]:
        """What ``snapshot`` gives this stream to send, type by type in push order."""
        assert self.node is not None
        for type_url in self.order():
            response = self._response(self.node, snapshot, type_url)
            if response is not None:
                yield response

    @abc.abstractmethod
    def _response(self, node: NodeStatus, snapshot: Snapshot, type_url: str) -> bytes | None:
        """One type's response (None: nothing to send); each protocol defines it."""


class Streams(Protocol):
    """What a :class:`Stream` reports to the server running it."""

    def connect(self, stream: Stream, node_proto: EnvoyNode) -> NodeStatus:
        """The stream's first request names its node: count the stream on it."""

    def delivered(self, stream: Stream, type_url: str, version: str) -> float:
        """A response at (snapshot) ``version`` is being written; its monotonic time."""

    def answered(self, node: NodeStatus, type_url: str, version: str | None,
                 error: str | None, sent_at: float | None, *, nack: bool = False,
                 resources: EncodedResources | None = None, zone: str = "") -> None:
        """Envoy ACKed (or NACKed) the response sent at ``sent_at``; an ACK with
        ``resources`` means the node now holds them whole (in ``zone``)."""

    def stale(self, node: NodeStatus, type_url: str, nonce: str) -> None:
        """A request answered a nonce this stream is not waiting for."""

    def shared_names(self, names: frozenset[str]) -> frozenset[str]:
        """One shared set object per distinct set of subscribed names."""
