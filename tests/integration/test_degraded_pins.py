"""Pinned sessions leave a sick member, through real sidecars, etcd and Envoy.

A load-sharing cluster with ``stickiness.pin`` (Envoy's stateful session filter, a
cookie per session) and three members running the sample counter app with its
statesync sidecar. One member turns ten times slower while its health check passes:
it is judged DEGRADED, its hashed share steps down, and once its share is at its last
step its pins are let go (it is sent ``HEALTHY``, no override target:
``meshxl.xds.stepdown``). Every session pinned to it moves to another member with no
failed request, and its counter goes on from where it was (its state read on the new
member, as in a takeover)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from meshxl.local.deployment import CLUSTER, DemoDeployment
from meshxl.local.procs import Owner
from meshxl.local.wait import wait_until
from tests.integration.test_pinned_sessions import Browser

pytestmark = pytest.mark.integration

SESSIONS = 24
ROUNDS = 400  # bound: rounds of one POST per session


@pytest.fixture
async def pinned(harness: Owner, tmp_path: Path) -> AsyncIterator[DemoDeployment]:
    async with DemoDeployment(
            tmp_path / "work", mode="load-sharing", pin=True, faults=True,
            fields={"degradation": "{detect: 1s, step: 0.5s, recover: 60s, min_requests: 10}",
                    "warmup": "0s"}) as d:
        harness.own(d.owner)
        yield d


async def degraded(d: DemoDeployment) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, \
            http.get(f"{d.replicas[0].admin_url}/v1/status") as resp:
        body = await resp.json()
    return dict(body.get("degraded", {}).get(CLUSTER, {}))


async def test_pinned_sessions_leave_a_degraded_member_with_their_state(
        pinned: DemoDeployment) -> None:
    d = pinned
    browser = Browser(f"{d.url}/counter")
    sessions = [f"p{i:02d}" for i in range(SESSIONS)]
    # (session, member, seq) of every answer, in order; failures counted apart.
    answers: list[tuple[float, str, str, int]] = []
    failed: list[str] = []
    stop = asyncio.Event()

    async def session_loop(http: aiohttp.ClientSession, session: str) -> None:
        for _ in range(ROUNDS):
            if stop.is_set():
                return
            async with http.post(browser.url, headers=browser.headers(session)) as resp:
                body = await resp.json(content_type=None)
                if resp.status != 200:
                    failed.append(f"{session}: HTTP {resp.status} {body}")
                    continue
                browser.keep(session, resp)
                answers.append((time.time(), session, resp.headers["x-meshxl-member"],
                                int(body["seq"])))
            await asyncio.sleep(0.02)

    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(),
                                     timeout=aiohttp.ClientTimeout(total=10)) as http:
        tasks = [asyncio.create_task(session_loop(http, s)) for s in sessions]
        try:
            await asyncio.sleep(3.0)  # every member's normal, every session pinned
            on: dict[str, str] = {}
            for _, s, m, _ in answers:
                on[s] = m
            sick = "b"
            pinned_there = sorted(s for s, m in on.items() if m == sick)
            assert pinned_there, on  # the hash gave b some of the sessions
            started = time.time()
            d.set_faults(sick, delay_ms=100)

            async def judged() -> bool:
                return sick in await degraded(d)

            await wait_until(judged, timeout=10, what="b degraded")

            async def last_step() -> bool:
                return (await degraded(d)).get(sick, {}).get("share") == 0.0

            # Envoy's admin shows every host without an EDS status as HEALTHY, so the
            # control plane's report tells when the pins are let go.
            await wait_until(last_step, timeout=10, what="b at its last step")
            let_go = time.time()
            # The push, then requests in flight finish on b (up to its 100 ms); after
            # that nothing goes there.
            await asyncio.sleep(2.5)
            quiet = let_go + 1.0
            late = [a for a in answers if a[0] >= quiet and a[2] == sick]
            assert not late, late[:5]
        finally:
            stop.set()
            await asyncio.gather(*tasks)
    assert not failed, failed[:5]
    # Every session pinned to b moved, and its counter went on from where it was.
    for s in pinned_there:
        mine = [(m, seq) for _, sess, m, seq in answers if sess == s]
        assert mine[-1][0] != sick, (s, mine[-3:])
        seqs = [seq for _, seq in mine]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), (s, mine)
    print(f"\n{len(pinned_there)} sessions pinned to {sick} let go "
          f"{let_go - started:.2f} s after the slowdown; {len(answers)} answers, 0 failed")
