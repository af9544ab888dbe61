"""A flapping member under sticky load, and the session moves it causes.

:func:`flap` makes a member of a local deployment report a problem and clear it,
again and again, while :class:`~meshxl.local.traffic.Traffic` drives sessions through
Envoy; :func:`session_moves` counts, from the requests as the clients saw them, how
often each session changed member. The failback hysteresis (``failover.failback``,
``failback_delay``) exists to keep that count low: ``tests/integration/
test_failback.py`` asserts it, ``bench/flap.py`` measures it with and without.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from meshxl.local.deployment import DemoDeployment, envoy_hosts
from meshxl.local.traffic import Record, Traffic
from meshxl.local.wait import wait_until

__all__ = ["flap", "served_since", "session_moves"]

PROBLEM = "flap"
"""The problem name :func:`flap` reports."""


def session_moves(records: Iterable[Record], since: float = 0.0,
                  until: float = float("inf")) -> dict[str, int]:
    """How many times each session's answering member changed with an answered
    request sent in ``[since, until)`` (in the order they were sent; the member of the
    session's last answer before ``since`` counts as where it was)."""
    last: dict[str, str] = {}
    moves: dict[str, int] = {}
    for r in sorted(records, key=lambda r: r.sent):
        if not (r.ok and r.member) or r.sent >= until:
            continue
        before = last.get(r.session)
        last[r.session] = r.member
        if r.sent < since:
            continue
        moves.setdefault(r.session, 0)
        if before is not None and before != r.member:
            moves[r.session] += 1
    return moves


def served_since(traffic: Traffic, since: float) -> dict[str, set[str]]:
    """Session -> the members that answered it since ``since``."""
    out: dict[str, set[str]] = {}
    for r in traffic.records:
        if r.ok and r.member and r.sent >= since:
            out.setdefault(r.session, set()).add(r.member)
    return out


async def every_session_answered(traffic: Traffic, since: float, times: int = 2) -> None:
    """Until every session got ``times`` answers sent after ``since``: the clients have
    seen what Envoy does now."""
    def seen() -> bool:
        counts: dict[str, int] = {}
        for r in traffic.records:
            if r.ok and r.sent >= since:
                counts[r.session] = counts.get(r.session, 0) + 1
        return all(counts.get(s, 0) >= times for s in traffic.sessions)

    await wait_until(seen, timeout=15, what=f"every session answered {times} times")


async def _in_envoy(d: DemoDeployment, member: str) -> bool:
    return any(h.hostname == member and h.healthy for h in await envoy_hosts(d.admin_url))


async def flap(d: DemoDeployment, member: str, times: int, traffic: Traffic) -> None:
    """``times`` times: ``member`` reports a problem until Envoy has withdrawn it and
    every session has been answered twice since, then clears it until Envoy has it
    back and every session has been answered twice since. A flap lasts a few hundred
    milliseconds: faster than any sensible ``failback_delay``."""
    import aiohttp

    url = f"{d.member(member).sidecar_url}/v1/problems/{PROBLEM}"
    async with aiohttp.ClientSession() as http:
        for _ in range(times):
            async with http.put(url, json={"detail": "flapping"}) as resp:
                resp.raise_for_status()
            await wait_until(lambda: _absent(d, member), timeout=15,
                             what=f"Envoy to withdraw {member}")
            await every_session_answered(traffic, time.time())
            async with http.delete(url) as resp:
                resp.raise_for_status()
            await wait_until(lambda: _in_envoy(d, member), timeout=15,
                             what=f"Envoy to have {member} back")
            await every_session_answered(traffic, time.time())


async def _absent(d: DemoDeployment, member: str) -> bool:
    return not await _in_envoy(d, member)
