"""A cold start in any order: every process of a :class:`DemoDeployment` killed together
(etcd, the control planes, the sidecars, the apps, Envoy: a power loss) and started
again in a given order, none waiting for another; how long until every member is ready
and Envoy serves every session with its state, whether an acknowledged write was lost,
and whether any process exited on its own.

Used by ``tests/integration/test_cold_start.py`` and ``bench/coldstart.py``.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp

from meshxl import headers as hdr
from meshxl.local.deployment import DemoDeployment

__all__ = ["PARTS", "ColdStart", "cold_start", "random_orders", "write_sessions"]

PARTS = ("etcd", "control-plane", "sidecars", "apps", "envoy")
"""What starts, each a step of an order (the members' sidecars together, their apps
together)."""
GAP = 0.3
"""Seconds between two steps of an order."""


@dataclass
class ColdStart:
    order: tuple[str, ...]
    seconds: float = 0.0
    """From the first start until every member was ready and Envoy served every session
    with its state."""
    ready_seconds: float = 0.0
    """From the first start until every sidecar was ready."""
    sessions: int = 0
    lost: list[str] = field(default_factory=list)
    """Sessions whose acknowledged count did not read back."""
    exited: list[str] = field(default_factory=list)
    """Processes that were not running at the end (they exited on their own)."""

    def as_dict(self) -> dict[str, object]:
        return {"order": list(self.order), "seconds": round(self.seconds, 3),
                "ready_seconds": round(self.ready_seconds, 3), "sessions": self.sessions,
                "lost": self.lost, "exited": self.exited}


def random_orders(count: int, rng: random.Random) -> list[tuple[str, ...]]:
    """``count`` orders: random permutations, the last with etcd last."""
    orders = [tuple(rng.sample(PARTS, len(PARTS))) for _ in range(max(0, count - 1))]
    rest = [p for p in PARTS if p != "etcd"]
    rng.shuffle(rest)
    return [*orders, (*rest, "etcd")]


async def write_sessions(d: DemoDeployment, sessions: Sequence[str]) -> dict[str, int]:
    """One acknowledged increment of each session through Envoy: session -> count."""
    counts = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        for session in sessions:
            async with http.post(f"{d.url}/counter", headers={hdr.SESSION: session}) as resp:
                resp.raise_for_status()
                counts[session] = int((await resp.json())["seq"])
    return counts


class _Proc(Protocol):
    @property
    def running(self) -> bool: ...

    def signal(self, sig: signal.Signals) -> None: ...

    async def kill(self) -> object: ...


def _processes(d: DemoDeployment) -> dict[str, _Proc | None]:
    found: dict[str, _Proc | None] = {"etcd": d.etcd_process}
    for r in d.replicas:
        found[r.name] = r.process
    for m in d.members:
        found[f"sidecar-{m.name}"] = m.sidecar
        found[f"app-{m.name}"] = m.app
    found["envoy"] = d.envoy
    return found


async def _kill_all(d: DemoDeployment) -> None:
    """SIGKILL everything at once, then reap."""
    procs = [p for p in _processes(d).values() if p is not None]
    for p in procs:
        p.signal(signal.SIGKILL)
    await asyncio.gather(*(p.kill() for p in procs))


def _start(d: DemoDeployment, part: str) -> None:
    if part == "etcd":
        assert d.etcd_process is not None
        d.etcd_process.start()
    elif part == "control-plane":
        for r in d.replicas:
            assert r.process is not None
            r.process.start()
    elif part in ("sidecars", "apps"):
        for m in d.members:
            proc = m.sidecar if part == "sidecars" else m.app
            assert proc is not None
            proc.start()
    else:
        assert part == "envoy"


async def _served(d: DemoDeployment, http: aiohttp.ClientSession,
                  counts: dict[str, int]) -> list[str]:
    """Sessions Envoy does not serve with their acknowledged count yet."""
    missing = []
    for session, count in counts.items():
        try:
            async with http.get(f"{d.url}/counter", headers={hdr.SESSION: session}) as resp:
                if resp.status != 200 or int((await resp.json())["seq"]) != count:
                    missing.append(session)
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError):
            missing.append(session)
    return missing


async def _all_ready(d: DemoDeployment, http: aiohttp.ClientSession) -> bool:
    for m in d.members:
        try:
            async with http.get(f"{m.sidecar_url}/readyz") as resp:
                if resp.status != 200:
                    return False
        except (aiohttp.ClientError, TimeoutError):
            return False
    return True


async def cold_start(d: DemoDeployment, order: Sequence[str], counts: dict[str, int],
                     timeout: float = 60.0) -> ColdStart:
    """Kill everything of ``d``, start it again in ``order`` (:data:`PARTS`), and
    measure until every member is ready and Envoy serves every session of ``counts``
    with its count (or ``timeout``: then the sessions not served count as lost)."""
    if sorted(order) != sorted(PARTS):
        raise ValueError(f"an order names each of {', '.join(PARTS)} once, got {order}")
    if d.etcd_process is None:
        raise ValueError("a cold start needs the deployment's own etcd (no etcd_url)")
    await _kill_all(d)
    result = ColdStart(tuple(order), sessions=len(counts))
    began = time.monotonic()
    for index, part in enumerate(order):
        if index:
            await asyncio.sleep(GAP)
        if part == "envoy":
            assert d.envoy is not None
            await d.envoy.start()
        else:
            _start(d, part)
    deadline = began + timeout
    missing = list(counts)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while time.monotonic() < deadline:
            if not result.ready_seconds and await _all_ready(d, http):
                result.ready_seconds = time.monotonic() - began
            if result.ready_seconds:
                missing = await _served(d, http, counts)
                if not missing:
                    result.seconds = time.monotonic() - began
                    break
            await asyncio.sleep(0.1)
    result.lost = missing
    result.exited = sorted(name for name, p in _processes(d).items()
                           if p is None or not p.running)
    return result
