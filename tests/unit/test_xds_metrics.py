"""The control plane's member-state gauge: every state of every cluster, counted from
the same view the compiler uses, and a cluster gone from the model loses its series."""

from __future__ import annotations

from textwrap import dedent

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from meshxl.model import AdminAction, MemberState, Registration, RuntimeState, parse_model
from meshxl.xds.metrics import XdsMetrics, member_state_counts

MODEL = parse_model(dedent("""
    clusters:
      - name: shop
        membership: registered
        members:
          - {name: a, address: 127.0.0.1, port: 80}
          - {name: b, address: 127.0.0.2, port: 80}
          - {name: c, address: 127.0.0.3, port: 80}
          - {name: d, address: 127.0.0.4, port: 80}
      - name: cart
        members:
          - {name: x, address: 127.0.0.5, port: 80}
    """))


def members(metrics: XdsMetrics) -> dict[tuple[str, str], float]:
    text = generate_latest(metrics.registry).decode()
    return {(s.labels["cluster"], s.labels["state"]): s.value
            for family in text_string_to_metric_families(text)
            if family.name == "meshxl_xds_members" for s in family.samples}


def test_every_state_of_every_cluster_is_counted() -> None:
    runtime = RuntimeState(
        registrations={
            ("shop", "a"): Registration(address="10.0.0.1", port=80, ready=True),
            ("shop", "b"): Registration(address="10.0.0.2", port=80, ready=False),
            ("shop", "c"): Registration(address="10.0.0.3", port=80, ready=True,
                                        problems=("db",)),
        },
        members_down={("cart", "x"): AdminAction(by="ops", reason="patch")})
    counts = member_state_counts(MODEL, runtime)
    assert set(counts) == {(c, str(s)) for c in ("shop", "cart") for s in MemberState}
    nonzero = {k: n for k, n in counts.items() if n}
    # d is listed, has no registration and its cluster needs one: lost.
    assert nonzero == {("shop", "ready"): 1, ("shop", "syncing"): 1, ("shop", "problem"): 1,
                       ("shop", "lost"): 1, ("cart", "admin-down"): 1}
    assert member_state_counts(None, runtime) == {}


def test_gauge_follows_the_counts_and_drops_a_removed_cluster() -> None:
    metrics = XdsMetrics()
    metrics.set_members(member_state_counts(MODEL, RuntimeState()))
    shown = members(metrics)
    assert shown[("cart", "ready")] == 1 and shown[("shop", "lost")] == 4
    assert len(shown) == 2 * len(MemberState)

    only_cart = parse_model(dedent("""
        clusters:
          - name: cart
            members: [{name: x, address: 127.0.0.5, port: 80}]
        """))
    metrics.set_members(member_state_counts(only_cart, RuntimeState()))
    shown = members(metrics)
    assert {c for c, _ in shown} == {"cart"} and shown[("cart", "ready")] == 1


def samples(metrics: XdsMetrics, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    text = generate_latest(metrics.registry).decode()
    return {tuple(sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == name}


def test_nack_and_failover_counters_start_at_zero() -> None:
    """A counter series born at 1 shows no increase() to Prometheus: the first NACK or
    failover would never fire an alert."""
    metrics = XdsMetrics()
    nacks = samples(metrics, "meshxl_xds_nacks_total")
    assert nacks == {(("type", t),): 0.0 for t in (
        "Cluster", "ClusterLoadAssignment", "Listener", "RouteConfiguration")}
    assert samples(metrics, "meshxl_xds_failovers_total") == {}

    metrics.know_clusters(["shop", "cart"])
    metrics.failovers.labels("shop", "problem").inc()
    metrics.know_clusters(["shop"])  # known already: nothing reset
    failovers = samples(metrics, "meshxl_xds_failovers_total")
    causes = {"lease_expired", "not_ready", "problem", "admin_down", "site_offline",
              "degraded"}
    assert {dict(k)["cause"] for k in failovers} == causes
    assert {dict(k)["cluster"] for k in failovers} == {"shop", "cart"}
    assert failovers[(("cause", "problem"), ("cluster", "shop"))] == 1
    assert sum(failovers.values()) == 1
