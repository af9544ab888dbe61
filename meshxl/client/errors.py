"""What the client raises: the sidecar's JSON error answers, as meshxl's error family.

Every error answer of the sidecar is ``{"error": "<message>", "status": N, ...}``
(``docs/statesync.md``); :func:`error_from_answer` turns one into the exception of its
status, keeping the server's message (``exc.message``) and its other fields
(``exc.details``: ``field``, ``owner``, ``revision``, ``current``, ``undecodable``...).

Each concept is the family's (:mod:`meshxl.errors`); the client adds one context,
:class:`SidecarError` (the answer: ``status``, ``message``, ``method``, ``path``), so
each class here is a family member *as the sidecar answered it*, with a name of its own
(``SidecarConflict`` is a ``SidecarError`` and a :class:`meshxl.errors.Conflict`). This
module re-exports the family's members under their own names (``meshxl.client.Conflict``
*is* ``meshxl.errors.Conflict``), so ``except meshxl.client.Conflict`` catches what the
sidecar answered with 409, as ``except meshxl.errors.Conflict`` does.
Four are the client's own concepts: :class:`Unauthorized`, :class:`Contended`,
:class:`Unreachable` and :class:`WriteUncertain`.

==========================  ===========================  ==============================
exception                   family member                when
==========================  ===========================  ==============================
BadRequest                  InputError                   400, 408, 415, another 4xx; an
                                                         invalid session id or state
                                                         refused before sending
Unauthorized                Unavailable                  401/403: no or wrong token
SidecarNotFound             NotFound                     404
SidecarConflict             Conflict                     409: ownership lost (another
                                                         member wrote the session), a
                                                         merge patch of a non-JSON state
SidecarUndecodable          Undecodable (a Conflict)     409 with ``"undecodable": true``
Contended                   Conflict                     ``update`` gave up: the session
                                                         kept changing
SidecarPreconditionFailed   PreconditionFailed           412: ``If-Match`` /
                            (a Conflict)                 ``If-None-Match: *`` failed
SidecarTooLarge             TooLarge                     413
OverQuota                   Unavailable                  429: over the cluster's quota
                                                         (not retried)
SidecarUnavailable          Unavailable                  503 (etcd unavailable), another
                                                         5xx, an answer not as documented;
                                                         a 404 naming the cluster (one
                                                         the sidecar does not serve, or
                                                         not yet: a VS just added)
Unreachable                 Unavailable                  no answer (refused, reset, timed
                                                         out)
WriteUncertain              Unavailable                  a write retried after an attempt
                                                         that may have applied, whose
                                                         retry cannot tell
==========================  ===========================  ==============================

A 401 is an ``Unavailable``, not an ``InputError``: the sidecar refuses this process
(its token is missing or wrong), which is no fault of whoever asked the application,
so an application maps it like any other failure of its sidecar (a 503, retried by
Envoy elsewhere), as :mod:`meshxl.httpbase` does with the family.

``exc.details`` never holds ``error`` or ``status``, so an exception that reaches
:func:`meshxl.web.json_errors` becomes a JSON answer with the sidecar's fields.
"""

from __future__ import annotations

import json
import math
from typing import Any

from meshxl import errors
from meshxl.errors import (
    Conflict,
    NotFound,
    PreconditionFailed,
    TooLarge,
    Unavailable,
    Undecodable,
)

__all__ = ["BadRequest", "Conflict", "Contended", "NotFound", "OverQuota", "PreconditionFailed",
           "SidecarConflict", "SidecarError", "SidecarNotFound", "SidecarPreconditionFailed",
           "SidecarTooLarge", "SidecarUnavailable", "SidecarUndecodable", "TooLarge",
           "Unauthorized", "Unavailable", "Undecodable", "Unreachable", "WriteUncertain",
           "describe", "error_from_answer", "retry_after_header"]


class SidecarError(errors.MeshxlError):
    """A failed request to the statesync sidecar.

    ``status``: the sidecar's HTTP status (None when it did not answer, or when the
    client refused the request before sending it); ``message``: the sidecar's own
    message; ``method`` and ``path``: the request.
    """

    def __init__(self, message: str, *, status: int | None = None, method: str = "",
                 path: str = "", **details: Any):
        self.message = message
        self.status = status
        self.method = method
        self.path = path
        super().__init__(_describe(message, status, method, path), **details)


def _describe(message: str, status: int | None, method: str, path: str) -> str:
    if status is None or not method:
        return message
    return f"sidecar {method} {path} answered {status}: {message}"


# The family's members, as the sidecar answered them.


class BadRequest(SidecarError, errors.InputError):
    """An :class:`~meshxl.errors.InputError`: refused as given (or it would be, so it
    was not sent)."""


class SidecarNotFound(SidecarError, NotFound):
    """A :class:`~meshxl.errors.NotFound`: no such session."""


class SidecarConflict(SidecarError, Conflict):
    """A :class:`~meshxl.errors.Conflict`: another member wrote the session since this
    one last saw it (this member was fenced), or its state is not JSON (merge patch)."""


class SidecarUndecodable(SidecarConflict, Undecodable):
    """An :class:`~meshxl.errors.Undecodable`: a ``put`` without ``if_match`` replaces
    the record, ``delete`` removes it."""


class SidecarPreconditionFailed(SidecarConflict, PreconditionFailed):
    """A :class:`~meshxl.errors.PreconditionFailed`: ``If-Match`` named another ETag,
    or ``If-None-Match: *`` found the session."""


class SidecarTooLarge(SidecarError, TooLarge):
    """A :class:`~meshxl.errors.TooLarge`: the state is beyond the sidecar's limit
    (``--max-session-bytes``)."""


class SidecarUnavailable(SidecarError, Unavailable):
    """An :class:`~meshxl.errors.Unavailable`: etcd does not answer the sidecar (503; a
    write was not acknowledged, and may or may not have applied)."""


# The client's own.


class Unauthorized(SidecarError, Unavailable):
    """The sidecar requires a token (``--token-file``) and this one is missing or wrong."""


class Contended(SidecarConflict):
    """``update`` read and wrote as many times as allowed and lost every time."""


class Unreachable(SidecarUnavailable):
    """No answer from the sidecar: connection refused or reset, or timed out."""


class OverQuota(SidecarUnavailable):
    """429: the write would take the cluster beyond its ``sessions.quota`` (sessions,
    bytes or writes per second); nothing of it was written. ``details`` has ``quota``,
    ``limit``, ``current`` and ``retry_after`` (seconds). Not retried by the client: the
    caller decides whether to wait ``retry_after`` or give up. Answer it as a 429 of
    its own (:attr:`retry_after_header`), never as a 5xx: a proxy retries a 5xx on
    another member, whose sidecar's bucket admits the write, so the session leaves
    its member and the quota is passed."""

    @property
    def retry_after_header(self) -> str:
        """``Retry-After`` for an answer passing this refusal on
        (:func:`retry_after_header`)."""
        return retry_after_header(self.details.get("retry_after"))


def retry_after_header(seconds: Any) -> str:
    """A ``Retry-After`` value from a refusal's ``retry_after`` (seconds): whole
    seconds, rounded up, at least 1 (and 1 when it is missing or not a number)."""
    if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and seconds > 0:
        return str(max(1, math.ceil(min(seconds, 86_400))))
    return "1"


class WriteUncertain(SidecarUnavailable):
    """A write was sent again after an attempt without an acknowledgement (a 503, or
    no answer), and the retry was refused by its own condition (412): the earlier
    attempt may have applied, or another writer came first; the client cannot tell
    which. Read the session before deciding what to do."""


_BY_STATUS: dict[int, type[SidecarError]] = {
    400: BadRequest, 401: Unauthorized, 403: Unauthorized, 404: SidecarNotFound,
    408: BadRequest, 409: SidecarConflict, 412: SidecarPreconditionFailed,
    413: SidecarTooLarge, 415: BadRequest, 429: OverQuota,
}


def error_class(status: int, details: dict[str, Any]) -> type[SidecarError]:
    """The exception an error answer of ``status`` (with these fields) raises."""
    if status == 409 and details.get("undecodable") is True:
        return SidecarUndecodable
    if status == 404 and details.get("field") == "cluster":
        # The cluster, not the session, is missing here: never "no such session" (a
        # load would start the session anew). Unavailable, as the member is for that
        # cluster: the app answers 503, and a VS just added to a pool is served by
        # its members' sidecars a moment later.
        return SidecarUnavailable
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    return BadRequest if 400 <= status < 500 else SidecarUnavailable


_OWN_FIELDS = frozenset({"error", "status", "path", "message", "method"})
"""The answer's fields that are the error's own (:class:`SidecarError`'s arguments)."""


def error_from_answer(status: int, body: bytes, *, method: str, path: str,
                      session: str | None = None) -> SidecarError:
    """The exception for an error answer: its class from ``status``, its message the
    body's ``error`` (the start of the body when it is not the documented JSON)."""
    parsed: Any = None
    try:
        parsed = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        pass
    details: dict[str, Any] = {}
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
        message = parsed["error"] or f"HTTP {status}"
        # What the error itself carries (the message, the request) is not a detail,
        # whatever the answer holds under those names.
        details = {k: v for k, v in parsed.items()
                   if k not in _OWN_FIELDS and isinstance(k, str)}
    else:
        text = body[:200].decode("utf-8", "replace").strip()
        message = f"{text} (not the JSON error the API documents)" if text else f"HTTP {status}"
    if session is not None:
        details.setdefault("session", session)
    cls = error_class(status, details)
    return cls(message, status=status, method=method, path=path, **details)


def describe(exc: BaseException) -> str:
    """A transport failure in one line: its type, and its text if it has one."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
