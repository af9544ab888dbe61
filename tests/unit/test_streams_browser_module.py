"""The browser's stream client as the package ships and serves it
(:mod:`meshxl.streams.browser`): the module's own bytes, as JavaScript, revalidated by
its ETag. No socket: the route's handler answers a request made in memory."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from meshxl.streams import static_route
from meshxl.streams.browser import script

SOURCE = Path(__file__).resolve().parents[2] / "meshxl/streams/static/meshxl-streams.js"


async def _get(app: web.Application, path: str, **headers: str) -> web.StreamResponse:
    request = make_mocked_request("GET", path, headers=headers, app=app)
    match = await app.router.resolve(request)
    return await match.handler(request)


async def test_the_module_is_served_as_shipped_and_revalidated_by_its_etag() -> None:
    app = web.Application()
    static_route(app)
    static_route(app, "/js/streams.js")
    first = await _get(app, "/meshxl-streams.js")
    assert isinstance(first, web.Response) and first.body == SOURCE.read_bytes() == script()
    assert first.headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert first.headers["X-Content-Type-Options"] == "nosniff"
    etag = first.headers["ETag"]
    assert re.fullmatch(r'"[0-9a-f]{32}"', etag)
    again = await _get(app, "/js/streams.js", **{"If-None-Match": etag})
    assert again.status == 304 and again.headers["ETag"] == etag
    stale = await _get(app, "/js/streams.js", **{"If-None-Match": '"0"'})
    assert stale.status == 200


def test_the_module_is_an_es_module_with_no_import() -> None:
    """No build step, no dependency: nothing to fetch from anywhere else."""
    source = script().decode()
    assert "export async function openWebSocketStream(" in source
    assert "export async function openEventStream(" in source
    assert not re.search(r"^\s*import\b|\bimport\(|\brequire\(", source, re.MULTILINE)


def test_a_path_must_be_absolute() -> None:
    with pytest.raises(ValueError, match="starts with /"):
        static_route(web.Application(), "meshxl-streams.js")
