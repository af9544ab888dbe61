"""What the sidecar accepts reads back, on every member; what it cannot read blocks nothing.

Real ``meshxl serve statesync`` processes on a real etcd:

* request metadata (a W3C trace context far longer than any valid one) is validated at
  entry: an invalid one is dropped, so the acknowledged session reads back everywhere;
* a stored record no sidecar wrote (a foreign or broken writer put it straight into
  etcd) is answered with a JSON error saying so, counted in status and metrics, and a
  PUT without If-Match or a DELETE replaces or removes it;
* problem reports are bounded in size and number, each refusal naming its field;
* every error, aiohttp's own included, is JSON; deep JSON nesting is a 400.
"""

from __future__ import annotations

import asyncio
import json
from functools import partial
from typing import Any

import aetcd
import pytest

from meshxl.etcd.keys import Keys
from meshxl.local.ports import free_port
from meshxl.local.wait import wait_until
from tests.harness import EtcdServer
from tests.harness.cli import meshxl_json
from tests.harness.sidecar import SidecarProcess

from .test_statesync import CLUSTER, assert_json_error, pair

pytestmark = pytest.mark.integration

KEYS = Keys()
TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


async def test_long_trace_context_is_dropped_and_the_session_reads_back(
    etcd: EtcdServer, start_sidecar: Any,
) -> None:
    a, b = await pair(start_sidecar, etcd.url)
    long = "00-" + "a" * 6000
    put = await a.put("cart", {"n": 1}, headers={"traceparent": long})
    assert put.status == 201, put

    async def on_b() -> bool:
        return (await b.get("cart")).status == 200

    await wait_until(on_b, timeout=10, what="session replicated to b")
    for member in (a, b):
        got = await member.get("cart")
        assert got.status == 200 and got.json() == {"n": 1}, got
    for i, member in enumerate((b, a, b)):  # each takes it over in turn
        assert (await member.get("cart")).status == 200
        written = await member.put("cart", {"n": 2 + i}, headers={"traceparent": long})
        assert written.status == 200, written
    assert (await a.get("cart")).status == 200
    patched = await a.patch("cart", {"m": True})
    assert patched.status == 200, patched
    assert (await b.get("cart")).json() == {"n": 4, "m": True}

    # A valid trace context is kept with the write (a takeover links to it).
    assert (await a.put("traced", {"t": 1}, headers={"traceparent": TRACE})).status == 201
    async with aetcd.Client(host="127.0.0.1", port=etcd.client_port) as client:
        stored = await client.get(KEYS.session(CLUSTER, "traced").encode())
        assert stored is not None
        assert json.loads(stored.value.split(b"\n", 1)[0])["traceparent"] == TRACE
        stored = await client.get(KEYS.session(CLUSTER, "cart").encode())
        assert stored is not None and b"traceparent" not in stored.value


async def _status(sidecar: SidecarProcess) -> dict[str, Any]:
    return await sidecar.status()


async def test_undecodable_record_is_reported_and_never_blocks_its_session(
    etcd: EtcdServer, start_sidecar: Any,
) -> None:
    a, b = await pair(start_sidecar, etcd.url)
    assert (await a.put("s1", {"v": 1})).status == 201
    key = KEYS.session(CLUSTER, "s1").encode()
    async with aetcd.Client(host="127.0.0.1", port=etcd.client_port) as client:
        for garbage in (b"no header line at all", b'{"owner": 1}\n{}', b"\xff" * 5000):
            await client.put(key, garbage)

            async def counted(member: SidecarProcess = b) -> bool:
                return (await member.status())["undecodable_sessions"] == 1

            for member in (a, b):  # each cache learns it through its own watch
                await wait_until(partial(counted, member), timeout=10,
                                 what=f"undecodable record counted on {member.member}")
            for member in (a, b):
                got = await member.get("s1")
                body = assert_json_error(got, 409)
                assert body["undecodable"] is True and "cannot be decoded" in body["error"]
                body = assert_json_error(await member.patch("s1", {"x": 1}), 409)
                assert body["undecodable"] is True
            metrics = (await a.request("GET", "/metrics")).body.decode()
            assert "meshxl_statesync_undecodable_records_total" in metrics
            assert "meshxl_statesync_undecodable_sessions 1.0" in metrics

            # A PUT without If-Match replaces it; it reads back everywhere.
            replaced = await b.put("s1", {"v": 2})
            assert replaced.status == 200, replaced
            for member in (a, b):
                async def readable(member: SidecarProcess = member) -> bool:
                    got = await member.get("s1")
                    return got.status == 200 and got.json() == {"v": 2}

                await wait_until(readable, timeout=10, what="replaced session readable")

        # A DELETE removes one.
        await client.put(key, b"garbage")
        await wait_until(lambda: counted(a), timeout=10, what="undecodable record counted on a")
        assert (await a.delete("s1")).status == 204
        assert_json_error(await b.get("s1"), 404)

        async def cleared() -> bool:
            return all([(await m.status())["undecodable_sessions"] == 0 for m in (a, b)])

        await wait_until(cleared, timeout=10, what="undecodable count back to zero")

        # A key under the sessions prefix that is not a session id is counted, skipped.
        await client.put(KEYS.session(CLUSTER, "x").encode()[:-1] + b"bad id", b"?")
        await wait_until(lambda: _bad_records(a), timeout=10, what="foreign key counted")
    # A member starting with undecodable records in etcd becomes ready and reports them.
    async with aetcd.Client(host="127.0.0.1", port=etcd.client_port) as client:
        await client.put(KEYS.session(CLUSTER, "s2").encode(), b"junk")
    c = await start_sidecar(cluster=CLUSTER, member="c", etcd=etcd.url, app_port=free_port())
    assert (await c.status())["undecodable_sessions"] == 1
    assert_json_error(await c.get("s2"), 409)

    # Operators see it in `meshxl sync` (the sidecars publish their statistics).
    async def in_sync_view() -> bool:
        report = await meshxl_json("sync", "--etcd", etcd.url)
        rows = {r["member"]: r for r in report["sidecars"]}
        return all(rows.get(m, {}).get("undecodable_sessions") == 1 for m in "abc")

    await wait_until(in_sync_view, timeout=20, what="undecodable session counted in meshxl sync")
    assert (await c.put("s2", b"fine")).status == 200


async def _bad_records(sidecar: SidecarProcess) -> bool:
    return bool((await sidecar.status())["bad_records"] >= 5)


async def test_problem_reports_are_bounded_and_named(
    etcd: EtcdServer, start_sidecar: Any,
) -> None:
    a = await start_sidecar(cluster=CLUSTER, member="a", etcd=etcd.url, app_port=free_port())
    body = assert_json_error(await a.set_problem("db", "x" * 1025), 400)
    assert body["field"] == "detail"
    body = assert_json_error(await a.set_problem("db", "bell\x07"), 400)
    assert body["field"] == "detail"
    body = assert_json_error(await a.request("PUT", "/v1/problems/db", data=b"[" * 2000 +
                                             b"]" * 2000,
                                             headers={"Content-Type": "application/json"}),
                             400)
    assert_json_error(await a.request("PUT", "/v1/problems/" + "p" * 64), 400)
    replies = await asyncio.gather(*(a.set_problem(f"p{i}", "down") for i in range(32)))
    assert all(r.status == 201 for r in replies), replies
    body = assert_json_error(await a.set_problem("one-more", "down"), 409)
    assert body["field"] == "name"
    assert (await a.set_problem("p0", "still down")).status == 200  # an update is fine
    assert (await a.clear_problem("p0")).status == 204
    assert (await a.set_problem("one-more", "down")).status == 201
    assert (await a.readyz()).status == 503


async def test_every_error_is_json_and_deep_nesting_is_refused(
    etcd: EtcdServer, start_sidecar: Any,
) -> None:
    a = await start_sidecar(cluster=CLUSTER, member="a", etcd=etcd.url, app_port=free_port())
    deep = b"[" * 100_000 + b"]" * 100_000
    for reply in (await a.put("deep", deep, content_type="application/json"),
                  await a.patch("deep", b'{"a":' * 50_000 + b"1" + b"}" * 50_000),
                  await a.put("deep", b"[" * 65 + b"]" * 65, content_type="application/json")):
        body = assert_json_error(reply, 400)
        assert "nests deeper" in body["error"], body
    assert (await a.put("ok", b"[" * 64 + b"]" * 64,
                        content_type="application/json")).status == 201
    assert_json_error(await a.request("GET", "/nowhere"), 404)
    body = assert_json_error(await a.request("POST", "/v1/sessions/x"), 405)
    assert "PUT" in body["allowed"]
    big = await a.request("GET", "/v1/sessions/x", headers={"X-Big": "h" * 9000})
    assert_json_error(big, big.status)
    assert big.status in (400, 431), big
    # A request aiohttp cannot even parse: its own 400, as JSON.
    reader, writer = await asyncio.open_connection("127.0.0.1", a.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
    await writer.drain()
    async with asyncio.timeout(10):
        answer = await reader.read()
    writer.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].endswith(b" 400 Bad Request"), answer[:200]
    assert b"application/json" in head.lower(), head
    assert json.loads(payload)["status"] == 400
    # Every stored bad-input reply left the sidecar serving.
    assert (await a.get("ok")).status == 200
