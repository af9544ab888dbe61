"""The demo's stream page: ``/streams/`` keeps the tally (:mod:`meshxl.demo.tally`) over a
WebSocket stream and a Server-Sent Events stream in a browser, with meshxl's browser
client (``/meshxl-streams.js``, :mod:`meshxl.streams.browser`); kill the member that
answers and watch the streams go on elsewhere (docs/streams.md, "Browser (JavaScript)").

A browser sends no custom header with a WebSocket, so the page's session is a cookie:
``x-session-id`` (what the stream routes read when the header is absent), set by the
page when the browser has none. The mesh routes it when the cluster hashes on that
cookie (``stickiness: {cookie: {name: x-session-id}}``); in a high-availability cluster
every session goes to the active member anyway. The files are in ``static/``, served
from the package: the page loads nothing from anywhere else.
"""

from __future__ import annotations

import secrets
from importlib import resources

from aiohttp import web

from meshxl import headers as hdr
from meshxl.streams import static_route

__all__ = ["FILES", "add_routes"]

FILES = {
    "": ("streams.html", "text/html; charset=utf-8"),
    "page.js": ("streams.js", "text/javascript; charset=utf-8"),
    "page.css": ("streams.css", "text/css; charset=utf-8"),
}
"""``/streams/<name>`` -> the file in ``static/`` and its content type."""

SECURITY_HEADERS = {
    # Only the page's own files, and connections back to where it came from.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def add_routes(app: web.Application) -> None:
    """``/streams/`` (the page, its script and style) and ``/meshxl-streams.js``."""
    files = {name: (resources.files(__package__).joinpath("static", file).read_bytes(), kind)
             for name, (file, kind) in FILES.items()}

    async def serve(request: web.Request) -> web.StreamResponse:
        name = request.match_info.get("name", "")
        if name not in files:
            raise web.HTTPNotFound(text=f'{{"error": "no such file: /streams/{name[:80]}"}}',
                                   content_type="application/json")
        body, kind = files[name]
        response = web.Response(body=body, headers={"Content-Type": kind, **SECURITY_HEADERS})
        if name == "" and not request.cookies.get(hdr.SESSION):
            response.set_cookie(hdr.SESSION, secrets.token_urlsafe(16), path="/",
                                httponly=True, samesite="Strict")
        return response

    async def slash(_: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/streams/")

    app.router.add_get("/streams", slash)
    app.router.add_get("/streams/", serve)
    app.router.add_get("/streams/{name:page\\.(?:js|css)}", serve)
    static_route(app)
