"""``meshxl istio check``: what makes meshxl's Istio objects ineffective, from a
namespace's objects as ``kubectl get -o yaml`` prints them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml
from click.testing import CliRunner

from meshxl.cli import main
from meshxl.istio import IstioOptions, render_model
from meshxl.istio.check import CheckInputError, check, istio_version_of, load_objects
from meshxl.model import parse_model

MODEL = parse_model("""
clusters:
  - name: orders
    membership: registered
    stickiness: {header: x-session-id}
    listener: {port: 8080}
""")
OPTIONS = IstioOptions(namespace="shop")


def _service(port: int = 8080, target: int = 8080) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "orders", "namespace": "shop"},
            "spec": {"ports": [{"port": port, "targetPort": target}]}}


def _pod(name: str, role: str | None) -> dict[str, Any]:
    labels = {"meshxl.io/cluster": "orders"}
    if role:
        labels["meshxl.io/role"] = role
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "shop", "labels": labels}}


def _istiod(tag: str) -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "istiod", "namespace": "istio-system"},
            "spec": {"template": {"spec": {"containers": [
                {"name": "discovery", "image": f"docker.io/istio/pilot:{tag}"}]}}}}


def _healthy() -> list[dict[str, Any]]:
    return [_service(), *render_model(MODEL, OPTIONS).objects, _pod("orders-0", "active"),
            _pod("orders-1", "standby"), _istiod("1.27.1")]


def _messages(objects: list[dict[str, Any]], **kwargs: Any) -> list[tuple[str, str]]:
    return [(f.level, f.message) for f in check(MODEL, objects, OPTIONS, **kwargs)]


def test_a_healthy_namespace_has_no_findings() -> None:
    assert check(MODEL, _healthy(), OPTIONS) == []


def test_another_destination_rule_for_the_host() -> None:
    other = {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
             "metadata": {"name": "orders-tls", "namespace": "shop"},
             "spec": {"host": "orders", "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"}}}}
    findings = check(MODEL, [*_healthy(), other], OPTIONS)
    assert [(f.level, f.object) for f in findings] == [
        ("error", "DestinationRule shop/orders-tls")]
    assert "Istio keeps one traffic policy per host" in findings[0].message
    # In a client's namespace, a full name wins over meshxl's rule for those clients;
    # a short name there means that namespace's own "orders".
    elsewhere = {**other, "metadata": {"name": "orders-web", "namespace": "web"},
                 "spec": {**other["spec"], "host": "orders.shop.svc.cluster.local"}}
    short = {**other, "metadata": {"name": "local-orders", "namespace": "web"}}
    findings = check(MODEL, [*_healthy(), elsewhere, short], OPTIONS)
    assert [f.object for f in findings] == ["DestinationRule web/orders-web"]


def test_a_port_mismatch() -> None:
    objects = [o for o in _healthy() if o["kind"] != "Service"] + [_service(80, 8080)]
    msgs = _messages(objects)
    assert ("error", "matches port 8080, the Service's ports are 80: the patches apply to "
                     "nothing (render with --services or --port SERVICE_PORT)") in msgs


def test_missing_outlier_detection_and_role_labels() -> None:
    objects = _healthy()
    del objects[1]["spec"]["trafficPolicy"]["outlierDetection"]
    for obj in objects:
        if obj["kind"] == "Pod":
            obj["metadata"]["labels"].pop("meshxl.io/role")
    msgs = [m for level, m in _messages(objects) if level == "error"]
    assert any(m.startswith("no outlierDetection: Istio ignores failoverPriority") for m in msgs)
    assert any("is meshxl istio label running?" in m for m in msgs)


def test_a_load_sharing_cluster_needs_the_serving_entry_and_label() -> None:
    """Degraded members go behind their peers through meshxl.io/serving (docs/istio.md)."""
    model = parse_model("""
clusters:
  - name: orders
    mode: load-sharing
    membership: registered
    stickiness: {header: x-session-id}
    listener: {port: 8080}
""")
    pods = [_pod("orders-0", None), _pod("orders-1", None)]
    pods[0]["metadata"]["labels"]["meshxl.io/serving"] = "true"
    objects = [_service(), *render_model(model, OPTIONS).objects, *pods, _istiod("1.27.1")]
    assert check(model, objects, OPTIONS) == []
    pods[0]["metadata"]["labels"].pop("meshxl.io/serving")
    objects[1]["spec"]["trafficPolicy"]["loadBalancer"]["localityLbSetting"] = {
        "enabled": False}
    found = [(f.level, f.object, f.message) for f in check(model, objects, OPTIONS)]
    assert [(level, obj) for level, obj, _ in found] == [
        ("warning", "DestinationRule shop/meshxl-orders"), ("warning", "Pod shop/orders-0")]
    assert "does not start with meshxl.io/serving=true" in found[0][2]
    assert "is meshxl istio label running?" in found[1][2]


@pytest.mark.parametrize(("tag", "expected"), [
    ("1.21.6", "DestinationRule networking.istio.io/v1 needs 1.22"),
    ("1.26.0", "does not know trafficPolicy.retryBudget (1.27)"),
])
def test_istio_too_old(tag: str, expected: str) -> None:
    objects = [o for o in _healthy() if o["kind"] != "Deployment"] + [_istiod(tag)]
    assert any(expected in m for _, m in _messages(objects))


def test_istio_version_unknown_is_a_warning_and_the_option_wins() -> None:
    objects = [o for o in _healthy() if o["kind"] != "Deployment"]
    assert [lvl for lvl, _ in _messages(objects)] == ["warning"]
    assert _messages(objects, istio_version=(1, 28)) == []
    assert istio_version_of([_istiod("1.27.1-distroless")]) == (1, 27)


def test_mesh_wide_filter_and_virtual_service_retries() -> None:
    objects = _healthy()
    objects[2]["metadata"]["namespace"] = "istio-system"
    vs = {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
          "metadata": {"name": "orders", "namespace": "shop"},
          "spec": {"hosts": ["orders.shop.svc.cluster.local"],
                   "http": [{"retries": {"attempts": 2}}]}}
    options = IstioOptions(namespace="shop", filter_namespace="istio-system")
    msgs = [(f.level, f.message) for f in check(MODEL, [*objects, vs], options)]
    assert all(level == "warning" for level, _ in msgs)
    assert any("without a workloadSelector" in m for _, m in msgs)
    assert any("retryIgnorePreviousHosts: true" in m for _, m in msgs)


def test_load_objects_multi_doc_lists_and_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "ns.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "List",
                                    "items": [_service(), _pod("orders-0", "active")]})
                    + "---\n" + yaml.safe_dump(_istiod("1.27.0")) + "---\n")
    assert [o["kind"] for o in load_objects([path])] == ["Service", "Pod", "Deployment"]
    path.write_text("- 1\n")
    with pytest.raises(CheckInputError, match="not a Kubernetes object"):
        load_objects([path])
    path.write_text("a: [\n")
    with pytest.raises(CheckInputError, match="not YAML"):
        load_objects([path])


def test_check_command(tmp_path: Path) -> None:
    model = tmp_path / "model.yaml"
    model.write_text(yaml.safe_dump(msgspec.to_builtins(MODEL)))
    objects = tmp_path / "ns.yaml"
    objects.write_text(yaml.safe_dump_all(_healthy()))
    ok = CliRunner().invoke(main, ["istio", "check", "-f", str(model), "-n", "shop",
                                   str(objects)])
    assert (ok.exit_code, ok.stdout) == (0, "no problems found\n")
    objects.write_text(yaml.safe_dump_all([*_healthy()[1:-1], _istiod("1.20.0")]))
    bad = CliRunner().invoke(main, ["istio", "check", "-f", str(model), "-n", "shop",
                                    "-o", "json", str(objects)])
    assert bad.exit_code == 1
    report = json.loads(bad.stdout)
    assert report["errors"] >= 2
    table = CliRunner().invoke(main, ["istio", "check", "-f", str(model), "-n", "shop",
                                      str(objects)])
    assert table.exit_code == 1 and "ERROR" in table.stdout
    missing = CliRunner().invoke(main, ["istio", "check", "-f", str(model),
                                        str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 1 and missing.stderr.startswith("meshxl: ")


# -- malformed objects: findings or a clean error, never a crash ------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 70000), st.text(max_size=8))
_trees = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.sampled_from(["spec", "host", "hosts", "ports", "port", "http",
                                     "retries", "trafficPolicy", "configPatches", "match",
                                     "cluster", "portNumber", "labels", "template",
                                     "containers", "image", "workloadSelector", "items",
                                     "outlierDetection", "retryIgnorePreviousHosts",
                                     "env", "name", "value", "route", "destination",
                                     "subset", "applyTo", "listener", "patch",
                                     "istio.io/persistent-session"]),
                    inner, max_size=4)), max_leaves=12)


@st.composite
def _objects(draw: Any) -> dict[str, Any]:
    kind = draw(st.sampled_from(["Service", "DestinationRule", "EnvoyFilter", "Pod",
                                 "VirtualService", "Deployment"]))
    meta: dict[str, Any] = {"name": draw(st.sampled_from(
        ["orders", "meshxl-orders", "meshxl-shop-orders", "istiod", "x"]))}
    if draw(st.booleans()):
        meta["namespace"] = draw(st.sampled_from(["shop", "istio-system", 3]))
    if draw(st.booleans()):
        meta["labels"] = draw(_trees)
    return {"kind": kind, "metadata": meta, "spec": draw(_trees)}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_objects(), max_size=5))
def test_malformed_objects_never_crash_the_check(objects: list[dict[str, Any]]) -> None:
    for model in (MODEL, PINNED):
        findings = check(model, objects, OPTIONS, istio_version=(1, 27))
        assert all(f.level in ("error", "warning") for f in findings)


# -- pinned sessions ----------------------------------------------------------------------------

PINNED = parse_model("""
clusters:
  - name: orders
    membership: registered
    stickiness: {header: x-session-id, pin: {strict: true}}
    listener: {port: 8080}
""")


def _pinned() -> list[dict[str, Any]]:
    return [_service(), *render_model(PINNED, OPTIONS).objects, _pod("orders-0", "active"),
            _pod("orders-1", "standby"), _istiod("1.27.1")]


def _env(objects: list[dict[str, Any]], **env: str) -> list[dict[str, Any]]:
    for obj in objects:
        if obj["kind"] == "Deployment":
            obj["spec"]["template"]["spec"]["containers"][0]["env"] = [
                {"name": k, "value": v} for k, v in env.items()] + [
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "x"}}}]
    return objects


def _labelled(objects: list[dict[str, Any]], **labels: str) -> list[dict[str, Any]]:
    for obj in objects:
        if obj["kind"] == "Service":
            obj["metadata"]["labels"] = labels
    return objects


def test_a_pinned_namespace_has_no_findings() -> None:
    assert check(PINNED, _pinned(), OPTIONS) == []
    assert check(PINNED, _env(_pinned(), PILOT_ENABLE_PERSISTENT_SESSION_FILTER="true"),
                 OPTIONS) == []


def test_istio_persistent_session_labels_on_the_service() -> None:
    objects = _labelled(_pinned(), **{"istio.io/persistent-session": "orders-pin"})
    findings = check(PINNED, objects, OPTIONS)
    assert [(f.level, f.object) for f in findings] == [("error", "Service shop/orders")]
    assert "keeps DRAINING members as pin targets" in findings[0].message
    # Without a pin in the model, Istio would pin what the model does not: a warning.
    objects = _labelled(_healthy(), **{"istio.io/persistent-session-header": "x-pin"})
    assert _messages(objects) == [("warning", check(MODEL, objects, OPTIONS)[0].message)]
    assert "the model has no stickiness.pin" in _messages(objects)[0][1]
    # istiod may rename its labels: the renamed one counts, the default one no longer.
    objects = _env(_labelled(_pinned(), **{"istio.io/persistent-session": "x"}),
                   PILOT_PERSISTENT_SESSION_LABEL="example.com/pin")
    assert check(PINNED, objects, OPTIONS) == []
    objects = _env(_labelled(_pinned(), **{"example.com/pin": "x"}),
                   PILOT_PERSISTENT_SESSION_LABEL="example.com/pin")
    assert [f.level for f in check(PINNED, objects, OPTIONS)] == ["error"]


def test_istiod_with_another_draining_label_keeps_drained_pins() -> None:
    findings = check(PINNED, _env(_pinned(), PILOT_DRAINING_LABEL=""), OPTIONS)
    assert [(f.level, f.object) for f in findings] == [("error", "istiod")]
    assert "PILOT_DRAINING_LABEL is ''" in findings[0].message
    assert check(MODEL, _env(_healthy(), PILOT_DRAINING_LABEL=""), OPTIONS) == []


def test_an_envoy_filter_rendered_before_or_after_the_pin() -> None:
    stale = [o for o in _pinned() if o["kind"] != "EnvoyFilter"] + [
        o for o in render_model(MODEL, OPTIONS).objects if o["kind"] == "EnvoyFilter"]
    assert [(f.level, f.message.split(":")[0]) for f in check(PINNED, stale, OPTIONS)] == [
        ("error", "does not pin sessions (no stateful session filter)")]
    ahead = [o for o in _healthy() if o["kind"] != "EnvoyFilter"] + [
        o for o in render_model(PINNED, OPTIONS).objects if o["kind"] == "EnvoyFilter"]
    assert [f.level for f in check(MODEL, ahead, OPTIONS)] == ["warning"]


def test_a_port_mismatch_of_a_pinned_filter_is_reported_once() -> None:
    objects = [o for o in _pinned() if o["kind"] != "Service"] + [_service(80, 8080)]
    msgs = [m for level, m in (
        (f.level, f.message) for f in check(PINNED, objects, OPTIONS)) if level == "error"]
    assert msgs == ["matches port 8080, the Service's ports are 80: the patches apply to "
                    "nothing (render with --services or --port SERVICE_PORT)"]


def test_strict_pins_and_virtual_service_routes_to_other_destinations() -> None:
    vs = {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
          "metadata": {"name": "orders", "namespace": "shop"},
          "spec": {"hosts": ["orders"], "http": [{"route": [
              {"destination": {"host": "orders"}, "weight": 90},
              {"destination": {"host": "orders", "subset": "canary"}, "weight": 10}]}]}}
    findings = check(PINNED, [*_pinned(), vs], OPTIONS)
    assert [(f.level, f.object) for f in findings] == [("warning", "VirtualService shop/orders")]
    assert findings[0].message.startswith(
        "a route of host orders also goes to orders (subset canary)")
    assert "in strict mode a pin naming a member that destination lacks" in findings[0].message
    vs["spec"]["http"][0]["route"].pop()
    assert check(PINNED, [*_pinned(), vs], OPTIONS) == []


def test_objects_rendered_for_the_istio_in_use_pass_and_others_say_how_to_render() -> None:
    """An Istio before 1.27: what `istio render --istio-version 1.26` makes has no
    retryBudget and passes; the default render's objects are refused, saying so."""
    from dataclasses import replace

    old = [o for o in _healthy() if o["kind"] != "Deployment"]
    for_126 = render_model(MODEL, replace(OPTIONS, istio_version=(1, 26))).objects
    assert not any("retryBudget" in o["spec"].get("trafficPolicy", {}) for o in for_126)
    rendered_for_126 = [o for o in old if o["kind"] not in ("DestinationRule", "EnvoyFilter")]
    assert check(MODEL, [*rendered_for_126, *for_126, _istiod("1.26.3")], OPTIONS) == []
    assert check(MODEL, [*rendered_for_126, *for_126], OPTIONS,
                 istio_version=(1, 26)) == []
    [(level, message)] = _messages([*old, _istiod("1.26.3")])
    assert level == "error" and "retryBudget" in message \
        and "meshxl istio render --istio-version 1.26" in message
