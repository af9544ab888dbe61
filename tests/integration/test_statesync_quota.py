"""Quotas per virtual system through real sidecars and etcd: t01 flooding writes beyond
its ``writes_per_second`` gets 429s (with Retry-After and a body naming the quota)
while t02's sidecar keeps writing; a new session beyond ``sessions`` is refused; every
write acknowledged reads back; a writer that ignores Retry-After but waits for its
answers is refused about as often as the rate mints tokens (the answers held); the
refusals are counted in the metrics and shown in ``/v1/status``."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aetcd
import pytest

from meshxl.client import AsyncClient, OverQuota
from meshxl.etcd.keys import Keys
from meshxl.local.ports import free_port
from meshxl.local.procs import Owner
from meshxl.operator.actions import apply_model
from meshxl.statesync.http import WRITE, Request, Response, Router, error
from tests.harness.clock import window
from tests.harness.sidecar import SidecarProcess
from tests.integration.test_sidecar_http import answers, exchange, run, serving
from tests.integration.test_sidecar_http import put as put_bytes

pytestmark = pytest.mark.integration

KEYS = Keys()
RATE = 20
MODEL = f"""\
pools:
  - name: web
    listener: {{address: 127.0.0.1, port: 10000}}
    members:
      - {{name: w1, address: 127.0.0.1, port: 18081}}
      - {{name: w2, address: 127.0.0.1, port: 18082}}
virtual_systems:
  - name: t01
    pool: web
    sessions: {{quota: {{writes_per_second: {RATE}, sessions: 12}}}}
  - name: t02
    pool: web
"""
FLOOD = 150  # t01's writes, 30 at a time (bounded)


async def test_a_flood_beyond_the_write_quota_is_refused_while_another_vs_writes(
        harness: Owner, etcd: Any, etcd_client: aetcd.Client) -> None:
    await apply_model(etcd_client, KEYS, MODEL, "test")
    t01, t02 = (SidecarProcess(harness, cluster=vs, member="w1", etcd=etcd.url,
                               app_port=free_port(), log_level="info")
                for vs in ("t01", "t02"))
    await asyncio.gather(t01.start(), t02.start())

    acked: dict[str, set[int]] = {}
    refused: list[Any] = []

    async def flood(i: int) -> None:
        reply = await t01.put(f"f{i % 10}", {"i": i})
        if reply.status in (200, 201):
            acked.setdefault(f"f{i % 10}", set()).add(i)
        else:
            assert reply.status == 429, reply
            refused.append(reply)

    async def other() -> list[int]:
        return [(await t02.put(f"o{i}", {"i": i})).status for i in range(40)]

    started = time.monotonic()
    semaphore = asyncio.Semaphore(30)

    async def bounded(i: int) -> None:
        async with semaphore:
            await flood(i)

    _, statuses = await asyncio.gather(asyncio.gather(*(bounded(i) for i in range(FLOOD))),
                                       other())
    elapsed = time.monotonic() - started
    assert statuses == [201] * 40  # t02 has no quota: every write taken
    # A burst of one second's worth, then RATE a second.
    assert acked and FLOOD - len(refused) <= RATE * (1 + elapsed) + 1, (
        FLOOD - len(refused), elapsed)
    assert len(refused) >= FLOOD - RATE * (1 + elapsed) - 1
    body = refused[0].json()
    assert body["status"] == 429 and body["quota"] == "writes_per_second"
    assert body["limit"] == RATE and body["retry_after"] >= 1
    assert refused[0].headers["Retry-After"] == str(body["retry_after"])
    for session, written in acked.items():  # nothing acknowledged is lost
        got = await t01.get(session)
        assert got.status == 200 and got.json()["i"] in written, (session, got)

    # Held answers: one writer ignoring Retry-After, each write sent on its answer, for
    # a second: each refusal answered when a token would be there, so it is refused
    # about as often as the rate mints tokens (at once, it would be hundreds of times).
    statuses: dict[int, int] = {}
    end = time.monotonic() + 1.0
    while time.monotonic() < end and sum(statuses.values()) < 1000:
        status = (await t01.put("f0", {"i": -1})).status
        statuses[status] = statuses.get(status, 0) + 1
    assert statuses.get(429, 0) <= 3 * RATE, statuses
    assert set(statuses) <= {200, 429} and statuses.get(200), statuses

    # Sessions: ten exist; a bulk save of three new ones would make 13 > 12: refused
    # whole; two fit; deletes and reads are never refused.
    await window(1.1, "the bucket refills; the count is made anew")
    over = await t01.bulk_save([{"session": f"n{i}", "data": {"n": i}} for i in range(3)])
    assert over.status == 429 and over.json()["quota"] == "sessions", over.json()
    assert over.json()["limit"] == 12 and over.json()["current"] == 10
    assert (await t01.get("n0")).status == 404
    assert [(await t01.put(f"n{i}", {"n": i})).status for i in range(3)] == [201, 201, 429]
    assert (await t01.put("n0", {"n": "again"})).status == 200  # not a new session
    async with AsyncClient(t01.url) as client:  # the session client: OverQuota, once
        with pytest.raises(OverQuota) as over_quota:
            await client.put("n9", {"n": 9})
    assert over_quota.value.details["quota"] == "sessions"
    assert (await t01.delete("n1")).status == 204

    metrics = (await t01.request("GET", "/metrics")).body.decode()
    assert f'meshxl_statesync_quota_refused_total{{quota="writes_per_second"}} ' \
           f'{float(len(refused) + statuses.get(429, 0))}' in metrics
    assert 'meshxl_statesync_quota_refused_total{quota="sessions"} 3.0' in metrics
    quota = (await t01.status())["quota"]
    assert quota["sessions"]["limit"] == 12 and quota["writes_per_second"]["limit"] == RATE
    assert quota["refused"] == {"writes_per_second": len(refused) + statuses.get(429, 0),
                                "sessions": 3}
    assert (await t02.status())["quota"] is None


FAST = 200
"""t04's rate: a write admitted every 5 ms past it, each alone in its transaction."""


def _writes_and_batches(metrics: str) -> tuple[float, float]:
    """The write batcher's ops and batches so far (``/metrics``)."""
    found = {}
    for line in metrics.splitlines():
        for name in ("sum", "count"):
            if line.startswith(f'meshxl_statesync_batch_size_{name}{{kind="write"}} '):
                found[name] = float(line.rsplit(" ", 1)[1])
    return found.get("sum", 0.0), found.get("count", 0.0)


async def test_a_tenant_past_its_rate_has_its_writes_committed_together(
        harness: Owner, etcd: Any, etcd_client: aetcd.Client) -> None:
    # Past its rate, the bucket admits t04's writes one at a time as tokens come, 5 ms
    # apart: each found the batcher idle and was a transaction of its own (1.0 a batch),
    # costing the etcd every tenant shares more than the same writes at the rate did.
    # Past the rate they wait for one another (THROTTLED_LINGER, 20 ms: about 4).
    await apply_model(etcd_client, KEYS, MODEL + f"""\
  - name: t04
    pool: web
    sessions: {{quota: {{writes_per_second: {FAST}, writes_burst: 1}}}}
""", "test")
    t04 = SidecarProcess(harness, cluster="t04", member="w1", etcd=etcd.url,
                         app_port=free_port(), log_level="info")
    await t04.start()
    before = _writes_and_batches((await t04.request("GET", "/metrics")).body.decode())
    acked: dict[str, int] = {}
    statuses: dict[int, int] = {}
    end = time.monotonic() + 1.5

    async def flooder(w: int) -> None:
        i = 0
        while time.monotonic() < end and i < 500:
            reply = await t04.put(f"w{w}", {"i": i})
            statuses[reply.status] = statuses.get(reply.status, 0) + 1
            if reply.status in (200, 201):
                acked[f"w{w}"] = i
            i += 1

    await asyncio.gather(*(flooder(w) for w in range(16)))
    writes, batches = (after - earlier for after, earlier in zip(
        _writes_and_batches((await t04.request("GET", "/metrics")).body.decode()), before,
        strict=True))
    assert set(statuses) <= {200, 201, 429} and statuses.get(429), statuses
    assert writes >= FAST / 2, (writes, statuses)  # 1.5 s at the rate, less start-up
    assert writes / batches >= 2.0, (writes, batches, statuses)
    for session, last in acked.items():  # nothing acknowledged is lost
        got = await t04.get(session)
        assert got.status == 200 and got.json()["i"] == last, (session, got)
    # The tenant is past its rate for THROTTLED_FOR after its last refusal, no longer.
    await window(1.1, "t04 stopped writing past its rate")
    before = _writes_and_batches((await t04.request("GET", "/metrics")).body.decode())
    for i in range(5):
        assert (await t04.put("alone", {"i": i})).status in (200, 201)
        await asyncio.sleep(0.03)
    writes, batches = (after - earlier for after, earlier in zip(
        _writes_and_batches((await t04.request("GET", "/metrics")).body.decode()), before,
        strict=True))
    assert writes == batches == 5


def test_the_server_answers_a_refusal_from_the_head_without_the_handler() -> None:
    """The body of a write refused from its head is read and dropped, its handler never
    runs, and the connection goes on with the next request."""
    calls: list[Request] = []
    over = [True]

    def refuse(request: Request) -> Response | None:
        return error(429, "over", [("Retry-After", "1")], quota="x") if over[0] else None

    async def handler(request: Request) -> Response:
        calls.append(request)
        return Response(200, request.body)

    router = Router()
    router.add("PUT", "/v1/sessions/{session_id}", handler, max_body=1 << 20,
               what="session state", access=WRITE, key="session_id", refuse=refuse)

    async def main() -> None:
        async with serving(router) as (_, port):
            big = b"x" * 300_000
            raw = await exchange(port, put_bytes("/v1/sessions/a", big) +
                                 put_bytes("/v1/sessions/b", b"{not json")
                                 + b"GET /v1/sessions/a HTTP/1.1\r\nHost: x\r\n"
                                   b"Connection: close\r\n\r\n")
            got = answers(raw)
            assert [status for status, _, _ in got] == [429, 429, 405]
            assert got[0][1]["retry-after"] == "1"
            assert json.loads(got[0][2])["quota"] == "x"
            over[0] = False
            got = answers(await exchange(port, put_bytes("/v1/sessions/a", b"{}", "Connection:"
                                                        " close\r\n")))
            assert got[0][0] == 200 and got[0][2] == b"{}"
        assert [r.path for r in calls] == ["/v1/sessions/a"]

    run("uvloop", main)
