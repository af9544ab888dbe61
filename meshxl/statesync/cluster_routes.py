"""The API of a sidecar hosting several clusters (``meshxl serve statesync --pool``, or
``--cluster`` given more than once): each cluster's API is the single-cluster API under
``/v1/clusters/{cluster}``, the request's path naming the cluster:

* ``/v1/sessions/...`` -> ``/v1/clusters/{cluster}/sessions/...`` (and ``:bulkGet``,
  ``:bulkSave``, ``:transaction``), ``/v1/problems...``, ``/v1/overload`` and
  ``/v1/status`` likewise, ``/readyz`` -> ``/v1/clusters/{cluster}/readyz`` and
  ``/healthz`` -> ``/v1/clusters/{cluster}/healthz``;
* ``/healthz``, ``/readyz``, ``/metrics`` (every cluster's series labelled ``cluster``)
  and ``/v1/status`` (every cluster's) are the process's; ``/v1/clusters`` lists the
  clusters served, each ready or not;
* an unknown cluster is a 404 naming it; the single-cluster paths (``/v1/sessions/...``)
  are a 400 saying to name the cluster.

A single-cluster sidecar answers under ``/v1/clusters/{its cluster}`` too, so a client
set to a cluster (``AsyncClient(url, cluster=...)``) reaches either kind.

Each cluster's requests go to its own :class:`~.api.SessionRoutes` (its own sidecar:
sessions, registration, metrics), looked up per request, so clusters can come and go
while the server runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, cast

from meshxl.model.limits import SESSION_BYTES

from .api import SessionRoutes, SidecarParts
from .http import ALONE, Request, RequestRefused, Response, Router
from .http.messages import json_response
from .metrics import CONTENT_TYPE

__all__ = ["CLUSTER_PREFIX", "HostedParts", "add_cluster_routes", "hosted_router",
           "scoped_pattern"]

CLUSTER_PREFIX = "/v1/clusters/{cluster}"
MAX_STATE = SESSION_BYTES.whole[1]
"""The largest session state any cluster takes (each cluster's own limit is checked
when its request comes: a route's body limit is set before the cluster is known)."""
_PROCESS_ONLY = frozenset({"/metrics", "/openapi.json"})
"""Single-cluster routes that stay the process's, under no cluster."""
_SCOPED = ("/v1/sessions", "/v1/problems", "/v1/overload")
"""The single-cluster paths a sidecar hosting several clusters refuses (name one)."""

Lookup = Callable[[str], SessionRoutes | None]
"""A hosted cluster's routes by its name (None: not hosted)."""


def scoped_pattern(pattern: str) -> str:
    """A single-cluster route's pattern under :data:`CLUSTER_PREFIX`."""
    if pattern.startswith("/v1/"):
        return f"{CLUSTER_PREFIX}/{pattern[4:]}"
    return CLUSTER_PREFIX + pattern


def _template() -> Router:
    """The single-cluster routes, as patterns and handler names (bound to no sidecar)."""
    return SessionRoutes(cast(SidecarParts, None)).router(MAX_STATE)


class _Dispatch:
    """Handlers of ``/v1/clusters/{cluster}/...``: each passes the request to the
    cluster's own handler of the same name."""

    def __init__(self, lookup: Lookup, names: Callable[[], list[str]]):
        self.lookup = lookup
        self.names = names

    def routes_of(self, request: Request) -> SessionRoutes:
        cluster = request.params["cluster"]
        routes = self.lookup(cluster)
        if routes is None:
            hosted = self.names()
            shown = ", ".join(hosted[:20]) + (", ..." if len(hosted) > 20 else "")
            raise RequestRefused(404, f"cluster {cluster[:80]!r} is not served by this "
                                      f"sidecar (it serves {shown or 'none yet'})",
                                 path=request.path, field="cluster")
        return routes

    def handler(self, name: str, state: bool) -> Callable[[Request], Awaitable[Response]]:
        async def handle(request: Request) -> Response:
            routes = self.routes_of(request)
            if state:
                _check_size(request, routes)
            handler: Callable[[Request], Awaitable[Response]] = getattr(routes, name)
            return await handler(request)

        return handle

    def refuse(self, request: Request) -> Response | None:
        """The cluster's refusal from the request's head (a write past its rate
        quota: :class:`~.quota.HeadRefusal`); an unknown cluster is its handler's 404,
        one not started its 503 (raised here, answered from the head)."""
        routes = self.lookup(request.params["cluster"])
        return None if routes is None else routes.refuse_write(request)

    async def put_group(self, requests: list[Request],
                        answer: Callable[[int, Response | Exception], None]) -> None:
        """PUTs pipelined together, each to its cluster's :meth:`~.api.SessionRoutes.
        put_group` (one per cluster, side by side); with a sync delay, one by one as
        ``put`` (the single-cluster API takes those up alone)."""
        by_cluster: dict[int, tuple[SessionRoutes, list[int]]] = {}
        for i, request in enumerate(requests):
            try:
                routes = self.routes_of(request)
                _check_size(request, routes)
            except Exception as exc:
                answer(i, exc)
                continue
            by_cluster.setdefault(id(routes), (routes, []))[1].append(i)

        async def one(routes: SessionRoutes, where: list[int]) -> None:
            if routes.sidecar.sessions.settings.sync_delay > 0:
                for i in where:
                    try:
                        answer(i, await routes.put(requests[i]))
                    except Exception as exc:
                        answer(i, exc)
                return
            await routes.put_group([requests[i] for i in where],
                                   lambda j, outcome: answer(where[j], outcome))

        await asyncio.gather(*(one(routes, where) for routes, where in by_cluster.values()))


def _check_size(request: Request, routes: SessionRoutes) -> None:
    limit = routes.sidecar.sessions.settings.max_bytes
    if len(request.body) > limit:
        raise RequestRefused(413, f"session state is {len(request.body)} bytes; cluster "
                                  f"{request.params['cluster']!r} takes at most {limit}",
                             path=request.path)


def add_cluster_routes(router: Router, lookup: Lookup, names: Callable[[], list[str]]) -> None:
    """Every single-cluster route under ``/v1/clusters/{cluster}`` on ``router``, each
    request given to the handler of ``lookup(cluster)``."""
    dispatch = _Dispatch(lookup, names)
    for route in _template().routes():
        if route.pattern in _PROCESS_ONLY:
            continue
        name = route.handler.__name__
        group = dispatch.put_group if route.group is not None else None
        router.add(route.method, scoped_pattern(route.pattern),
                   dispatch.handler(name, state=route.what == "session state"),
                   max_body=route.max_body, what=route.what,
                   # A bulk save with a sync delay writes in tasks of its own (api.py):
                   # not known before the cluster is, so always alone on its connection.
                   access=ALONE if name == "bulk_save" else route.access,
                   key=route.key, group=group,
                   refuse=dispatch.refuse if route.refuse is not None else None)

    async def clusters(request: Request) -> Response:
        listed = []
        for name in names():
            routes = lookup(name)
            if routes is not None:
                listed.append({"name": name,
                               "ready": not routes.sidecar.not_ready_reasons()})
        return json_response({"clusters": listed})

    router.add("GET", "/v1/clusters", clusters)


class HostedParts(Protocol):
    """What the process-wide routes of a sidecar hosting several clusters use
    (:class:`.hosting.Hosting`)."""

    def clusters(self) -> dict[str, SidecarParts]: ...

    def liveness_problems(self) -> list[str]: ...

    def not_ready_reasons(self) -> list[str]: ...

    def warnings(self) -> list[str]: ...

    def status(self) -> dict[str, Any]: ...

    def render_metrics(self) -> bytes: ...


def hosted_router(host: HostedParts, lookup: Lookup) -> Router:
    """The routes of a sidecar hosting several clusters: each cluster's, the process's,
    and a 400 for the single-cluster paths."""
    r = Router()

    def names() -> list[str]:
        return sorted(host.clusters())

    add_cluster_routes(r, lookup, names)

    async def healthz(request: Request) -> Response:
        problems = host.liveness_problems()
        if problems:
            return json_response({"status": "failing", "problems": problems}, 503)
        return json_response({"status": "ok", "clusters": len(host.clusters())})

    async def readyz(request: Request) -> Response:
        reasons = host.not_ready_reasons()
        if reasons:
            return json_response({"ready": False, "reasons": reasons}, 503)
        warnings = host.warnings()
        return json_response({"ready": True, "clusters": len(host.clusters()),
                              **({"warnings": warnings} if warnings else {})})

    async def metrics(request: Request) -> Response:
        return Response(200, host.render_metrics(), [("Content-Type", CONTENT_TYPE)])

    async def status(request: Request) -> Response:
        return json_response(host.status())

    async def openapi(request: Request) -> Response:
        from .api import openapi_document

        return json_response(openapi_document())

    async def name_a_cluster(request: Request) -> Response:
        hosted = names()
        shown = ", ".join(hosted[:20]) + (", ..." if len(hosted) > 20 else "")
        raise RequestRefused(
            400, f"this sidecar serves {len(hosted)} clusters ({shown or 'none yet'}): "
                 f"name the cluster in the path, /v1/clusters/{{cluster}}{request.path[3:]}",
            path=request.path, field="cluster")

    r.add("GET", "/healthz", healthz)
    r.add("GET", "/readyz", readyz)
    r.add("GET", "/metrics", metrics)
    r.add("GET", "/v1/status", status)
    r.add("GET", "/openapi.json", openapi)
    for route in _template().routes():
        if route.pattern.startswith(_SCOPED):
            r.add(route.method, route.pattern, name_a_cluster)
    return r
