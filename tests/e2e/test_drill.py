"""``meshxl drill`` end to end on the deployment ``meshxl demo`` builds, under traffic:
the drill that passes, the one that refuses to start, and the one that aborts midway
and brings the site back."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from meshxl import etcd
from meshxl.local.deployment import CLUSTER, DemoDeployment
from meshxl.local.procs import Owner
from meshxl.local.traffic import Traffic
from meshxl.local.wait import wait_until
from tests.harness.cli import REPO, meshxl, meshxl_json
from tests.harness.clock import LONG_DRAIN_WINDOW
from tests.harness.load import under_way

pytestmark = [pytest.mark.integration, pytest.mark.heavy]

SLO = REPO / "deploy" / "slo" / "failover.yaml"


def slo_file(tmp_path: Path, name: str, takeover_below_ms: float) -> Path:
    """deploy/slo/failover.yaml with the takeover threshold replaced: a loose one so
    the test judges the drill and not this (shared, loaded) machine, or an impossible
    one to see a breach fail the drill."""
    text = SLO.read_text()
    marker = "sli: takeover_ms}}"
    assert marker in text
    head, tail = text.split(marker, 1)
    tail = tail.replace("value: 50\n", f"value: {takeover_below_ms}\n", 1)
    path = tmp_path / name
    path.write_text(head + marker + tail)
    return path


@pytest.fixture
async def deployment(harness: Owner, tmp_path: Path) -> AsyncIterator[DemoDeployment]:
    async with DemoDeployment(tmp_path / "work", trace_dir=tmp_path / "traces",
                              drain_window=LONG_DRAIN_WINDOW) as d:
        harness.own(d.owner)  # its processes' logs in a failure report
        yield d


def etcd_args(d: DemoDeployment) -> list[str]:
    return ["--etcd", d.etcd_url, "--etcd-prefix", d.keys.root]


async def site_admin_present(d: DemoDeployment, site: str) -> bool:
    async with etcd.client(d.etcd_url) as client:
        return await client.get(d.keys.site_admin(site).encode()) is not None


async def test_the_drill_moves_traffic_off_the_site_and_back(
        deployment: DemoDeployment, tmp_path: Path) -> None:
    d = deployment
    assert d.trace_dir is not None
    # Until the drills are done (stopped below; at most 90 s and a bounded count).
    traffic = Traffic(f"{d.url}/counter", 10, time.time() + 90.0, max_requests=9000,
                      trace_file=d.trace_dir / "client.jsonl")
    load = asyncio.create_task(traffic.run())
    await under_way(lambda: traffic.records, 30)
    traces = [a for t in sorted(d.trace_dir.glob("*.jsonl")) for a in ("--traces", str(t))]
    out = tmp_path / "drill"
    code, stdout, stderr = await meshxl(
        "drill", "--site", "dc1", "--duration", "3", "--envoy-admin", d.admin_url,
        "--slo", str(slo_file(tmp_path, "loose.yaml", 2000)), *traces,
        "--output-dir", str(out), *etcd_args(d), timeout=120)
    assert code == 0, f"{stdout}\n{stderr}"
    report = json.loads((out / "drill.json").read_text())
    assert report["result"] == "passed"
    assert [s["step"] for s in report["steps"]] == [
        "preflight", "site offline", "offline converged", "watch", "verify offline",
        "site online", "online converged", "verify online"]
    assert all(s["ok"] for s in report["steps"])
    # Traffic left dc1 while it was offline, and came back.
    t = report["traffic"]
    assert t["moved"] is True and t["during"].get("dc1", 0) == 0 and t["during"]["dc2"] > 0
    assert t["before"]["dc1"] > 0 and t["after"]["dc1"] > 0
    # Failed requests are counted from Envoy's listeners, traces or not.
    assert t["failed_requests"] == 0 and t["answered_requests"] > 0, t
    # The failovers (a and b went site-offline) were traced and judged.
    assert report["slo"]["met"] and report["slo"]["failovers"] >= 1
    assert (out / "timeline.png").read_bytes()[:4] == b"\x89PNG"
    assert "Result: **passed**" in (out / "drill.md").read_text()
    assert not await site_admin_present(d, "dc1")

    # The same drill judged by an objective nobody meets: it fails (exit 1). Once the
    # deployment is healthy again: a member back from the site's outage may still be
    # held behind the others for a moment (returning), which a drill refuses (exit 2).
    async def every_member_ready() -> bool:
        status = await meshxl_json("status", *etcd_args(d))
        return all(m["state"] == "ready" for c in status["clusters"] for m in c["members"])

    await wait_until(every_member_ready, timeout=30, what="every member ready again")
    code, stdout, _ = await meshxl(
        "drill", "--site", "dc1", "--duration", "1", "--envoy-admin", d.admin_url,
        "--slo", str(slo_file(tmp_path, "strict.yaml", 0.001)), *traces,
        "--output-dir", str(tmp_path / "strict"), *etcd_args(d), timeout=120)
    traffic.until = time.time()
    await load
    strict = tmp_path / "strict" / "drill.md"
    assert code == 1, f"{stdout}\n{strict.read_text() if strict.exists() else ''}"
    strict = json.loads((tmp_path / "strict" / "drill.json").read_text())
    assert strict["result"] == "failed" and not strict["slo"]["met"]
    assert all(s["ok"] for s in strict["steps"])  # every step passed: only the SLO failed
    assert traffic.failures == 0
    assert not await site_admin_present(d, "dc1")


async def test_the_drill_refuses_an_unhealthy_deployment(
        deployment: DemoDeployment, tmp_path: Path) -> None:
    d = deployment
    await meshxl_json("member", "down", CLUSTER, "c", "--reason", "repair", *etcd_args(d))
    out = tmp_path / "drill"
    code, _, stderr = await meshxl("drill", "--site", "dc1", "--duration", "1",
                                   "--output-dir", str(out), *etcd_args(d), timeout=60)
    assert code == 2, stderr
    assert "demo/c is admin-down" in stderr
    # c was dc1's only way out: the drill names that too, and changed nothing.
    assert "no ready member outside site dc1" in stderr
    report = json.loads((out / "drill.json").read_text())
    assert report["result"] == "refused" and report["steps"][0]["ok"] is False
    assert not await site_admin_present(d, "dc1")

    code, _, stderr = await meshxl("drill", "--site", "mars", "--duration", "1",
                                   "--output-dir", str(out), *etcd_args(d), timeout=60)
    assert code == 2 and "no member is on site mars" in stderr


async def test_a_drill_that_fails_midway_brings_the_site_back(
        deployment: DemoDeployment, tmp_path: Path) -> None:
    d = deployment
    out = tmp_path / "drill"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshxl.cli", "drill", "--site", "dc1", "--duration", "1",
        "--converge-timeout", "3", "--envoy-admin", d.admin_url, "--output-dir", str(out),
        *etcd_args(d), cwd=REPO, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    assert proc.stdout is not None
    replica = d.replicas[0].process
    assert replica is not None and replica.running
    paused = False
    try:
        # Once the preflight passed, freeze the only control plane: Envoy can never
        # acknowledge the site going offline.
        lines = []
        async with asyncio.timeout(60):
            async for raw in proc.stdout:
                lines.append(raw.decode())
                if "preflight" in lines[-1] and not paused:
                    replica.signal(signal.SIGSTOP)
                    paused = True
            code = await proc.wait()
    finally:
        if paused:
            replica.signal(signal.SIGCONT)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    output = "".join(lines)
    assert paused, output
    assert code == 1, output
    assert "bringing site dc1 back online" in output
    report = json.loads((out / "drill.json").read_text())
    assert report["result"] == "aborted" and report["restored"] is True
    assert "offline converged" in report["abort_reason"]
    assert not await site_admin_present(d, "dc1")
    # With the control plane back, the deployment verifies clean again (once the
    # replica, frozen past its lease, has written its nodes' statuses anew).
    async def clean() -> bool:
        code, out, _ = await meshxl("verify", "--envoy-admin", d.admin_url, "--settle", "15",
                                    *etcd_args(d), "--output", "json")
        return code == 0 and json.loads(out)["ok"]

    await wait_until(clean, timeout=60, interval=1.0, what="a clean verify")
