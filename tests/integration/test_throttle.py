"""CPU throttling of real processes (``meshxl.local.throttle``): a busy process and its
child get about the share asked for, through cgroup v1's cpu controller and through the
SIGSTOP/SIGCONT fallback alike, and everything is undone on exit (the child cgroup
removed, the processes running at full speed again), also when the block raises."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from meshxl.local.procs import Owner
from meshxl.local.throttle import (
    CGROUP_CPU,
    CpuThrottle,
    ThrottleError,
    cgroup_unavailable,
    duty_cycle,
    quota_us,
    remove_stale,
)
from meshxl.local.wait import wait_until
from tests.harness.clock import window

pytestmark = [pytest.mark.integration, pytest.mark.heavy]

# A busy parent with a busy child: a member's app and what it started.
BUSY = ("import os, time\n"
        "os.fork()\n"
        "while True: pass\n")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return out


async def busy_pair(harness: Owner) -> list[int]:
    proc = harness.spawn(harness.unique_name("busy"), [sys.executable, "-c", BUSY])
    assert proc.pid is not None
    kids = await wait_until(lambda: children(proc.pid), interval=0.02,
                            what="the busy process to fork")
    return [proc.pid, *kids]


async def used(pids: list[int], seconds: float) -> float:
    """CPU seconds per second the processes used over ``seconds``."""
    before = sum(cpu_seconds(p) for p in pids)
    await asyncio.sleep(seconds)  # the window measured (a rate: its length divides)
    return (sum(cpu_seconds(p) for p in pids) - before) / seconds


def test_quota_and_duty_cycle_follow_the_share() -> None:
    assert quota_us(0.05) == 5_000 and quota_us(1.0) == 100_000
    assert quota_us(0.001) == 1_000  # the kernel's smallest quota
    assert duty_cycle(0.05) == pytest.approx((0.005, 0.095))
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ThrottleError):
            quota_us(bad)


@pytest.mark.parametrize("mode", ["cgroup", "sigstop"])
async def test_a_throttled_process_and_its_child_get_their_share(
        harness: Owner, mode: str) -> None:
    if mode == "cgroup" and cgroup_unavailable() is not None:
        pytest.skip(f"cgroup v1 cpu controller: {cgroup_unavailable()}")
    pids = await busy_pair(harness)
    name = f"meshxl-test-{os.getpid()}-{mode}"
    async with CpuThrottle(name, pids[:1], share=0.1,
                           force_sigstop=mode == "sigstop") as throttle:
        assert throttle.mode == mode
        assert sorted(throttle.pids) == sorted(pids)  # the child came along
        if mode == "cgroup":
            assert sorted(throttle.members()) == sorted(pids)
            assert (CGROUP_CPU / name / "cpu.cfs_quota_us").read_text().strip() == "10000"
        await window(0.3, "the throttle takes hold")
        share = await used(pids, 2.0)
        assert share < 0.25, share  # 0.1 of a core asked, two processes sharing it
    assert not (CGROUP_CPU / name).exists()
    # Unthrottled: over the throttled bound again, in some half-second (two cores hogged
    # by other work may give the pair well under a core, but not under a quarter for long).
    async def unthrottled() -> bool:
        return await used(pids, 0.5) > 0.25

    await wait_until(unthrottled, timeout=15, interval=0.0, what="the pair unthrottled")


async def test_throttling_is_undone_when_the_block_raises(harness: Owner) -> None:
    if cgroup_unavailable() is not None:
        pytest.skip(f"cgroup v1 cpu controller: {cgroup_unavailable()}")
    pids = await busy_pair(harness)
    name = f"meshxl-test-{os.getpid()}-raise"
    with pytest.raises(RuntimeError, match="boom"):
        async with CpuThrottle(name, pids[:1], share=0.05):
            assert (CGROUP_CPU / name).exists()
            raise RuntimeError("boom")
    assert not (CGROUP_CPU / name).exists()
    with pytest.raises(ThrottleError, match="plain cgroup name"):
        CpuThrottle("../escape", pids, share=0.05)


async def test_stale_groups_left_by_a_killed_run_are_removed(harness: Owner) -> None:
    if cgroup_unavailable() is not None:
        pytest.skip(f"cgroup v1 cpu controller: {cgroup_unavailable()}")
    prefix = f"meshxl-test-{os.getpid()}-stale"
    (CGROUP_CPU / f"{prefix}-1").mkdir()
    pids = await busy_pair(harness)
    async with CpuThrottle(f"{prefix}-2", pids[:1], share=0.5):
        # the empty leftover goes, the group in use stays
        assert remove_stale(prefix) == [f"{prefix}-1"]
        assert (CGROUP_CPU / f"{prefix}-2").exists()
    assert not (CGROUP_CPU / f"{prefix}-2").exists()
