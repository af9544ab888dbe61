"""The role labels ``meshxl istio label`` writes, and the patches it sends (pure parts)."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web

from meshxl.istio.labeler import KubeApi, KubeApiError, PodLabeler, changes, desired_labels
from meshxl.model import RuntimeState, parse_model
from meshxl.model.runtime import AdminAction, Registration

MODEL = parse_model("""
clusters:
  - name: orders
    membership: registered
    sites: [{name: dc1}, {name: dc2}]
    listener: {port: 8080}
  - name: cart
    mode: load-sharing
    members: [{name: cart-0, address: 10.0.0.1, port: 80}]
""")


def _pod(name: str, cluster: str = "orders", **labels: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {"meshxl.io/cluster": cluster, **labels}}}


def _state(down: tuple[str, ...] = ()) -> RuntimeState:
    regs = {("orders", n): Registration("10.0.0.1", 8080, site=s)
            for n, s in [("orders-0", "dc1"), ("orders-1", "dc1"), ("orders-2", "dc2")]}
    return RuntimeState(registrations=regs,
                        members_down={("orders", n): AdminAction() for n in down})


def test_only_high_availability_clusters_are_labelled() -> None:
    desired = desired_labels(MODEL, _state())
    assert list(desired) == ["orders"]
    assert desired["orders"]["orders-0"] == {"meshxl.io/role": "active",
                                             "meshxl.io/serving": "true",
                                             "meshxl.io/preferred": "true"}
    assert desired["orders"]["orders-2"] == {"meshxl.io/role": "backup",
                                             "meshxl.io/serving": "true",
                                             "meshxl.io/preferred": None}


def test_changes_patch_only_what_differs_and_unknown_pods_get_no_role() -> None:
    desired = desired_labels(MODEL, _state(down=("orders-0",)))
    pods = [_pod("orders-0", **{"meshxl.io/role": "active", "meshxl.io/serving": "true",
                                "meshxl.io/preferred": "true"}),
            _pod("orders-1", **{"meshxl.io/role": "active", "meshxl.io/serving": "true",
                                "meshxl.io/preferred": "true"}),
            _pod("orders-9"), _pod("cart-0", cluster="cart"), {"metadata": {}},
            {"metadata": "x"}, {"metadata": {"name": "y", "labels": ["z"]}}]
    out = {c.pod: dict(c.labels) for c in changes("shop", desired, pods)}
    assert out == {
        "orders-0": {"meshxl.io/role": "none", "meshxl.io/serving": None,
                     "meshxl.io/preferred": None},
        "orders-9": {"meshxl.io/role": "none"},
    }


class _Api:
    def __init__(self, pods: list[dict[str, Any]]) -> None:
        self.pods = pods
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def member_pods(self, namespace: str) -> list[dict[str, Any]]:
        return self.pods

    async def patch_labels(self, namespace: str, pod: str, labels: Any) -> None:
        self.calls.append((pod, dict(labels)))


async def test_a_promotion_is_patched_after_the_demotion() -> None:
    """Never two pods labelled active at once: demotions first."""
    api = _Api([_pod("orders-0", **{"meshxl.io/role": "active"}), _pod("orders-1"),
                _pod("orders-2")])
    labeler = PodLabeler(api, "shop")  # type: ignore[arg-type]
    assert await labeler.reconcile(MODEL, _state(down=("orders-0",))) == 3
    order = [pod for pod, _ in api.calls]
    assert order.index("orders-0") < order.index("orders-1")
    assert dict(api.calls)["orders-1"]["meshxl.io/role"] == "active"


async def test_kube_api_errors_name_the_request() -> None:
    app = web.Application()

    async def forbidden(request: web.Request) -> web.Response:
        return web.json_response({"reason": "Forbidden"}, status=403)
    app.router.add_get("/api/v1/namespaces/shop/pods", forbidden)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    api = KubeApi(f"http://127.0.0.1:{port}", token="t")
    try:
        with pytest.raises(KubeApiError, match=r"GET /api/v1/namespaces/shop/pods: HTTP 403"):
            await api.member_pods("shop")
    finally:
        await api.close()
        await runner.cleanup()


def test_outside_a_pod_without_an_api_url_is_a_clear_error(monkeypatch: Any) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(KubeApiError, match="give --kube-api URL"):
        KubeApi()
