"""``bench/grayfailure.py --quick`` end to end, as a user runs it (the smoke run of the
sick-member measurement): real etcd, control plane, sidecars, sample apps and Envoy on
loopback, each fault injected into one member of three under sticky session load.

What must hold whatever the control plane does about sick members: every scenario ran
both arms under load and no acknowledged write was lost; each fault was felt (the CPU
and latency faults breach the SLO under outlier detection alone, which cannot see
latency; Envoy ejects the member failing 20 % of its requests); the soak killed a member
and lost nothing. Once the control plane reports degraded members, the member failing
a fifth of its requests must be among them within 4.5 s and the soak must show no
verdict. (The latency scenario's detection is reported, not asserted here: a member
slowed so much that its sessions send it fewer than ``min_requests`` per ``detect`` is
not judged yet, docs/faults.md, "Sick members: measured".)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from meshxl.model.traffic import Retries
from tests.harness.clock import scaled

pytestmark = [pytest.mark.integration, pytest.mark.heavy]

BENCH = Path(__file__).resolve().parents[2] / "bench" / "grayfailure.py"
RUN_TIMEOUT = scaled(240.0)
"""A sanity bound on the quick run (about a minute and a half on two busy cores)."""


def test_the_quick_grayfailure_run(tmp_path: Path) -> None:
    out = tmp_path / "grayfailure.json"
    done = subprocess.run([sys.executable, str(BENCH), "--quick", "--output", str(out)],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text
    res = json.loads(out.read_text())
    assert res["quick"] is True and "SLO-breach seconds" in done.stdout

    assert set(res["scenarios"]) == {"cpu", "latency", "errors"}
    orders = [sc["order"] for sc in res["scenarios"].values()]
    assert orders[0] == orders[2] == list(reversed(orders[1])), orders
    for name, sc in res["scenarios"].items():
        for arm in ("outlier", "meshxl"):
            a = sc["arms"][arm]
            assert a["requests"] > 50, (name, arm, a)
            assert a["lost"] == 0, (name, arm, a)
            assert a["seconds"] >= 3, (name, arm, a)
    outlier = {name: sc["arms"]["outlier"] for name, sc in res["scenarios"].items()}
    # The starved member answers much slower than its peers in the same seconds (its
    # sessions' p99 breaches the SLO whenever maglev gave it enough of them); the
    # delayed one always breaches it. Peers of the same seconds, not the calibration:
    # on two cores shared with the rest of the suite, a calibration taken in a busy
    # moment answered at 519 ms p50, and the starved member's 1,517 ms was not 3x that.
    cpu = outlier["cpu"]
    assert cpu["sick_latency_ms"]["p50"] > 2 * cpu["others_latency_ms"]["p50"], cpu
    # The delay is 10 healthy p99s: a calibration taken in a busy moment of the suite
    # (453 ms p99) made it 4.5 s, past the route's per-try timeout, so every delayed
    # request was cut and answered by another member within the SLO (5 p99s): no breach
    # to see. Judged where the delayed answers reach the clients.
    latency = outlier["latency"]
    if latency["fault"]["delay_ms"] < 1000 * Retries().per_try_timeout:
        assert latency["breach_seconds"] >= 1, latency
    # Envoy's failure-percentage ejection judges a host in an interval (1 s) in which it
    # had 20 requests. A second in which the sick member answered 20 gave it about 25
    # (its 503s, retried elsewhere, are not among those answers), and 20 % of 25 falls
    # under the 10 % threshold about once in ten: three such seconds make a missed
    # ejection about a 0.1 % event (a quiet machine's quick run has four). A slow
    # machine's may give the sick member fewer, or its timeouts may eject it during the
    # baseline, out past the fault's few seconds.
    errs = outlier["errors"]
    judged = sum(1 for n in errs["sick_served_per_second"] if n >= 20)
    if judged >= 3 and not errs["ejected_before_fault"]:
        assert errs["ejected_s"] is not None, {k: errs[k] for k in (
            "sick_served_per_second", "ejected_before_fault", "requests", "failed",
            "seconds")}
    # Envoy retries the injected 503s on another member: clients see few failures.
    assert outlier["errors"]["failed"] <= 0.05 * outlier["errors"]["requests"]

    soak = res["soak"]
    assert soak["kills"] and soak["lost"] == 0 and soak["requests"] > 100, soak
    verdicts = {v["name"]: v for v in res["verdicts"]}
    assert verdicts["acknowledged writes lost (every run)"]["met"] is True

    errors = res["scenarios"]["errors"]["arms"]["meshxl"]
    if errors["control_plane_reports_degraded"]:
        # Judged by its failed share, at least 5 points above its peers' in each of
        # detect's three half-second windows: ~25 requests a window at a 20 % failure
        # rate leave a window under that now and then (binomial), and each such window
        # costs up to 1.5 s more (3.21 s seen in a full suite run; 1.48 s in the full
        # bench). The 3 s is a 10x latency's, measured by the full bench.
        # With fewer than ~20 a window (a slow machine's quick run: 10 seen, the sick
        # member then shows no failure in a window one time in ten, and three windows in
        # a row with one are not there within the fault's 4 s), the judge rightly waits:
        # asserted only where the volume makes a judgement due, as for Envoy's above.
        per_window = errors["requests"] * errors["sick_share_served"] / max(
            1, errors["seconds"]) / 2
        if per_window >= 20:
            assert errors["detect_s"] is not None and errors["detect_s"] <= scaled(4.5), \
                (per_window, errors)
        assert not errors["degraded_before_fault"], errors
        assert soak["degraded_verdicts"] == 0, soak["verdicts"]
    else:  # no degradation in the control plane yet: nothing may show as degraded
        assert errors["detect_s"] is None and soak["degraded_verdicts"] == 0
    # outlier detection alone never reports a member degraded
    assert all(sc["arms"]["outlier"]["detect_s"] is None for sc in res["scenarios"].values())
    assert not list(Path("/sys/fs/cgroup/cpu").glob("meshxl-grayfailure-*"))
