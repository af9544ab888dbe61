"""The demo's TCP member passes a quota refusal on and keeps the connection (no other
member would help: each sidecar has its own bucket); any other sidecar failure closes
it, so the client reconnects through Envoy to a member that can serve it. (The HTTP
member's 429 is tested through Envoy in tests/integration/test_vsls_statesync.py.)"""

from __future__ import annotations

from typing import Any

import pytest

from meshxl.client import OverQuota, SidecarUnavailable
from meshxl.demo.tcp_app import CounterServer

pytestmark = pytest.mark.asyncio


class _Refusing:
    """A session client whose every write fails with ``exc``."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    async def update(self, session: str, change: Any) -> Any:
        raise self.exc


async def test_over_quota_answers_err_and_keeps_the_connection() -> None:
    refused = OverQuota("over the rate", status=429, quota="writes_per_second", limit=5,
                        retry_after=0.4)
    server = CounterServer("a", _Refusing(refused))  # type: ignore[arg-type]
    line, keep = await server.answer(b"INC s1")
    assert keep is True
    assert line == b"ERR over quota: writes_per_second; retry in 1 s\n"


async def test_another_sidecar_failure_closes_the_connection() -> None:
    failing = _Refusing(SidecarUnavailable("etcd down", status=503))
    server = CounterServer("a", failing)  # type: ignore[arg-type]
    line, keep = await server.answer(b"INC s1")
    assert keep is False and line.startswith(b"ERR ") and b"etcd down" in line
