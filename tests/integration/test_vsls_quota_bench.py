"""``bench/vsls_quota.py``'s other tenant, through a real sidecar and etcd: t02's writes
are measured only once the other tenant's writer process is under way (its start-up
never inside the measured window: flooding, the quota's burst already spent), and it
stops when told, reporting what it did meanwhile."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import aetcd
import pytest

from meshxl.etcd.keys import Keys
from meshxl.local.ports import free_port
from meshxl.local.procs import Owner
from meshxl.local.wait import wait_until
from meshxl.operator.actions import apply_model
from tests.harness.sidecar import SidecarProcess

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import vsls_quota  # noqa: E402

pytestmark = pytest.mark.integration


async def _refused(sidecar: SidecarProcess) -> int:
    status = (await sidecar.request("GET", "/v1/status")).json()
    refused: int = status["quota"]["refused"].get("writes_per_second", 0)
    return refused


async def test_the_flooding_tenant_is_past_its_burst_before_it_says_ready(
        harness: Owner, etcd: Any, etcd_client: aetcd.Client) -> None:
    await apply_model(etcd_client, Keys(), vsls_quota.MODEL, "test")
    t01 = SidecarProcess(harness, cluster="t01", member="w1", etcd=etcd.url,
                         app_port=free_port(), log_level="warning")
    await t01.start()
    assert await _refused(t01) == 0
    tenant = vsls_quota.Tenant(t01.url, "flood", 60.0, None)
    try:
        await tenant.start()
        # Under way: the bucket's burst (a second's worth) is spent, refusals come.
        ready = await _refused(t01)
        assert ready >= 1

        async def refused_since() -> bool:
            return await _refused(t01) > ready

        # The writes it counts from then on: a refusal among them (answered late, its
        # answer held until a token would be there; the writer waits for it before it
        # stops). Stopped at once, its writes past the rate could all be still held.
        await wait_until(refused_since, timeout=10, interval=0.05,
                         what="a write refused after the tenant said it was under way")
        stopping = time.monotonic()
        counts = await tenant.stop()
    finally:
        tenant.kill()
    assert time.monotonic() - stopping < 10.0  # told to stop, not at its 60 s bound
    assert counts["other"] == 0 and counts["refused"] >= 1, counts
    assert counts["ms"] < 10_000 and counts["cpu_ms"] >= 0, counts
