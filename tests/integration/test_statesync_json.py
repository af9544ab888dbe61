"""Stored JSON is JSON, on every write path alike, and If-Match compares strongly: the
sidecar in this process on a real socket and a real etcd.

A PATCH used to store ``{"n":1e400}`` as ``{"n":Infinity}`` and to accept ``NaN``, a PUT
of ``application/json`` took ``NaN`` (the standard library reads it), and a patch
rewrote numbers it never named (``1E2`` -> ``100.0``, ``-0`` -> ``0``); ``If-Match:
W/"N"`` matched revision N, though RFC 9110 compares If-Match strongly."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from tests.harness import EtcdServer, inproc
from tests.harness.inproc import RawHttp

pytestmark = pytest.mark.integration

MERGE = "application/merge-patch+json"


@pytest.fixture
async def http(etcd: EtcdServer) -> AsyncIterator[RawHttp]:
    async with inproc.sidecar(etcd.url) as (port, _):
        conn = await RawHttp.open(port)
        try:
            yield conn
        finally:
            conn.close()


async def test_non_finite_numbers_are_refused_on_every_write_path(http: RawHttp) -> None:
    assert (await http.call("PUT", "/v1/sessions/s", b'{"n":1}'))[0] == 201
    for body in (b'{"n":1e400}', b'{"n":NaN}', b'{"n":-Infinity}'):
        status, answer = await http.call("PATCH", "/v1/sessions/s", body,
                                         {"Content-Type": MERGE})
        assert status == 400, answer
        assert "not JSON" in json.loads(answer)["error"]
        status, answer = await http.call("PUT", "/v1/sessions/t", body)
        assert status == 400, answer
        bulk = json.dumps({"items": [{"session": "u", "data": 1}]}).encode().replace(
            b'"data": 1', b'"data": ' + body)
        status, answer = await http.call("POST", "/v1/sessions:bulkSave", bulk)
        assert status == 400, answer
    status, answer = await http.call("GET", "/v1/sessions/s")
    assert (status, answer) == (200, b'{"n":1}')
    assert (await http.call("GET", "/v1/sessions/t"))[0] == 404


async def test_a_patch_keeps_the_values_it_does_not_touch(http: RawHttp) -> None:
    stored = '{"a":1E2,"b":-0,"c":1.10,"d":[1e-07,"é"],"n":1}'.encode()
    assert (await http.call("PUT", "/v1/sessions/p", stored))[0] == 201
    status, _ = await http.call("PATCH", "/v1/sessions/p", b'{"n":2}',
                                {"Content-Type": MERGE})
    assert status == 200
    status, answer = await http.call("GET", "/v1/sessions/p")
    assert answer == '{"a":1E2,"b":-0,"c":1.10,"d":[1e-07,"é"],"n":2}'.encode()


async def test_a_weak_etag_never_matches_if_match(http: RawHttp) -> None:
    status, _ = await http.call("PUT", "/v1/sessions/w", b'{"v":1}')
    assert status == 201
    # The session's own ETag, made weak: refused with 412 all the same.
    [(_, fields, _)] = await http.pipelined([("GET", "/v1/sessions/w", b"", {})])
    tag = fields["etag"]
    for method, body in (("PUT", b'{"v":2}'), ("PATCH", b'{"v":2}'), ("DELETE", b"")):
        status, answer = await http.call(method, "/v1/sessions/w", body,
                                         {"If-Match": f"W/{tag}", "Content-Type": MERGE
                                          if method == "PATCH" else "application/json"})
        assert status == 412, (method, answer)
        assert "weak ETag" in json.loads(answer)["error"]
    assert (await http.call("GET", "/v1/sessions/w"))[1] == b'{"v":1}'
    status, _ = await http.call("PUT", "/v1/sessions/w", b'{"v":3}', {"If-Match": tag})
    assert status == 200
