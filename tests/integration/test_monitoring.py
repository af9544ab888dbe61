"""Every metric and label the Grafana dashboard and the Prometheus rules use is one a
real control plane and a real statesync sidecar export: both run against real etcd,
with a real Envoy connected, go through what the panels show (a push and its ACK, a
session write, a failover, an etcd outage), and their /metrics pages are read.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aetcd
import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from meshxl.etcd.keys import Keys
from meshxl.local.ports import free_ports
from meshxl.local.wait import wait_until
from meshxl.operator.actions import apply_model
from tests.unit.test_monitoring import (
    GRAFANA,
    GRAFANA_VARIABLES,
    PROMETHEUS,
    PROMETHEUS_RULE,
    ROOT,
    RULE_TESTS,
    RULES,
    _validated,
    dashboard,
    dashboard_expressions,
    label_uses,
    promtool,
    referenced_metrics,
    rule_expressions,
    rules,
)

pytestmark = pytest.mark.integration

CLUSTER = "shop"
#: Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"instance", "job"}

Samples = dict[str, list[dict[str, str]]]


async def scrape(url: str) -> tuple[Samples, dict[str, float]]:
    """A /metrics page: sample name -> the label sets it has, and one value per
    ``name{labels}`` for the checks below."""
    async with (aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
                http.get(url) as resp):
        assert resp.status == 200, url
        text = await resp.text()
    samples: Samples = {}
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(dict(sample.labels))
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples, values


def value_is(url: str, key: str, check: Callable[[float], bool]) -> Callable[
        [], Awaitable[bool]]:
    async def probe() -> bool:
        _, values = await scrape(url)
        return key in values and check(values[key])

    return probe


async def test_dashboard_and_rules_use_only_exported_metrics_and_labels(
    etcd: Any, etcd_client: aetcd.Client, control_plane_process: Any, start_envoy: Any,
    start_backends: Any, start_sidecar: Any,
) -> None:
    (lport,) = free_ports(1)
    await apply_model(etcd_client, Keys(), f"""\
clusters:
- name: {CLUSTER}
  membership: registered
  members:
  - {{name: m0, address: 127.0.0.1, port: 1}}
  listener: {{address: 127.0.0.1, port: {lport}}}
  # One member: by default a problem would keep it serving (active-attention); this
  # test wants the failover a problem causes.
  failover: {{all_withdrawn: withdraw}}
""", "test")
    plane = await control_plane_process(etcd=etcd.url).start()
    envoy = await start_envoy("n1", plane.port)
    await envoy.wait_ready()
    xds_url = f"http://127.0.0.1:{plane.admin_port}/metrics"
    (backend,) = await start_backends(["m0"])
    sidecar = await start_sidecar(cluster=CLUSTER, member="m0", etcd=etcd.url,
                                  app_port=backend.endpoint[1])
    sidecar_url = f"{sidecar.url}/metrics"

    # The registration is pushed to the connected Envoy, which ACKs it: a convergence.
    await envoy.wait_hosts(CLUSTER, lambda hosts: len(hosts) == 1, what="m0 advertised")
    await wait_until(value_is(xds_url, "meshxl_xds_convergence_seconds_count",
                              lambda n: n >= 1), timeout=10, what="a convergence observed")
    # Session writes and reads through the sidecar.
    put = await sidecar.put("s1", {"cart": [1]})
    assert put.status in (200, 201), put
    assert (await sidecar.get("s1")).status == 200
    # A failover: the application reports a problem, the member is withdrawn.
    assert (await sidecar.set_problem("db", "primary down")).status in (200, 201, 204)
    member = f'cluster="{CLUSTER}",state="problem"'
    await wait_until(value_is(xds_url, f"meshxl_xds_members{{{member}}}", lambda n: n == 1),
                     timeout=10, what="the member counted in state problem")
    _, values = await scrape(xds_url)
    assert values[f'meshxl_xds_failovers_total{{cause="problem",cluster="{CLUSTER}"}}'] == 1
    assert values[f'meshxl_xds_failovers_total{{cause="lease_expired",cluster="{CLUSTER}"}}'] \
        == 0  # present at zero before any such failover: an alert sees the first one
    assert (await sidecar.clear_problem("db")).status in (200, 204)
    await wait_until(value_is(xds_url, f'meshxl_xds_members{{cluster="{CLUSTER}",state='
                              '"ready"}', lambda n: n == 1), timeout=10, what="m0 ready again")

    xds, xds_values = await scrape(xds_url)
    side, side_values = await scrape(sidecar_url)
    assert side_values[f'meshxl_statesync_member_info{{cluster="{CLUSTER}",member="m0",'
                       'site=""}'] == 1
    assert side_values["meshxl_statesync_ready"] == 1
    assert xds_values["meshxl_xds_etcd_unreachable_seconds"] == 0
    assert side_values["meshxl_statesync_etcd_unreachable_seconds"] == 0
    # The SLI's bucket (le="1.0"), which the rules match as le=~"1(\\.0)?".
    assert "meshxl_xds_convergence_seconds_bucket{le=\"1.0\"}" in xds_values

    exported = {**xds, **side}
    missing = {name: sorted(where) for name, where in referenced_metrics().items()
               if name not in exported}
    assert not missing, f"used but not exported: {missing}"
    for where, expr in [*dashboard_expressions(), *rule_expressions()]:
        for label, metrics in label_uses(expr):
            known = TARGET_LABELS.union(*(labels for name in metrics
                                          for labels in exported.get(name, [])))
            assert label in known, f"{where}: label {label!r} is on none of {sorted(metrics)}"

    # etcd goes away: both say so (the MeshxlEtcdUnreachable alert), and recover.
    await etcd.kill()
    await wait_until(value_is(xds_url, "meshxl_xds_etcd_unreachable_seconds", lambda s: s > 0),
                     timeout=20, what="the control plane sees etcd gone")
    await wait_until(value_is(sidecar_url, "meshxl_statesync_etcd_unreachable_seconds",
                              lambda s: s > 0), timeout=20, what="the sidecar sees etcd gone")
    await etcd.start()
    await wait_until(value_is(xds_url, "meshxl_xds_etcd_unreachable_seconds",
                              lambda s: s == 0), timeout=30, what="the control plane back")
    await wait_until(value_is(sidecar_url, "meshxl_statesync_etcd_unreachable_seconds",
                              lambda s: s == 0), timeout=30, what="the sidecar back")


def test_rules_file_passes_promtool_check() -> None:
    out = run_promtool("check", "rules", RULES)
    assert f"SUCCESS: {len(rule_expressions())} rules found" in out, out


def test_alerts_fire_as_their_unit_tests_say() -> None:
    out = run_promtool("test", "rules", RULE_TESTS)
    assert "SUCCESS" in out, out


def test_promtool_refuses_a_broken_expression(tmp_path: Path) -> None:
    """The dashboard check below would pass vacuously if promtool accepted anything."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [
        {"record": "x:y", "expr": "sum by (le (rate(meshxl_xds_nodes[5m]))"}]}]}))
    proc = subprocess.run([promtool(), "check", "rules", str(bad)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode != 0 and "parse error" in proc.stdout + proc.stderr


def test_dashboard_queries_parse_with_promtool(tmp_path: Path) -> None:
    """Each query, Grafana's variables replaced, as a recording rule for promtool."""
    exprs = dashboard_expressions()
    assert len(exprs) >= 30
    file = tmp_path / "dashboard-queries.yaml"
    file.write_text(yaml.safe_dump({"groups": [{"name": "meshxl-dashboard", "rules": [
        {"record": f"dashboard:query_{i}:check", "expr": promql(expr)}
        for i, (_, expr) in enumerate(exprs)]}]}))
    out = run_promtool("check", "rules", file)
    assert f"SUCCESS: {len(exprs)} rules found" in out, out


def test_prometheus_rule_is_generated_from_the_rules_file() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "prometheus_rule.py"),
                           "--check"], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    generated = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert generated["spec"]["groups"] == rules()["groups"]


def test_kustomizations_render_the_rules_and_the_dashboard() -> None:
    """`kubectl apply -k deploy/prometheus` and `-k deploy/grafana`, as the docs say."""
    import kubernetes_validate
    from cloudcoil.models.prometheus_operator.v1 import PrometheusRule, ServiceMonitor

    from tests.integration.test_manifests import _kustomize

    monitoring = {d["kind"]: d for d in _kustomize(PROMETHEUS)}
    assert set(monitoring) == {"PrometheusRule", "ServiceMonitor"}
    for kind, model in (("PrometheusRule", PrometheusRule), ("ServiceMonitor", ServiceMonitor)):
        assert monitoring[kind]["metadata"]["namespace"] == "meshxl-system"
        _validated(model, monitoring[kind])
    assert monitoring["PrometheusRule"]["spec"]["groups"] == rules()["groups"]

    [configmap] = _kustomize(GRAFANA)
    kubernetes_validate.validate(configmap, kubernetes_validate.latest_version(), strict=True)
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["meshxl.json"]) == dashboard()


def test_exported_metrics_pass_promtool_lint() -> None:
    """Both registries, labelled series included, follow Prometheus's naming rules."""
    from prometheus_client import generate_latest

    from meshxl.statesync.metrics import StatesyncMetrics
    from meshxl.xds.metrics import XdsMetrics

    xds = XdsMetrics()
    xds.know_clusters(["shop"])
    xds.sent("type.googleapis.com/envoy.config.cluster.v3.Cluster", "sotw", 0.001)
    xds.answered("type.googleapis.com/envoy.config.cluster.v3.Cluster", False, 0.002)
    sidecar = StatesyncMetrics()
    sidecar.member.labels("shop", "m0", "").set(1)
    sidecar.on_batch("put", 3, 0.004)
    text = generate_latest(xds.registry) + sidecar.render()
    proc = subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr).decode()


def promql(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a Grafana variable without a stand-in: {expr}"
    return expr


def run_promtool(*args: str | Path) -> str:
    proc = subprocess.run([promtool(), *map(str, args)], capture_output=True, text=True,
                          timeout=120, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"promtool {' '.join(map(str, args))} failed:\n{output}"
    return output
