"""The session layer's failures. Each is a member of :mod:`meshxl.errors`' family, which
gives its HTTP status (:func:`meshxl.httpbase.http_status`): a bad request is an
``InputError`` (400), a missing session ``NotFound`` (404), a lost compare ``Conflict``
(409), a record that cannot be decoded ``Undecodable`` (409), a failed If-Match or
If-None-Match ``PreconditionFailed`` (412), a state over the limit ``TooLarge`` (413),
etcd not answering :class:`meshxl.etcd.EtcdUnavailable` (an ``Unavailable``, 503). The
layer raises the family's classes themselves; defined here are only :class:`LeaseLost`
and :class:`Superseded`, which say more than their family members.
"""

from __future__ import annotations

from meshxl.errors import (
    Conflict,
    InputError,
    MeshxlError,
    NotFound,
    PreconditionFailed,
    TooLarge,
    Unavailable,
)
from meshxl.etcd.balancer import EtcdUnavailable

__all__ = ["LeaseLost", "Superseded", "no_session", "result_name"]


class LeaseLost(EtcdUnavailable):
    """etcd refused a batch for a session lease it no longer has: nothing in the batch
    applied, so its writes may be sent again, with a new lease."""


class Superseded(Conflict):
    """A session kept only on this member (delayed sync) that another member wrote in
    etcd meanwhile: its replication never replaces that record, and the copy here is
    given up (409, the other member named, as for a fenced former owner)."""


def no_session(session_id: str) -> NotFound:
    return NotFound(f"no session {session_id!r}")


_RESULTS: tuple[tuple[type[MeshxlError], str], ...] = (
    (PreconditionFailed, "precondition_failed"), (Conflict, "conflict"),
    (NotFound, "not_found"), (Unavailable, "unavailable"), (TooLarge, "too_large"),
    (InputError, "bad_request"))


def result_name(exc: MeshxlError) -> str:
    """The metrics' name of a failure (``result`` label)."""
    for cls, name in _RESULTS:
        if isinstance(exc, cls):
            return name
    return "failed"
