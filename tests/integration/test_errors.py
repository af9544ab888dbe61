"""An aiohttp handler raising a member of the meshxl.errors family answers its status
as JSON, through a real server (the family and its mappings: tests/unit/test_errors.py)."""

from __future__ import annotations

from meshxl import errors
from meshxl import web as mweb


async def test_a_handler_raising_a_family_member_answers_its_status_as_json() -> None:
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    async def handler(_: web.Request) -> web.Response:
        raise errors.PreconditionFailed("stale", current="7")

    app = mweb.application()
    app.router.add_get("/", handler)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        reply = await client.get("/")
        assert reply.status == 412
        assert await reply.json() == {"error": "stale", "status": 412, "current": "7"}
