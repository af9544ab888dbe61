"""The sidecar's HTTP API (aiohttp). Every error is JSON: ``{"error": ..., "status": ...}``."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .record import is_json, valid_session_id
from .sessions import BadRequest, SessionError, Stored, TooLarge

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MERGE_PATCH = "application/merge-patch+json"


def error_response(status: int, message: str, **details: Any) -> web.Response:
    return web.json_response({"error": message, "status": status, **details}, status=status)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map every failure to a JSON body with a message; nothing accepted is lost."""
    try:
        return await handler(request)
    except SessionError as exc:
        return error_response(exc.status, str(exc), **exc.details)
    except web.HTTPRequestEntityTooLarge as exc:
        return error_response(413, f"request body too large: {exc.text}")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, exc.reason, path=request.path)


def _session_id(request: web.Request) -> str:
    session_id = request.match_info["session_id"]
    if not valid_session_id(session_id):
        raise BadRequest(f"invalid session id {session_id!r}: use 1-200 characters of "
                         "A-Z a-z 0-9 . _ ~ -")
    return session_id


async def _body(request: web.Request, limit: int) -> bytes:
    length = request.content_length
    if length is not None and length > limit:
        raise TooLarge(f"session state is {length} bytes; the limit is {limit}", limit=limit)
    data = await request.read()
    if len(data) > limit:
        raise TooLarge(f"session state is {len(data)} bytes; the limit is {limit}", limit=limit)
    return data


def _content_type(request: web.Request, default: str) -> str:
    """The Content-Type header, which is stored and sent back as a header: a media type
    is printable ASCII (other bytes would come back mangled, or not encode at all)."""
    value = request.headers.get("Content-Type", default)
    if len(value) > 255 or not all(" " <= c <= "~" for c in value):
        raise BadRequest("Content-Type must be a media type of at most 255 printable ASCII "
                         f"characters, such as application/json; got {value[:80]!r}")
    return value


def _stored_headers(stored: Stored) -> dict[str, str]:
    return {"ETag": f'"{stored.etag}"', "X-Meshxl-Owner": stored.record.owner,
            "X-Meshxl-Source": stored.source}


def _write_response(stored: Stored) -> web.Response:
    body = {"session": stored.session_id, "etag": stored.etag, "owner": stored.record.owner,
            "created": stored.created, "takeover": stored.takeover,
            "replicated": stored.source != "local"}
    return web.json_response(body, status=201 if stored.created else 200,
                             headers=_stored_headers(stored))


class SessionRoutes:
    """Handlers bound to the sidecar (its sessions, membership, metrics, status)."""

    def __init__(self, sidecar: Any):
        self.sidecar = sidecar

    def add_to(self, app: web.Application) -> None:
        r = app.router
        r.add_route("PUT", "/v1/sessions/{session_id}", self.put)
        r.add_route("GET", "/v1/sessions/{session_id}", self.get)
        r.add_route("PATCH", "/v1/sessions/{session_id}", self.patch)
        r.add_route("DELETE", "/v1/sessions/{session_id}", self.delete)
        r.add_route("GET", "/v1/problems", self.problems)
        r.add_route("PUT", "/v1/problems/{name}", self.put_problem)
        r.add_route("DELETE", "/v1/problems/{name}", self.delete_problem)
        r.add_route("GET", "/healthz", self.healthz)
        r.add_route("GET", "/readyz", self.readyz)
        r.add_route("GET", "/metrics", self.metrics)
        r.add_route("GET", "/v1/status", self.status)

    # -- sessions -------------------------------------------------------------------------

    async def put(self, request: web.Request) -> web.Response:
        session_id = _session_id(request)
        sessions = self.sidecar.sessions
        data = await _body(request, sessions.settings.max_bytes)
        content_type = _content_type(request, "application/octet-stream")
        if is_json(content_type):
            try:
                json.loads(data)
            except ValueError as exc:
                raise BadRequest(f"body is not valid JSON ({exc}); send another "
                                 "Content-Type to store it as bytes") from None
        if_none_match = request.headers.get("If-None-Match")
        if if_none_match is not None and if_none_match.strip() != "*":
            raise BadRequest('If-None-Match takes only "*" (create, never replace)')
        stored = await sessions.put(session_id, data, content_type,
                                    request.headers.get("If-Match"),
                                    request.headers.get("traceparent"),
                                    create_only=if_none_match is not None)
        return _write_response(stored)

    async def get(self, request: web.Request) -> web.Response:
        stored = await self.sidecar.sessions.get(_session_id(request))
        return web.Response(body=stored.record.data, headers={
            **_stored_headers(stored), "Content-Type": stored.record.content_type})

    async def patch(self, request: web.Request) -> web.Response:
        session_id = _session_id(request)
        content_type = _content_type(request, "").split(";")[0].strip().lower()
        if content_type not in (MERGE_PATCH, "application/json"):
            raise web.HTTPUnsupportedMediaType(
                reason=f"PATCH takes {MERGE_PATCH} (RFC 7386), not {content_type or 'nothing'}")
        data = await _body(request, self.sidecar.sessions.settings.max_bytes)
        try:
            patch = json.loads(data)
        except ValueError as exc:
            raise BadRequest(f"merge patch is not valid JSON: {exc}") from None
        stored = await self.sidecar.sessions.patch(session_id, patch,
                                                   request.headers.get("If-Match"),
                                                   request.headers.get("traceparent"))
        return _write_response(stored)

    async def delete(self, request: web.Request) -> web.Response:
        await self.sidecar.sessions.delete(_session_id(request),
                                           request.headers.get("If-Match"))
        return web.Response(status=204)

    # -- critical devices ----------------------------------------------------------------

    async def problems(self, request: web.Request) -> web.Response:
        return web.json_response({"problems": self.sidecar.membership.problems})

    async def put_problem(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if not valid_session_id(name) or len(name) > 63:
            raise BadRequest(f"invalid problem name {name!r}: use 1-63 characters of "
                             "A-Z a-z 0-9 . _ ~ -")
        detail = ""
        if request.can_read_body:
            raw = await _body(request, 4096)
            try:
                body = json.loads(raw) if raw.strip() else {}
            except ValueError:
                body = {"detail": raw.decode(errors="replace")}
            detail = str(body.get("detail", "")) if isinstance(body, dict) else str(body)
        created = await self.sidecar.membership.set_problem(name, detail)
        return web.json_response({"problem": name, "detail": detail,
                                  "problems": sorted(self.sidecar.membership.problems)},
                                 status=201 if created else 200)

    async def delete_problem(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if not await self.sidecar.membership.clear_problem(name):
            return error_response(404, f"no problem {name!r} is set")
        return web.Response(status=204)

    # -- health, metrics, status ---------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        problems = self.sidecar.liveness_problems()
        if problems:
            return web.json_response({"status": "failing", "problems": problems}, status=503)
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        reasons = self.sidecar.not_ready_reasons()
        if reasons:
            return web.json_response({"ready": False, "reasons": reasons}, status=503)
        warnings = self.sidecar.warnings()
        return web.json_response({"ready": True, **({"warnings": warnings} if warnings else {})})

    async def metrics(self, request: web.Request) -> web.Response:
        self.sidecar.refresh_gauges()
        body = generate_latest(self.sidecar.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(self.sidecar.status(), dumps=_dumps)


def _dumps(data: Any) -> str:
    return json.dumps(data, default=lambda o: round(o, 6) if isinstance(o, float) else str(o))


__all__ = ["SessionRoutes", "error_response", "json_errors"]
