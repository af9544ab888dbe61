"""The role labels ``meshxl istio label`` writes, and the patches it sends (pure parts)."""

from __future__ import annotations

from typing import Any

import pytest

from meshxl.istio.labeler import KubeApi, KubeApiError, PodLabeler, changes, desired_labels
from meshxl.istio.labels import HA_FAILOVER_PRIORITY, istio_priority, sick_entry
from meshxl.model import RuntimeState, parse_model
from meshxl.model.runtime import AdminAction, Health, Registration

MODEL = parse_model("""
clusters:
  - name: orders
    membership: registered
    sites: [{name: dc1}, {name: dc2}]
    listener: {port: 8080}
  - name: cart
    mode: load-sharing
    degradation: {action: report}
    members: [{name: cart-0, address: 10.0.0.1, port: 80}]
""")


def _pod(name: str, cluster: str = "orders", **labels: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {"meshxl.io/cluster": cluster,
                                                  "meshxl.io/installation": "meshxl",
                                                  **labels}}}


def _state(down: tuple[str, ...] = ()) -> RuntimeState:
    regs = {("orders", n): Registration("10.0.0.1", 8080, site=s)
            for n, s in [("orders-0", "dc1"), ("orders-1", "dc1"), ("orders-2", "dc2")]}
    return RuntimeState(registrations=regs,
                        members_down={("orders", n): AdminAction() for n in down})


def test_only_clusters_whose_labels_steer_istio_are_labelled() -> None:
    """High availability, and load sharing whose degraded members move (not cart)."""
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
    # Load sharing: no role labels; the serving label (off a member meshxl does not
    # send new sessions to) and the draining mark.
    assert cart == {"cart-0": {"meshxl.io/serving": "true", "istio.io/draining": None},
                    "cart-1": {"meshxl.io/serving": None, "istio.io/draining": "meshxl"}}
    assert desired["cart"].unknown == {"meshxl.io/serving": None, "istio.io/draining": None}

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
    assert out["cart-0"] == {"meshxl.io/serving": "true"}  # the rollout mark stays
    assert out["cart-1"] == {"istio.io/draining": "meshxl"}
    assert out["cart-9"] == {"istio.io/draining": None}  # unknown pod: meshxl's mark goes
    assert "cart-8" not in out


# -- sick members (degradation) ------------------------------------------------------------


def _judged(state: RuntimeState, cluster: str, member: str, kind: str = "degraded",
            moves: bool = True, behind: str = "") -> RuntimeState:
    """``state`` with the control plane's judgement of one member (an etcd record)."""
    return RuntimeState(registrations=state.registrations, members_down=state.members_down,
                        sites_offline=state.sites_offline,
                        health={(cluster, member): Health(kind, "p90 400 ms", 1.0, "xds-0",
                                                          moves, behind)})


def _priorities(labels: dict[str, dict[str, Any]], chain: Any) -> dict[str, int]:
    return {n: istio_priority({k: v for k, v in pod.items() if v is not None}, chain)
            for n, pod in labels.items()}


def test_a_predictive_failover_moves_the_role_labels_a_probe_shares_the_tier() -> None:
    """High availability: the labels follow cluster_view, so a degraded active's role
    goes to the member it went behind. The probe before it puts the standby in the
    active's tier: Istio has no small share to give it, so both are labelled active
    (priority 0) while it runs and the hash splits the sessions between them."""
    before = desired_labels(MODEL, _state())["orders"].members
    moved = desired_labels(MODEL, _judged(_state(), "orders", "orders-0",
                                          behind="orders-1"))["orders"].members
    assert {n: labels["meshxl.io/role"] for n, labels in moved.items()} == {
        "orders-0": "standby", "orders-1": "active", "orders-2": "backup"}
    assert _priorities(moved, HA_FAILOVER_PRIORITY) == {"orders-0": 1, "orders-1": 0,
                                                        "orders-2": 2}
    probed = desired_labels(MODEL, _judged(_state(), "orders", "orders-1", kind="probe"))
    assert {n: labels["meshxl.io/role"] for n, labels in probed["orders"].members.items()} \
        == {"orders-0": "active", "orders-1": "active", "orders-2": "backup"}
    assert _priorities(probed["orders"].members, HA_FAILOVER_PRIORITY) == {
        "orders-0": 0, "orders-1": 0, "orders-2": 2}
    # Pinned: not expressed (Istio would keep honouring the probe's pins to the standby).
    pinned = desired_labels(PINNED, _judged(_state(), "orders", "orders-1", kind="probe"))
    assert pinned["orders"].members["orders-1"]["meshxl.io/role"] == "standby"
    reported = _judged(_state(), "orders", "orders-0", moves=False)
    assert desired_labels(MODEL, reported)["orders"].members == before
    # No standby serves: the degraded active keeps its role (a sick member beats none).
    alone = _judged(_state(down=("orders-1", "orders-2")), "orders", "orders-0")
    assert desired_labels(MODEL, alone)["orders"].members["orders-0"]["meshxl.io/role"] \
        == "active"


SHARED_YAML = """
clusters:
  - name: cart
    mode: load-sharing
    stickiness: {header: x-cart}
    members:
      - {name: cart-0, address: 10.0.0.1, port: 80}
      - {name: cart-1, address: 10.0.0.2, port: 80}
      - {name: cart-2, address: 10.0.0.3, port: 80}
"""
SHARED = parse_model(SHARED_YAML)


def test_a_degraded_load_sharing_member_goes_behind_its_peers_until_judged_well() -> None:
    spec = SHARED.cluster("cart")
    chain = sick_entry(spec)
    assert chain == ["meshxl.io/serving=true"]
    well = desired_labels(SHARED, RuntimeState())["cart"]
    assert well.members == {f"cart-{i}": {"meshxl.io/serving": "true"} for i in range(3)}
    assert well.unknown == {"meshxl.io/serving": None}
    sick = desired_labels(SHARED, _judged(RuntimeState(), "cart", "cart-1"))["cart"].members
    assert _priorities(sick, chain) == {"cart-0": 0, "cart-1": 1, "cart-2": 0}
    pods = [_pod(n, "cart", **{"meshxl.io/serving": "true"}) for n in well.members]
    out = {c.pod: dict(c.labels) for c in changes(
        "shop", desired_labels(SHARED, _judged(RuntimeState(), "cart", "cart-1")), pods)}
    assert out == {"cart-1": {"meshxl.io/serving": None}}
    # The judgement ends (its record goes): the label comes back.
    pods[1]["metadata"]["labels"].pop("meshxl.io/serving")
    out = {c.pod: dict(c.labels) for c in changes(
        "shop", desired_labels(SHARED, RuntimeState()), pods)}
    assert out == {"cart-1": {"meshxl.io/serving": "true"}}
    # action report: shown, not moved; action off or report: no label at all.
    reported = desired_labels(SHARED, _judged(RuntimeState(), "cart", "cart-1", moves=False))
    assert reported["cart"].members == well.members
    for action in ("report", "off"):
        model = parse_model(SHARED_YAML.replace("mode: load-sharing",
                                                f"mode: load-sharing\n    degradation: "
                                                f"{{action: {action}}}"))
        assert sick_entry(model.cluster("cart")) == []
        assert desired_labels(model, _judged(RuntimeState(), "cart", "cart-1")) == {}


def test_pinned_degraded_members_leave_istios_eds_while_a_peer_serves() -> None:
    """A pin outlives a change of priority: a degraded member of a pinned cluster gets
    istiod's draining label (load sharing at once, high availability once the active
    role has left it), unless no other member would serve."""
    state = _judged(_state(), "cart", "cart-0")
    cart = desired_labels(PINNED, state)["cart"].members
    assert cart == {"cart-0": {"meshxl.io/serving": None, "istio.io/draining": "meshxl"},
                    "cart-1": {"meshxl.io/serving": "true", "istio.io/draining": None}}
    offline = RuntimeState(registrations=state.registrations, health=state.health,
                           sites_offline={"dc2": AdminAction()})
    cart = desired_labels(PINNED, offline)["cart"].members
    assert cart["cart-0"]["istio.io/draining"] is None  # cart-1 is out: cart-0 serves
    orders = desired_labels(PINNED, _judged(_state(), "orders", "orders-0",
                                            behind="orders-1"))["orders"].members
    assert orders["orders-0"]["meshxl.io/role"] == "standby"
    assert orders["orders-0"]["istio.io/draining"] == "meshxl"
    probe = desired_labels(PINNED, _judged(_state(), "orders", "orders-1", kind="probe"))
    assert all(labels["istio.io/draining"] is None
               for labels in probe["orders"].members.values())


class _Api:
    def __init__(self, pods: list[dict[str, Any]]) -> None:
        self.pods = pods
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def member_pods(self, namespace: str, installation: str) -> list[dict[str, Any]]:
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



def test_outside_a_pod_without_an_api_url_is_a_clear_error(monkeypatch: Any) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(KubeApiError, match="give --kube-api URL"):
        KubeApi()



