"""The HTTP header names meshxl sends and reads, defined once.

aiohttp compares header names case-insensitively (``CIMultiDict``), so the spelling
here is what meshxl writes; readers match any case.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "AUTHORIZATION",
    "ETAG",
    "IF_MATCH",
    "IF_NONE_MATCH",
    "LOWERED",
    "MEMBER",
    "OWNER",
    "SESSION",
    "SOURCE",
    "SYNC",
    "TRACEPARENT",
    "WWW_AUTHENTICATE",
    "bearer",
    "lower_name",
]

#: The session id the sample apps and the demo route on (the model's stickiness header).
SESSION: Final = "x-session-id"
#: The member that served a response (sample apps).
MEMBER: Final = "x-meshxl-member"
#: The statesync session API: the member owning a session, and where a read came from
#: ("etcd", or "cache" while etcd does not answer).
OWNER: Final = "X-Meshxl-Owner"
SOURCE: Final = "X-Meshxl-Source"
#: A write replicated to etcd before it is acknowledged, whatever the cluster's
#: ``sessions.sync_delay`` (its only value: ``now``).
SYNC: Final = "X-Meshxl-Sync"
#: Conditional writes of the session API (RFC 9110).
ETAG: Final = "ETag"
IF_MATCH: Final = "If-Match"
IF_NONE_MATCH: Final = "If-None-Match"
#: Bearer tokens (the sidecar's API, the Kubernetes API).
AUTHORIZATION: Final = "Authorization"
WWW_AUTHENTICATE: Final = "WWW-Authenticate"
#: W3C trace context.
TRACEPARENT: Final = "traceparent"


def bearer(token: str | None) -> dict[str, str]:
    """``{Authorization: Bearer TOKEN}``, or no header without a token."""
    return {AUTHORIZATION: f"Bearer {token}"} if token else {}


LOWERED: dict[bytes, str] = {}
"""Header names as received -> lower case: a peer sends a handful, each decoded once (a
parser's hot path may look a name up here first, :func:`lower_name` when it is not)."""


def lower_name(name: bytes) -> str:
    """A received header name (ISO-8859-1 bytes) in lower case, the key both HTTP parsers
    of the session API (the sidecar's server, ``meshxl.client``'s transport) file headers
    under. The first 256 names seen are remembered (a peer could send endless new ones)."""
    key = LOWERED.get(name)
    if key is None:
        key = name.decode("latin-1").lower()
        if len(LOWERED) < 256:
            LOWERED[name] = key
    return key
