"""Debounced rebuilds and the model file source (asyncio and a temp file, no processes)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from meshxl.local.wait import wait_until
from meshxl.model import ModelError
from meshxl.xds.sources import Debouncer, ModelFileSource
from tests.harness.clock import scaled, window

GOOD = """
clusters:
  - name: web
    members: [{name: a, address: 127.0.0.1, port: 8081}]
"""


async def run_debouncer(quiet: float, max_delay: float) -> tuple[Debouncer, list[float],
                                                                  asyncio.Task[None]]:
    runs: list[float] = []

    async def action() -> None:
        runs.append(time.monotonic())

    debouncer = Debouncer(action, quiet=quiet, max_delay=max_delay)
    return debouncer, runs, asyncio.create_task(debouncer.run())


async def until(condition: object, within: float = 10.0) -> None:
    await wait_until(condition, timeout=within, interval=0.005,  # type: ignore[call-overload]
                     what="the debouncer's runs")


async def test_a_change_after_quiet_is_built_at_once() -> None:
    """The failover case: nothing to coalesce with, so no reason to wait."""
    debouncer, runs, task = await run_debouncer(quiet=2.0, max_delay=5.0)
    try:
        poked = time.monotonic()
        debouncer.poke()
        await until(lambda: runs)
        assert runs[0] - poked < scaled(1.0), "an isolated change waited for the quiet period"
    finally:
        task.cancel()


async def test_a_burst_of_changes_becomes_two_rebuilds_at_most() -> None:
    """The first change of a burst is built at once, the rest together after quiet."""
    # Quiet long enough that no pause of a busy machine between two pokes ends it.
    debouncer, runs, task = await run_debouncer(quiet=0.5, max_delay=5.0)
    try:
        last = 0.0
        for _ in range(50):
            debouncer.poke()
            last = time.monotonic()  # the last poke's time, not the sleep's after it
            await asyncio.sleep(0.001)
        await until(lambda: len(runs) == 2)
        await window(0.6, "a third run would come within quiet")
        assert len(runs) == 2 and debouncer.pokes == 50 and debouncer.runs == 2
        assert runs[1] - last >= 0.5 - 0.005, "the rest of the burst waits for quiet"
    finally:
        task.cancel()


async def test_continuous_changes_still_rebuild_within_max_delay() -> None:
    debouncer, runs, task = await run_debouncer(quiet=0.3, max_delay=0.6)
    try:
        start = time.monotonic()
        while time.monotonic() - start < 2.0:  # never quiet for 300 ms
            debouncer.poke()
            await asyncio.sleep(0.01)
        await until(lambda: len(runs) >= 3)
        first = runs[0] - start
        slack = scaled(0.3)  # the event loop's lateness on a busy machine
        assert first < 0.6 + slack, f"first rebuild after {first:.3f}s, max_delay is 0.6s"
        gaps = [b - a for a, b in zip(runs, runs[1:], strict=False)]
        assert all(gap < 0.6 + slack for gap in gaps), gaps
    finally:
        task.cancel()


async def test_changes_after_a_rebuild_trigger_another() -> None:
    debouncer, runs, task = await run_debouncer(quiet=0.01, max_delay=0.1)
    try:
        debouncer.poke()
        await until(lambda: len(runs) == 1)
        debouncer.poke()
        await until(lambda: len(runs) == 2)
    finally:
        task.cancel()


async def test_a_failing_rebuild_does_not_stop_later_ones() -> None:
    calls = 0

    async def action() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")

    debouncer = Debouncer(action, quiet=0.001, max_delay=0.01)
    task = asyncio.create_task(debouncer.run())
    try:
        debouncer.poke()
        await until(lambda: calls == 1)
        debouncer.poke()
        await until(lambda: calls == 2)
    finally:
        task.cancel()


async def test_a_cancel_that_meets_a_poke_still_ends_the_debouncer() -> None:
    """A control plane's stop cancels the rebuild loop: a change poked in the same loop
    turn must not swallow that cancel (asyncio.wait_for did on Python 3.11, and a stop
    waited for the loop forever)."""
    debouncer, runs, task = await run_debouncer(quiet=5.0, max_delay=10.0)
    debouncer.poke()
    await until(lambda: runs)
    debouncer.poke()  # within quiet of a run: a burst, waited out on the next poke
    for _ in range(20):
        await asyncio.sleep(0)
    debouncer.poke()
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=scaled(2.0))
    assert done, "the cancel was swallowed: the debouncer still runs"
    assert task.cancelled()


def test_model_file_loads_and_a_bad_file_refuses_to_start(tmp_path: Path) -> None:
    path = tmp_path / "model.yaml"
    path.write_text(GOOD)
    source = ModelFileSource(path, lambda: None)
    assert source.load().clusters[0].name == "web"
    path.write_text("clusters: [{name: Bad}]")
    with pytest.raises(ModelError):
        ModelFileSource(path, lambda: None).load()


async def test_model_file_reload_and_bad_edit_keeps_last_good(tmp_path: Path) -> None:
    path = tmp_path / "model.yaml"
    path.write_text(GOOD)
    changes: list[int] = []
    source = ModelFileSource(path, lambda: changes.append(1), interval=0.01)
    source.load()
    task = asyncio.create_task(source.run())
    try:
        path.write_text(GOOD.replace("8081", "8082"))
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))
        await until(lambda: changes)
        assert source.model is not None
        assert source.model.clusters[0].members[0].port == 8082

        path.write_text("clusters: [{name: web, mode: nope}]")
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 2_000_000))
        await until(lambda: source.error is not None)
        assert "mode" in source.error
        assert source.model.clusters[0].members[0].port == 8082  # still the last good one
        assert len(changes) == 1  # a rejected edit is not a change

        path.write_text(GOOD)
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 3_000_000))
        await until(lambda: len(changes) == 2)
        assert source.error is None
    finally:
        task.cancel()
