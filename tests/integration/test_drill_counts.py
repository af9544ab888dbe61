"""The DR drill counts failed requests from Envoy's own counters, traces or not.

``meshxl drill --envoy-admin URL`` samples each Envoy's listener counters: every request
a client sent through meshxl's listeners and how many were answered with a 5xx, by a
member or by Envoy itself (503 no healthy upstream). Before, failed requests were
counted only by the SLO review of traces (``--traces``).
"""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from meshxl.local.ports import free_ports
from meshxl.operator.drill import _Sampler
from tests.integration.test_envoy_routing import LOOPBACK, cluster, member, start_stack

pytestmark = pytest.mark.integration


async def test_the_drill_sampler_counts_requests_envoy_failed(
        tmp_path: Any, start_control_plane: Any, start_envoy: Any, start_backends: Any) -> None:
    (backend,) = await start_backends(1)
    (port,) = free_ports(1)
    _, envoy = await start_stack(tmp_path, start_control_plane, start_envoy,
                                 cluster("web", "load-sharing", [member(backend)], port))
    sampler = _Sampler([envoy.admin_url], {f"web/{LOOPBACK}:{backend.port}": "dc1"}, 0.1)
    url = f"http://{LOOPBACK}:{port}/"
    async with aiohttp.ClientSession() as http:
        await sampler.sample(http)
        for _ in range(3):
            async with http.get(url) as resp:
                assert resp.status == 200
        await backend.set_health(False)
        await envoy.wait_hosts("web", lambda hs: not any(h.healthy for h in hs), timeout=10,
                               what="the only member unhealthy")
        for _ in range(4):
            async with http.get(url) as resp:
                assert resp.status == 503  # Envoy's own answer: no healthy upstream
        await sampler.sample(http)
    [sample] = sampler.samples
    assert (sample["failed"], sample["answered"]) == (4, 7), sample
    assert sample["sites"] == {"dc1": 3}
    assert sampler.answers("failed", 0, sample["t"]) == 4
