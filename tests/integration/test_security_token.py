"""The sidecar's token check over a real connection: health probes open, every other
path needs the bearer token (tests/unit/test_security.py: the settings)."""

from __future__ import annotations

import json
from typing import Any

from meshxl.statesync.auth import (
    token_check,
)
from meshxl.statesync.http import Request, Response, Router, json_response
from tests.integration.test_sidecar_http import answers, exchange, serving
from tests.unit.test_security import TOKEN


async def test_token_check() -> None:
    async def ok(_: Request) -> Response:
        return json_response({"ok": True})

    router = Router()
    for path in ("/healthz", "/readyz", "/v1/sessions/x"):
        router.add("GET", path, ok)

    async def get(port: int, path: str, authorization: str | None = None) -> Any:
        header = f"Authorization: {authorization}\r\n" if authorization is not None else ""
        raw = await exchange(port, f"GET {path} HTTP/1.1\r\nHost: x\r\n{header}"
                                   "Connection: close\r\n\r\n".encode())
        return answers(raw)[0]

    async with serving(router, authorize=token_check(TOKEN)) as (_, port):
        for path in ("/healthz", "/readyz"):
            assert (await get(port, path))[0] == 200
        for header in (None, f"Bearer {TOKEN[:-1]}", f"Basic {TOKEN}", "Bearer ",
                       f"Bearer {TOKEN}extra", "Bearer \u00e9" * 3):
            status, headers, body = await get(port, "/v1/sessions/x", header)
            assert status == 401, header
            assert headers["www-authenticate"] == 'Bearer realm="meshxl-statesync"'
            payload = json.loads(body)
            assert payload["status"] == 401 and payload["error"]
        for header in (f"Bearer {TOKEN}", f"bearer {TOKEN}", f"  Bearer   {TOKEN}  "):
            assert (await get(port, "/v1/sessions/x", header))[0] == 200, header
        # Not found stays hidden from those without a token.
        assert (await get(port, "/elsewhere"))[0] == 401
        assert (await get(port, "/elsewhere", f"Bearer {TOKEN}"))[0] == 404
