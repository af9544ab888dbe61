"""``meshxl demo --protocol``: the kill -9 demo with members that speak another protocol,
run as a user runs it (shortened). TCP stands for the long-lived kinds: its clients'
connections break with the member and are re-established through Envoy's TCP proxy;
the report says where they went, how fast, and that the state went with them. (gRPC,
WebSocket and TCP under kill -9 are tested in depth in tests/integration/test_protocols.py.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.clock import scaled

pytestmark = [pytest.mark.integration, pytest.mark.heavy]

SESSIONS = 20
RUN_TIMEOUT = scaled(240.0)


def test_demo_over_tcp_reports_reconnects_with_the_state_intact(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "meshxl", "demo", "--protocol", "tcp", "--sessions",
         str(SESSIONS), "--duration", "6", "--output-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["protocol"] == "tcp" and report["killed_member"] == "a"
    assert report["failed_requests"] == 0, (report["failures"], text)
    assert report["lost_writes"] == 0 and report["sessions_read_back"] == SESSIONS
    streams = report["reconnects"]
    # Every session was on the active member: each connection broke and came back on
    # the standby, which continued the session's count.
    assert streams["of_killed_member"] == SESSIONS
    assert streams["moved_to"] == {"b": SESSIONS} and streams["state_intact"]
    assert streams["kill_to_first_answer_ms"]["count"] == SESSIONS
    assert (tmp_path / "traces.jsonl").stat().st_size > 0
    assert "reconnects (kill -> first answer)" in text
