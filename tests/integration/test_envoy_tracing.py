"""Envoy's request tracing as compiled from the model, seen by a real Envoy: which
requests it records (spans at an OTLP receiver), by the caller's W3C ``traceparent``
and the model's ``telemetry.sampling_percent``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from meshxl import headers as hdr
from meshxl.local.ports import free_port
from meshxl.local.wait import wait_until
from meshxl.telemetry.receiver import TraceReceiver
from tests.harness.clock import scaled

pytestmark = pytest.mark.integration

LOOPBACK = "127.0.0.1"
ROOTS = 20
"""Requests without a ``traceparent``: Envoy starts their traces."""


def traceparent(sampled: bool) -> tuple[str, str]:
    trace_id = os.urandom(16).hex()
    return trace_id, f"00-{trace_id}-{os.urandom(8).hex()}-{'01' if sampled else '00'}"


def recorded(path: Path) -> dict[str, list[int]]:
    """Trace id -> the kinds of its spans, as the receiver wrote them."""
    out: dict[str, list[int]] = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        for rs in json.loads(line)["resourceSpans"]:
            for ss in rs["scopeSpans"]:
                for span in ss["spans"]:
                    out.setdefault(span["traceId"], []).append(span["kind"])
    return out


@pytest.mark.parametrize("percent", [0, 100])
async def test_a_callers_decision_is_kept_and_envoy_samples_its_own_traces(
        tmp_path: Path, start_backends: Any, start_control_plane: Any, start_envoy: Any,
        percent: int) -> None:
    receiver = TraceReceiver(tmp_path / "spans.jsonl")
    await receiver.start(f"{LOOPBACK}:0")
    try:
        (backend,) = await start_backends(1)
        port = free_port()
        model = tmp_path / "model.yaml"
        model.write_text(yaml.safe_dump({
            "clusters": [{"name": "web", "mode": "load-sharing",
                          "members": [{"name": backend.name, "address": LOOPBACK,
                                       "port": backend.port}],
                          "listener": {"address": LOOPBACK, "port": port},
                          "degradation": {"action": "off"}}],
            "telemetry": {"tracing": True, "sampling_percent": percent}}))
        plane = await start_control_plane(config_path=model)

        def flush_soon(bootstrap: dict[str, Any]) -> None:
            layer = bootstrap["layered_runtime"]["layers"][0]["static_layer"]
            layer["tracing.opentelemetry.flush_interval_ms"] = 100

        envoy = await start_envoy("edge", plane.port, otlp=(LOOPBACK, receiver.port),
                                  customize=flush_soon)
        await envoy.wait_ready()
        await envoy.wait_hosts("web", lambda hs: len(hs) == 1 and hs[0].healthy,
                               timeout=20, what="the member healthy")
        sampled, sampled_header = traceparent(True)
        unsampled, unsampled_header = traceparent(False)
        url = f"http://{LOOPBACK}:{port}/"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            for header in [unsampled_header, *[None] * ROOTS, sampled_header]:
                headers = {hdr.SESSION: "s"} | ({"traceparent": header} if header else {})
                async with http.get(url, headers=headers) as resp:
                    assert resp.status == 200

        # Spans leave Envoy in the order they ended: the sampled caller's come last.
        await wait_until(lambda: sampled in recorded(receiver.path), timeout=scaled(15),
                         what="the sampled caller's trace at the receiver")
        traces = recorded(receiver.path)
        # A SERVER span for the request and a CLIENT span for its upstream attempt.
        assert sorted(traces[sampled]) == [2, 3]
        assert unsampled not in traces
        assert len(traces) - 1 == (ROOTS if percent == 100 else 0)
    finally:
        await receiver.stop()
