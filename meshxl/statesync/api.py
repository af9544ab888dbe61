"""The sidecar's HTTP API (aiohttp). Every error is JSON: ``{"error": ..., "status": ...}``
(:mod:`meshxl.web`). Every value that is stored (the state, its content type, the trace
context, a problem's name and detail) is validated and bounded here, at entry, so
whatever is acknowledged reads back. The API is described by ``openapi.json``.
"""

from __future__ import annotations

import asyncio
import json
from importlib import resources
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from meshxl import headers as hdr
from meshxl import web as mweb
from meshxl.web import error_response, json_errors

from . import bulk
from .membership import MAX_PROBLEMS
from .record import is_json, valid_content_type, valid_session_id, valid_traceparent
from .sessions import (
    BadRequest,
    Conflict,
    PreconditionFailed,
    SessionError,
    Stored,
    TooLarge,
    Transacted,
)

MERGE_PATCH = "application/merge-patch+json"
MAX_PROBLEM_DETAIL = 1024
"""Characters of a problem's detail."""
PROBLEM_NAME_MAX = 63


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 description of this API (shipped as package data)."""
    text = resources.files("meshxl.statesync").joinpath("openapi.json").read_text("utf-8")
    document: dict[str, Any] = json.loads(text)
    return document


def _session_id(request: web.Request) -> str:
    session_id = request.match_info["session_id"]
    if not valid_session_id(session_id):
        raise BadRequest(f"invalid session id {session_id!r}: use 1-200 characters of "
                         "A-Z a-z 0-9 . _ ~ -")
    return session_id


async def _body(request: web.Request, limit: int, what: str = "session state") -> bytes:
    try:
        return await mweb.read_body(request, limit, what=what)
    except mweb.BodyTooLarge as exc:
        raise TooLarge(str(exc), limit=limit) from None


def _content_type(request: web.Request, default: str) -> str:
    """The Content-Type header, which is stored and sent back as a header: a media type
    is printable ASCII (other bytes would come back mangled, or not encode at all)."""
    value = request.headers.get("Content-Type", default)
    if value and not valid_content_type(value):
        raise BadRequest("Content-Type must be a media type of at most 255 printable ASCII "
                         f"characters, such as application/json; got {value[:80]!r}",
                         field="Content-Type")
    return value


def _traceparent(request: web.Request) -> str | None:
    """The request's W3C trace context, kept with the write so a takeover can link to
    it; an invalid one is ignored (trace context is optional metadata)."""
    return valid_traceparent(request.headers.get(hdr.TRACEPARENT))


def _stored_headers(stored: Stored) -> dict[str, str]:
    return {hdr.ETAG: f'"{stored.etag}"', hdr.OWNER: stored.record.owner,
            hdr.SOURCE: stored.source}


def _write_response(stored: Stored) -> web.Response:
    return web.Response(body=bulk.write_answer(stored), status=201 if stored.new_session
                        else 200, headers={**_stored_headers(stored),
                                           "Content-Type": "application/json"})


def _json_bytes(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type="application/json")


def _transaction_response(items: list[bulk.Item], outcome: Transacted) -> web.Response:
    """Committed: 200, every item's answer. Not: the first failed operation's status,
    naming it, with every item's answer (424 for those that failed only because
    another one did)."""
    if outcome.committed:
        answers: list[dict[str, Any]] = []
        for item, stored in zip(items, outcome.stored, strict=True):
            if stored is None:
                answers.append({"session": item.session_id, "operation": "delete",
                                "status": 204})
            else:
                answers.append({**bulk.write_fields(stored), "operation": "upsert"})
        return _json_bytes(bulk.dumps({"committed": True, "revision": outcome.revision,
                                       "items": answers}))
    first = min(outcome.errors)
    failure = outcome.errors[first]
    item = items[first]
    field = "session"
    if isinstance(failure, PreconditionFailed):
        field = "if_none_match" if item.create_only else "if_match"
    status = mweb.http_status(failure)
    answers = []
    for i, each in enumerate(items):
        error = outcome.errors.get(i)
        if error is not None:
            answers.append({**bulk.error_fields(each.session_id, error),
                            "operation": each.operation})
        else:
            answers.append({"session": each.session_id, "operation": each.operation,
                            "status": 424, "error": f"not applied: operations[{first}] "
                            "failed and a transaction applies all or nothing"})
    body = {"error": f"operations[{first}] (session {item.session_id!r}): {failure}",
            "status": status, "field": f"operations[{first}].{field}", "item": first,
            "committed": False, "items": answers}
    return _json_bytes(bulk.dumps(body), status)


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
        r.add_route("POST", "/v1/sessions:bulkGet", self.bulk_get)
        r.add_route("POST", "/v1/sessions:bulkSave", self.bulk_save)
        r.add_route("POST", "/v1/sessions:transaction", self.transaction)
        r.add_route("GET", "/v1/problems", self.problems)
        r.add_route("PUT", "/v1/problems/{name}", self.put_problem)
        r.add_route("DELETE", "/v1/problems/{name}", self.delete_problem)
        r.add_route("GET", "/v1/overload", self.overload)
        r.add_route("PUT", "/v1/overload", self.put_overload)
        r.add_route("DELETE", "/v1/overload", self.delete_overload)
        r.add_route("GET", "/healthz", self.healthz)
        r.add_route("GET", "/readyz", self.readyz)
        r.add_route("GET", "/metrics", self.metrics)
        r.add_route("GET", "/v1/status", self.status)
        r.add_route("GET", "/openapi.json", self.openapi)

    # -- sessions -------------------------------------------------------------------------

    async def put(self, request: web.Request) -> web.Response:
        session_id = _session_id(request)
        sessions = self.sidecar.sessions
        data = await _body(request, sessions.settings.max_bytes)
        content_type = _content_type(request, "application/octet-stream")
        if is_json(content_type):
            try:
                mweb.loads(data)
            except mweb.BadJson as exc:
                raise BadRequest(f"{exc}; send another Content-Type to store it as bytes",
                                 field="body") from None
        if_none_match = request.headers.get(hdr.IF_NONE_MATCH)
        if if_none_match is not None and if_none_match.strip() != "*":
            raise BadRequest('If-None-Match takes only "*" (create, never replace)')
        stored = await sessions.put(session_id, data, content_type,
                                    request.headers.get(hdr.IF_MATCH),
                                    _traceparent(request),
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
            patch = mweb.loads(data, what="merge patch")
        except mweb.BadJson as exc:
            raise BadRequest(str(exc), field="body") from None
        stored = await self.sidecar.sessions.patch(session_id, patch,
                                                   request.headers.get(hdr.IF_MATCH),
                                                   _traceparent(request))
        return _write_response(stored)

    async def delete(self, request: web.Request) -> web.Response:
        await self.sidecar.sessions.delete(_session_id(request),
                                           request.headers.get(hdr.IF_MATCH))
        return web.Response(status=204)

    # -- several sessions (bulk.py) -------------------------------------------------------

    async def bulk_get(self, request: web.Request) -> web.Response:
        """Each session as GET answers it (concurrent reads share etcd transactions)."""
        sessions = self.sidecar.sessions
        ids = bulk.parse_get(await _body(request, bulk.MAX_GET_BODY, "bulk get request"))
        self._count("get", len(ids))
        results = await asyncio.gather(*(sessions.get(s) for s in ids),
                                       return_exceptions=True)
        parts = []
        for session_id, result in zip(ids, results, strict=True):
            if isinstance(result, Stored):
                parts.append(bulk.read_item(result))
            elif isinstance(result, SessionError):
                parts.append(bulk.dumps(bulk.error_fields(session_id, result)))
            else:
                raise result
        return _json_bytes(bulk.items_body(parts))

    async def bulk_save(self, request: web.Request) -> web.Response:
        """Each item as PUT would write it, concurrently (the batcher packs them into
        shared etcd transactions); each succeeds or fails on its own."""
        sessions = self.sidecar.sessions
        items = bulk.parse_save(await _body(request, bulk.MAX_BODY, "bulk save request"),
                                sessions.settings.max_bytes)
        self._count("save", len(items))
        results = await sessions.put_many(
            items,
            _traceparent(request))
        return _json_bytes(bulk.items_body([
            bulk.write_answer(result, status=True) if isinstance(result, Stored)
            else bulk.dumps(bulk.error_fields(item.session_id, result))
            for item, result in zip(items, results, strict=True)]))

    async def transaction(self, request: web.Request) -> web.Response:
        """Every operation or none, in one etcd transaction (Sessions.transact)."""
        sessions = self.sidecar.sessions
        items = bulk.parse_transaction(
            await _body(request, bulk.MAX_BODY, "transaction request"),
            sessions.settings.max_bytes)
        self._count("transaction", len(items))
        outcome = await sessions.transact(
            items,
            _traceparent(request))
        return _transaction_response(items, outcome)

    def _count(self, kind: str, items: int) -> None:
        metrics = self.sidecar.metrics
        metrics.bulk_requests.labels(kind).inc()
        metrics.bulk_items.labels(kind).inc(items)

    # -- critical devices ----------------------------------------------------------------

    async def problems(self, request: web.Request) -> web.Response:
        return web.json_response({"problems": self.sidecar.membership.problems})

    async def put_problem(self, request: web.Request) -> web.Response:
        name = _problem_name(request)
        detail = ""
        if request.can_read_body:
            raw = await mweb.read_body(request, 4 * MAX_PROBLEM_DETAIL + 64,
                                       what="problem report")
            detail = _problem_detail(raw, request.content_type)
        membership = self.sidecar.membership
        if name not in membership.problems and len(membership.problems) >= MAX_PROBLEMS:
            raise Conflict(f"{MAX_PROBLEMS} problems are reported already: clear one first",
                           field="name")
        created = await membership.set_problem(name, detail)
        return web.json_response({"problem": name, "detail": detail,
                                  "problems": sorted(self.sidecar.membership.problems)},
                                 status=201 if created else 200)

    async def delete_problem(self, request: web.Request) -> web.Response:
        name = _problem_name(request)
        if not await self.sidecar.membership.clear_problem(name):
            return error_response(404, f"no problem {name!r} is set")
        return web.Response(status=204)

    # -- load -----------------------------------------------------------------------------

    async def overload(self, request: web.Request) -> web.Response:
        return web.json_response({"overload": self.sidecar.membership.overload})

    async def put_overload(self, request: web.Request) -> web.Response:
        detail = ""
        if request.can_read_body:
            raw = await mweb.read_body(request, 4 * MAX_PROBLEM_DETAIL + 64,
                                       what="overload report")
            detail = _problem_detail(raw, request.content_type, what="overload report")
        created = await self.sidecar.membership.set_overload(detail)
        return web.json_response({"overload": self.sidecar.membership.overload},
                                 status=201 if created else 200)

    async def delete_overload(self, request: web.Request) -> web.Response:
        if not await self.sidecar.membership.clear_overload():
            return error_response(404, "no overload is reported")
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

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(openapi_document())


def _problem_name(request: web.Request) -> str:
    name = request.match_info["name"]
    if not valid_session_id(name) or len(name) > PROBLEM_NAME_MAX:
        raise BadRequest(f"invalid problem name {name[:80]!r}: use 1-{PROBLEM_NAME_MAX} "
                         "characters of A-Z a-z 0-9 . _ ~ -", field="name")
    return name


def _problem_detail(raw: bytes, content_type: str, what: str = "problem report") -> str:
    """``{"detail": "..."}`` (JSON), or the body as plain text: at most
    :data:`MAX_PROBLEM_DETAIL` characters of printable text."""
    if not raw.strip():
        return ""
    if is_json(content_type) or raw.lstrip()[:1] == b"{":
        body = mweb.loads(raw, what=what)
        if not isinstance(body, dict):
            raise BadRequest(f'the {what} is {{"detail": "<text>"}}', field="body")
        detail = body.get("detail", "")
        if not isinstance(detail, str):
            raise BadRequest("detail must be a string", field="detail")
    else:
        try:
            detail = raw.decode()
        except UnicodeDecodeError:
            raise BadRequest("a plain-text detail must be UTF-8",
                             field="detail") from None
    detail = detail.strip()
    if len(detail) > MAX_PROBLEM_DETAIL:
        raise BadRequest(f"detail is {len(detail)} characters; the limit is "
                         f"{MAX_PROBLEM_DETAIL}", field="detail")
    if not detail.isprintable():
        raise BadRequest("detail must be printable text (no control characters)",
                         field="detail")
    return detail


def _dumps(data: Any) -> str:
    return json.dumps(data, default=lambda o: round(o, 6) if isinstance(o, float) else str(o))


__all__ = ["SessionRoutes", "error_response", "json_errors"]
