"""A client of the statesync sidecar's session API (``docs/statesync.md``).

``AsyncClient`` (asyncio, over its own HTTP/1.1 transport: :mod:`meshxl.client.transport`)
and ``Client`` (blocking sockets; both parse answers with :mod:`meshxl.client.framing`)
have the same methods:
``get``, ``put`` (``if_match`` compare-and-set, ``create_only``), ``patch`` (JSON merge
patch), ``delete``, ``update(session, fn)`` (read, apply, write with ``If-Match``, again
after a 409/412), ``ready``, and for several sessions in one request ``bulk_get``,
``bulk_save`` (each item on its own) and ``transaction`` (``Upsert`` and ``Delete``
operations, all or nothing). Both retry 503s and unanswered requests with bounded
exponential backoff and jitter, send the bearer token, keep connections alive (over TCP,
or the sidecar's Unix socket: ``unix:/PATH``), hold each request to one deadline and
its answer to a size cap, and raise the sidecar's JSON errors as
meshxl's error family (:mod:`meshxl.client.errors`). :mod:`meshxl.client.middleware`
loads and saves a request's session for aiohttp and ASGI apps.

The operations are written once, without I/O, in :mod:`meshxl.client.plans`; the two
clients only carry them out (``run``).

The client imports nothing of the sidecar's own code (``meshxl.statesync``): an
application depends on the HTTP API only.
"""

from .aio import AsyncClient
from .errors import (
    BadRequest,
    Conflict,
    Contended,
    NotFound,
    OverQuota,
    PreconditionFailed,
    SidecarConflict,
    SidecarError,
    SidecarNotFound,
    SidecarPreconditionFailed,
    SidecarTooLarge,
    SidecarUnavailable,
    SidecarUndecodable,
    TooLarge,
    Unauthorized,
    Unavailable,
    Undecodable,
    Unreachable,
    WriteUncertain,
)
from .plans import Delete, JsonText, Readiness, Session, Upsert, Written
from .settings import DEFAULT_URL, Backoff, ClientSettings
from .sync import Client

__all__ = [
    "DEFAULT_URL", "AsyncClient", "Backoff", "BadRequest", "Client", "ClientSettings",
    "Conflict", "Contended", "Delete", "JsonText", "NotFound", "OverQuota", "PreconditionFailed",
    "Readiness", "Session",
    "SidecarConflict", "SidecarError", "SidecarNotFound", "SidecarPreconditionFailed",
    "SidecarTooLarge", "SidecarUnavailable", "SidecarUndecodable", "TooLarge", "Unauthorized",
    "Unavailable", "Undecodable", "Unreachable", "Upsert", "Written", "WriteUncertain",
]
