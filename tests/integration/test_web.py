"""meshxl.web, the aiohttp servers' layer, on an in-process loopback server:
every error answer is JSON (the handlers', aiohttp's routing and size answers, protocol
errors that never reach the application, unexpected exceptions), slow clients are cut
off, bodies are bounded in size, time and nesting."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from meshxl import web as mweb
from tests.harness.clock import scaled


async def _boom(_: web.Request) -> web.Response:
    raise RuntimeError("secret internals")


async def _text_error(_: web.Request) -> web.Response:
    return web.Response(status=418, text="short and stout")


async def _echo(request: web.Request) -> web.Response:
    return web.json_response({"got": await mweb.read_json(request, 1000)})


async def _big(request: web.Request) -> web.Response:
    return web.json_response({"bytes": len(await mweb.read_body(request, 10_000))})


async def _slow_body(request: web.Request) -> web.Response:
    data = await mweb.read_body(request, 10_000, timeout=0.3)
    return web.json_response({"bytes": len(data)})


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, int]]:
    app = mweb.application(client_max_size=1000)
    app.router.add_get("/boom", _boom)
    app.router.add_get("/teapot", _text_error)
    app.router.add_post("/echo", _echo)
    app.router.add_post("/big", _big)
    app.router.add_post("/slow", _slow_body)
    runner = mweb.Runner(app, header_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", port
    finally:
        await runner.cleanup()


async def _call(url: str, method: str = "GET", **kwargs: Any) -> tuple[int, str, Any]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session, \
            session.request(method, url, **kwargs) as resp:
        return resp.status, resp.content_type, await resp.json()


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/nowhere", 404), ("PUT", "/boom", 405), ("GET", "/boom", 500),
    ("GET", "/teapot", 418),
])
async def test_every_error_is_json(server: tuple[str, int], method: str, path: str,
                                   status: int) -> None:
    got, content_type, body = await _call(server[0] + path, method)
    assert (got, content_type, body["status"]) == (status, "application/json", status)
    assert body["error"]
    assert "secret internals" not in json.dumps(body)  # no traceback or message leaks


async def test_bodies_are_bounded_in_size_and_depth(server: tuple[str, int]) -> None:
    url = server[0] + "/echo"
    assert (await _call(url, "POST", data=b'{"a": [1, 2]}'))[2] == {"got": {"a": [1, 2]}}
    status, _, body = await _call(url, "POST", data=b"x" * 5000)
    assert status == 413 and body["status"] == 413
    # Chunked, without a length: cut off at the limit as it arrives.
    status, _, body = await _call(url, "POST", data=_chunks(b"x" * 100, 50))
    assert status == 413 and "the limit is 1000" in body["error"]
    # The endpoint's limit decides, not the application's default (1000 here).
    assert (await _call(server[0] + "/big", "POST", data=b"x" * 5000))[2] == {"bytes": 5000}
    status, _, body = await _call(url, "POST", data=b"[" * 400 + b"]" * 400)
    assert status == 400 and "nests deeper" in body["error"]
    status, _, body = await _call(url, "POST", data=b"{nope")
    assert status == 400 and "not JSON" in body["error"]


async def _chunks(chunk: bytes, count: int) -> AsyncIterator[bytes]:
    for _ in range(count):
        yield chunk


async def _raw(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(10):
            return await reader.read()
    finally:
        writer.close()


@pytest.mark.parametrize("request_bytes", [
    b"NOT-HTTP\r\n\r\n", b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
    b"GET / HTTP/1.1\r\nX: " + b"y" * 9000 + b"\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + b"".join(b"H%d: x\r\n" % i for i in range(150)) + b"\r\n",
])
async def test_protocol_errors_are_json(server: tuple[str, int], request_bytes: bytes) -> None:
    answer = await _raw(server[1], request_bytes)
    head, _, payload = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    assert 400 <= status < 500, head
    assert b"application/json" in head.lower(), head
    assert json.loads(payload)["status"] == status


async def test_slow_clients_are_cut_off(server: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    # A request head that never completes: closed after the header timeout.
    reader, writer = await asyncio.open_connection("127.0.0.1", server[1])
    started = loop.time()
    writer.write(b"GET /teapot HTTP/1.1\r\nHost: x\r\n")
    await writer.drain()
    async with asyncio.timeout(10):
        assert await reader.read() == b""
    assert loop.time() - started < scaled(5)  # the header timeout, not the 10 s wait
    writer.close()
    # A body that never completes: 408 after the body timeout.
    reader, writer = await asyncio.open_connection("127.0.0.1", server[1])
    writer.write(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
    await writer.drain()
    async with asyncio.timeout(10):
        answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:100]


def test_server_settings_bound_headers_and_idle_time() -> None:
    args = mweb.server_args()
    assert 0 < args["keepalive_timeout"] <= 60
    assert args["max_headers"] <= 128 and args["max_field_size"] <= 8190


def test_every_meshxl_server_uses_the_shared_layer() -> None:
    """No server builds its own aiohttp Application or AppRunner (which would answer
    errors as text and keep slow clients forever); the echo backend stands in for an
    application and is not a meshxl surface."""
    import ast
    from pathlib import Path

    package = Path(mweb.__file__).parent
    exempt = {package / "web.py", package / "demo" / "echo.py"}
    offenders = []
    for path in package.rglob("*.py"):
        if path in exempt:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("Application", "AppRunner")):
                offenders.append(f"{path.relative_to(package)}:{node.lineno}")
    assert offenders == []
