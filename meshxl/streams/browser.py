"""The browser's stream client, served: ``meshxl-streams.js``, one ES module shipped in
the package (``static/``), no build step and no dependencies (docs/streams.md,
"Browser (JavaScript)").

::

    static_route(app)                       # GET /meshxl-streams.js
    # in the page: import { openWebSocketStream } from "/meshxl-streams.js";

Served from the package, so a page works with no network beyond the mesh; with an
``ETag`` (the file's hash), so browsers revalidate it instead of fetching it again.
"""

from __future__ import annotations

import hashlib
from importlib import resources

from aiohttp import web

__all__ = ["SCRIPT", "script", "static_route"]

SCRIPT = "meshxl-streams.js"
"""The module's file name (in ``meshxl/streams/static``)."""


def script() -> bytes:
    """The module's source, as shipped."""
    return resources.files(__package__).joinpath("static", SCRIPT).read_bytes()


def static_route(app: web.Application, path: str = f"/{SCRIPT}") -> web.AbstractRoute:
    """Serve the module at ``path`` (GET and HEAD) of ``app``: JavaScript, revalidated by
    its ETag, never sniffed as anything else."""
    if not path.startswith("/"):
        raise ValueError(f"the module's path starts with /, not {path!r}")
    body = script()  # read once, when the route is added
    etag = f'"{hashlib.sha256(body).hexdigest()[:32]}"'
    headers = {"Content-Type": "text/javascript; charset=utf-8", "ETag": etag,
               "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}

    async def serve(request: web.Request) -> web.Response:
        if etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers={"ETag": etag,
                                                     "Cache-Control": "no-cache"})
        return web.Response(body=body, headers=headers)

    return app.router.add_get(path, serve)
