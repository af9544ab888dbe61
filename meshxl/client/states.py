"""A session's state on the wire: JSON or bytes, encoded once. Pure code."""

from __future__ import annotations

import json
from typing import Any

from .errors import BadRequest, SidecarUnavailable

__all__ = ["JSON", "MERGE_PATCH", "OCTETS", "JsonText", "decode_state", "encode_state",
           "is_json"]

JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"
OCTETS = "application/octet-stream"


def is_json(content_type: str) -> bool:
    base = content_type.split(";", 1)[0].strip().lower()
    return base == JSON or base.endswith("+json")


_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
"""Made once: ``json.dumps`` with options makes an encoder on every call."""


class JsonText(bytes):
    """A state already encoded as JSON text (UTF-8): sent as it is and stored as JSON,
    not encoded again (the sidecar checks it is JSON)."""


def encode_state(state: Any, content_type: str | None = None) -> tuple[bytes, str]:
    """Bytes are stored verbatim (``content_type``, else octet-stream); :class:`JsonText`
    as the JSON it is; anything else as JSON."""
    if isinstance(state, JsonText):
        return bytes(state), content_type if content_type and is_json(content_type) else JSON
    if isinstance(state, bytes | bytearray | memoryview):
        return bytes(state), content_type or OCTETS
    try:
        text = _COMPACT.encode(state)
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"the session state is neither bytes nor JSON: {exc}",
                         field="state") from None
    return text.encode(), JSON if content_type is None or not is_json(content_type) \
        else content_type


def decode_state(data: bytes, content_type: str, session: str | None = None) -> Any:
    if not is_json(content_type):
        return data
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SidecarUnavailable(f"the sidecar sent session {session!r} as {content_type} "
                                 f"that is not JSON: {exc}", session=session) from None
