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
    assert desired["orders"].members["orders-0"] == {"meshxl.io/role": "active",
                                             "meshxl.io/serving": "true",
                                             "meshxl.io/preferred": "true"}
    assert desired["orders"].members["orders-2"] == {"meshxl.io/role": "backup",
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


PINNED = parse_model("""
clusters:
  - name: orders
    membership: registered
    stickiness: {header: x-session-id, pin: {}}
    sites: [{name: dc1}, {name: dc2}]
    listener: {port: 8080}
  - name: cart
    mode: load-sharing
    stickiness: {header: x-cart, pin: {header: x-cart-pin}}
    sites: [{name: dc1}, {name: dc2}]
    members:
      - {name: cart-0, address: 10.0.0.1, port: 80, site: dc1}
      - {name: cart-1, address: 10.0.0.2, port: 80, site: dc2}
""")


def test_pinned_clusters_mark_drained_members_with_istiods_draining_label() -> None:
    """A pin overrides the priority: drained members of a pinned cluster must leave
    Istio's EDS (istio.io/draining) for their sessions to move, as with meshxl's xDS."""
    state = _state(down=("orders-0",))
    state = RuntimeState(registrations=state.registrations, members_down=state.members_down,
                         sites_offline={"dc2": AdminAction()})
    desired = desired_labels(PINNED, state)
    assert list(desired) == ["orders", "cart"]
    orders, cart = desired["orders"].members, desired["cart"].members
    assert orders["orders-0"] == {"meshxl.io/role": "none", "meshxl.io/serving": None,
                                  "meshxl.io/preferred": None,
                                  "istio.io/draining": "meshxl"}
    assert orders["orders-1"] == {"meshxl.io/role": "active", "meshxl.io/serving": "true",
                                  "meshxl.io/preferred": "true", "istio.io/draining": None}
    assert orders["orders-2"]["istio.io/draining"] == "meshxl"  # its site is offline
    # Load sharing: no role labels, only the draining mark.
    assert cart == {"cart-0": {"istio.io/draining": None},
                    "cart-1": {"istio.io/draining": "meshxl"}}
    assert desired["cart"].unknown == {"istio.io/draining": None}

    pods = [_pod("orders-0", **{"meshxl.io/role": "active"}),
            _pod("orders-1", **{"istio.io/draining": "meshxl"}),
            _pod("orders-2", **{"istio.io/draining": "rollout"}),
            _pod("cart-0", cluster="cart", **{"istio.io/draining": "rollout"}),
            _pod("cart-1", cluster="cart"),
            _pod("cart-9", cluster="cart", **{"istio.io/draining": "meshxl"}),
            _pod("cart-8", cluster="cart")]
    out = {c.pod: dict(c.labels) for c in changes("shop", desired, pods)}
    assert out["orders-0"]["istio.io/draining"] == "meshxl"
    assert out["orders-1"]["istio.io/draining"] is None  # undrained: meshxl's mark goes
    # Someone else's draining mark is neither overwritten nor removed.
    assert "istio.io/draining" not in out["orders-2"]
    assert "cart-0" not in out
    assert out["cart-1"] == {"istio.io/draining": "meshxl"}
    assert out["cart-9"] == {"istio.io/draining": None}  # unknown pod: meshxl's mark goes
    assert "cart-8" not in out


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
