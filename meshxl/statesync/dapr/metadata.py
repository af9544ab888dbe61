"""What Dapr's metadata API says of this sidecar (``GET /v1.0/metadata``, the gRPC
``GetMetadata``): the application's id, the state stores served as components with
their capabilities, and the extended metadata an application sets
(``PUT /v1.0/metadata/{key}``, ``SetMetadata``), kept in memory as daprd keeps it."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

__all__ = ["CAPABILITIES", "COMPONENT_TYPE", "MAX_EXTENDED", "Metadata"]

COMPONENT_TYPE = "state.meshxl"
CAPABILITIES = ("ETAG", "TRANSACTIONAL", "TTL")
"""What each store does, in Dapr's words (no ``ACTOR``: meshxl serves no actors)."""
MAX_EXTENDED = 64
"""Extended metadata entries at most (each key and value bounded too)."""
_NAME = re.compile(r"^[A-Za-z0-9._~-]{1,128}$")


class Metadata:
    """This sidecar as Dapr's metadata API shows it."""

    def __init__(self, app_id: str, stores: Callable[[], list[str]], version: str):
        self.app_id = app_id
        self.stores = stores
        self.version = version
        self.extended: dict[str, str] = {"meshxl": version}

    def set(self, name: str, value: str) -> None:
        """An application's extended metadata entry (ValueError: refused)."""
        if not _NAME.match(name):
            raise ValueError(f"invalid metadata key {name[:80]!r}: 1-128 of A-Z a-z 0-9 . _ ~ -")
        if len(value) > 1024 or not value.isprintable():
            raise ValueError("a metadata value is at most 1024 printable characters")
        if name not in self.extended and len(self.extended) >= MAX_EXTENDED:
            raise ValueError(f"{MAX_EXTENDED} metadata entries are set already")
        self.extended[name] = value

    def components(self) -> list[dict[str, Any]]:
        return [{"name": name, "type": COMPONENT_TYPE, "version": "v1",
                 "capabilities": list(CAPABILITIES)} for name in self.stores()]

    def document(self) -> dict[str, Any]:
        """``GET /v1.0/metadata``'s answer, in daprd's field names."""
        return {"id": self.app_id, "runtimeVersion": f"meshxl-{self.version}",
                "enabledFeatures": [], "actors": [], "components": self.components(),
                "extended": dict(self.extended), "subscriptions": [], "httpEndpoints": []}
