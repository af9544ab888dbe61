"""A tiny backend member for the quickstart and the tests.

Every response names the member that served it (JSON body and ``x-meshxl-member``
header) and echoes the session the client presented, so stickiness and failover are
visible from the client side. Health can be failed and restored over HTTP
(``POST /admin/health`` with body ``fail`` or ``ok``), so a test can make Envoy's health
checks eject a member without killing it. A member can be made sick while its health
check passes (``POST /admin/fault`` with ``{"delay": SECONDS, "fail": FRACTION}``: every
answer that much later, that fraction of them 503; ``{"hang": true}``: every request
accepted and never answered (dropped after :data:`HANG_SECONDS`); ``{"service":
SECONDS}``: requests served one at a time, each taking that long, as a member of that
capacity; ``{}`` makes it well again).
``GET /ws`` upgrades to a WebSocket that answers every text message with the member and
the session.

Run: ``python -m meshxl.demo.echo --name a --listen 127.0.0.1:8081``
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from collections.abc import Sequence

from aiohttp import web
from aiohttp.typedefs import Handler

from meshxl import headers as hdr
from meshxl.addr import parse_hostport
from meshxl.demo.signals import until_stopped

__all__ = ["make_app", "main", "serve"]

#: Sessions are named by the ``hdr.SESSION`` header (the default hash key for
#: stickiness); every response names the member that served it in ``hdr.MEMBER``.
#: Cookie names tried, in order, when the session header is absent.
DEFAULT_SESSION_COOKIES = (hdr.SESSION, "session", "meshxl-session")

_NAME = web.AppKey("name", str)
_HEALTHY = web.AppKey("healthy", list)
_COOKIES = web.AppKey("cookies", tuple)
_FAULT = web.AppKey("fault", dict)
_SERVER = web.AppKey("server", asyncio.Lock)


def _session_of(request: web.Request) -> str | None:
    header = request.headers.get(hdr.SESSION)
    if header:
        return header
    for cookie in request.app[_COOKIES]:
        value = request.cookies.get(cookie)
        if value:
            return str(value)
    return None


@web.middleware
async def _member_header(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        exc.headers[hdr.MEMBER] = request.app[_NAME]
        raise
    if not response.prepared:  # a WebSocket's headers left with its upgrade
        response.headers[hdr.MEMBER] = request.app[_NAME]
    return response


MAX_DELAY = 60.0
"""The longest ``?delay``: as long as a hang (a slow machine's test scales its delays)."""
HANG_SECONDS = 60.0
"""How long a hanging member (``{"hang": true}``) holds a request before it drops it."""


async def _echo(request: web.Request) -> web.Response:
    """Echo the member; ``?delay=SECONDS`` (at most :data:`MAX_DELAY`) answers that
    much later, to keep requests in flight in tests of load-bounded hashing."""
    try:
        delay = float(request.query.get("delay", 0))
    except ValueError:
        return web.json_response({"error": "delay must be a number of seconds"}, status=400)
    if not 0 <= delay <= MAX_DELAY:
        return web.json_response({"error": f"delay must be 0..{MAX_DELAY:g} s"}, status=400)
    fault = request.app[_FAULT]
    if fault.get("hang"):
        await asyncio.sleep(HANG_SECONDS)  # the client (Envoy) gives up first
        raise web.HTTPServiceUnavailable(text="hung on purpose (/admin/fault)")
    delay += fault.get("delay", 0.0)
    if delay:
        await asyncio.sleep(delay)
    service = fault.get("service", 0.0)
    if service:
        async with request.app[_SERVER]:  # one at a time: a queue of that capacity
            await asyncio.sleep(service)
    failing = fault.get("fail", 0.0)
    if failing:
        fault["count"] = count = fault.get("count", 0) + 1
        if math.floor(count * failing) != math.floor((count - 1) * failing):
            return web.json_response({"error": "failing on purpose (/admin/fault)"},
                                     status=503)
    return web.json_response(
        {"member": request.app[_NAME], "path": request.path, "session": _session_of(request)}
    )


async def _websocket(request: web.Request) -> web.WebSocketResponse:
    """A WebSocket: each text message is answered with the member and the session."""
    ws = web.WebSocketResponse()
    ws.headers[hdr.MEMBER] = request.app[_NAME]
    await ws.prepare(request)
    answer = {"member": request.app[_NAME], "session": _session_of(request)}
    async for message in ws:
        if message.type == web.WSMsgType.TEXT:
            await ws.send_json(answer)
    return ws


async def _healthz(request: web.Request) -> web.Response:
    if request.app[_HEALTHY][0]:
        return web.Response(text="ok")
    return web.Response(status=503, text="fail")


async def _set_health(request: web.Request) -> web.Response:
    body = (await request.text()).strip().lower()
    if body not in ("ok", "fail"):
        return web.Response(status=400, text=f"body must be 'ok' or 'fail', got {body!r}\n")
    request.app[_HEALTHY][0] = body == "ok"
    return web.Response(text=body)


async def _set_fault(request: web.Request) -> web.Response:
    try:
        body = await request.json()
        delay = float(body.get("delay", 0.0))
        fail = float(body.get("fail", 0.0))
        service = float(body.get("service", 0.0))
        hang = body.get("hang", False)
        if not isinstance(hang, bool):
            raise TypeError("hang")
    except (ValueError, TypeError, AttributeError):
        return web.json_response({"error": 'body must be {"delay": SECONDS, "fail": '
                                           'FRACTION, "service": SECONDS, "hang": '
                                           'true|false}'}, status=400)
    if not (0 <= delay <= MAX_DELAY and 0 <= fail <= 1 and 0 <= service <= MAX_DELAY):
        return web.json_response({"error": f"delay and service must be 0..{MAX_DELAY:g} s "
                                           "and fail 0..1"}, status=400)
    request.app[_FAULT].clear()
    done = {"delay": delay, "fail": fail, "service": service, "hang": hang}
    request.app[_FAULT].update(done)
    return web.json_response(done)


def make_app(
    name: str, session_cookies: Sequence[str] = DEFAULT_SESSION_COOKIES
) -> web.Application:
    """Build the echo application for member ``name``."""
    app = web.Application(middlewares=[_member_header])
    app[_NAME] = name
    app[_HEALTHY] = [True]  # a one-item list so handlers can flip it in place
    app[_COOKIES] = tuple(session_cookies)
    app[_FAULT] = {}
    app[_SERVER] = asyncio.Lock()
    app.router.add_get("/healthz", _healthz)
    app.router.add_post("/admin/health", _set_health)
    app.router.add_post("/admin/fault", _set_fault)
    app.router.add_get("/ws", _websocket)
    app.router.add_route("*", "/{tail:.*}", _echo)
    return app


async def serve(
    name: str,
    host: str,
    port: int,
    session_cookies: Sequence[str] = DEFAULT_SESSION_COOKIES,
) -> None:
    """Serve until SIGTERM/SIGINT; print one ``listening`` line once the port is bound."""
    runner = web.AppRunner(make_app(name, session_cookies), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        bound = runner.addresses[0][1] if runner.addresses else port
        shown = f"[{host}]" if ":" in host else host
        print(f"listening {shown}:{bound} member={name}", flush=True)
        await until_stopped()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m meshxl.demo.echo", description="meshxl demo echo backend"
    )
    parser.add_argument("--name", required=True, help="member name reported in every response")
    parser.add_argument("--listen", default="127.0.0.1:8081", help="HOST:PORT to bind")
    parser.add_argument(
        "--session-cookie",
        action="append",
        default=None,
        help="cookie name that carries the session (repeatable; default: "
        + ", ".join(DEFAULT_SESSION_COOKIES)
        + ")",
    )
    args = parser.parse_args(argv)
    try:
        host, port = parse_hostport(args.listen, allow_zero=True)
    except ValueError as exc:
        parser.error(str(exc))
    cookies = tuple(args.session_cookie or DEFAULT_SESSION_COOKIES)
    try:
        asyncio.run(serve(args.name, host, port, cookies))
    except OSError as exc:
        print(f"echo {args.name}: cannot listen on {args.listen}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from meshxl.exiting import run_main

    run_main(main)
