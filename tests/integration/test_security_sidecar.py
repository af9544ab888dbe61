"""The sidecar API's token, the demo app behind it, and fuzzing a real sidecar.

The fuzzer (hypothesis) sends random methods, paths, session ids, headers, content
types, If-Match values, tokens and bodies (some oversized) to a running ``meshxl serve
statesync`` on loopback and checks every answer: never a 5xx (but the documented 503s:
``/readyz`` not ready, etcd unavailable), 401 exactly when the token is missing or
wrong (health checks excepted), 413 above the size limit, JSON bodies for errors, and
no traceback in the sidecar's log.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshxl.local import commands
from meshxl.local.ports import free_port
from meshxl.local.procs import Owner
from meshxl.local.wait import wait_until
from meshxl.statesync.auth import OPEN_PATHS
from meshxl.statesync.record import valid_session_id
from tests.harness.clock import scaled
from tests.harness.sidecar import SidecarProcess

pytestmark = pytest.mark.integration

TOKEN = "s3cr3t-token-for-the-sidecar-api-0123456789"
MAX_BYTES = 2048
# Examples per fuzz run (about 100 a second); MESHXL_FUZZ_EXAMPLES=5000 for a campaign.
EXAMPLES = int(os.environ.get("MESHXL_FUZZ_EXAMPLES", "300"))
AUTH = {"Authorization": f"Bearer {TOKEN}"}

# Every route of the API, with what a request without a token must get (401) and what
# the right token makes of it (never 401).
ROUTES = [
    ("PUT", "/v1/sessions/s1"), ("GET", "/v1/sessions/s1"), ("PATCH", "/v1/sessions/s1"),
    ("DELETE", "/v1/sessions/s1"), ("GET", "/v1/problems"), ("PUT", "/v1/problems/db"),
    ("DELETE", "/v1/problems/db"), ("GET", "/metrics"), ("GET", "/v1/status"),
    ("GET", "/nowhere"), ("POST", "/v1/sessions/s1"),
]


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


async def _sidecar(harness: Owner, etcd_url: str, token_file: Path,
                   **options: Any) -> SidecarProcess:
    sidecar = SidecarProcess(harness, cluster="orders", member="a", etcd=etcd_url,
                             app_port=free_port(), token_file=token_file, **options)
    await sidecar.start()
    return sidecar


async def test_every_endpoint_but_health_checks_needs_the_token(
        harness: Owner, etcd: Any, token_file: Path) -> None:
    sidecar = await _sidecar(harness, etcd.url, token_file)
    for path in sorted(OPEN_PATHS):
        assert (await sidecar.request("GET", path)).status == 200, path

    wrong = [{}, {"Authorization": "Bearer wrong-token-0123456789"},
             {"Authorization": f"Basic {TOKEN}"}, {"Authorization": "Bearer"},
             {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": TOKEN}]
    for method, path in ROUTES:
        for headers in wrong:
            reply = await sidecar.request(method, path, data=b"{}", headers={
                "Content-Type": "application/json", **headers})
            assert reply.status == 401, (method, path, headers, reply)
            assert reply.headers["WWW-Authenticate"].startswith("Bearer")
            assert reply.json()["status"] == 401 and reply.json()["error"]

    # The right token (any case of the scheme) gets the real answers.
    hdrs = {"Content-Type": "application/json", **AUTH}
    put = await sidecar.request("PUT", "/v1/sessions/s1", data=b'{"n": 1}', headers=hdrs)
    assert put.status == 201, put
    got = await sidecar.request("GET", "/v1/sessions/s1",
                                headers={"Authorization": f"bearer {TOKEN}"})
    assert got.status == 200 and got.json() == {"n": 1}
    assert (await sidecar.request("GET", "/v1/status", headers=AUTH)).status == 200
    assert (await sidecar.request("GET", "/metrics", headers=AUTH)).status == 200
    assert (await sidecar.request("GET", "/nowhere", headers=AUTH)).status == 404
    assert (await sidecar.request("DELETE", "/v1/sessions/s1", headers=AUTH)).status == 204
    assert "Traceback" not in sidecar.logs()


async def test_demo_app_sends_the_token_from_its_environment(
        harness: Owner, etcd: Any, token_file: Path) -> None:
    sidecar = await _sidecar(harness, etcd.url, token_file)

    async def start_app(env: dict[str, str]) -> str:
        port = free_port()
        name = harness.unique_name("demo-app")
        app = harness.process(
            name, commands.app("a", cluster=None, listen=f"127.0.0.1:{port}",
                               sidecar=sidecar.url),
            env={**_environ(), **env})
        app.start()
        url = f"http://127.0.0.1:{port}"

        async def healthy() -> bool:  # /readyz needs no token: health follows it
            try:
                async with aiohttp.ClientSession() as http, http.get(f"{url}/healthz") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        await wait_until(healthy, timeout=15.0, what=f"{name} healthy", process=app)
        return url

    async def count(url: str) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as http, http.post(
                f"{url}/counter", headers={"x-session-id": "cart-7"}) as resp:
            return resp.status, await resp.json()

    with_token = await start_app({"MESHXL_STATESYNC_TOKEN_FILE": str(token_file)})
    assert await count(with_token) == (200, {"member": "a", "session": "cart-7", "seq": 1})
    assert (await count(with_token))[1]["seq"] == 2

    # Without the token the sidecar says 401, which the app reports as 503 (retryable).
    without = await start_app({})
    status, body = await count(without)
    assert status == 503 and "401" in body["error"]


def _environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MESHXL_STATESYNC")}


# -- fuzzing ------------------------------------------------------------------------------

_SESSION_ROUTES = ["/v1/sessions/{}"]
_ALL_ROUTES = ["/v1/sessions/{}", "/v1/problems/{}", "/v1/problems", "/healthz", "/readyz",
               "/metrics", "/v1/status", "/{}", "/v1/{}", "/v1/sessions/"]
_METHODS = ["GET", "PUT", "PATCH", "DELETE", "POST", "HEAD", "OPTIONS", "TRACE", "PROPFIND",
            "PURGE"]
_CONTENT_TYPES = ["application/json", "application/merge-patch+json", "text/plain",
                  "application/octet-stream", "application/json; charset=utf-8",
                  "APPLICATION/JSON", "multipart/form-data; boundary=x",
                  "application/x-www-form-urlencoded", ""]
# Visible latin-1 text without CR/LF: what an HTTP header value can carry.
_header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF,
                                     blacklist_characters="\x7f"), max_size=60)
_valid_id = st.from_regex(r"[A-Za-z0-9._~-]{1,200}", fullmatch=True)
_any_id = st.one_of(_valid_id, st.text(max_size=40).map(lambda t: quote(t, safe="")),
                    st.from_regex(r"[A-Za-z0-9]{201,260}", fullmatch=True),
                    st.sampled_from(["..", ".", "%2e%2e", "a%2Fb", "%00", "s%20x"]))
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner,
                                                                 max_size=4),
    max_leaves=12)


@dataclass
class Req:
    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    authorized: bool = False
    session_route: bool = False
    valid_id: bool = False


@st.composite
def requests(draw: st.DrawFn) -> Req:
    method = draw(st.sampled_from(_METHODS) | st.from_regex(r"[A-Z]{1,8}", fullmatch=True))
    route = draw(st.sampled_from(_ALL_ROUTES))
    ident = draw(_any_id)
    path = route.format(ident)
    headers: dict[str, str] = {}
    auth = draw(st.sampled_from(["right", "right", "right", "missing", "wrong", "scheme",
                                 "garbage"]))
    if auth == "right":
        headers["Authorization"] = f"Bearer {TOKEN}"
    elif auth == "wrong":
        headers["Authorization"] = f"Bearer {draw(_header_text)}"
    elif auth == "scheme":
        headers["Authorization"] = f"{draw(st.sampled_from(['Basic', 'Token', '']))} {TOKEN}"
    elif auth == "garbage":
        headers["Authorization"] = draw(_header_text)
    ctype = draw(st.sampled_from(_CONTENT_TYPES) | _header_text)
    if ctype:
        headers["Content-Type"] = ctype
    if draw(st.booleans()):
        headers["If-Match"] = draw(st.sampled_from(['"1"', "*", 'W/"1"', '"L3"', '""', '"-1"',
                                                    '"99999999999999999999999"', "1, 2"])
                                   | _header_text)
    for _ in range(draw(st.integers(0, 2))):
        name = draw(st.from_regex(r"X-[A-Za-z0-9-]{1,20}", fullmatch=True))
        headers[name] = draw(_header_text)
    kind = draw(st.sampled_from(["none", "json", "bytes", "oversized"]))
    body = {"none": lambda: b"",
            "json": lambda: json.dumps(draw(_json)).encode(),
            "bytes": lambda: draw(st.binary(max_size=1024)),
            "oversized": lambda: b"x" * draw(st.integers(MAX_BYTES + 1, MAX_BYTES + 70_000))}[
        kind]()
    return Req(method, path, headers, body, authorized=auth == "right",
               session_route=route == "/v1/sessions/{}" and path.startswith("/v1/sessions/"),
               valid_id=ident == quote(ident, safe="") and valid_session_id(ident))


def _send(port: int, req: Req) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(req.method, req.path, body=req.body or None, headers=req.headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def _check(req: Req, status: int, headers: dict[str, str], body: bytes,
           etcd_down: bool) -> None:
    where = f"{req.method} {req.path[:80]} -> {status} {body[:200]!r}"
    bare_path = req.path.split("?", 1)[0]
    if req.method not in _METHODS and status == 400:
        # aiohttp's HTTP parser knows no such method: refused before the app, as JSON.
        assert json.loads(body)["status"] == 400, where
        return
    if status >= 500:
        documented = status == 503 and (bare_path == "/readyz" or etcd_down)
        assert documented, f"server error: {where}"
    if bare_path in OPEN_PATHS:
        assert status != 401, where
    elif not req.authorized:
        assert status == 401, f"unauthenticated request not refused: {where}"
    if status == 401:
        assert headers.get("www-authenticate", "").startswith("Bearer"), where
    else:
        assert req.authorized or bare_path in OPEN_PATHS, where
    if status >= 400 and req.method != "HEAD":
        payload = json.loads(body)
        if bare_path == "/readyz" and status == 503:  # not ready: the reasons, documented
            assert payload["ready"] is False and payload["reasons"], where
        else:
            assert payload["status"] == status and payload["error"], where
    oversized = len(req.body) > MAX_BYTES
    ctype = req.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if req.authorized and oversized and req.session_route and req.valid_id and not etcd_down:
        if req.method == "PUT" or (req.method == "PATCH" and ctype in (
                "application/merge-patch+json", "application/json")):
            assert status == 413, f"size limit not enforced: {where}"
    if status in (200, 201) and req.method in ("PUT", "PATCH") and req.session_route:
        assert not oversized, f"an oversized body was accepted: {where}"


def _fuzz(port: int, examples: int, *, etcd_down: bool) -> int:
    sent = 0

    @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(req=requests())
    def one(req: Req) -> None:
        nonlocal sent
        status, headers, body = _send(port, req)
        sent += 1
        _check(req, status, headers, body, etcd_down)

    one()
    return sent


async def test_fuzzed_requests_never_crash_the_sidecar(
        harness: Owner, etcd: Any, token_file: Path) -> None:
    sidecar = await _sidecar(harness, etcd.url, token_file, max_session_bytes=MAX_BYTES,
                             log_level="info")
    started = time.monotonic()
    sent = await asyncio.to_thread(_fuzz, sidecar.port, EXAMPLES, etcd_down=False)
    assert sent >= EXAMPLES
    # etcd gone: writes fail with the documented 503, nothing else changes.
    await etcd.kill()
    sent = await asyncio.to_thread(_fuzz, sidecar.port, 40, etcd_down=True)
    assert sent >= 40
    assert sidecar.running
    assert (await sidecar.request("GET", "/healthz")).status == 200
    # Tracebacks of requests aiohttp's HTTP parser refused (an unknown method: 400
    # before the app) are aiohttp's own logging; any other is a handler that failed.
    tracebacks = [t for t in sidecar.logs().split("Traceback (most recent call last):")[1:]
                  if "aiohttp.http_exceptions.BadHttpMethod" not in t]
    assert not tracebacks, tracebacks[0][-3000:]
    assert time.monotonic() - started < scaled(60 + EXAMPLES / 20)
