"""Load-aware stickiness (VSLS load-based distribution) through a real Envoy:
``stickiness.balance_factor`` bounds how many requests in flight one member takes when
its hot sessions pile up, and sessions stay sticky wherever the bound allows."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from meshxl.local.ports import free_ports
from meshxl.local.wait import wait_until
from tests.harness import Backend
from tests.harness.clock import scaled

pytestmark = pytest.mark.integration

LOOPBACK = "127.0.0.1"
HEADER = "x-session-id"
HOT = 24          # hot sessions, all hashed to one member
DELAY = scaled(3.0)
"""Seconds each hot request stays in flight: all HOT must overlap. Each is sent once
the one before it is upstream (Envoy's ``upstream_rq_active``): the bound counts only
requests on a member's connections, and one still connecting counts for none (on two
busy cores, requests sent 30 ms apart left the busiest member 17 of 24)."""


def model(backends: list[Backend], ports: list[int]) -> dict[str, Any]:
    members = [{"name": b.name, "address": LOOPBACK, "port": b.port} for b in backends]

    def cluster(name: str, port: int, **stickiness: Any) -> dict[str, Any]:
        return {"name": name, "mode": "load-sharing", "members": members,
                "stickiness": {"header": HEADER, **stickiness},
                "outlier_detection": {"enabled": False},
                # Past a hot request's DELAY: neither its route nor a try ends it.
                "route": {"timeout": f"{DELAY + 30:g}s"},
                "retries": {"per_try_timeout": f"{DELAY + 20:g}s"},
                "listener": {"address": LOOPBACK, "port": port}}

    return {"clusters": [cluster("plain", ports[0]),
                         cluster("bounded", ports[1], balance_factor=1.25)]}


async def ask(http: aiohttp.ClientSession, port: int, session: str,
              delay: float = 0.0) -> str:
    async with http.get(f"http://{LOOPBACK}:{port}/", params={"delay": str(delay)},
                        headers={HEADER: session}) as resp:
        assert resp.status == 200, await resp.text()
        return resp.headers["x-meshxl-member"]


async def test_bounded_loads_cap_a_member_with_hot_sessions(
        tmp_path: Path, start_control_plane: Any, start_envoy: Any,
        start_backends: Any) -> None:
    backends = await start_backends(3)
    ports = free_ports(2)
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(model(backends, ports), sort_keys=False))
    plane = await start_control_plane(config_path=path)
    envoy = await start_envoy("edge", plane.port)
    await envoy.wait_ready()
    for name in ("plain", "bounded"):
        await envoy.wait_hosts(name, lambda hs: len(hs) == 3 and all(h.healthy for h in hs),
                               timeout=20, what=f"{name}: three healthy members")

    async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=4 * HOT),
            timeout=aiohttp.ClientTimeout(total=DELAY + scaled(10))) as http:
        # Without load the bound never applies: each session has one member, the same in
        # both clusters (same members, same hash), and keeps it.
        home = {}
        for i in range(300):
            session = f"s{i}"
            home[session] = await ask(http, ports[0], session)
        for session in list(home)[:60]:
            assert await ask(http, ports[1], session) == home[session]
            assert await ask(http, ports[1], session) == home[session]
        busiest, _ = Counter(home.values()).most_common(1)[0]
        hot = [s for s, m in home.items() if m == busiest][:HOT]
        assert len(hot) == HOT, Counter(home.values())

        async def burst(port: int, cluster: str) -> Counter[str]:
            active = f"cluster.{cluster}.upstream_rq_active"
            calls = []
            for k, session in enumerate(hot):
                calls.append(asyncio.ensure_future(ask(http, port, session, DELAY)))

                async def upstream(n: int = k + 1) -> bool:
                    return await envoy.stat(active) >= n

                await wait_until(upstream, timeout=3.0, interval=0.01,  # scaled there
                                 what=f"{cluster}: hot request {k + 1} upstream")
            in_flight = await envoy.stat(active)
            served = Counter(await asyncio.gather(*calls))
            # Else the premise failed: early requests ended before late ones were routed.
            assert in_flight == HOT, (in_flight, served)
            return served

        # Plain consistent hashing: every hot request in flight lands on one member.
        plain = await burst(ports[0], "plain")
        assert plain == Counter({busiest: HOT})

        # Bounded: that member takes at most about 1.25 x the mean in flight; the rest
        # spill to the next members of the table, and every request is still served.
        for _ in range(2):
            bounded = await burst(ports[1], "bounded")
            mean = HOT / 3
            assert sum(bounded.values()) == HOT
            assert bounded[busiest] <= int(1.25 * mean) + 2, bounded
            assert bounded[busiest] >= int(mean) - 1, bounded
            assert max(bounded.values()) <= int(1.25 * mean) + 2, bounded

        # Load gone: the hot sessions are back on their own member.
        for session in hot[:8]:
            assert await ask(http, ports[1], session) == busiest
