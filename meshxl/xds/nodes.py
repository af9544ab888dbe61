"""What both ADS protocols share about the Envoys they serve: each node's status (what
operators see: streams, versions sent and ACKed, the last NACK), the quarantine of
rejected responses, and the two interfaces that tie a stream's protocol state
(:class:`Session`, state of the world in :mod:`meshxl.xds.server`, delta in
:mod:`meshxl.xds.delta`) to the server that runs it (:class:`Streams`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from meshxl.xds.cache import TYPE_ORDER, Snapshot

__all__ = ["Nack", "NodeStatus", "Session", "StreamState", "Streams", "TypeStatus"]

# Rejected responses remembered per node; old entries fall out first.
QUARANTINE_MAX = 64


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
    streams: int = 0
    connected_at: float | None = None
    disconnected_at: float | None = None
    nacks: int = 0
    last_nack: Nack | None = None
    types: dict[str, TypeStatus] = field(default_factory=dict)
    rejected: dict[tuple[str, Hashable], None] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        nack = self.last_nack
        return {
            "node_id": self.node_id,
            "cluster": self.cluster,
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


class Session(Protocol):
    """One ADS stream's protocol state, as the shared stream loop drives it."""

    protocol: str  # the metrics label: "sotw" or "delta"
    opened_at: float  # time.monotonic() when the stream was accepted
    inbox: deque[Any]
    closed: bool
    node: NodeStatus | None

    def handle(self, request: Any) -> str | None:
        """Apply one request; a returned message ends the stream (INVALID_ARGUMENT)."""

    def responses(self, snapshot: Snapshot) -> Iterator[bytes]:
        """What to write now, in push order; each response is recorded as it is made."""




class StreamState:
    """What every protocol's per-stream state starts with (the :class:`Session` fields)."""

    protocol = ""

    def __init__(self, server: Streams) -> None:
        self._server = server
        self.opened_at = time.monotonic()
        self.inbox: deque[Any] = deque()
        self.closed = False
        self.node: NodeStatus | None = None
        self.subscriptions: dict[str, Any] = {}

    def order(self) -> list[str]:
        """Subscribed types, in push order (CDS, EDS, LDS, RDS, then the rest)."""
        known = [t for t in TYPE_ORDER if t in self.subscriptions]
        return known + [t for t in self.subscriptions if t not in TYPE_ORDER]


class Streams(Protocol):
    """What a :class:`Session` reports to the server running its stream."""

    def connect(self, session: Session, node_proto: Any) -> NodeStatus:
        """The stream's first request names its node: count the stream on it."""

    def delivered(self, session: Session, type_url: str, version: str) -> float:
        """A response at (snapshot) ``version`` is being written; its monotonic time."""

    def answered(self, node: NodeStatus, type_url: str, version: str | None,
                 error: str | None, sent_at: float | None, *, nack: bool = False) -> None:
        """Envoy ACKed (or NACKed) the response sent at ``sent_at``."""

    def stale(self, node: NodeStatus, type_url: str, nonce: str) -> None:
        """A request answered a nonce this stream is not waiting for."""
