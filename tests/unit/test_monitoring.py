"""deploy/grafana and deploy/prometheus: the dashboard and the rules parse (Prometheus's
own promtool), the alerts fire when they should (promtool's rule unit tests), the
PrometheusRule is the rules file and validates against the CRD's schema, and the
dashboard is provisioning-ready.

That every metric they name is one meshxl exports is checked against live processes
in tests/integration/test_monitoring.py, with the helpers here.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = GRAFANA / "meshxl.json"
RULES = PROMETHEUS / "meshxl-rules.yaml"
RULE_TESTS = PROMETHEUS / "meshxl-rules.test.yaml"
PROMETHEUS_RULE = PROMETHEUS / "prometheusrule.yaml"
SERVICE_MONITOR = PROMETHEUS / "servicemonitor.yaml"
DATASOURCE_VAR = "${datasource}"

#: Grafana's variables, replaced by what they stand for before promtool reads an
#: expression (Grafana substitutes them before Prometheus sees the query).
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "6h",
                     "$cluster": ".*"}

_METRIC = re.compile(r"\bmeshxl_[a-z0-9_]+\b")
_RECORDED = re.compile(r"\bmeshxl:[a-z0-9_:]+\b")
_SELECTOR = re.compile(r"\b(meshxl_[a-z0-9_]+)\{([^}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


# -- what the dashboard and the rules contain ---------------------------------------------


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def rules() -> dict[str, Any]:
    return dict(yaml.safe_load(RULES.read_text()))


def dashboard_panels() -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    found = []
    for panel in dashboard()["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def dashboard_expressions() -> list[tuple[str, str]]:
    """(where, PromQL as Grafana sends it, variables left in) of every query."""
    found = []
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            found.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for annotation in dashboard()["annotations"]["list"]:
        if "expr" in annotation:
            found.append((f"annotation {annotation['name']!r}", annotation["expr"]))
    return found


def rule_expressions() -> list[tuple[str, str]]:
    return [(f"rule {rule.get('record') or rule.get('alert')}", rule["expr"])
            for group in rules()["groups"] for rule in group["rules"]]


def template_queries() -> list[str]:
    """The variables' label_values(...) queries (Grafana syntax, not PromQL)."""
    return [v["definition"] for v in dashboard()["templating"]["list"] if v["type"] == "query"]



def referenced_metrics() -> dict[str, set[str]]:
    """Every meshxl metric name (as a sample name: ``_bucket``, ``_total``...) that the
    dashboard or the rules use -> where."""
    found: dict[str, set[str]] = {}
    sources = [*dashboard_expressions(), *rule_expressions(),
               *(("variable", q) for q in template_queries())]
    for where, expr in sources:
        for name in _METRIC.findall(expr):
            found.setdefault(name, set()).add(where)
    return found


def label_uses(expr: str) -> list[tuple[str, set[str]]]:
    """(label, metrics of the expression) for every label an expression matches on or
    groups by: each must be a label of one of those metrics (or a target label)."""
    metrics = set(_METRIC.findall(expr))
    uses = []
    for _, matchers in _SELECTOR.findall(expr):
        uses += [(label, metrics) for label in _MATCHER.findall(matchers)]
    for group in _GROUPING.findall(expr):
        uses += [(label.strip(), metrics) for label in group.split(",") if label.strip()]
    return uses


# -- promtool -------------------------------------------------------------------------------


def promtool() -> str:
    """Prometheus's promtool: fail (not skip) without it, saying how to install it."""
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is not installed, so the rules and the dashboard's queries "
                    "cannot be checked: run `make setup` (scripts/setup.sh installs "
                    "Debian's prometheus package, which provides /usr/bin/promtool) or "
                    "`apt-get install prometheus`", pytrace=False)
    return found



def test_every_alert_has_a_unit_test_that_fires_it() -> None:
    tested = yaml.safe_load(RULE_TESTS.read_text())
    fired = {case["alertname"] for test in tested["tests"]
             for case in test.get("alert_rule_test", []) if case.get("exp_alerts")}
    alerts = {rule["alert"] for group in rules()["groups"] for rule in group["rules"]
              if "alert" in rule}
    assert alerts - fired == set(), "alerts without a unit test in which they fire"



def test_recorded_series_the_dashboard_reads_are_recorded_by_the_rules() -> None:
    recorded = {rule["record"] for group in rules()["groups"] for rule in group["rules"]
                if "record" in rule}
    used = {name for _, expr in dashboard_expressions() for name in _RECORDED.findall(expr)}
    used |= {name for _, expr in rule_expressions() for name in _RECORDED.findall(expr)}
    assert used and used <= recorded, used - recorded


def test_every_referenced_metric_is_documented() -> None:
    documented = (ROOT / "docs" / "metrics.md").read_text()
    for name in referenced_metrics():
        family = re.sub(r"_(bucket|sum|count|total)$", "", name)
        assert f"`{family}" in documented, f"{name} is not in docs/metrics.md"


def test_burn_rate_alerts_use_the_objective_of_the_slo_file() -> None:
    """The rules' error budget (0.01) and threshold (1 s) are deploy/slo's objective."""
    slos = {doc["metadata"]["name"]: doc for doc in
            yaml.safe_load_all((ROOT / "deploy" / "slo" / "failover.yaml").read_text())}
    [objective] = slos["failover-convergence"]["spec"]["objectives"]
    budget = round(1 - objective["target"], 6)
    assert (objective["op"], objective["value"], budget) == ("lt", 1000, 0.01)
    burns = [r for g in rules()["groups"] for r in g["rules"]
             if r.get("labels", {}).get("slo") == "failover-convergence"]
    assert {r["alert"] for r in burns} == {"MeshxlConvergenceBudgetBurnFast",
                                           "MeshxlConvergenceBudgetBurnSlow"}
    factors = sorted(float(f) for r in burns
                     for f in re.findall(rf"\(([0-9.]+) \* {budget}\)", r["expr"]))
    assert factors == [1, 1, 3, 3, 6, 6, 14.4, 14.4]
    # The SLI counts convergences within 1 s: the bucket at the objective's value.
    for _, expr in rule_expressions():
        for bucket in re.findall(r'_bucket\{le=~"([^"]*)"\}', expr):
            assert re.fullmatch(bucket.replace("\\\\", "\\"), "1.0")
            assert re.fullmatch(bucket.replace("\\\\", "\\"), "1")


# -- the PrometheusRule ----------------------------------------------------------------------



def _validated(model: Any, document: dict[str, Any]) -> Any:
    """Validate against the CRD's pydantic model and check that nothing was dropped:
    the models ignore unknown fields, which would hide a misspelt one."""
    obj = model.model_validate(document)
    assert obj.model_dump(by_alias=True, exclude_unset=True, mode="json") == document
    return obj


def test_prometheus_rule_validates_against_its_crd_schema() -> None:
    from cloudcoil.models.prometheus_operator.v1 import PrometheusRule

    document = yaml.safe_load(PROMETHEUS_RULE.read_text())
    rule = _validated(PrometheusRule, document)
    assert rule.api_version == "monitoring.coreos.com/v1" and rule.kind == "PrometheusRule"
    assert rule.spec is not None and len(rule.spec.groups) == len(rules()["groups"])


def test_crd_schema_refuses_a_broken_rule() -> None:
    """The schema check above has teeth: a bad duration or a rule without expr fails."""
    from cloudcoil.models.prometheus_operator.v1 import PrometheusRule
    from pydantic import ValidationError

    document = yaml.safe_load(PROMETHEUS_RULE.read_text())
    alert = next(r for g in document["spec"]["groups"] for r in g["rules"] if "for" in r)
    alert["for"] = "5 minutes"
    with pytest.raises(ValidationError, match="for"):
        PrometheusRule.model_validate(document)
    alert["for"] = "5m"
    del alert["expr"]
    with pytest.raises(ValidationError, match="expr"):
        PrometheusRule.model_validate(document)
    alert["expr"] = "1"
    alert["anotations"] = {"summary": "misspelt"}
    with pytest.raises(AssertionError):
        _validated(PrometheusRule, document)


def test_service_monitor_validates_and_selects_the_control_plane_service() -> None:
    from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor

    document = yaml.safe_load(SERVICE_MONITOR.read_text())
    _validated(ServiceMonitor, document)
    services = [d for d in yaml.safe_load_all(
        (ROOT / "deploy" / "kubernetes" / "base" / "control-plane.yaml").read_text())
        if d and d["kind"] == "Service"]
    [service] = [s for s in services
                 if document["spec"]["selector"]["matchLabels"].items()
                 <= s["metadata"].get("labels", {}).items()]
    [endpoint] = document["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"


# -- the dashboard --------------------------------------------------------------------------


def test_dashboard_is_provisioning_ready() -> None:
    board = dashboard()
    assert board["uid"] == "meshxl-overview" and len(board["uid"]) <= 40
    assert board["title"] and isinstance(board["schemaVersion"], int)
    assert "id" not in board or board["id"] is None  # provisioning assigns it
    variables = {v["name"]: v for v in board["templating"]["list"]}
    datasource = variables["datasource"]
    assert (datasource["type"], datasource["query"]) == ("datasource", "prometheus")
    for var in variables.values():
        if var["type"] == "query":
            assert var["datasource"]["uid"] == DATASOURCE_VAR

    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    queried = [p for p in panels if p["type"] != "row"]
    assert len(queried) >= 25
    for panel in queried:
        where = f"panel {panel['title']!r}"
        assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE_VAR}, where
        assert panel["targets"], f"{where} has no query"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), where
        for target in panel["targets"]:
            assert target["expr"].strip(), where
            assert target["datasource"]["uid"] == DATASOURCE_VAR, where
        assert panel.get("description"), f"{where} does not say what it shows"
    for annotation in board["annotations"]["list"]:
        if "expr" in annotation:
            assert annotation["datasource"]["uid"] == DATASOURCE_VAR


def test_dashboard_panels_fit_the_grid_without_overlapping() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard_panels():
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


def test_dashboard_covers_what_operators_watch() -> None:
    """Convergence, pushes, ACKs, NACKs, failovers, member states, replication lag,
    session writes and conflicts, etcd availability: each has a panel."""
    used = referenced_metrics()
    on_dashboard = {m for m, where in used.items()
                    if any(w.startswith("panel") for w in where)}
    assert {
        "meshxl_xds_convergence_seconds_bucket", "meshxl_xds_pushes_total",
        "meshxl_xds_ack_duration_seconds_count", "meshxl_xds_nacks_total",
        "meshxl_xds_failovers_total", "meshxl_xds_members",
        "meshxl_statesync_replication_lag_seconds_bucket", "meshxl_statesync_writes_total",
        "meshxl_statesync_write_conflicts_total", "meshxl_xds_etcd_unreachable_seconds",
        "meshxl_statesync_etcd_unreachable_seconds",
    } <= on_dashboard


def test_grafana_provisioning_points_at_the_dashboard_folder() -> None:
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "meshxl.yaml")
                              .read_text())
    assert provider["apiVersion"] == 1
    [entry] = provider["providers"]
    assert entry["type"] == "file" and entry["options"]["path"]
    docs = (ROOT / "docs" / "metrics.md").read_text()
    assert entry["options"]["path"] in docs, "docs/metrics.md must say where to copy it"
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" /
                                  "prometheus.yaml").read_text())
    assert [d["type"] for d in datasources["datasources"]] == ["prometheus"]


def test_label_uses_are_found() -> None:
    """The helper the live check relies on finds matchers and groupings."""
    uses = label_uses('sum by (le, type) (rate(meshxl_xds_nacks_total{type=~"C.*", '
                      'x!="1"}[5m]) * on (instance) group_left (cluster) meshxl_a_info)')
    assert {label for label, _ in uses} == {"le", "type", "x", "instance", "cluster"}
    assert all(metrics == {"meshxl_xds_nacks_total", "meshxl_a_info"} for _, metrics in uses)


# -- on Kubernetes ---------------------------------------------------------------------------



