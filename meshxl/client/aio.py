"""The async client: the plans of :mod:`meshxl.client.plans` over a pool of kept-alive
connections to the sidecar (at most ``settings.max_connections`` at once).

By default the pool is meshxl's own lean HTTP/1.1 transport
(:mod:`meshxl.client.transport`, httptools), over TCP or the sidecar's Unix socket
(``unix:/PATH``): on loopback the client's CPU per request is what limits an
application's write rate. Two aiohttp features keep the client on an
``aiohttp.ClientSession``: an application's own session passed as ``http`` (the client
uses it and leaves closing it to its owner), and ``trace_configs`` (aiohttp's request
hooks, which OpenTelemetry's client tracing uses).

Create it anywhere; its connections are opened on first use, inside the running loop
(use one client in one loop), and closed by :meth:`AsyncClient.close` (or ``async
with``).
"""

from __future__ import annotations

import asyncio
import copy
import random
import ssl
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

import aiohttp

from meshxl import __version__
from meshxl import headers as hdr
from meshxl.errors import InputError

from . import plans
from .errors import SidecarError, describe
from .plans import (
    Answer,
    Delete,
    Pause,
    Plan,
    Readiness,
    Request,
    Session,
    Unanswered,
    Upsert,
    Written,
)
from .settings import DEFAULT_URL, ClientSettings
from .transport import Pool
from .url import base_url, check_cluster, cluster_path, split_url, unix_path

__all__ = ["AsyncClient"]

T = TypeVar("T")


class AsyncClient:
    """The sidecar's session API, for asyncio code.

    ``url``: the sidecar, ``http://127.0.0.1:7070`` or ``unix:/run/meshxl/statesync.sock``;
    ``token``: its bearer token (``--token-file``), if it requires one.

    ``http`` (an application's ``aiohttp.ClientSession``) or ``trace_configs`` (for the
    session the client then opens: ``meshxl.telemetry.http.client_trace_configs()``)
    are aiohttp features: with either, requests go through aiohttp rather than the
    client's own transport. ``http`` cannot reach a ``unix:`` URL (its connector
    decides where it connects).

    ``cluster``: the cluster (or virtual system) whose sessions it reads and writes, on a
    sidecar hosting several (``meshxl serve statesync --pool``): its requests go under
    ``/v1/clusters/{cluster}``. None (the default): the sidecar's one cluster.
    :meth:`for_cluster` gives a client of another cluster sharing this one's connections.
    """

    def __init__(self, url: str = DEFAULT_URL, *, token: str | None = None,
                 settings: ClientSettings | None = None,
                 http: aiohttp.ClientSession | None = None,
                 trace_configs: list[aiohttp.TraceConfig] | None = None,
                 rng: random.Random | None = None, cluster: str | None = None) -> None:
        self.url = base_url(url)
        self.cluster = check_cluster(cluster)
        self.settings = settings or ClientSettings()
        self._unix = unix_path(url)
        if self._unix is not None and http is not None:
            raise InputError(f"{url!r}: an aiohttp session given as http connects where its "
                             "connector says; give the client no http to reach a unix: URL")
        scheme, host, port, self._prefix = ("http", "localhost", 80, "") \
            if self._unix is not None else split_url(url)
        self._origin = "http://localhost" if self._unix is not None else self.url
        self._headers = {"User-Agent": f"meshxl-client/{__version__}", **hdr.bearer(token)}
        self._rng = rng or random.Random()
        self._http = http
        self._owns_http = http is None
        self._trace_configs = trace_configs
        self._pool: Pool | None = None
        self._parent: AsyncClient | None = None
        """The client whose connections it shares (:meth:`for_cluster`)."""
        if http is None and not trace_configs:
            self._pool = Pool(settings=self.settings, host=host, port=port, unix=self._unix,
                              tls=ssl.create_default_context() if scheme == "https" else None,
                              headers=self._headers)
        # sock_connect, not connect: waiting for a pooled connection is not connecting.
        self._timeout = aiohttp.ClientTimeout(total=self.settings.timeout,
                                              sock_connect=self.settings.connect_timeout)

    def for_cluster(self, cluster: str) -> AsyncClient:
        """A client of ``cluster``'s sessions on the same sidecar, sharing this client's
        connections, settings and token (closing it closes nothing: close this one)."""
        other = copy.copy(self)
        other.cluster = check_cluster(cluster)
        other._owns_http = False
        other._parent = self
        return other

    # -- session API ------------------------------------------------------------------------

    async def get(self, session_id: str) -> Session:
        """The session's state and ETag; :class:`NotFound` if there is none."""
        return await self.run(plans.get(session_id, self.settings, self._rng))

    async def put(self, session_id: str, state: Any, *, content_type: str | None = None,
                  if_match: str | None = None, create_only: bool = False,
                  sync_now: bool = False) -> Written:
        """Create or replace: bytes verbatim, anything else as JSON. ``if_match``: only
        if the session is at that ETag (else :class:`PreconditionFailed`);
        ``create_only``: only if it does not exist; ``sync_now``: committed in etcd
        before it is answered, whatever the cluster's ``sync_delay``."""
        return await self.run(plans.put(session_id, state, self.settings, self._rng,
                                        content_type=content_type, if_match=if_match,
                                        create_only=create_only, sync_now=sync_now))

    async def patch(self, session_id: str, merge_patch: Any, *,
                    if_match: str | None = None) -> Written:
        """JSON merge patch (RFC 7386) of a JSON session."""
        return await self.run(plans.patch(session_id, merge_patch, self.settings, self._rng,
                                          if_match=if_match))

    async def delete(self, session_id: str, *, if_match: str | None = None) -> None:
        await self.run(plans.delete(session_id, self.settings, self._rng, if_match=if_match))

    async def update(self, session_id: str, fn: Callable[[Any], Any], *,
                     default: Any = None) -> Session:
        """Compare-and-set loop: ``fn(state)`` written if the session did not change
        since it was read, else read and applied again (``settings.conflicts``)."""
        return await self.run(plans.update(session_id, fn, self.settings, self._rng,
                                           default=default))

    async def bulk_get(self, session_ids: list[str]) -> list[Session | SidecarError]:
        """Many sessions in one request: each a :class:`Session` or the error a
        :meth:`get` of it raises (returned, not raised), in the order asked."""
        return await self.run(plans.bulk_get(session_ids, self.settings, self._rng))

    async def bulk_save(self, items: list[Upsert]) -> list[Written | SidecarError]:
        """Many writes in one request, each as :meth:`put` (not atomic): each item's
        acknowledgement or error (returned, not raised)."""
        return await self.run(plans.bulk_save(items, self.settings, self._rng))

    async def transaction(self, operations: list[Upsert | Delete]) -> list[Written | None]:
        """All or nothing: the upserts' acknowledgements (None for deletes), or the
        failing operation's error, raised, with nothing written."""
        return await self.run(plans.transaction(operations, self.settings, self._rng))

    async def ready(self) -> Readiness:
        """The sidecar's ``/readyz`` (one try; :class:`Unreachable` without an answer)."""
        return await self.run(plans.ready(self.settings, self._rng))

    # -- the driver -------------------------------------------------------------------------

    async def run(self, plan: Plan[T]) -> T:
        """Carry out a plan (see :mod:`meshxl.client.plans`) and return its result."""
        try:
            step = next(plan)
            while True:
                if isinstance(step, Pause):
                    await asyncio.sleep(step.seconds)
                    step = plan.send(None)
                else:
                    step = plan.send(await self._send(step))
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        finally:
            plan.close()

    async def _send(self, request: Request) -> Answer | Unanswered:
        if self._pool is not None:
            return await self._pool.request(request.method, self._prefix + cluster_path(
                                                self.cluster, request.path),
                                            request.headers, request.body)
        return await self._send_aiohttp(request)

    def _session(self) -> aiohttp.ClientSession:
        if self._parent is not None:
            return self._parent._session()
        if self._http is None or (self._owns_http and self._http.closed):
            limit, keepalive = self.settings.max_connections, self.settings.keepalive
            connector: aiohttp.BaseConnector = aiohttp.UnixConnector(
                path=self._unix, limit=limit, keepalive_timeout=keepalive) \
                if self._unix is not None else aiohttp.TCPConnector(
                    limit=limit, keepalive_timeout=keepalive)
            self._http = aiohttp.ClientSession(connector=connector,
                                               trace_configs=self._trace_configs)
            self._owns_http = True
        return self._http

    async def _send_aiohttp(self, request: Request) -> Answer | Unanswered:
        http = self._session()
        try:
            async with http.request(request.method,
                                    self._origin + cluster_path(self.cluster, request.path),
                                    data=request.body,
                                    headers={**self._headers, **request.headers},
                                    timeout=self._timeout, allow_redirects=False) as resp:
                headers = {name.lower(): value for name, value in resp.headers.items()}
                problem = _unframed(resp.status, headers, self.settings.max_answer)
                if problem is not None:
                    return Unanswered(problem, sent=True)
                body = bytearray()
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > self.settings.max_answer:
                        return Unanswered(f"the answer is larger than "
                                          f"{self.settings.max_answer} bytes", sent=True)
                return Answer(resp.status, headers, bytes(body))
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            return Unanswered(describe(exc), sent=False)
        except (aiohttp.ClientError, TimeoutError) as exc:
            return Unanswered(describe(exc), sent=True)

    # -- lifetime ---------------------------------------------------------------------------

    async def close(self) -> None:
        """Close the client's connections (not an HTTP session it was given); it opens
        new ones if used again."""
        if self._parent is not None:
            return
        if self._pool is not None:
            await self._pool.close()
        if self._owns_http and self._http is not None:
            await self._http.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    def __repr__(self) -> str:
        cluster = f", cluster={self.cluster!r}" if self.cluster is not None else ""
        return f"AsyncClient({self.url!r}{cluster})"


def _unframed(status: int, headers: dict[str, str], limit: int) -> str | None:
    """Why an answer read through aiohttp is refused before its body, as the client's
    own transport refuses it (:mod:`meshxl.client.framing`), or None."""
    length = headers.get("content-length")
    if "transfer-encoding" not in headers and length is None and status not in (204, 304):
        return ("the answer says neither Content-Length nor chunked Transfer-Encoding: its "
                "end, and so a cut, could not be told")
    if length is not None and length.isdigit() and int(length) > limit:
        return f"the answer is larger than {limit} bytes (Content-Length: {length})"
    return None
