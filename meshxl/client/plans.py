"""The client's logic without I/O: each operation is a *plan*.

A plan is a generator that yields what to do next, a :class:`Request` to send or a
:class:`Pause` to wait, and is sent back what happened (an :class:`Answer`, or
:class:`Unanswered`). Its return value is the operation's result; its exceptions are
the operation's errors (:mod:`meshxl.client.errors`). The async and the sync client are
two small drivers of the same plans (``run``), so the retry rules, the ETag handling
and the error mapping exist once, and are tested without a network.

Retry rules:

* a 503 or no answer: the same request again, per ``settings.unavailable``;
* a write answered 503, or sent and not answered, may have applied. Sent again, an
  unconditional ``put`` or ``patch`` cannot tell (both are idempotent: the retry
  writes the same state), a ``delete`` that then finds nothing is done; but a
  conditional write (``If-Match``, ``If-None-Match: *``) refused by its condition
  (412) may be refused by its own earlier success: :class:`WriteUncertain`, never a
  412 that would make ``update`` apply its function twice;
* ``update`` after a 409 or 412: read again, apply the function to the newer state,
  write again, per ``settings.conflicts`` (:class:`Contended` when they run out).

**Adding an operation** (the extension point). An operation is a plan here plus one
line in each client: ``return await self.run(plans.something(...))`` and
``return self.run(plans.something(...))``. A plan may send any number of requests
(``update`` sends several), so operations over several sessions (bulk reads and
writes, transactions) need nothing new from the clients once the sidecar's API has
endpoints for them; they are not invented here before it does. ``run`` is public,
so an application can drive plans of its own the same way.
"""

from __future__ import annotations

import base64
import copy
import json
import random
import re
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson

from meshxl import headers as hdr

from .errors import (
    BadRequest,
    Contended,
    SidecarError,
    SidecarUnavailable,
    Undecodable,
    Unreachable,
    WriteUncertain,
    error_from_answer,
)
from .settings import ClientSettings
from .states import JSON, MERGE_PATCH, OCTETS, JsonText, decode_state, encode_state, is_json

__all__ = ["JSON", "MERGE_PATCH", "OCTETS", "SESSION_ID", "Answer", "JsonText", "Pause", "Plan",
           "Readiness", "Request", "Session", "Unanswered", "Written", "check_session_id",
           "decode_state", "delete", "encode_state", "exchange", "get", "is_json", "patch",
           "put", "ready", "update"]

T = TypeVar("T")

SESSION_ID = re.compile(r"^[A-Za-z0-9._~:{}-]{1,200}$")
"""A session id, as the API's OpenAPI document says (``SessionId``); not ``.`` or
``..``. Checked before sending: such an id is one path segment, never a path."""


# -- what a plan asks for and gets ----------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One HTTP request to the sidecar; ``path`` is relative to the sidecar's URL."""

    method: str
    path: str
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes | None = None
    session: str | None = None
    """The session it concerns (named in errors)."""

    @property
    def writes(self) -> bool:
        return self.method not in ("GET", "HEAD")


@dataclass(frozen=True)
class Answer:
    """The sidecar's answer; header names in lower case."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    @property
    def content_type(self) -> str:
        return self.header("Content-Type") or OCTETS


@dataclass(frozen=True)
class Unanswered:
    """No answer. ``sent``: the request may have reached the sidecar (it was not
    refused at connect), so a write may have applied."""

    reason: str
    sent: bool = True


@dataclass(frozen=True)
class Pause:
    seconds: float


Step = Request | Pause
Outcome = Answer | Unanswered | None
Plan = Generator[Step, Outcome, T]
"""A plan returning ``T``: yields steps, is sent their outcomes (None after a pause)."""


# -- results --------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Session:
    """A session's state: decoded JSON for a JSON content type, else the bytes."""

    id: str
    state: Any
    etag: str
    """As the sidecar sent it (``"42"``): give it back as ``if_match``."""
    owner: str | None
    """The member that wrote the session last."""
    content_type: str
    source: str | None
    """Where the sidecar read it: ``etcd``, ``cache``, ``local``, ``cache-unverified``;
    ``write`` for the state ``update`` wrote."""


@dataclass(frozen=True, kw_only=True)
class Written:
    """A write's acknowledgement: committed in etcd (unless ``replicated`` is false:
    delayed sync keeps young sessions on their member)."""

    session: str
    etag: str
    owner: str
    created: bool
    takeover: bool
    """This write took the session over from another member."""
    replicated: bool


@dataclass(frozen=True, kw_only=True)
class Readiness:
    ready: bool
    reasons: list[str]
    warnings: list[str]
    moving: bool = False
    """A planned move away from the member is under way (member down, site offline, a
    degraded judgement...): hand long-lived connections on (:mod:`meshxl.streams`)."""


# -- pure helpers ---------------------------------------------------------------------------


def check_session_id(session_id: str) -> str:
    if (not isinstance(session_id, str) or not SESSION_ID.match(session_id)
            or session_id in (".", "..")):
        raise BadRequest(f"invalid session id {str(session_id)[:80]!r}: use 1-200 "
                         "characters of A-Z a-z 0-9 . _ ~ - : { } (not . or ..)",
                         field="session_id")
    return session_id


def session_path(session_id: str) -> str:
    """The session's URL path: a hash tag's braces percent-encoded."""
    path = check_session_id(session_id)
    if "{" in path or "}" in path:
        path = path.replace("{", "%7B").replace("}", "%7D")
    return f"/v1/sessions/{path}"


def _json_body(answer: Answer, request: Request, *, states: bool = True) -> dict[str, Any]:
    """The sidecar's JSON answer. ``states``: it may carry session states, which the
    standard library reads exactly (orjson would read integers beyond 64 bits as
    floats); without, it holds only the sidecar's own fields (write acknowledgements,
    errors), which orjson reads at a third of the cost."""
    try:
        body = json.loads(answer.body) if states else orjson.loads(answer.body)
    except (ValueError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict):
        raise SidecarUnavailable(f"the sidecar answered {request.method} {request.path} "
                                 f"with {answer.status} and no JSON object: "
                                 f"{answer.body[:120]!r}")
    return body


def session_from(session_id: str, answer: Answer) -> Session:
    content_type = answer.content_type
    return Session(id=session_id, state=decode_state(answer.body, content_type, session_id),
                   etag=answer.header(hdr.ETAG) or "", owner=answer.header(hdr.OWNER),
                   content_type=content_type, source=answer.header(hdr.SOURCE))


def written_from(answer: Answer, request: Request) -> Written:
    body = _json_body(answer, request, states=False)
    try:
        etag = answer.header(hdr.ETAG) or f'"{body["etag"]}"'
        return Written(session=str(body["session"]), etag=etag, owner=str(body["owner"]),
                       created=bool(body["created"]), takeover=bool(body["takeover"]),
                       replicated=bool(body["replicated"]))
    except KeyError as exc:
        raise SidecarUnavailable(f"the sidecar's answer to {request.method} "
                                 f"{request.path} lacks {exc}") from None


def _error(request: Request, answer: Answer) -> SidecarError:
    return error_from_answer(answer.status, answer.body, method=request.method,
                             path=request.path, session=request.session)


def _uncertain(request: Request, answer: Answer) -> WriteUncertain:
    cause = _error(request, answer)
    return WriteUncertain(
        f"{request.method} {request.path} was sent again after an attempt that was not "
        f"acknowledged, and the retry's condition failed ({cause.message}): the earlier "
        "attempt may have applied; read the session to know", status=answer.status,
        session=request.session)


# -- plans ----------------------------------------------------------------------------------


def exchange(request: Request, settings: ClientSettings,
             rng: random.Random) -> Plan[tuple[Answer, bool]]:
    """Send ``request``, again after a 503 or no answer (``settings.unavailable``).
    Returns the last answer (a 503 too, once the tries run out) and whether an earlier
    attempt may have applied (a write answered 503, or sent without an answer)."""
    pauses = settings.unavailable.delays(rng)
    uncertain = False
    while True:
        outcome = yield request
        if isinstance(outcome, Answer) and outcome.status != 503:
            return outcome, uncertain
        if not isinstance(outcome, Answer | Unanswered):
            raise TypeError(f"a plan was sent {outcome!r} for a request")
        last_try_uncertain = request.writes and (isinstance(outcome, Answer) or outcome.sent)
        pause = next(pauses, None)
        if pause is None:
            if isinstance(outcome, Answer):
                return outcome, uncertain
            tries = settings.unavailable.attempts
            maybe = (" (the write may or may not have applied)"
                     if uncertain or last_try_uncertain else "")
            raise Unreachable(f"sidecar unreachable: {request.method} {request.path}: "
                              f"{outcome.reason} ({tries} {_tries(tries)}){maybe}",
                              session=request.session)
        uncertain = uncertain or last_try_uncertain
        yield Pause(pause)


def _tries(n: int) -> str:
    return "try" if n == 1 else "tries"


def get(session_id: str, settings: ClientSettings, rng: random.Random) -> Plan[Session]:
    request = Request("GET", session_path(session_id), session=session_id)
    answer, _ = yield from exchange(request, settings, rng)
    if answer.status != 200:
        raise _error(request, answer)
    return session_from(session_id, answer)


_SYNC_NOW: dict[bool, dict[str, str]] = {True: {hdr.SYNC: "now"}, False: {}}
"""The header of a write committed before it is answered, whatever ``sync_delay``."""


def _conditions(if_match: str | None, create_only: bool) -> dict[str, str]:
    if if_match is not None and create_only:
        raise BadRequest("give if_match or create_only, not both")
    if if_match is not None:
        if not if_match.strip() or not if_match.isprintable():
            raise BadRequest(f"if_match must be an ETag such as '\"42\"', got {if_match!r}",
                             field="If-Match")
        return {hdr.IF_MATCH: if_match}
    return {hdr.IF_NONE_MATCH: "*"} if create_only else {}


def put(session_id: str, state: Any, settings: ClientSettings, rng: random.Random, *,
        content_type: str | None = None, if_match: str | None = None,
        create_only: bool = False, sync_now: bool = False) -> Plan[Written]:
    path = session_path(session_id)
    body, ctype = encode_state(state, content_type)
    request = Request("PUT", path, {"Content-Type": ctype, **_conditions(if_match, create_only),
                                    **_SYNC_NOW[sync_now]}, body, session_id)
    answer, uncertain = yield from exchange(request, settings, rng)
    if answer.status in (200, 201):
        return written_from(answer, request)
    if uncertain and answer.status == 412:
        raise _uncertain(request, answer)
    raise _error(request, answer)


def patch(session_id: str, merge_patch: Any, settings: ClientSettings, rng: random.Random, *,
          if_match: str | None = None) -> Plan[Written]:
    path = session_path(session_id)
    body, _ = encode_state(merge_patch, JSON)
    request = Request("PATCH", path, {"Content-Type": MERGE_PATCH,
                                      **_conditions(if_match, False)}, body, session_id)
    answer, uncertain = yield from exchange(request, settings, rng)
    if answer.status == 200:
        return written_from(answer, request)
    if uncertain and answer.status == 412:
        raise _uncertain(request, answer)
    raise _error(request, answer)


def delete(session_id: str, settings: ClientSettings, rng: random.Random, *,
           if_match: str | None = None) -> Plan[None]:
    request = Request("DELETE", session_path(session_id), _conditions(if_match, False),
                      None, session_id)
    answer, uncertain = yield from exchange(request, settings, rng)
    if answer.status == 204:
        return None
    if uncertain:
        error = _error(request, answer)
        # Gone either way: by the earlier attempt, or by another deleter.
        if answer.status == 404 or (answer.status == 412
                                    and error.details.get("current", 0) is None):
            return None
        if answer.status == 412:
            raise _uncertain(request, answer)
    raise _error(request, answer)


def update(session_id: str, fn: Callable[[Any], Any], settings: ClientSettings,
           rng: random.Random, *, default: Any = None) -> Plan[Session]:
    """Read the session, write ``fn(state)`` if it is still at what was read, and
    start again after a 409 or 412. A missing session is ``default`` (a copy), created
    only if still absent (``If-None-Match: *``). ``fn`` may run several times: it
    should only compute the new state. Bytes states keep their content type."""
    pauses = settings.conflicts.delays(rng)
    read = Request("GET", session_path(session_id), session=session_id)
    tries = 0
    while True:
        tries += 1
        answer, _ = yield from exchange(read, settings, rng)
        if answer.status == 200:
            current = session_from(session_id, answer)
            state, etag, ctype = current.state, current.etag, current.content_type
        elif answer.status == 404:
            state, etag, ctype = copy.deepcopy(default), None, None
        else:
            raise _error(read, answer)
        new = fn(state)
        body, new_type = encode_state(new, ctype if isinstance(new, bytes) else None)
        conditions = {hdr.IF_MATCH: etag} if etag else {hdr.IF_NONE_MATCH: "*"}
        write = Request("PUT", read.path, {"Content-Type": new_type, **conditions}, body,
                        session_id)
        answer, uncertain = yield from exchange(write, settings, rng)
        if answer.status in (200, 201):
            written = written_from(answer, write)
            return Session(id=session_id, state=new, etag=written.etag, owner=written.owner,
                           content_type=new_type, source="write")
        if answer.status not in (409, 412):
            raise _error(write, answer)
        if uncertain:
            raise _uncertain(write, answer)
        conflict = _error(write, answer)
        if isinstance(conflict, Undecodable):
            try:
                raise conflict
            finally:  # the frame keeps no reference to it: no reference cycle
                del conflict  # (the caller may keep the error)
        pause = next(pauses, None)
        if pause is None:
            raise Contended(f"session {session_id!r} kept changing: {tries} "
                            f"{_tries(tries)} to update it lost to other writers (last: "
                            f"{conflict.message})", status=answer.status,
                            session=session_id) from conflict
        if pause > 0:
            yield Pause(pause)


def ready(settings: ClientSettings, rng: random.Random) -> Plan[Readiness]:
    """``GET /readyz``: ready (200) or not (503, with the reasons); one try."""
    request = Request("GET", "/readyz")
    outcome = yield request
    if isinstance(outcome, Unanswered):
        raise Unreachable(f"sidecar unreachable: GET /readyz: {outcome.reason}")
    if not isinstance(outcome, Answer):
        raise TypeError(f"a plan was sent {outcome!r} for a request")
    if outcome.status not in (200, 503):
        raise _error(request, outcome)
    body = _json_body(outcome, request)
    return Readiness(ready=outcome.status == 200 and body.get("ready") is True,
                     reasons=[str(r) for r in body.get("reasons") or []],
                     warnings=[str(w) for w in body.get("warnings") or []],
                     moving=body.get("moving") is True)


# -- several sessions at once (POST /v1/sessions:bulkGet, :bulkSave, :transaction) -------


MAX_BULK = 128
"""Sessions per bulk get or bulk save (the API's bound, etcd's --max-txn-ops)."""
MAX_OPERATIONS = MAX_BULK - 1
"""Operations per transaction (nested in the sidecar's batch, which etcd counts against
the 128 operations it takes per level)."""


@dataclass(frozen=True, kw_only=True)
class Upsert:
    """One write of a bulk save or a transaction: ``state`` as :func:`put` takes it."""

    session: str
    state: Any
    content_type: str | None = None
    if_match: str | None = None
    create_only: bool = False
    sync_now: bool = False
    """Committed in etcd before it is answered, whatever the cluster's ``sync_delay``
    (a bulk save's ``"sync": "now"``)."""


@dataclass(frozen=True, kw_only=True)
class Delete:
    """One delete of a transaction."""

    session: str
    if_match: str | None = None


def _quoted(etag: Any) -> str:
    text = str(etag)
    return text if text.startswith(('"', "W/")) else f'"{text}"'


def _item_body(item: Upsert | Delete, **extra: str) -> bytes:
    """One item of a bulk save or transaction, as JSON text. A JSON state goes in as
    the text :func:`encode_state` made of it (encoded once, never parsed back)."""
    body: dict[str, Any] = {"session": check_session_id(item.session), **extra}
    data = b""
    if isinstance(item, Upsert):
        state, ctype = encode_state(item.state, item.content_type)
        if is_json(ctype) and (isinstance(item.state, JsonText) or not isinstance(
                item.state, bytes | bytearray | memoryview)):
            body["encoding"] = "json"
            data = b',"data":' + state
        else:
            body.update(data=base64.b64encode(state).decode("ascii"), encoding="base64")
        body["content_type"] = ctype
        conditions = _conditions(item.if_match, item.create_only)
        if hdr.IF_MATCH in conditions:
            body["if_match"] = conditions[hdr.IF_MATCH]
        elif conditions:
            body["if_none_match"] = "*"
        if item.sync_now:
            body["sync"] = "now"
    elif item.if_match is not None:
        body["if_match"] = _conditions(item.if_match, False)[hdr.IF_MATCH]
    return json.dumps(body, separators=(",", ":")).encode()[:-1] + data + b"}"


def _bulk_request(path: str, body: dict[str, Any] | tuple[str, list[bytes]],
                  count: int, limit: int = MAX_BULK,
                  what: str = "a bulk request names") -> Request:
    """A bulk request: ``body`` as an object, or as ``(array name, its items' JSON)``,
    of at most ``limit`` sessions (``what`` names the bound in the error)."""
    if not 1 <= count <= limit:
        raise BadRequest(f"{what} 1 to {limit} sessions, not {count}")
    if isinstance(body, tuple):
        name, parts = body
        data = b'{"' + name.encode() + b'":[' + b",".join(parts) + b"]}"
    else:
        data = json.dumps(body, separators=(",", ":")).encode()
    return Request("POST", path, {"Content-Type": JSON}, data)


def _item_error(item: dict[str, Any], request: Request, uncertain: bool) -> SidecarError:
    status = int(item.get("status") or 500)
    session = str(item.get("session")) if item.get("session") is not None else None
    item_request = Request(request.method, request.path, session=session)
    answer = Answer(status, {}, json.dumps(item).encode())
    if uncertain and status == 412:
        return _uncertain(item_request, answer)
    return _error(item_request, answer)


def _item_written(item: dict[str, Any], etag: Any) -> Written:
    return Written(session=str(item["session"]), etag=_quoted(etag),
                   owner=str(item.get("owner", "")), created=bool(item.get("created")),
                   takeover=bool(item.get("takeover")),
                   replicated=bool(item.get("replicated", True)))


def _items(answer: Answer, request: Request, count: int, *,
           states: bool = True) -> list[dict[str, Any]]:
    items = _json_body(answer, request, states=states).get("items")
    if not isinstance(items, list) or len(items) != count or not all(
            isinstance(i, dict) for i in items):
        raise SidecarUnavailable(f"the sidecar's answer to {request.path} does not carry "
                                 f"{count} items")
    return items


def bulk_get(session_ids: list[str], settings: ClientSettings,
             rng: random.Random) -> Plan[list[Session | SidecarError]]:
    """Each session as :func:`get` gives it, or the error it gives (``NotFound``...),
    in the order asked."""
    ids = [check_session_id(s) for s in session_ids]
    request = _bulk_request("/v1/sessions:bulkGet", {"sessions": ids}, len(ids))
    answer, _ = yield from exchange(request, settings, rng)
    if answer.status != 200:
        raise _error(request, answer)
    out: list[Session | SidecarError] = []
    for item in _items(answer, request, len(ids)):
        if item.get("status") != 200:
            out.append(_item_error(item, request, False))
            continue
        ctype = str(item.get("content_type") or OCTETS)
        if item.get("encoding") == "base64":
            raw = base64.b64decode(str(item.get("data", "")))
            state = decode_state(raw, ctype, str(item["session"]))
        else:
            state = item.get("data")
        out.append(Session(id=str(item["session"]), state=state, etag=_quoted(item["etag"]),
                           owner=item.get("owner"), content_type=ctype,
                           source=item.get("source")))
    return out


def bulk_save(items: list[Upsert], settings: ClientSettings,
              rng: random.Random) -> Plan[list[Written | SidecarError]]:
    """Each item written as :func:`put` writes it, each on its own (not atomic): its
    acknowledgement or its error, in order."""
    request = _bulk_request("/v1/sessions:bulkSave",
                            ("items", [_item_body(i) for i in items]), len(items))
    answer, uncertain = yield from exchange(request, settings, rng)
    if answer.status != 200:
        raise _error(request, answer)
    return [_item_written(item, item.get("etag")) if item.get("status") in (200, 201)
            else _item_error(item, request, uncertain)
            for item in _items(answer, request, len(items), states=False)]


def transaction(operations: list[Upsert | Delete], settings: ClientSettings,
                rng: random.Random) -> Plan[list[Written | None]]:
    """All or nothing: every upsert's acknowledgement (None for a delete), or the
    error of the operation that failed (nothing was written; its ``details`` carry
    ``item`` and every operation's answer in ``items``)."""
    ops = [_item_body(op, operation="upsert" if isinstance(op, Upsert) else "delete")
           for op in operations]
    request = _bulk_request("/v1/sessions:transaction", ("operations", ops), len(ops),
                            MAX_OPERATIONS, "a transaction holds")
    answer, uncertain = yield from exchange(request, settings, rng)
    if answer.status != 200:
        if uncertain and answer.status == 412:
            raise _uncertain(request, answer)
        raise _error(request, answer)
    body = _json_body(answer, request)
    return [None if item.get("operation") == "delete"
            else _item_written(item, item.get("etag", body.get("revision")))
            for item in _items(answer, request, len(ops))]

