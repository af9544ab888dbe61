"""The sidecar's signals of a sick member (statesync/signals.py): the bounded windows and
their percentile, the event-loop lag timer, PSI files as Linux writes them, and the
metrics they expose."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from meshxl import stats
from meshxl.local.wait import wait_until
from meshxl.statesync.metrics import StatesyncMetrics
from meshxl.statesync.signals import (
    LoopLag,
    Pressure,
    Signals,
    Window,
    cgroup_v2_path,
    parse_psi_some_avg10,
    pressure_source,
)
from tests.harness.clock import window

# As Linux 5.x/6.x writes them: /proc/pressure/cpu (with a "full" line since 5.13, all
# zeros at the system level) and a cgroup v2 cpu.pressure.
PROC_PRESSURE_CPU = ("some avg10=61.13 avg60=42.02 avg300=24.58 total=1051939945\n"
                     "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
PROC_PRESSURE_CPU_OLD = "some avg10=0.41 avg60=0.18 avg300=0.05 total=123456\n"
CGROUP_CPU_PRESSURE = ("some avg10=3.50 avg60=1.02 avg300=0.31 total=987654\n"
                       "full avg10=2.75 avg60=0.90 avg300=0.20 total=765432\n")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@given(st.lists(st.floats(min_value=0, max_value=1e6), min_size=1, max_size=60))
def test_the_percentile_is_the_reports_one(values: list[float]) -> None:
    clock = Clock()
    window = Window(span=1e9, clock=clock)
    for value in values:
        window.add(value)
    assert window.summary()["p99"] == stats.quantile(values, 0.99)


def test_a_window_keeps_only_its_last_seconds() -> None:
    clock = Clock()
    window = Window(span=10.0, clock=clock)
    assert window.summary() == {"samples": 0}
    assert math.isnan(window.stat("max"))
    for i in range(100):
        window.add(i / 1000)
        clock.now += 0.05
    summary = window.summary()
    assert summary == {"samples": 100, "last": 0.099, "p99": 0.098, "max": 0.099}
    clock.now += 9.0  # the first 80 samples are now older than 10 s
    assert window.summary()["samples"] == 20
    assert window.stat("p99") == 0.099
    clock.now += 10.0
    assert window.summary() == {"samples": 0}
    assert math.isnan(window.stat("last"))


def test_an_unread_window_holds_no_more_than_its_seconds() -> None:
    clock = Clock()
    window = Window(span=1.0, clock=clock)
    for _ in range(100):
        window.add(0.001)
        clock.now += 0.25
    assert len(window._samples) == 5  # the last second, both ends: trimmed, read or not


def test_a_window_is_bounded_in_count() -> None:
    window = Window(span=1e9, limit=16, clock=Clock())
    for i in range(10_000):
        window.add(float(i))
    assert window.summary() == {"samples": 16, "last": 9999.0, "p99": 9999.0, "max": 9999.0}
    window.add(0.5)  # a full window moves on: the summary is made again
    assert window.summary() == {"samples": 16, "last": 0.5, "p99": 9999.0, "max": 9999.0}
    assert window.stat("last") == 0.5


def test_the_loop_lag_keeps_the_window_it_is_given_empty_as_it_is() -> None:
    """A window with no sample yet is falsy (it has a length): it must not be swapped
    for a default one, whose samples its owner would never see."""
    given = Window(span=60.0)
    assert LoopLag(window=given).window is given


async def test_the_loop_lag_rises_when_the_loop_is_blocked() -> None:
    lag = LoopLag(interval=0.02)
    lag.start()
    lag.start()  # once only
    try:
        await wait_until(lambda: lag.window.summary()["samples"] >= 2, what="two samples")
        asyncio.get_running_loop().call_soon(time.sleep, 0.15)  # a callback holds the loop
        await wait_until(lambda: lag.window.summary()["max"] >= 0.12, what="the lag seen")
    finally:
        lag.stop()
    count = len(lag.window)
    await window(0.06, "three sampling intervals")
    assert len(lag.window) == count  # stopped: no more samples


@pytest.mark.parametrize(("text", "avg10"), [
    (PROC_PRESSURE_CPU, 61.13), (PROC_PRESSURE_CPU_OLD, 0.41), (CGROUP_CPU_PRESSURE, 3.5),
    ("full avg10=9.00 avg60=0 avg300=0 total=0\nsome avg10=100.00 avg60=1 avg300=1 total=5",
     100.0),
])
def test_psi_some_avg10_is_read_from_what_linux_writes(text: str, avg10: float) -> None:
    assert parse_psi_some_avg10(text) == avg10


@pytest.mark.parametrize("text", [
    "", "full avg10=1.00 avg60=0.00 avg300=0.00 total=0\n", "some avg60=1.00 total=3\n",
    "some avg10=abc avg60=0.00\n", "some avg10=-1.00 avg60=0.00\n", "some avg10=101.5\n",
    "some avg10=nan\n", "garbage\n",
])
def test_malformed_psi_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_psi_some_avg10(text)


@pytest.mark.parametrize(("text", "path"), [
    ("0::/system.slice/meshxl.service\n", "/system.slice/meshxl.service"),
    ("0::/\n", "/"),
    # cgroup v1 (this machine), then hybrid (v1 controllers with a v2 tree beside them)
    ("12:cpu,cpuacct:/\n9:name=systemd:/\n8:pids:/\n", None),
    ("5:cpu,cpuacct:/kubepods/pod1\n1:name=systemd:/kubepods/pod1\n0::/kubepods/pod1\n",
     "/kubepods/pod1"),
    ("", None),
])
def test_the_cgroup_v2_path_is_found(text: str, path: str | None) -> None:
    assert cgroup_v2_path(text) == path


def _tree(root: Path, cgroup: str | None, system: bool, container: bool) -> None:
    (root / "proc/pressure").mkdir(parents=True)
    if cgroup is not None:
        (root / "proc/self").mkdir(parents=True)
        (root / "proc/self/cgroup").write_text(cgroup)
    if system:
        (root / "proc/pressure/cpu").write_text(PROC_PRESSURE_CPU)
    if container:
        where = root / "sys/fs/cgroup/kubepods/pod1"
        where.mkdir(parents=True)
        (where / "cpu.pressure").write_text(CGROUP_CPU_PRESSURE)


def test_the_containers_pressure_comes_first_then_the_machines(tmp_path: Path) -> None:
    both = tmp_path / "both"
    _tree(both, "0::/kubepods/pod1\n", system=True, container=True)
    source = pressure_source(both)
    assert source == ("cgroup", both / "sys/fs/cgroup/kubepods/pod1/cpu.pressure")
    assert Pressure(source).read() == {"source": "cgroup", "some_avg10": 3.5}
    assert Pressure(source).ratio() == 0.035

    v1 = tmp_path / "v1"
    _tree(v1, "12:cpu,cpuacct:/\n", system=True, container=False)
    assert Pressure(pressure_source(v1)).read() == {"source": "system", "some_avg10": 61.13}

    none = tmp_path / "none"
    _tree(none, None, system=False, container=False)
    assert pressure_source(none) is None
    absent = Pressure(None, find=False)
    assert absent.read() == {"source": None, "some_avg10": None}
    assert math.isnan(absent.ratio())


def test_a_pressure_file_that_vanishes_or_breaks_says_so(tmp_path: Path) -> None:
    path = tmp_path / "cpu.pressure"
    path.write_text("some avg10=x\n")
    broken = Pressure(("cgroup", path)).read()
    assert broken["some_avg10"] is None and "avg10" not in broken["error"].split(":")[0]
    assert str(path) in broken["error"]
    path.unlink()
    gone = Pressure(("cgroup", path)).read()
    assert gone["source"] == "cgroup" and gone["some_avg10"] is None and gone["error"]
    assert math.isnan(Pressure(("cgroup", path)).ratio())


def test_only_write_batches_are_commits() -> None:
    signals = Signals(Pressure(None, find=False))
    signals.on_batch("read", 0.5)
    assert signals.status()["etcd_commit"] == {"samples": 0}
    signals.on_batch("write", 0.004)
    assert signals.status()["etcd_commit"]["max"] == 0.004
    assert signals.status()["event_loop_lag"] == {"samples": 0}
    assert signals.status()["cpu_pressure"] == {"source": None, "some_avg10": None}


def test_the_signals_are_exposed_as_prometheus_text() -> None:
    m = StatesyncMetrics()
    text = m.render().decode()
    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    lag = {s.labels["stat"]: s.value for s in
           parsed["meshxl_statesync_event_loop_lag_seconds"].samples}
    assert set(lag) == {"last", "p99", "max"} and all(math.isnan(v) for v in lag.values())
    m.on_batch("write", 3, 0.012)
    m.on_batch("write", 1, 0.002)
    parsed = {f.name: f for f in text_string_to_metric_families(m.render().decode())}
    commit = {s.labels["stat"]: s.value for s in
              parsed["meshxl_statesync_etcd_commit_seconds"].samples}
    assert commit == {"last": 0.002, "p99": 0.012, "max": 0.012}
    pressure = parsed["meshxl_statesync_cpu_pressure_ratio"].samples
    source = pressure_source()
    if source is None:
        assert pressure == []
    else:
        [sample] = pressure
        assert sample.labels == {"source": source[0]} and 0 <= sample.value <= 1
