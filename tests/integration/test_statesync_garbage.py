"""A request leaves nothing for the garbage collector: everything it made is freed by
reference counting as soon as it is answered, refusals and errors included.

An exception kept by a frame its traceback passes through (a local it was raised from,
a list of results) makes a reference cycle: the frame, and the request's data it holds
(states of up to 1 MiB each), then live until the collector runs. The sidecar collects
its youngest generation only every 10,000 allocations (``GC_YOUNG``), so a client
whose writes are refused (If-Match on a stale ETag, a routine answer) would make it
hold hundreds of such requests: 4 MiB bulk saves took its RSS past 1 GB.

The sidecar runs in this process (its HTTP server on a real socket, a real etcd), so
the collector can be asked what is unreachable after the requests; a plain socket
client sends them.
"""

from __future__ import annotations

import gc
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from meshxl.etcd.keys import Keys
from meshxl.local.wait import wait_until
from meshxl.statesync.record import SessionRecord
from tests.harness import EtcdServer, inproc
from tests.harness.inproc import JSON, RawHttp

pytestmark = pytest.mark.integration


@pytest.fixture
async def sidecar(etcd: EtcdServer) -> AsyncIterator[RawHttp]:
    async with inproc.sidecar(etcd.url) as (port, _side):
        http = await RawHttp.open(port)
        try:
            yield http
        finally:
            http.close()


def _items(prefix: str, n: int, **fields: Any) -> bytes:
    return json.dumps({"items": [{"session": f"{prefix}{i}", "data": {"pad": "x" * 1000},
                                  **fields} for i in range(n)]}).encode()


async def test_answered_requests_leave_no_reference_cycles(sidecar: RawHttp,
                                                            etcd: EtcdServer) -> None:
    status, body = await sidecar.call("PUT", "/v1/sessions/cart-1", b'{"items":1}')
    assert status == 201, body
    etag = json.loads(body)["etag"]
    requests: list[tuple[str, str, bytes, dict[str, str], int]] = [
        ("PUT", "/v1/sessions/cart-1", b'{"items":2}', {}, 200),
        ("PUT", "/v1/sessions/cart-1", b'{"items":3}', {"If-Match": '"1"'}, 412),
        ("PUT", "/v1/sessions/cart-new", b"{}", {"If-Match": f'"{etag}"'}, 412),
        ("PUT", "/v1/sessions/cart-1", b"{}", {"If-None-Match": "*"}, 412),
        ("DELETE", "/v1/sessions/cart-1", b"", {"If-Match": '"1"'}, 412),
        ("DELETE", "/v1/sessions/nothing-here", b"", {}, 404),
        ("GET", "/v1/sessions/nothing-here", b"", {}, 404),
        ("PATCH", "/v1/sessions/nothing-here", b'{"a":1}',
         {"Content-Type": "application/merge-patch+json"}, 404),
        ("PUT", "/v1/sessions/cart-2", b'{"not json', {}, 400),
        ("PUT", "/v1/sessions/bad!id", b"{}", {}, 400),
        ("POST", "/v1/sessions:bulkSave", _items("bulk-", 4), {}, 200),
        ("POST", "/v1/sessions:bulkSave", _items("stale-", 4, if_match='"1"'), {}, 200),
        ("POST", "/v1/sessions:bulkSave", b'{"items": [{"session": "!"}]}', {}, 400),
        ("POST", "/v1/sessions:bulkGet", b'{"sessions": ["cart-1", "nothing-here"]}', {},
         200),
        ("POST", "/v1/sessions:transaction", json.dumps({"operations": [
            {"session": "t-1", "data": {"a": 1}, "if_match": '"1"'},
            {"session": "t-2", "data": {"b": 2}}]}).encode(), {}, 412),
        ("POST", "/v1/sessions:transaction", json.dumps({"operations": [
            {"session": "t-3", "data": {"a": 1}}]}).encode(), {}, 200),
        ("GET", "/v1/no-such-route", b"", {}, 404),
        ("POST", "/v1/sessions/cart-1", b"{}", {}, 405),
        ("PUT", "/v1/sessions/cart-big", b'"' + b"x" * 1_100_000 + b'"', {}, 413),
        ("PUT", "/v1/problems/disk", b"{", {}, 400),
    ]

    taken = 0

    async def each() -> None:
        nonlocal taken
        for method, path, body, headers, expected in requests:
            status, answer = await sidecar.call(method, path, body, headers)
            assert status == expected, (method, path, headers, status, answer)
        # Pipelined PUTs, taken up together: refusals among them, and a second write of
        # a session (it waits for the first, in a task of its own).
        statuses = [status for status, _, _ in await sidecar.pipelined([
            ("PUT", "/v1/sessions/pipe-1", b'{"a":1}', {}),
            ("PUT", "/v1/sessions/pipe-2", b'{"a":1}', {"If-Match": '"1"'}),
            ("PUT", "/v1/sessions/pipe!", b"{}", {}),
            ("PUT", "/v1/sessions/pipe-3", b'{"not json', {}),
            ("PUT", "/v1/sessions/pipe-4", b"{}", {"If-Match": "*"}),
            ("PUT", "/v1/sessions/pipe-5", b"{}", {}),
            ("PUT", "/v1/sessions/pipe-1", b'{"a":2}', {})])]
        assert statuses[0] in (200, 201) and statuses[1:5] == [412, 400, 400, 412], statuses
        assert statuses[5] in (200, 201) and statuses[6] == 200, statuses
        # A takeover: a session member b wrote, written here (traced, counted).
        taken += 1
        session = f"taken-{taken}"
        record = SessionRecord(owner="b", content_type=JSON, created=1.0, updated=1.0,
                               data=b'{"items":1}')
        async with etcd.client() as client:
            await client.put(Keys().session("orders", session).encode(), record.encode())
        async def cached() -> bool:  # the watch brought it (else a blind write, no takeover)
            status, _ = await sidecar.call("GET", f"/v1/sessions/{session}")
            return status == 200

        await wait_until(cached, timeout=10, interval=0.01, what="the watch to bring it")
        status, answer = await sidecar.call("PUT", f"/v1/sessions/{session}", b'{"items":2}')
        assert status == 200 and json.loads(answer)["takeover"] is True, answer

    await each()  # first uses (caches, lazily built objects) are not the requests' own
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(3):
            await each()
        gc.collect()
        frames = sorted({f"{frame.f_code.co_filename.rsplit('/meshxl/', 1)[-1]}:"
                         f"{frame.f_code.co_name}" for frame in gc.garbage
                         if type(frame).__name__ == "frame"
                         and "/meshxl/" in frame.f_code.co_filename})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert frames == [], f"frames left in reference cycles by answered requests: {frames}"
