"""The sample app's injected faults served: a fault answers before the app asks the
sidecar anything, and /healthz never fails (the file's format and bounds:
tests/unit/test_demo_faults.py)."""

from __future__ import annotations

import time
from pathlib import Path

from meshxl.demo.faults import FaultFile
from tests.harness.clock import scaled


async def test_the_app_fails_and_delays_counter_requests_but_never_healthz(
        tmp_path: Path) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from meshxl.demo.app import make_app
    from meshxl.local.ports import free_port

    faults = tmp_path / "faults.json"
    faults.write_text('{"fail_fraction": 1.0, "delay_ms": 400}')
    # A sidecar nobody serves: the app is not ready, and a request that gets past the
    # faults fails with "sidecar unreachable".
    app = make_app("a", f"http://127.0.0.1:{free_port()}", faults=faults)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        t0 = time.monotonic()
        reply = await client.post("/counter", headers={"x-session-id": "s1"})
        body = await reply.json()
        assert reply.status == 503 and "injected fault" in body["error"], body
        assert reply.headers["x-meshxl-member"] == "a"
        assert time.monotonic() - t0 < scaled(0.3)  # a failure answers undelayed (400 ms)
        t0 = time.monotonic()
        health = await client.get("/healthz")
        assert health.status == 503 and "injected" not in (await health.json())["error"]
        assert time.monotonic() - t0 < scaled(0.3)

        faults.write_text('{"delay_ms": 400}')
        app_faults = next(v for k, v in app.items() if isinstance(v, FaultFile))
        app_faults.interval = 0.0  # look at the file on the next request
        t0 = time.monotonic()
        reply = await client.get("/counter", headers={"x-session-id": "s1"})
        took = time.monotonic() - t0
        body = await reply.json()
        assert reply.status == 503 and "injected" not in body["error"], body
        assert took >= 0.4, took
