"""The control plane's live status page: ``/ui`` on its admin port (``--admin``).

The page (``static/``: HTML, JavaScript and CSS shipped in the package, nothing
fetched from elsewhere) polls ``/v1/view``, which is what ``meshxl status`` and
``meshxl sync`` report, computed by the same functions (:mod:`meshxl.operator.views`) from
one read of etcd. Every replica serves it the same way: what it shows comes from etcd,
not from the replica's own memory, so a replica with no Envoy connected shows the
failovers the others followed.

One read serves every page polling a replica at once (:class:`SharedRead`), so many
open pages cost etcd no more than one. The page and its data sit behind the admin
port's own protection (its bind address: docs/security.md), with headers that keep
browsers from framing the page or running anything but its own script.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import TYPE_CHECKING, Any

from aiohttp import web

from meshxl.errors import NotFound, Unavailable

if TYPE_CHECKING:
    from meshxl.xds.app import ControlPlane

__all__ = ["ASSETS", "SECURITY_HEADERS", "SharedRead", "add_routes", "install", "view_of"]

ASSETS: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "ui.js": "text/javascript; charset=utf-8",
    "ui.css": "text/css; charset=utf-8",
}
"""The page's files (``meshxl/ui/static``) and their content types."""

SECURITY_HEADERS: dict[str, str] = {
    # Only the page's own script and style; no inline code, no other origin, no frames.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; connect-src 'self'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}

READ_INTERVAL = 0.2
"""Seconds a read of etcd is reused for other pages' polls."""
READ_TIMEOUT = 5.0
"""Seconds a read of etcd may take before the page is told etcd is unavailable."""


def _asset(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


class SharedRead:
    """The latest view, read again when older than ``interval`` seconds; concurrent
    polls wait for one read instead of each starting their own."""

    def __init__(self, read: Callable[[], Awaitable[dict[str, Any]]],
                 interval: float = READ_INTERVAL, timeout: float = READ_TIMEOUT) -> None:
        self._read = read
        self.interval = interval
        self.timeout = timeout
        self._lock = asyncio.Lock()
        self._value: dict[str, Any] | None = None
        self._at = 0.0
        self.reads = 0

    async def get(self) -> dict[str, Any]:
        async with self._lock:
            if self._value is not None and time.monotonic() - self._at < self.interval:
                return self._value
            try:
                async with asyncio.timeout(self.timeout):
                    value = await self._read()
            except TimeoutError:
                raise Unavailable(f"etcd did not answer within {self.timeout:g} s") from None
            self.reads += 1
            self._value, self._at = value, time.monotonic()
            return value


def add_routes(app: web.Application, view: SharedRead) -> None:
    """``/ui`` (the page), ``/ui/{asset}`` and ``/v1/view`` (its data, JSON)."""
    files = {name: _asset(name) for name in ASSETS}  # read once, when the port opens

    async def page(request: web.Request) -> web.StreamResponse:
        if not request.path.endswith("/"):
            # Relative links (ui.js, ../v1/view) then work behind a path prefix too.
            query = f"?{request.query_string}" if request.query_string else ""
            raise web.HTTPFound(f"ui/{query}", headers=SECURITY_HEADERS)
        return asset_response("index.html")

    async def asset(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in files:
            raise NotFound(f"no such file: /ui/{name} (the page is /ui/)")
        return asset_response(name)

    def asset_response(name: str) -> web.Response:
        return web.Response(body=files[name], headers={
            "Content-Type": ASSETS[name], "Cache-Control": "no-cache", **SECURITY_HEADERS})

    async def data(_: web.Request) -> web.Response:
        return web.json_response(await view.get(), headers={
            "Cache-Control": "no-store", **SECURITY_HEADERS})

    app.router.add_get("/ui", page)
    app.router.add_get("/ui/", page)
    app.router.add_get("/ui/{name}", asset)
    app.router.add_get("/v1/view", data)


def view_of(plane: ControlPlane) -> Callable[[], Awaitable[dict[str, Any]]]:
    """What the page shows for ``plane``: ``meshxl status`` and ``meshxl sync`` of one
    etcd read (the model file when the replica serves one, as ``--model`` does for
    the commands) and the replica's own readiness and versions."""
    from meshxl.operator.views import live_report, read_mesh
    from meshxl.xds.types import short_type

    config = plane.config

    async def read() -> dict[str, Any]:
        if plane.client is None:
            raise Unavailable("this replica reads no etcd (started without --etcd): the "
                              "live view shows what etcd holds")
        text = source = None
        if config.config_path is not None:
            try:
                text = await asyncio.to_thread(config.config_path.read_text, encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise Unavailable(f"cannot read {config.config_path}: {exc}") from None
            source = str(config.config_path)
        mesh = await read_mesh(plane.client, plane.keys, text, source)
        snapshot = plane.cache.snapshot
        reasons = plane.not_ready_reasons()
        return {
            **live_report(mesh),
            "replica": {"name": config.replica, "ready": not reasons, "reasons": reasons,
                        "versions": {} if snapshot is None else {
                            short_type(t): v for t, v in snapshot.versions.items()}},
            "read_at": time.time(),
        }

    return read


def install(app: web.Application, plane: ControlPlane) -> None:
    """Serve the page on ``plane``'s admin port (``ControlPlane(admin_pages=install)``)."""
    add_routes(app, SharedRead(view_of(plane)))
