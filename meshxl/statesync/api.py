"""The sidecar's HTTP API, served by :mod:`.http`. Every error is JSON: ``{"error":
..., "status": ...}`` (:mod:`meshxl.httpbase`'s shape). Every value that is stored (the
state, its content type, the trace context, a problem's name and detail) is validated
and bounded here, at entry, so whatever is acknowledged reads back. The API is
described by ``openapi.json``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from meshxl import headers as hdr
from meshxl import httpbase
from meshxl.errors import Conflict, InputError, MeshxlError, PreconditionFailed
from meshxl.model.basics import parse_duration

from . import bulk
from .http import ALONE, JSON, READ, WRITE, Request, RequestRefused, Response, Router, error
from .membership import MAX_PROBLEMS, Membership
from .metrics import CONTENT_TYPE, StatesyncMetrics
from .problems import check_ttl
from .quota import HeadRefusal, QuotaGuard
from .record import (
    SESSION_ID_RULE,
    is_json,
    served_content_type,
    valid_content_type,
    valid_name,
    valid_session_id,
    valid_traceparent,
)
from .writes import DELETE, PATCH, Outcome, SessionEngine, Stored, Transacted, Write

MERGE_PATCH = "application/merge-patch+json"
MAX_PROBLEM_DETAIL = 1024
"""Characters of a problem's detail."""
MAX_REPORT = 4 * MAX_PROBLEM_DETAIL + 64
"""Bytes of a problem or overload report's body."""
PROBLEM_NAME_MAX = 63

# Request header names as the server keys them (lower case).
_CONTENT_TYPE = "content-type"
_IF_MATCH = hdr.IF_MATCH.lower()
_IF_NONE_MATCH = hdr.IF_NONE_MATCH.lower()
_SYNC = hdr.SYNC.lower()
_TRACEPARENT = hdr.TRACEPARENT.lower()


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 description of this API (shipped as package data; read on
    request, so importlib.resources and what it loads stay out of the idle sidecar)."""
    from importlib import resources

    text = resources.files("meshxl.statesync").joinpath("openapi.json").read_text("utf-8")
    document: dict[str, Any] = json.loads(text)
    return document


def _session_id(request: Request) -> str:
    session_id = request.params["session_id"]
    if not valid_session_id(session_id):
        raise InputError(f"invalid session id {session_id!r}: use {SESSION_ID_RULE}")
    return session_id


def _content_type(request: Request, default: str) -> str:
    """The Content-Type header, which is stored and sent back as a header: a media type
    (RFC 9110: ``type/subtype``, then ``; name=value`` parameters) of printable ASCII,
    else InputError; an empty one counts as none (``default``)."""
    value = request.headers.get(_CONTENT_TYPE) or default  # empty: as if not sent
    if value and not valid_content_type(value):
        raise InputError("Content-Type must be a media type of at most 255 printable ASCII "
                         f"characters, such as application/json; got {value[:80]!r}",
                         field="Content-Type")
    # Kept with every session written: one string per media type, not one per write (as
    # the records read from etcd share theirs).
    return sys.intern(value)


def _traceparent(request: Request) -> str | None:
    """The request's W3C trace context, kept with the write so a takeover can link to
    it; an invalid one is ignored (trace context is optional metadata)."""
    return valid_traceparent(request.headers.get(_TRACEPARENT))


def _put_write(request: Request) -> Write:
    """A PUT's write, checked: the session id, the Content-Type (the state JSON if the
    type says so), If-None-Match, and the trace context kept with it."""
    session_id = _session_id(request)
    data = request.body
    content_type = _content_type(request, "application/octet-stream")
    if is_json(content_type):
        try:
            httpbase.check_json(data)
        except httpbase.BadJson as exc:
            raise InputError(f"{exc}; send another Content-Type to store it as bytes",
                             field="body") from None
    headers = request.headers
    if_none_match = headers.get(_IF_NONE_MATCH)
    if if_none_match is not None and if_none_match.strip() != "*":
        raise InputError('If-None-Match takes only "*" (create, never replace)')
    return Write(session_id=session_id, data=data, content_type=content_type,
                 if_match=headers.get(_IF_MATCH), create_only=if_none_match is not None,
                 traceparent=_traceparent(request), sync_now=_sync_now(headers))


def _sync_now(headers: Mapping[str, str]) -> bool:
    """``X-Meshxl-Sync: now`` (a write committed before it is answered); anything else
    is a 400."""
    value = headers.get(_SYNC)
    if value is None:
        return False
    if value.strip().lower() != "now":
        raise InputError(f"{hdr.SYNC} takes only \"now\", not {value.strip()[:40]!r}",
                         field=hdr.SYNC)
    return True


def _stored_headers(stored: Stored, content_type: str) -> list[tuple[str, str]]:
    return [(hdr.ETAG, f'"{stored.etag}"'), (hdr.OWNER, stored.record.owner),
            (hdr.SOURCE, stored.source), ("Content-Type", content_type)]


def _write_response(stored: Stored) -> Response:
    return Response(201 if stored.new_session else 200, bulk.write_answer(stored),
                    _stored_headers(stored, JSON))


def _written(outcome: Outcome) -> Response | Exception:
    """A write's answer: its response, or the error the server answers."""
    return _write_response(outcome) if isinstance(outcome, Stored) else outcome


def _json_bytes(body: bytes, status: int = 200) -> Response:
    return Response(status, body, [("Content-Type", JSON)])


def _json(data: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(data, default=str).encode(),
                    [("Content-Type", JSON)])


def _transaction_response(items: list[bulk.Item], outcome: Transacted) -> Response:
    """Committed: 200, every item's answer. Not: the first failed operation's status,
    naming it, with every item's answer (424 for those that failed only because
    another one did)."""
    if outcome.committed:
        answers: list[dict[str, Any]] = []
        for item, stored in zip(items, outcome.stored, strict=True):
            if stored is None:
                answers.append({"session": item.session_id, "operation": DELETE,
                                "status": 204})
            else:
                answers.append({**bulk.write_fields(stored), "operation": bulk.UPSERT})
        return _json_bytes(bulk.dumps({"committed": True, "revision": outcome.revision,
                                       "items": answers}))
    first = min(outcome.errors)
    failure = outcome.errors[first]
    item = items[first]
    field = "session"
    if isinstance(failure, PreconditionFailed):
        field = "if_none_match" if item.create_only else "if_match"
    status = httpbase.http_status(failure)
    answers = []
    for i, each in enumerate(items):
        error = outcome.errors.get(i)
        if error is not None:
            answers.append({**bulk.error_fields(each.session_id, error),
                            "operation": bulk.operation(each)})
        else:
            answers.append({"session": each.session_id, "operation": bulk.operation(each),
                            "status": 424, "error": f"not applied: operations[{first}] "
                            "failed and a transaction applies all or nothing"})
    body = {"error": f"operations[{first}] (session {item.session_id!r}): {failure}",
            "status": status, "field": f"operations[{first}].{field}", "item": first,
            "committed": False, "items": answers}
    return _json_bytes(bulk.dumps(body), status)


class SidecarParts(Protocol):
    """What the API uses of the sidecar (:class:`.sidecar.Sidecar`, a layer above this
    one): its session engine, its registration, its metrics and what it reports."""

    @property
    def sessions(self) -> SessionEngine: ...

    @property
    def membership(self) -> Membership: ...

    @property
    def metrics(self) -> StatesyncMetrics: ...

    @property
    def quota(self) -> QuotaGuard: ...

    def liveness_problems(self) -> list[str]: ...

    def not_ready_reasons(self) -> list[str]: ...

    def warnings(self) -> list[str]: ...

    def moving(self) -> bool: ...

    def refresh_gauges(self) -> None: ...

    def status(self) -> dict[str, Any]: ...


class SessionRoutes:
    """Handlers bound to the sidecar (its sessions, membership, metrics, status)."""

    def __init__(self, sidecar: SidecarParts):
        self.sidecar = sidecar
        self.refuse_write = HeadRefusal(self)
        """A write past the rate quota refused from its head (quota.py: a leaf, so a
        PUT's walk enters this module once)."""

    def router(self, max_bytes: int, *, delayed_sync: bool = False) -> Router:
        """Every route, with the body each takes (``max_bytes``: a session state's).
        ``delayed_sync``: a bulk save then writes each session on its own, as a PUT
        would, in tasks of their own, so it runs alone on its connection."""
        r = Router()
        # A session's writes take their places in its lock's line before they first
        # wait (sessions.py), so a connection's pipelined writes run side by side: each
        # session's in the order sent, different sessions' as if sent on connections of
        # their own. A read waits for the writes sent before it on its session.
        one = "session_id"
        # PUTs pipelined together on a connection are taken up together (put_group):
        # not with delayed sync, where each may stay local and put() decides one by one.
        # A write past the rate quota is refused from its head (refuse_write).
        r.add("PUT", "/v1/sessions/{session_id}", self.put, max_body=max_bytes,
              what="session state", access=WRITE, key=one,
              group=None if delayed_sync else self.put_group, refuse=self.refuse_write)
        r.add("GET", "/v1/sessions/{session_id}", self.get, access=READ, key=one)
        r.add("PATCH", "/v1/sessions/{session_id}", self.patch, max_body=max_bytes,
              what="session state", access=WRITE, key=one, refuse=self.refuse_write)
        r.add("DELETE", "/v1/sessions/{session_id}", self.delete, access=WRITE, key=one)
        r.add("POST", "/v1/sessions:bulkGet", self.bulk_get, max_body=bulk.MAX_GET_BODY,
              what="bulk get request", access=READ)
        # Bulk saves and transactions take their places in every session's line at
        # once, before they first wait: writes too (not with delayed sync, where a
        # bulk save writes each session in a task of its own).
        r.add("POST", "/v1/sessions:bulkSave", self.bulk_save, max_body=bulk.MAX_BODY,
              what="bulk save request", access=ALONE if delayed_sync else WRITE)
        r.add("POST", "/v1/sessions:transaction", self.transaction, max_body=bulk.MAX_BODY,
              what="transaction request", access=WRITE)
        r.add("GET", "/v1/problems", self.problems)
        r.add("PUT", "/v1/problems/{name}", self.put_problem, max_body=MAX_REPORT,
              what="problem report")
        r.add("DELETE", "/v1/problems/{name}", self.delete_problem)
        r.add("GET", "/v1/overload", self.overload)
        r.add("PUT", "/v1/overload", self.put_overload, max_body=MAX_REPORT,
              what="overload report")
        r.add("DELETE", "/v1/overload", self.delete_overload)
        r.add("GET", "/healthz", self.healthz)
        r.add("GET", "/readyz", self.readyz)
        r.add("GET", "/metrics", self.metrics)
        r.add("GET", "/v1/status", self.status)
        r.add("GET", "/openapi.json", self.openapi)
        return r

    # -- sessions -------------------------------------------------------------------------

    async def put(self, request: Request) -> Response:
        return await self._one(_put_write(request))

    async def put_group(self, requests: list[Request],
                        answer: Callable[[int, Response | Exception], None]) -> None:
        """PUTs pipelined on one connection, taken up together (the server's
        :attr:`~.http.Route.group`): each checked and answered as :meth:`put` would,
        their writes made in one :meth:`~.sessions.Sessions.write`, ``early``: a write
        waiting for its session holds back only the answers after it."""
        writes: list[Write] = []
        where: list[int] = []
        quota = self.sidecar.quota
        for i, request in enumerate(requests):
            try:
                write = _put_write(request)
                quota.admit((write,))
                writes.append(write)
            except Exception as exc:  # answered as put() raising it would be
                answer(i, exc)
                continue
            where.append(i)
        if not writes:
            return
        waiting: dict[asyncio.Task[Outcome], int] = {}
        for i, outcome in zip(where, await self.sidecar.sessions.write(writes, early=True),
                              strict=True):
            if isinstance(outcome, asyncio.Task):
                waiting[outcome] = i
            else:
                answer(i, _written(outcome))
        while waiting:
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                answer(waiting.pop(task), _written(task.result()))

    async def get(self, request: Request) -> Response:
        stored = await self.sidecar.sessions.get(_session_id(request))
        return Response(200, stored.record.data,
                        _stored_headers(stored, served_content_type(stored.record.content_type)))

    async def patch(self, request: Request) -> Response:
        session_id = _session_id(request)
        content_type = _content_type(request, "").split(";")[0].strip().lower()
        if content_type not in (MERGE_PATCH, "application/json"):
            raise RequestRefused(415, f"PATCH takes {MERGE_PATCH} (RFC 7386), not "
                               f"{content_type or 'nothing'}", path=request.path)
        try:
            patch = httpbase.loads(request.body, what="merge patch")
        except httpbase.BadJson as exc:
            raise InputError(str(exc), field="body") from None
        return await self._one(Write(session_id=session_id, op=PATCH, patch=patch,
                                     if_match=request.headers.get(_IF_MATCH),
                                     traceparent=_traceparent(request),
                                     sync_now=_sync_now(request.headers)))

    async def delete(self, request: Request) -> Response:
        await self._one(Write(session_id=_session_id(request), op=DELETE,
                              if_match=request.headers.get(_IF_MATCH)))
        return Response(204)

    async def _one(self, write: Write) -> Response:
        """One write's answer (its error raised, for the server to answer)."""
        self.sidecar.quota.admit((write,))
        [outcome] = await self.sidecar.sessions.write([write])
        if isinstance(outcome, Exception):
            raise outcome
        return _write_response(outcome)

    # -- several sessions (bulk.py) -------------------------------------------------------

    async def bulk_get(self, request: Request) -> Response:
        """Each session as GET answers it (concurrent reads share etcd transactions)."""
        sessions = self.sidecar.sessions
        ids = bulk.parse_get(request.body)
        self._count("get", len(ids))
        results = await asyncio.gather(*(sessions.get(s) for s in ids),
                                       return_exceptions=True)
        parts = []
        for session_id, result in zip(ids, results, strict=True):
            if isinstance(result, Stored):
                parts.append(bulk.read_item(result))
            elif isinstance(result, MeshxlError):
                parts.append(bulk.dumps(bulk.error_fields(session_id, result)))
            else:
                raise result
        return _json_bytes(bulk.items_body(parts))

    async def bulk_save(self, request: Request) -> Response:
        """Each item as PUT would write it, concurrently (the batcher packs them into
        shared etcd transactions); each succeeds or fails on its own."""
        sessions = self.sidecar.sessions
        items = bulk.parse_save(request.body, sessions.settings.max_bytes)
        self._count("save", len(items))
        self.sidecar.quota.admit(items)
        outcomes = await sessions.write(items, traceparent=_traceparent(request))
        parts = []
        for item, outcome in zip(items, outcomes, strict=True):
            if isinstance(outcome, Stored):
                parts.append(bulk.write_answer(outcome, status=True))
            elif isinstance(outcome, MeshxlError):
                parts.append(bulk.dumps(bulk.error_fields(item.session_id, outcome)))
            else:
                raise outcome
        return _json_bytes(bulk.items_body(parts))

    async def transaction(self, request: Request) -> Response:
        """Every operation or none, in one etcd transaction (:mod:`.transactions`)."""
        sessions = self.sidecar.sessions
        items = bulk.parse_transaction(request.body, sessions.settings.max_bytes)
        self._count("transaction", len(items))
        self.sidecar.quota.admit(items)
        transacted = await sessions.write(items, atomic=True,
                                          traceparent=_traceparent(request))
        return _transaction_response(items, transacted)

    def _count(self, kind: str, items: int) -> None:
        metrics = self.sidecar.metrics
        metrics.bulk_request(kind).inc()
        metrics.bulk_item(kind).inc(items)

    # -- critical devices ----------------------------------------------------------------

    async def problems(self, request: Request) -> Response:
        return _json({"problems": self.sidecar.membership.problems})

    async def put_problem(self, request: Request) -> Response:
        name = _problem_name(request)
        detail, ttl = _problem_report(request.body, request.content_type)
        membership = self.sidecar.membership
        if name not in membership.problems and len(membership.problems) >= MAX_PROBLEMS:
            raise Conflict(f"{MAX_PROBLEMS} problems are reported already: clear one first",
                           field="name")
        created = await membership.set_problem(name, detail, ttl)
        return _json({"problem": name, "detail": detail, "ttl": ttl,
                      "problems": sorted(self.sidecar.membership.problems)},
                     status=201 if created else 200)

    async def delete_problem(self, request: Request) -> Response:
        name = _problem_name(request)
        if not await self.sidecar.membership.clear_problem(name):
            return error(404, f"no problem {name!r} is set")
        return Response(204)

    # -- load -----------------------------------------------------------------------------

    async def overload(self, request: Request) -> Response:
        return _json({"overload": self.sidecar.membership.overload})

    async def put_overload(self, request: Request) -> Response:
        detail = _problem_detail(request.body, request.content_type, what="overload report")
        created = await self.sidecar.membership.set_overload(detail)
        return _json({"overload": self.sidecar.membership.overload},
                     status=201 if created else 200)

    async def delete_overload(self, request: Request) -> Response:
        if not await self.sidecar.membership.clear_overload():
            return error(404, "no overload is reported")
        return Response(204)

    # -- health, metrics, status ---------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        problems = self.sidecar.liveness_problems()
        if problems:
            return _json({"status": "failing", "problems": problems}, status=503)
        return _json({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        reasons = self.sidecar.not_ready_reasons()
        moving = {"moving": True} if self.sidecar.moving() else {}
        if reasons:
            return _json({"ready": False, "reasons": reasons, **moving}, status=503)
        warnings = self.sidecar.warnings()
        return _json({"ready": True, **({"warnings": warnings} if warnings else {}),
                      **moving})

    async def metrics(self, request: Request) -> Response:
        self.sidecar.refresh_gauges()
        body = self.sidecar.metrics.render()
        return Response(200, body, [("Content-Type", CONTENT_TYPE)])

    async def status(self, request: Request) -> Response:
        return _json(self.sidecar.status())

    async def openapi(self, request: Request) -> Response:
        return _json(openapi_document())


def _problem_name(request: Request) -> str:
    name = request.params["name"]
    if not valid_name(name) or len(name) > PROBLEM_NAME_MAX:
        raise InputError(f"invalid problem name {name[:80]!r}: use 1-{PROBLEM_NAME_MAX} "
                         "characters of A-Z a-z 0-9 . _ ~ -", field="name")
    return name


def _problem_report(raw: bytes, content_type: str) -> tuple[str, float | None]:
    """A problem report's detail and TTL: ``{"detail": "...", "ttl": "30s"}`` (the
    TTL a duration such as ``30s`` or a number of seconds, optional) or a plain-text
    detail (no TTL)."""
    detail = _problem_detail(raw, content_type)
    if not _json_body(raw, content_type):
        return detail, None
    ttl = httpbase.loads(raw, what="problem report").get("ttl")
    if ttl is None:
        return detail, None
    try:
        return detail, check_ttl(parse_duration(ttl))
    except ValueError as exc:
        raise InputError(f"ttl: {exc}", field="ttl") from None


def _json_body(raw: bytes, content_type: str) -> bool:
    return bool(raw.strip()) and (is_json(content_type) or raw.lstrip()[:1] == b"{")


def _problem_detail(raw: bytes, content_type: str, what: str = "problem report") -> str:
    """``{"detail": "..."}`` (JSON), or the body as plain text: at most
    :data:`MAX_PROBLEM_DETAIL` characters of printable text."""
    if not raw.strip():
        return ""
    if _json_body(raw, content_type):
        body = httpbase.loads(raw, what=what)
        if not isinstance(body, dict):
            raise InputError(f'the {what} is {{"detail": "<text>"}}', field="body")
        detail = body.get("detail", "")
        if not isinstance(detail, str):
            raise InputError("detail must be a string", field="detail")
    else:
        try:
            detail = raw.decode()
        except UnicodeDecodeError:
            raise InputError("a plain-text detail must be UTF-8",
                             field="detail") from None
    detail = detail.strip()
    if len(detail) > MAX_PROBLEM_DETAIL:
        raise InputError(f"detail is {len(detail)} characters; the limit is "
                         f"{MAX_PROBLEM_DETAIL}", field="detail")
    if not detail.isprintable():
        raise InputError("detail must be printable text (no control characters)",
                         field="detail")
    return detail


__all__ = ["SessionRoutes", "SidecarParts", "openapi_document"]
