"""A cold start in any order (issue: start in any order, come back from anything): every
process of a deployment (etcd, the control plane, three sidecars, three apps, Envoy)
killed together and started again, in a random order and with etcd last, none waiting
for another. Every member becomes ready and Envoy serves every session with its
acknowledged count; no process exits on its own (a sidecar started before etcd used to
exit after a second)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from meshxl.local.coldstart import cold_start, random_orders, write_sessions
from meshxl.local.deployment import DemoDeployment

pytestmark = [pytest.mark.integration, pytest.mark.heavy]


async def test_a_cold_start_in_any_order_loses_nothing(tmp_path: Path) -> None:
    rng = random.Random(20261124)
    async with DemoDeployment(tmp_path, mode="load-sharing") as d:
        counts = await write_sessions(d, [f"cold-{i}" for i in range(12)])
        for order in random_orders(2, rng):  # one random order, then etcd last
            result = await cold_start(d, order, counts, timeout=60)
            assert not result.exited, result.as_dict()
            assert not result.lost, result.as_dict()
            assert result.seconds > 0, result.as_dict()
            print("cold start:", result.as_dict())
            counts = await write_sessions(d, list(counts))  # the counts go on
