"""A sidecar hosting several clusters: how a request finds its cluster's handlers
(``/v1/clusters/{cluster}/...``), what an unknown cluster and a path naming none are
answered, pipelined PUTs of several clusters, the metrics of every cluster in one
exposition, the clients' paths, and the pools a sidecar reads of the model."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import pytest

from meshxl.client import AsyncClient, Client, NotFound, SidecarNotFound, SidecarUnavailable
from meshxl.client.errors import error_from_answer
from meshxl.client.url import check_cluster, cluster_path
from meshxl.errors import InputError
from meshxl.model.decode import decode
from meshxl.model.document import ModelSpec
from meshxl.model.text import model_data
from meshxl.model.vsls import pool_systems, system_named
from meshxl.statesync.cluster_routes import add_cluster_routes, hosted_router, scoped_pattern
from meshxl.statesync.http import Request, Response, Router
from meshxl.statesync.http.routing import handled
from meshxl.statesync.metrics import StatesyncMetrics, render_hosted


class FakeRoutes:
    """A cluster's handlers (SessionRoutes' names), answering which cluster took it."""

    def __init__(self, name: str, max_bytes: int = 1024, sync_delay: float = 0.0):
        self.name = name
        settings = SimpleNamespace(max_bytes=max_bytes, sync_delay=sync_delay)
        self.sidecar = SimpleNamespace(sessions=SimpleNamespace(settings=settings),
                                       not_ready_reasons=lambda: [])
        self.groups: list[list[str]] = []

    def _answer(self, request: Request) -> Response:
        body = {"cluster": self.name, "params": request.params}
        return Response(200, json.dumps(body).encode())

    async def get(self, request: Request) -> Response:
        return self._answer(request)

    async def put(self, request: Request) -> Response:
        return self._answer(request)

    async def put_group(self, requests: list[Request], answer: Any) -> None:
        self.groups.append([r.params["session_id"] for r in requests])
        for i, request in enumerate(requests):
            answer(i, self._answer(request))

    async def status(self, request: Request) -> Response:
        return self._answer(request)


def request(router: Router, method: str, path: str, body: bytes = b"") -> Request:
    found = router.resolve(path)
    assert found is not None, path
    methods, params = found
    req = Request(method, path, "", "1.1", {"host": "sidecar"}, True)
    req.route, req.params, req.body = methods[method], params, body
    return req


def answer(router: Router, method: str, path: str, body: bytes = b"") -> tuple[int, Any]:
    response = asyncio.run(handled(request(router, method, path, body)))
    return response.status, json.loads(response.body)


CLUSTERS = {"t01": FakeRoutes("t01"), "t02": FakeRoutes("t02", max_bytes=4)}


class FakeHost:
    def clusters(self) -> dict[str, Any]:
        return {name: r.sidecar for name, r in CLUSTERS.items()}


def hosted() -> Router:
    return hosted_router(FakeHost(), CLUSTERS.get)  # type: ignore[arg-type]


def test_the_path_names_the_cluster_and_its_own_handlers_answer() -> None:
    router = hosted()
    status, body = answer(router, "GET", "/v1/clusters/t02/sessions/s1")
    assert (status, body["cluster"]) == (200, "t02")
    assert body["params"] == {"cluster": "t02", "session_id": "s1"}
    status, body = answer(router, "GET", "/v1/clusters/t01/status")
    assert (status, body["cluster"]) == (200, "t01")
    assert scoped_pattern("/readyz") == "/v1/clusters/{cluster}/readyz"
    assert scoped_pattern("/v1/sessions:bulkGet") == "/v1/clusters/{cluster}/sessions:bulkGet"


def test_an_unknown_cluster_is_a_404_naming_it_and_those_served() -> None:
    status, body = answer(hosted(), "GET", "/v1/clusters/t99/sessions/s1")
    assert status == 404 and body["field"] == "cluster"
    assert "'t99' is not served by this sidecar (it serves t01, t02)" in body["error"]


def test_a_path_naming_no_cluster_is_a_400_saying_how_to_name_one() -> None:
    for method, path in (("GET", "/v1/sessions/s1"), ("PUT", "/v1/sessions/s1"),
                         ("POST", "/v1/sessions:bulkGet"), ("GET", "/v1/problems"),
                         ("GET", "/v1/overload")):
        status, body = answer(hosted(), method, path)
        assert status == 400, path
        assert body["error"].startswith("this sidecar serves 2 clusters (t01, t02): name the "
                                        "cluster in the path, /v1/clusters/{cluster}/"), body


def test_each_cluster_takes_states_up_to_its_own_size() -> None:
    router = hosted()
    status, _ = answer(router, "PUT", "/v1/clusters/t01/sessions/s1", b"12345")
    assert status == 200
    status, body = answer(router, "PUT", "/v1/clusters/t02/sessions/s1", b"12345")
    assert status == 413 and "cluster 't02' takes at most 4" in body["error"]


def test_pipelined_puts_of_several_clusters_go_each_to_its_own() -> None:
    router = hosted()
    paths = ["/v1/clusters/t01/sessions/a", "/v1/clusters/t02/sessions/b",
             "/v1/clusters/t09/sessions/c", "/v1/clusters/t01/sessions/d"]
    requests = [request(router, "PUT", p) for p in paths]
    group = requests[0].route.group  # type: ignore[union-attr]
    assert group is not None
    answers: dict[int, Response | Exception] = {}
    asyncio.run(group(requests, answers.__setitem__))
    assert sorted(answers) == [0, 1, 2, 3]
    for i, cluster in ((0, "t01"), (1, "t02"), (3, "t01")):
        outcome = answers[i]
        assert isinstance(outcome, Response)
        assert json.loads(outcome.body)["cluster"] == cluster
    assert "t09" in str(answers[2]) and getattr(answers[2], "status", None) == 404
    assert ["a", "d"] in CLUSTERS["t01"].groups


def test_a_single_cluster_sidecar_answers_under_its_cluster_too() -> None:
    own = FakeRoutes("shop")
    router = Router()
    add_cluster_routes(router, lambda name: own if name == "shop" else None, lambda: ["shop"])
    assert answer(router, "GET", "/v1/clusters/shop/sessions/s1")[0] == 200
    assert answer(router, "GET", "/v1/clusters/other/sessions/s1")[0] == 404
    assert answer(router, "GET", "/v1/clusters") == (200, {"clusters": [
        {"name": "shop", "ready": True}]})


def test_metrics_of_every_cluster_in_one_exposition_labelled_by_cluster() -> None:
    process = StatesyncMetrics()
    a, b = StatesyncMetrics(process.signals), StatesyncMetrics(process.signals)
    a.writes.labels("put", "ok").inc(3)
    b.writes.labels("put", "ok").inc()
    b.cached.set(7)
    process.connections.set(2)
    text = render_hosted(process, {"t02": b, "t01": a}).decode()
    lines = text.splitlines()
    assert lines.count("# TYPE meshxl_statesync_writes_total counter") == 1
    assert 'meshxl_statesync_writes_total{cluster="t01",op="put",result="ok"} 3.0' in lines
    assert 'meshxl_statesync_writes_total{cluster="t02",op="put",result="ok"} 1.0' in lines
    assert 'meshxl_statesync_cached_sessions{cluster="t02"} 7.0' in lines
    assert "meshxl_statesync_http_connections 2.0" in lines  # the process's, unlabelled
    assert not any(line.startswith("meshxl_statesync_http_connections{") for line in lines)
    # Every family once, in the single-cluster order.
    helps = [line for line in lines if line.startswith("# HELP")]
    assert helps == [line for line in process.render().decode().splitlines()
                     if line.startswith("# HELP")]


def test_the_clients_address_a_cluster_under_v1_clusters() -> None:
    assert cluster_path(None, "/v1/sessions/s1") == "/v1/sessions/s1"
    assert cluster_path("t07", "/v1/sessions/s1") == "/v1/clusters/t07/sessions/s1"
    assert cluster_path("t07", "/v1/sessions:bulkGet") == "/v1/clusters/t07/sessions:bulkGet"
    assert cluster_path("t07", "/readyz") == "/v1/clusters/t07/readyz"
    with pytest.raises(InputError, match="invalid cluster name 'T07/x'"):
        check_cluster("T07/x")
    with pytest.raises(InputError, match="invalid cluster name"):
        Client("http://127.0.0.1:7070", cluster="")
    client = AsyncClient("http://127.0.0.1:7070", cluster="t07")
    other = client.for_cluster("t08")
    assert (client.cluster, other.cluster) == ("t07", "t08")
    assert repr(other) == "AsyncClient('http://127.0.0.1:7070', cluster='t08')"


def test_an_unknown_cluster_is_no_missing_session_to_the_client() -> None:
    body = json.dumps({"error": "cluster 't9' is not served by this sidecar", "status": 404,
                       "field": "cluster"}).encode()
    exc = error_from_answer(404, body, method="GET", path="/v1/clusters/t9/sessions/s1")
    assert isinstance(exc, SidecarUnavailable) and not isinstance(exc, NotFound)
    missing = error_from_answer(404, b'{"error": "no session", "status": 404}',
                                method="GET", path="/v1/clusters/t1/sessions/s1")
    assert isinstance(missing, SidecarNotFound)


def test_the_sidecar_reads_each_pools_virtual_systems_of_the_model() -> None:
    # Read without the model's cross-checks (which refuse "shop" and "lost"): what the
    # sidecar's questions answer for entries the control plane would not compile.
    model = decode(model_data("""
clusters: [{name: shop, members: [{name: a, address: 127.0.0.1, port: 1}]}]
pools: [{name: web, members: [{name: w1, address: 127.0.0.1, port: 1}]},
        {name: api, members: [{name: x1, address: 127.0.0.1, port: 1}]}]
virtual_systems:
  - {names: [t01, t02, shop], pool: web, sessions: {ttl: 60s}}
  - {name: big, pool: web, weight: 3}
  - {name: other, pool: api}
  - {name: lost, pool: nowhere}
"""), ModelSpec)
    assert pool_systems(model, "web") == ("t01", "t02", "big")  # shop: a cluster's name
    assert pool_systems(model, "api") == ("other",)
    assert pool_systems(model, "x") == () and model.pool("x") is None
    vs = system_named(model, "t02")
    assert vs is not None and vs[0].sessions.ttl == 60 and vs[1].name == "web"
    assert system_named(model, "lost") is None


def test_a_sidecar_asks_vsls_only_of_a_model_with_virtual_systems() -> None:
    """mesh_reads' and following's answers, which load vsls.py only for a model with
    virtual systems, are vsls.py's own for models with and without them."""
    from meshxl.model.vsls import sessions_of
    from meshxl.statesync.following import _system_named
    from meshxl.statesync.mesh_reads import _sessions_of

    plain = decode(model_data(
        "clusters: [{name: shop, sessions: {ttl: 90s}, "
        "members: [{name: a, address: 127.0.0.1, port: 1}]}]"), ModelSpec)
    with_vs = decode(model_data("""
clusters: [{name: shop, members: [{name: a, address: 127.0.0.1, port: 1}]}]
pools: [{name: web, members: [{name: w1, address: 127.0.0.1, port: 1}]}]
virtual_systems: [{names: [t01], pool: web, sessions: {ttl: 60s}}]
"""), ModelSpec)
    for model in (plain, with_vs):
        for name in ("shop", "t01", "nowhere"):
            assert _sessions_of(model, name) == sessions_of(model, name), name
            assert _system_named(model, name) == system_named(model, name), name
    assert _sessions_of(plain, "shop") is not None and _sessions_of(plain, "shop").ttl == 90
    found = _system_named(with_vs, "t01")
    assert found is not None and found[1].name == "web"
