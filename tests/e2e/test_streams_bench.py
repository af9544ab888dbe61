"""``bench/streams.py --quick`` end to end, as a user runs it (the smoke run of
docs/streams.md's measurement): a high-availability deployment (etcd, control plane,
three members with their sidecars, a real Envoy) on loopback, twenty resumable
streams per kind at 5 messages a second each way, kill -9 and ``member down`` of the
member serving them, and the same streams without resumption.

What must hold whatever the speed: every phase completes; in every phase, no error
reached the application, and no message was lost, duplicated (answered or applied
twice: the tally's totals) or reordered; every stream of the kill and of the drain
was resumed elsewhere (WebSocket, SSE, gRPC); the plain streams answered everything too
(the reference is a working one). Latency, resume time and rate are reported, not
asserted: the full run measures them (docs/performance.md). Socket.IO is left out
(``--no-peer``): it installs npm packages, which a test does not fetch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

BENCH = Path(__file__).resolve().parents[2] / "bench" / "streams.py"
RUN_TIMEOUT = 600.0
"""A sanity bound on the quick run (about 2 minutes alone; two busy cores are slower)."""


def test_the_quick_streams_run(tmp_path: Path) -> None:
    out = tmp_path / "streams.json"
    done = subprocess.run([sys.executable, str(BENCH), "--quick", "--no-peer", "--no-write",
                           "--output", str(out)],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-6000:]
    res = json.loads(out.read_text())
    assert res["quick"] is True and "streams: targets" in done.stdout
    assert set(res["kinds"]) == {"websocket", "sse", "grpc"}, res["kinds"].keys()
    streams = res["streams"]
    for kind, phases in res["kinds"].items():
        for name in ("plain", "kill", "drain"):
            phase = phases[name]
            where = f"{kind} {name}: {json.dumps(phase)[:3000]}"
            assert phase["streams"] == streams, where
            assert phase["messages_sent"] > streams, where  # they talked
            assert (phase["errors"], phase["lost"], phase["unanswered"],
                    phase["duplicated"], phase["reordered"]) == (0, 0, 0, 0, 0), where
            assert phase["answers"] >= phase["messages_sent"], where
        for name in ("kill", "drain"):
            phase = phases[name]
            where = f"{kind} {name}: {json.dumps(phase)[:3000]}"
            assert phase["served_by_before"] == ["a"], where
            assert phase["unresumed"] == 0 and phase["resume_ms"]["n"] == streams, where
        assert phases["kill"]["http"]["failed"] == 0, phases["kill"]["http"]
    verdicts = {v["name"]: v for v in res["verdicts"]}
    for name, v in verdicts.items():
        if any(w in name for w in (": errors", ": lost", ": duplicated", ": reordered",
                                   "drain: errors")):
            assert v["met"] is True, v
