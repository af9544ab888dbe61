"""The labeler against a Kubernetes API served on loopback: which pods it patches and
how its errors read (the pure parts: tests/unit/test_istio_labeler.py)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from meshxl.istio.labeler import KubeApi, KubeApiError, PodLabeler
from tests.unit.test_istio_labeler import MODEL, _state


async def test_kube_api_errors_name_the_request() -> None:
    app = web.Application()

    async def forbidden(request: web.Request) -> web.Response:
        return web.json_response({"reason": "Forbidden"}, status=403)
    app.router.add_get("/api/v1/namespaces/shop/pods", forbidden)
    async with kube_api(app) as api:
        with pytest.raises(KubeApiError, match=r"GET /api/v1/namespaces/shop/pods: HTTP 403"):
            await api.member_pods("shop")


async def test_only_its_own_installations_pods_are_patched() -> None:
    """Run over every namespace (the shipped overlay), the labeler leaves alone the
    same-named pods of another installation's cluster of the same name, and pods of
    its cluster's name no installation injected: a pod is its installation's by the
    label the injector writes, never by its name."""
    def pod(ns: str, name: str, installation: str | None, role: str) -> dict[str, Any]:
        labels = {"meshxl.io/cluster": "orders", "meshxl.io/role": role}
        if installation is not None:
            labels["meshxl.io/installation"] = installation
        return {"metadata": {"name": name, "namespace": ns, "labels": labels}}

    pods = [pod("shop", "orders-0", "meshxl", "active"),
            pod("shop", "orders-1", "meshxl", "standby"),
            pod("shop", "orders-2", "meshxl", "backup"),
            pod("other", "orders-0", "other", "standby"),
            pod("other", "orders-1", "other", "active"),
            pod("other", "orders-2", "other", "backup"),
            pod("stray", "orders-1", None, "none")]
    patched: list[tuple[str, str, dict[str, Any]]] = []
    app = web.Application()

    async def listing(request: web.Request) -> web.Response:
        selector = request.query.get("labelSelector", "")
        namespace = request.match_info.get("ns")
        return web.json_response({"items": [
            p for p in pods if _selected(p["metadata"]["labels"], selector)
            and namespace in (None, p["metadata"]["namespace"])]})

    async def patch(request: web.Request) -> web.Response:
        body = await request.json()
        ns, name = request.match_info["ns"], request.match_info["name"]
        patched.append((ns, name, body["metadata"]["labels"]))
        for p in pods:
            if (p["metadata"]["namespace"], p["metadata"]["name"]) == (ns, name):
                p["metadata"]["labels"].update(body["metadata"]["labels"])
        return web.json_response({})

    app.router.add_get("/api/v1/pods", listing)
    app.router.add_get("/api/v1/namespaces/{ns}/pods", listing)
    app.router.add_patch("/api/v1/namespaces/{ns}/pods/{name}", patch)
    async with kube_api(app) as api:
        labeler = PodLabeler(api, None)  # every namespace, as the overlay runs it
        assert await labeler.reconcile(MODEL, _state(down=("orders-0",))) > 0
    assert {ns for ns, _, _ in patched} == {"shop"}, patched
    assert [p["metadata"]["labels"]["meshxl.io/role"] for p in pods] == [
        "none", "active", "standby", "standby", "active", "backup", "none"]


@contextlib.asynccontextmanager
async def kube_api(app: web.Application) -> AsyncIterator[KubeApi]:
    """A :class:`KubeApi` of an HTTP server on loopback speaking the calls ``app`` routes."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    api = KubeApi(f"http://127.0.0.1:{port}", token="t")
    try:
        yield api
    finally:
        await api.close()
        await runner.cleanup()


def _selected(labels: dict[str, str], selector: str) -> bool:
    """The API server's equality-based label selector: ``key``, ``key=value``,
    ``key!=value``, comma-separated (all must hold)."""
    for term in filter(None, selector.split(",")):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = term.split("=", 1)
            if labels.get(key) != value:
                return False
        elif term not in labels:
            return False
    return True
