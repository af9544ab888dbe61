"""A sidecar's signals of a sick member on its real API (``/v1/status``'s ``signals`` and
``/metrics``), with a real etcd: a write's commit time appears, the CPU pressure names
its source, and the event-loop lag rises when the loop is held, then leaves the window.

The sidecar runs in this process (tests/harness/inproc.py) so the test can hold its
loop: a blocking sleep (0.6 s) on the loop both share, as a slow callback in the sidecar would.
Its window is shortened to 1 s so the held loop leaves it within the test's seconds.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshxl.local.wait import wait_until
from meshxl.statesync.signals import LAG_INTERVAL, pressure_source
from tests.harness import EtcdServer, inproc
from tests.harness.inproc import RawHttp

pytestmark = pytest.mark.integration

HELD = 0.6
"""Seconds the loop is held: the lag timer, due at some point within its interval of
the start, runs between ``HELD - LAG_INTERVAL`` and ``HELD`` late."""
LEAST = HELD - LAG_INTERVAL - 0.01


async def _signals(http: RawHttp) -> dict[str, Any]:
    status, body = await http.call("GET", "/v1/status")
    assert status == 200, body
    signals: dict[str, Any] = json.loads(body)["signals"]
    return signals


async def _metrics(http: RawHttp) -> dict[str, dict[str, float]]:
    status, body = await http.call("GET", "/metrics")
    assert status == 200
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(body.decode()):
        if family.name in ("meshxl_statesync_event_loop_lag_seconds",
                           "meshxl_statesync_etcd_commit_seconds",
                           "meshxl_statesync_cpu_pressure_ratio"):
            out[family.name] = {s.labels.get("stat", s.labels.get("source", "")): s.value
                                for s in family.samples}
    return out


async def _until(check: Any, timeout: float = 10.0) -> None:
    await wait_until(check, timeout=timeout, what=getattr(check, "__name__", "a signal"))


async def test_the_signals_appear_and_the_lag_follows_a_held_loop(etcd: EtcdServer) -> None:
    async with inproc.sidecar(etcd.url, cluster="signals") as (port, side):
        side.metrics.signals.loop_lag.window.span = 1.0
        http = await RawHttp.open(port)
        try:
            status, body = await http.call("PUT", "/v1/sessions/cart-1", b'{"n":1}')
            assert status == 201, body
            signals = await _signals(http)
            assert signals["window_seconds"] == 10.0
            commit = signals["etcd_commit"]
            assert commit["samples"] >= 1 and 0 < commit["last"] <= commit["max"] < 5.0
            source = pressure_source()
            pressure = signals["cpu_pressure"]
            assert pressure["source"] == (source[0] if source else None)
            if source is not None:
                assert 0 <= pressure["some_avg10"] <= 100

            async def sampled() -> bool:
                return (await _signals(http))["event_loop_lag"]["samples"] >= 2
            await _until(sampled)

            async def quiet() -> bool:
                return bool((await _signals(http))["event_loop_lag"]["max"] < LEAST / 2)
            await _until(quiet)
            metrics = await _metrics(http)
            assert metrics["meshxl_statesync_etcd_commit_seconds"]["max"] == commit["max"]
            assert metrics["meshxl_statesync_event_loop_lag_seconds"]["max"] < LEAST / 2
            if source is not None:
                assert set(metrics["meshxl_statesync_cpu_pressure_ratio"]) == {source[0]}

            # A slow callback holds the loop both share.
            asyncio.get_running_loop().call_soon(time.sleep, HELD)

            async def lagged() -> bool:
                return bool((await _signals(http))["event_loop_lag"]["max"] >= LEAST)
            await _until(lagged, timeout=1.0)
            lag = (await _metrics(http))["meshxl_statesync_event_loop_lag_seconds"]
            assert LEAST <= lag["max"] < HELD + 1.0 and lag["p99"] <= lag["max"]

            await _until(quiet, timeout=3.0)  # out of the (1 s) window again
            lag = (await _metrics(http))["meshxl_statesync_event_loop_lag_seconds"]
            assert lag["max"] < LEAST / 2 and not math.isnan(lag["last"])
        finally:
            http.close()
