"""Sick members (grey failure): meshxl's degradation beside Envoy's outlier detection alone.

Run: ``.venv/bin/python bench/grayfailure.py [--quick] [--soak SECONDS] [--sessions N]``
(``BENCH_QUICK=1``: quick). docs/faults.md, "Sick members: measured", reads the table.

Each run is a local load-sharing deployment (``DemoDeployment``: etcd, ``meshxl serve
xds``, three members (the sample counter app plus its statesync sidecar each), a real
Envoy; maglev on the session header). A few dozen sessions each send ``POST /counter``
one at a time (every acknowledged POST an acknowledged write, its state in statesync).
After a healthy baseline one member (``b``) turns sick while its health check passes:

* ``cpu``: its app and sidecar are moved into a child cgroup of cgroup v1's cpu
  controller with 5 % of one core (2 % in quick mode; ``meshxl.local.throttle``; a
  SIGSTOP/SIGCONT duty cycle where that controller is missing), as a CPU-starved pod;
* ``latency``: its app answers every request later by 10x the healthy p99;
* ``errors``: its app answers 20 % of the requests 503 (``--faults``,
  ``meshxl.demo.faults``: a file, out of the clients' reach).

Two arms per scenario, in one run, their order alternating from one scenario to the
next: ``outlier``, Envoy's outlier detection alone (``degradation.action: off``;
consecutive 5xx and gateway failures, plus success-rate and failure-percentage ejection
tuned for three members, see :data:`OUTLIER_FIELDS`), and ``meshxl``, the defaults
(``degradation.action: move``). Measured per scenario and arm over the fault window:
seconds whose p99 exceeded the SLO (every request finished in the second, plus every
request still waiting at its end with its age so far, a failed one as infinitely slow;
the SLO is 5x the healthy p99 of the first baseline (the median half-second's), never
under :data:`SLO_FLOOR_MS`),
failed requests, sessions moved (answered by another member than before), acknowledged
writes lost (a counter going back, and the final read-back), the time from the fault to
the member showing in the control plane's ``/v1/status`` ``degraded`` (None: never),
and Envoy's first outlier ejection of it. Then the noise soak (defaults): every member
with normal jitter (a lognormal delay around the healthy median per request, a 50 ms
stall of the whole process now and then) and a kill -9 of a member every
:data:`KILL_EVERY` seconds (restarted after); every DEGRADED verdict there is false.

Targets (issue 40): a 10x latency degradation detected within 3 s; SLO-breach seconds
with meshxl at most a fifth of outlier detection alone (per scenario); 0 acknowledged
writes lost; 0 DEGRADED verdicts in the soak. Until the control plane measures members
(``degradation``), the meshxl arm behaves like the baseline and the detection targets
read NOT MEASURED / MISSED. Writes ``bench/results/grayfailure.json`` (full run only).
Loopback only; every load bounded in time and count; every process killed and the
cgroup removed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
import traceback
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from benchlib import (
    Verdict,
    print_verdicts,
    quick_requested,
    run_benchmark,
    stop_load,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshxl.local.deployment import CLUSTER, DemoDeployment, envoy_hosts  # noqa: E402
from meshxl.local.procs import Owner  # noqa: E402
from meshxl.local.report import lost_writes  # noqa: E402
from meshxl.local.servers import start_etcd  # noqa: E402
from meshxl.local.throttle import CpuThrottle, remove_stale  # noqa: E402
from meshxl.local.traffic import Record, Traffic, read_back  # noqa: E402
from meshxl.local.wait import LocalError, wait_until  # noqa: E402
from meshxl.stats import quantile  # noqa: E402

NAME = "grayfailure"
SCENARIOS = ("cpu", "latency", "errors")
ARMS = ("outlier", "meshxl")
SICK = "b"
CGROUP_PREFIX = "meshxl-grayfailure-"
"""The throttled member's share of one core (its app and sidecar together, ``Plan``):
below what its share of the load needs (a request costs them about 3 ms of CPU), so its
requests queue, as on a CPU-starved pod."""
LATENCY_FACTOR = 10.0
"""The latency fault: every request of the sick member later by this many healthy p99s."""
FAIL_FRACTION = 0.2
SLO_FACTOR = 5.0
SLO_FLOOR_MS = 20.0
KILL_EVERY = 60.0
"""The soak's kill -9 period (seconds; quick: one kill halfway)."""
PAUSE_MS = 50.0
PAUSE_EVERY_S = 15.0
JITTER_SIGMA = 0.5
POLL = 0.1
"""How often the control plane's status and Envoy's hosts are looked at (seconds)."""
SETUP_TIMEOUT = 60.0
TARGET_DETECT_S = 3.0
TARGET_BREACH_RATIO = 0.2

# Envoy's outlier detection alone, tuned for three members as its documentation
# describes the knobs: consecutive 5xx (5, Envoy's default) and gateway failures (3, the
# model's default), and the statistical ejections: success rate needs
# ``success_rate_minimum_hosts`` hosts (default 5) with ``success_rate_request_volume``
# requests each per interval (default 100), both lowered to what this cluster has; with
# three hosts one outlier is at most 1.15 standard deviations from the mean, so the
# default factor (1.9) could never eject it: 1.0. Failure percentage (off by default)
# ejects a member failing 10 % or more of its requests. Interval 1 s (Envoy: 10 s).
OUTLIER_FIELDS = {
    "degradation": "{action: 'off'}",
    "outlier_detection": "{consecutive_5xx: 5, consecutive_gateway_failure: 3, "
                         "interval: 1s, base_ejection_time: 5s, max_ejection_percent: 50}",
    "overrides": "{cluster: {outlierDetection: {enforcingSuccessRate: 100, "
                 "successRateMinimumHosts: 3, successRateRequestVolume: 20, "
                 "successRateStdevFactor: 1000, enforcingFailurePercentage: 100, "
                 "failurePercentageThreshold: 10, failurePercentageMinimumHosts: 3, "
                 "failurePercentageRequestVolume: 20}}}",
}
ARM_FIELDS: dict[str, dict[str, str]] = {"outlier": OUTLIER_FIELDS, "meshxl": {}}


@dataclass(frozen=True)
class Plan:
    """How long each part runs (seconds) and with how much load."""

    sessions: int
    interval: float
    baseline: float
    fault: float
    tail: float
    soak: float
    cpu_share: float
    """The CPU fault's share of one core: the quick run's lighter load needs less."""


FULL = Plan(sessions=30, interval=0.2, baseline=8.0, fault=30.0, tail=3.0, soak=600.0,
            cpu_share=0.05)
QUICK = Plan(sessions=30, interval=0.2, baseline=2.0, fault=4.0, tail=0.5, soak=8.0,
             cpu_share=0.02)


# -- pure parts (tests/unit/test_grayfailure.py) ---------------------------------------------


def arm_order(index: int) -> tuple[str, ...]:
    """The arms of the ``index``-th scenario: alternating which runs first."""
    return ARMS if index % 2 == 0 else tuple(reversed(ARMS))


def per_second_p99(records: Sequence[Record], start: float, end: float,
                   width: float = 1.0) -> list[float | None]:
    """The p99 (seconds) of each whole second (``width``) from ``start`` to ``end``:
    every request that finished in it, plus every request still waiting at its end with
    its age so far (a session stuck on a sick member counts in every second it waits);
    a failed request counts as infinitely slow. None for a second with no request."""
    out: list[float | None] = []
    seconds = int(max(0.0, end - start) / width + 1e-9)
    for k in range(seconds):
        lo, hi = start + k * width, start + (k + 1) * width
        samples = []
        for r in records:
            if r.sent >= hi or r.ended < lo:
                continue
            if r.ended < hi:
                samples.append(r.ended - r.sent if r.ok else float("inf"))
            else:
                samples.append(hi - r.sent)
        out.append(quantile(samples, 0.99) if samples else None)
    return out


def served_per_second(records: Sequence[Record], member: str, start: float, end: float,
                      ) -> list[int]:
    """How many of ``records`` ``member`` answered in each whole second from ``start``
    to ``end`` (by when they were sent): the volume Envoy's outlier detection judges
    it on, per interval, less the failures it retried elsewhere."""
    seconds = int(max(0.0, end - start) + 1e-9)
    counts = [0] * seconds
    for r in records:
        k = int(r.sent - start)
        if r.member == member and r.sent >= start and k < seconds:
            counts[k] += 1
    return counts


def typical_p99(records: Sequence[Record], start: float, end: float) -> float | None:
    """The healthy p99 (seconds): the median of the half-seconds' p99s, so one burst
    of a busy machine does not set the yardstick of the whole run."""
    p99s = [p for p in per_second_p99(records, start, end, width=0.5)
            if p is not None and p != float("inf")]
    return quantile(p99s, 0.5) if p99s else None


def breach_seconds(p99s: Iterable[float | None], slo_s: float) -> int:
    return sum(1 for p in p99s if p is not None and p > slo_s)


def regressions(records: Iterable[Record]) -> int:
    """Acknowledged writes undone while the load ran: a session's acknowledged counter
    must only grow (one request at a time per session)."""
    by_session: dict[str, list[Record]] = {}
    for r in records:
        if r.method == "POST" and r.ok and r.seq is not None:
            by_session.setdefault(r.session, []).append(r)
    lost = 0
    for recs in by_session.values():
        recs.sort(key=lambda r: r.sent)
        for before, after in zip(recs, recs[1:], strict=False):
            assert before.seq is not None and after.seq is not None
            if after.seq <= before.seq:
                lost += before.seq - after.seq + 1
    return lost


def session_moves(records: Iterable[Record], since: float, until: float) -> dict[str, int]:
    """Sessions answered by another member than their previous answer, between ``since``
    and ``until`` (each session's member before ``since`` counts as its previous one):
    ``sessions`` that moved at least once, ``moves`` in all, ``from_sick``."""
    last: dict[str, str] = {}
    moved: set[str] = set()
    moves = from_sick = 0
    for r in sorted((r for r in records if r.ok and r.member), key=lambda r: r.ended):
        if r.sent >= until:
            break
        previous = last.get(r.session)
        assert r.member is not None
        if r.sent >= since and previous is not None and previous != r.member:
            moved.add(r.session)
            moves += 1
            from_sick += previous == SICK
        last[r.session] = r.member
    return {"sessions": len(moved), "moves": moves, "from_sick": from_sick}


def latency_summary_ms(records: Iterable[Record]) -> dict[str, float | None]:
    ok = [(r.ended - r.sent) * 1000 for r in records if r.ok]
    return {q: (round(v, 2) if (v := quantile(ok, p)) is not None else None)
            for q, p in (("p50", 0.5), ("p99", 0.99))}


def degraded_entries(status: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``member -> {since, reason, share}`` of the demo cluster in a control plane's
    ``/v1/status`` (empty while the control plane reports none, or has no such part)."""
    degraded = status.get("degraded")
    if not isinstance(degraded, Mapping):
        return {}
    members = degraded.get(CLUSTER)
    if not isinstance(members, Mapping):
        return {}
    return {str(m): dict(v) if isinstance(v, Mapping) else {} for m, v in members.items()}


def ratio(meshxl: float | None, outlier: float | None) -> float | None:
    """meshxl / outlier (None when either is missing; 0/0 is 1: no difference)."""
    if meshxl is None or outlier is None:
        return None
    if outlier == 0:
        return 1.0 if meshxl == 0 else None
    return round(meshxl / outlier, 3)


def compare(arms: Mapping[str, Mapping[str, Any]]) -> dict[str, float | None]:
    keys = ("breach_seconds", "failed", "sessions_moved", "lost")
    return {k: ratio(arms["meshxl"][k], arms["outlier"][k]) for k in keys}


# -- observing -------------------------------------------------------------------------------


class Watcher:
    """Polls the control plane's ``/v1/status`` and Envoy's hosts every :data:`POLL`
    seconds: when each member first showed as degraded (and every distinct verdict),
    when each member was ejected (every onset: one during the baseline, which a busy
    machine's load can cause, must not hide the fault's), and its EDS weight over time."""

    def __init__(self, d: DemoDeployment) -> None:
        self.d = d
        self.first_degraded: dict[str, float] = {}
        self.verdicts: dict[tuple[str, Any], dict[str, Any]] = {}
        self.ejections: dict[str, list[float]] = {}
        """Per member, each time it was seen ejected after being seen in service."""
        self._ejected: set[str] = set()
        self.weights: list[tuple[float, dict[str, int]]] = []
        self.status_errors = 0
        self.reports_degraded = False
        """Whether the control plane's status has a ``degraded`` part at all."""
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        admin = self.d.replicas[0].admin_url
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as http:
            while True:
                now = time.time()
                try:
                    async with http.get(f"{admin}/v1/status") as resp:
                        status = await resp.json(content_type=None)
                    self.reports_degraded |= isinstance(status, Mapping) and \
                        "degraded" in status
                    for member, entry in degraded_entries(status).items():
                        self.first_degraded.setdefault(member, now)
                        self.verdicts.setdefault((member, entry.get("since")),
                                                 {"member": member, "seen": now, **entry})
                except (aiohttp.ClientError, TimeoutError, ValueError):
                    self.status_errors += 1
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError,
                                         LocalError, OSError):
                    hosts = await envoy_hosts(self.d.admin_url)
                    self.weights.append((now, {h.hostname: h.weight for h in hosts}))
                    ejected = {h.hostname for h in hosts if "failed_outlier_check" in h.flags}
                    for member in ejected - self._ejected:
                        self.ejections.setdefault(member, []).append(now)
                    self._ejected = ejected
                await asyncio.sleep(POLL)

    def weight_share(self, member: str, since: float) -> float | None:
        """The member's lowest share of the cluster's weight seen since ``since``."""
        shares = [w[member] / sum(w.values()) for t, w in self.weights
                  if t >= since and member in w and sum(w.values()) > 0]
        return round(min(shares), 3) if shares else None


# -- one run ---------------------------------------------------------------------------------


def fault_values(scenario: str, healthy_p99_ms: float) -> dict[str, float]:
    if scenario == "latency":
        return {"delay_ms": round(LATENCY_FACTOR * healthy_p99_ms, 1)}
    if scenario == "errors":
        return {"fail_fraction": FAIL_FRACTION}
    return {}


async def run_one(top: Owner, etcd_url: str, scenario: str, arm: str, plan: Plan,
                  calibration: dict[str, float]) -> dict[str, Any]:
    """One scenario under one arm on a fresh deployment."""
    d = DemoDeployment(top.root / f"{scenario}-{arm}", mode="load-sharing", etcd_url=etcd_url,
                       fields=ARM_FIELDS[arm], faults=True)
    top.own(d.owner)
    watcher = Watcher(d)
    traffic: Traffic | None = None
    load: asyncio.Task[None] | None = None
    step = "starting the deployment"
    try:
        async with asyncio.timeout(SETUP_TIMEOUT):
            await d.start()
        watcher.start()
        # The traffic's bound: the run's phases, after at most SETUP_TIMEOUT for every
        # session's first answer (a busy machine's first connections are slow).
        budget = SETUP_TIMEOUT + plan.baseline + plan.fault + plan.tail + 2.0
        traffic = Traffic(f"{d.url}/counter", plan.sessions, time.time() + budget,
                          max_requests=int(plan.sessions * budget / plan.interval) + 100,
                          interval=plan.interval, prefix=scenario[0])
        load = asyncio.create_task(traffic.run())
        step = "every session's first answer"
        await wait_until(lambda: len({r.session for r in traffic.records if r.ok})
                         == plan.sessions, timeout=SETUP_TIMEOUT,
                         what="every session answered once")
        started = time.time()
        step = "healthy baseline"
        await asyncio.sleep(plan.baseline)
        warm = started + min(1.0, plan.baseline / 3)
        baseline = [r for r in traffic.records if r.sent >= warm]
        if not calibration:
            healthy = latency_summary_ms(baseline)
            typical = typical_p99(traffic.records, warm, time.time())
            if typical is None or healthy["p50"] is None or healthy["p99"] is None:
                raise LocalError("no successful request in the healthy baseline")
            p99_ms = round(typical * 1000, 2)
            calibration.update(healthy_p50_ms=healthy["p50"], healthy_p99_ms=p99_ms,
                               baseline_p99_ms=healthy["p99"],
                               slo_ms=round(max(SLO_FLOOR_MS, SLO_FACTOR * p99_ms), 1))
        step = f"the {scenario} fault on member {SICK}"
        values: dict[str, Any] = fault_values(scenario, calibration["healthy_p99_ms"])
        sick = d.member(SICK)
        fault_start = time.time()
        if scenario == "cpu":
            assert sick.app is not None and sick.sidecar is not None
            pids = [p for p in (sick.app.pid, sick.sidecar.pid) if p is not None]
            async with CpuThrottle(f"{CGROUP_PREFIX}{os.getpid()}", pids,
                                   share=plan.cpu_share) as throttle:
                await asyncio.sleep(plan.fault)
            values = {"cpu_share": plan.cpu_share, "throttle": throttle.mode}
        else:
            d.set_faults(SICK, **values)
            await asyncio.sleep(plan.fault)
            d.set_faults(SICK)
        fault_end = time.time()
        step = "after the fault"
        await asyncio.sleep(plan.tail)
        traffic.until = time.time()
        async with asyncio.timeout(15.0):
            await load
        step = "reading every session back"
        final, _ = await read_back(f"{d.url}/counter", traffic.sessions)
    except (LocalError, TimeoutError, OSError) as exc:
        traceback.print_exc()
        raise SystemExit(f"{scenario}/{arm}: failed {step}: {exc!r}\n{d.owner.report()}") \
            from None
    finally:
        await stop_load(load, traffic)
        await watcher.stop()
        await d.close()
    records = traffic.records
    window = [r for r in records if fault_start <= r.sent < fault_end]
    p99s = per_second_p99(records, fault_start, fault_end)
    slo_s = calibration["slo_ms"] / 1000
    detected = watcher.first_degraded.get(SICK)
    ejections = watcher.ejections.get(SICK, [])
    ejected = next((t for t in ejections if t >= fault_start), None)
    served = [r for r in window if r.ok]
    return {
        "scenario": scenario, "arm": arm, "fault": values,
        "requests": len(window), "failed": sum(1 for r in window if not r.ok),
        "failed_total": sum(1 for r in records if not r.ok),
        "breach_seconds": breach_seconds(p99s, slo_s), "seconds": len(p99s),
        "p99_ms_per_second": [None if p is None else
                              (None if p == float("inf") else round(p * 1000, 1))
                              for p in p99s],
        "latency_ms": latency_summary_ms(window),
        "sick_latency_ms": latency_summary_ms(r for r in window if r.member == SICK),
        "others_latency_ms": latency_summary_ms(r for r in window if r.member != SICK),
        "sessions_moved": session_moves(records, fault_start, fault_end)["sessions"],
        "moves": session_moves(records, fault_start, fault_end),
        "lost": regressions(records) + sum(lost_writes(records, final).values()),
        "detect_s": None if detected is None or detected < fault_start
        else round(detected - fault_start, 2),
        "degraded_before_fault": detected is not None and detected < fault_start,
        "ejected_s": None if ejected is None else round(ejected - fault_start, 2),
        "ejected_before_fault": any(t < fault_start for t in ejections),
        "sick_served_per_second": served_per_second(served, SICK, fault_start, fault_end),
        "sick_share_served": round(sum(1 for r in served if r.member == SICK)
                                   / max(1, len(served)), 3),
        "sick_lowest_weight_share": watcher.weight_share(SICK, fault_start),
        "verdicts": list(watcher.verdicts.values()),
        "control_plane_reports_degraded": watcher.reports_degraded,
    }


async def soak(top: Owner, etcd_url: str, plan: Plan, calibration: dict[str, float],
               quick: bool) -> dict[str, Any]:
    """The defaults under normal noise and periodic kill -9: every verdict is false."""
    d = DemoDeployment(top.root / "soak", mode="load-sharing", etcd_url=etcd_url, faults=True)
    top.own(d.owner)
    watcher = Watcher(d)
    traffic: Traffic | None = None
    load: asyncio.Task[None] | None = None
    kills: list[dict[str, Any]] = []
    step = "starting the deployment"
    noise = {"jitter_ms": calibration["healthy_p50_ms"], "jitter_sigma": JITTER_SIGMA,
             "pause_ms": PAUSE_MS, "pause_every_s": PAUSE_EVERY_S}
    every = plan.soak / 2 if quick else KILL_EVERY
    try:
        async with asyncio.timeout(SETUP_TIMEOUT):
            await d.start()
        for m in d.members:
            d.set_faults(m.name, **noise)
        watcher.start()
        started = time.time()
        budget = plan.soak + 2.0
        traffic = Traffic(f"{d.url}/counter", plan.sessions, started + budget,
                          max_requests=int(plan.sessions * budget / plan.interval) + 100,
                          interval=plan.interval, prefix="n")
        load = asyncio.create_task(traffic.run())
        end = started + plan.soak
        k = 0
        while time.time() + every <= end + 0.01 and k < 1000:
            await asyncio.sleep(max(0.0, started + every * (k + 1) - time.time()))
            victim = d.members[k % len(d.members)].name
            step = f"kill -9 of member {victim}"
            killed = await d.kill_member(victim)
            await d.reap_member(victim)
            await d.start_member(d.member(victim))
            await d.wait_all_healthy(timeout=30)
            kills.append({"member": victim, "at_s": round(killed - started, 1),
                          "back_after_s": round(time.time() - killed, 2)})
            k += 1
        step = "the rest of the soak"
        await asyncio.sleep(max(0.0, end - time.time()))
        traffic.until = time.time()
        async with asyncio.timeout(15.0):
            await load
        step = "reading every session back"
        final, _ = await read_back(f"{d.url}/counter", traffic.sessions)
    except (LocalError, TimeoutError, OSError) as exc:
        traceback.print_exc()
        raise SystemExit(f"soak: failed {step}: {exc!r}\n{d.owner.report()}") from None
    finally:
        await stop_load(load, traffic)
        await watcher.stop()
        await d.close()
    records = traffic.records
    p99s = per_second_p99(records, started, end)
    return {"seconds": round(plan.soak, 1), "noise": noise, "kills": kills,
            "requests": len(records), "failed": sum(1 for r in records if not r.ok),
            "breach_seconds": breach_seconds(p99s, calibration["slo_ms"] / 1000),
            "latency_ms": latency_summary_ms(records),
            "lost": regressions(records) + sum(lost_writes(records, final).values()),
            "degraded_verdicts": len(watcher.verdicts),
            "verdicts": list(watcher.verdicts.values()),
            "outlier_ejections": sum(len(t) for t in watcher.ejections.values()),
            "control_plane_reports_degraded": watcher.reports_degraded,
            "status_errors": watcher.status_errors}


async def run(work: Path, plan: Plan, quick: bool) -> dict[str, Any]:
    remove_stale(CGROUP_PREFIX)  # what a killed run left behind
    top = Owner(work, grace=3.0)
    calibration: dict[str, float] = {}
    scenarios: dict[str, dict[str, Any]] = {}
    try:
        etcd_url, _ = await start_etcd(top)
        for i, scenario in enumerate(SCENARIOS):
            arms: dict[str, Any] = {}
            for arm in arm_order(i):
                t0 = time.perf_counter()
                arms[arm] = await run_one(top, etcd_url, scenario, arm, plan, calibration)
                print(f"  {scenario} / {arm}: {time.perf_counter() - t0:.1f} s", flush=True)
            scenarios[scenario] = {"order": list(arm_order(i)), "arms": arms,
                                   "ratios": compare(arms)}
        soaked = None
        if plan.soak > 0:
            t0 = time.perf_counter()
            soaked = await soak(top, etcd_url, plan, calibration, quick)
            print(f"  soak: {time.perf_counter() - t0:.1f} s", flush=True)
    finally:
        await top.aclose()
    return {"plan": plan.__dict__, "sick_member": SICK, "calibration": calibration,
            "slo": f"{SLO_FACTOR:g}x the healthy p99 of the first baseline (its median "
                   f"half-second's; at least {SLO_FLOOR_MS:g} ms)",
            "scenarios": scenarios, "soak": soaked}


# -- verdicts and the table ------------------------------------------------------------------


def verdicts(res: Mapping[str, Any]) -> list[Verdict]:
    out: list[Verdict] = []
    scenarios = res.get("scenarios", {})
    latency = scenarios.get("latency", {}).get("arms", {}).get("meshxl", {})
    if latency:
        detect, note = latency.get("detect_s"), ""
        if detect is None and latency.get("control_plane_reports_degraded"):
            # judged by a control plane that reports degraded members, never found:
            # at least the whole fault window
            detect = float(latency["seconds"])
            note = f"not degraded within the {latency['seconds']} s fault (shown as that)"
        elif detect is None:
            note = "the control plane reports no degraded members"
        out.append(Verdict("latency 10x: detected (meshxl)", detect, TARGET_DETECT_S, "s",
                           note=note))
    for name, sc in scenarios.items():
        arms = sc["arms"]
        o, m = arms["outlier"]["breach_seconds"], arms["meshxl"]["breach_seconds"]
        measured = (0.0 if m == 0 else None) if o == 0 else round(m / o, 3)
        out.append(Verdict(f"{name}: SLO-breach seconds meshxl/outlier", measured,
                           TARGET_BREACH_RATIO, "x", reference=f"outlier {o} s, meshxl {m} s",
                           note="" if o else "outlier detection alone breached no second"))
    lost = sum(a["lost"] for sc in scenarios.values() for a in sc["arms"].values())
    soaked = res.get("soak")
    if soaked:
        lost += soaked["lost"]
    out.append(Verdict("acknowledged writes lost (every run)", lost, 0, "writes"))
    if soaked:
        out.append(Verdict("soak: DEGRADED verdicts (false moves)", soaked["degraded_verdicts"],
                           0, "moves", reference=f"{soaked['seconds']:g} s, "
                           f"{len(soaked['kills'])} kill -9"))
    return out


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if value < 10 else f"{value:.1f}"
    return str(value)


def print_report(res: Mapping[str, Any], verdict_list: Sequence[Verdict]) -> None:
    cal = res["calibration"]
    print(f"\n== sick member {res['sick_member']} of 3, load sharing, maglev, "
          f"{res['plan']['sessions']} sessions; SLO {cal.get('slo_ms')} ms ({res['slo']}); "
          f"healthy p50 {cal.get('healthy_p50_ms')} ms, p99 {cal.get('healthy_p99_ms')} ms")
    head = (f"  {'scenario':<8} {'arm':<8} {'breach s':>8} {'of s':>5} {'failed':>6} "
            f"{'moved':>6} {'lost':>5} {'detect s':>8} {'eject s':>8} {'sick share':>10} "
            f"{'p99 ms':>8}")
    print(head)
    for name, sc in res["scenarios"].items():
        for arm in ARMS:
            a = sc["arms"][arm]
            print(f"  {name:<8} {arm:<8} {a['breach_seconds']:>8} {a['seconds']:>5} "
                  f"{a['failed']:>6} {a['sessions_moved']:>6} {a['lost']:>5} "
                  f"{_fmt(a['detect_s']):>8} {_fmt(a['ejected_s']):>8} "
                  f"{_fmt(a['sick_share_served']):>10} {_fmt(a['latency_ms']['p99']):>8}")
        r = sc["ratios"]
        print(f"  {name:<8} {'ratio':<8} {_fmt(r['breach_seconds']):>8} {'':>5} "
              f"{_fmt(r['failed']):>6} {_fmt(r['sessions_moved']):>6} {_fmt(r['lost']):>5}"
              f"   (meshxl / outlier; order {' then '.join(sc['order'])})")
    soaked = res.get("soak")
    if soaked:
        print(f"  soak {soaked['seconds']:g} s: {soaked['requests']} requests, "
              f"{soaked['failed']} failed, {soaked['breach_seconds']} breach s, "
              f"{len(soaked['kills'])} kill -9, {soaked['lost']} lost, "
              f"{soaked['degraded_verdicts']} DEGRADED verdicts, "
              f"{soaked['outlier_ejections']} ejections by Envoy")
    faults = {name: sc["arms"]["outlier"]["fault"] for name, sc in res["scenarios"].items()}
    print(f"  faults on {res['sick_member']}: {faults}")
    print_verdicts("sick members", verdict_list)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a few seconds per scenario, a short soak (about a minute); "
                             "writes no results file")
    parser.add_argument("--soak", type=float, metavar="SECONDS",
                        help=f"the noise soak (default {FULL.soak:g}; quick {QUICK.soak:g}; "
                             "0: none)")
    parser.add_argument("--sessions", type=int, help=f"sessions (default {FULL.sessions}; "
                                                     f"quick {QUICK.sessions})")
    parser.add_argument("--output", type=Path,
                        help="also write the results here (JSON; the quick run's only file)")
    args = parser.parse_args(argv)
    quick = quick_requested(args.quick)
    plan = QUICK if quick else FULL
    if args.soak is not None:
        if not 0 <= args.soak <= 24 * 3600:
            parser.error("--soak must be within 0..86400 seconds")
        plan = Plan(**{**plan.__dict__, "soak": args.soak})
    if args.sessions is not None:
        if not 3 <= args.sessions <= 500:
            parser.error("--sessions must be within 3..500")
        plan = Plan(**{**plan.__dict__, "sessions": args.sessions})
    return run_benchmark(NAME, quick, "meshxl-bench-grayfailure-",
                         lambda work: run(work, plan, quick), verdicts, print_report,
                         write=not quick, output=args.output)


if __name__ == "__main__":
    sys.exit(main())
