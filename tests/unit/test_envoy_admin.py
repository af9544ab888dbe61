"""The one definition of a healthy host, over ``/clusters?format=json`` as Envoy writes it."""

from __future__ import annotations

from typing import Any

import pytest

from meshxl.proxy.admin import FAILURE_FLAGS, Host, parse_clusters, parse_stats


def raw_host(port: int = 8080, eds: str | None = "HEALTHY", **flags: bool) -> dict[str, Any]:
    health: dict[str, Any] = dict(flags)
    if eds is not None:
        health["eds_health_status"] = eds
    return {
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "stats": [{"name": "rq_total", "value": "7"}, {"name": "cx_active", "value": "1"}],
        "health_status": health,
        "weight": 3,
        "priority": 1,
        "locality": {"region": "r", "zone": "dc1"},
        "hostname": "a",
    }


def test_host_fields() -> None:
    host = Host.from_admin(raw_host())
    assert (host.endpoint, host.priority, host.weight, host.zone, host.hostname) == (
        "127.0.0.1:8080", 1, 3, "dc1", "a")
    assert host.rq_total == 7 and host.healthy and not host.draining


@pytest.mark.parametrize("flag", sorted(FAILURE_FLAGS))
def test_each_failure_flag_makes_a_host_unhealthy(flag: str) -> None:
    assert not Host.from_admin(raw_host(**{flag: True})).healthy
    assert Host.from_admin(raw_host(**{flag: False})).healthy


@pytest.mark.parametrize("flag", ["pending_dynamic_removal", "pending_active_hc"])
def test_pending_flags_alone_keep_a_host_healthy(flag: str) -> None:
    assert Host.from_admin(raw_host(**{flag: True})).healthy


def test_degraded_active_check_is_not_healthy() -> None:
    assert "failed_active_degraded_check" in FAILURE_FLAGS


@pytest.mark.parametrize(("eds", "healthy"), [
    ("HEALTHY", True), ("UNKNOWN", True), (None, True), ("DRAINING", False),
    ("UNHEALTHY", False), ("TIMEOUT", False), ("DEGRADED", False)])
def test_eds_status(eds: str | None, healthy: bool) -> None:
    host = Host.from_admin(raw_host(eds=eds))
    assert host.healthy is healthy
    assert host.draining is (eds == "DRAINING")


def test_parse_clusters_and_stats() -> None:
    clusters = parse_clusters({"cluster_statuses": [
        {"name": "c", "host_statuses": [raw_host(1), raw_host(2)]}, {"name": "empty"}]})
    assert {k: [h.port for h in v] for k, v in clusters.items()} == {"c": [1, 2], "empty": []}
    stats = parse_stats({"stats": [{"name": "a", "value": 1},
                                   {"name": "control_plane.identifier", "value": "6b8c5d5f"},
                                   {"name": "h", "histograms": {}}]})
    assert stats == {"a": 1}
