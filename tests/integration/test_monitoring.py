"""Every metric and label the Grafana dashboard and the Prometheus rules use is one a
real control plane and a real statesync sidecar export: both run against real etcd,
with a real Envoy connected, go through what the panels show (a push and its ACK, a
session write, a failover, an etcd outage), and their /metrics pages are read.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import aetcd
import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshxl.etcd.keys import Keys
from meshxl.local.ports import free_ports
from meshxl.local.wait import wait_until
from meshxl.operator.actions import apply_model
from tests.unit.test_monitoring import (
    dashboard_expressions,
    label_uses,
    referenced_metrics,
    rule_expressions,
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
