"""The statesync API against its OpenAPI document: schemathesis (a property-based API
fuzzer) drives a real ``meshxl serve statesync`` on a real etcd with requests generated
from the document, valid and invalid, and checks every answer: no 5xx, every status,
content type and body as documented. Bounded in time (``--max-time``)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from meshxl.local.ports import free_port
from meshxl.local.procs import run
from meshxl.statesync.api import openapi_document
from tests.harness import EtcdServer

pytestmark = pytest.mark.integration

CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_schema_conformance")
FUZZ_SECONDS = int(os.environ.get("MESHXL_OPENAPI_FUZZ_SECONDS", "50"))


async def test_sidecar_serves_its_document(etcd: EtcdServer, start_sidecar: Any) -> None:
    sidecar = await start_sidecar(cluster="shop", member="a", etcd=etcd.url,
                                  app_port=free_port())
    reply = await sidecar.request("GET", "/openapi.json")
    assert reply.status == 200 and reply.json() == openapi_document()


async def test_schemathesis_finds_no_server_error_and_no_undocumented_answer(
    etcd: EtcdServer, start_sidecar: Any, tmp_path: Path,
) -> None:
    sidecar = await start_sidecar(cluster="shop", member="a", etcd=etcd.url,
                                  app_port=free_port(), max_session_bytes=65536)
    # Something to read, patch and delete besides what the fuzzer creates.
    for session in ("a", "b", "0", "session-1"):
        assert (await sidecar.put(session, {"n": 1})).status == 201
    # Everything but readiness (the process's and its cluster's), whose 503 (not ready,
    # with the reasons) is by design.
    text = await _schemathesis(sidecar.url, CHECKS, FUZZ_SECONDS, "--exclude-path-regex",
                               "readyz$", report=tmp_path / "fuzz.ndjson")
    assert "Server error" not in text, text[-3000:]
    # Readiness, both ways: the fuzzing above left problems reported (503), then none.
    await _schemathesis(sidecar.url, CHECKS.replace("not_a_server_error,", ""), 10,
                        "--include-path-regex", "readyz$", report=tmp_path / "readyz.ndjson")
    problems = (await sidecar.request("GET", "/v1/problems")).json()["problems"]
    for name in problems:
        assert (await sidecar.clear_problem(name)).status == 204
    await _schemathesis(sidecar.url, CHECKS, 10, "--include-path-regex", "readyz$",
                        report=tmp_path / "ready.ndjson")
    assert (await sidecar.request("GET", "/healthz")).status == 200


async def _schemathesis(url: str, checks: str, seconds: int, *options: str,
                        report: Path) -> str:
    """Run the schemathesis CLI against ``url`` (in the report's directory, where it
    keeps its cache); its output, asserting it passed."""
    argv = [sys.executable, "-m", "schemathesis.cli", "run", f"{url}/openapi.json",
            "--checks", checks, "--max-time", str(seconds), "--max-examples", "60",
            "--workers", "2", "--seed", "4242", "--request-timeout", "10",
            "--phases", "examples,fuzzing", "--continue-on-failure",
            "--suppress-health-check", "all", "--no-color", *options,
            "--report", "ndjson", "--report-ndjson-path", str(report)]
    code, out, err = await run(argv, timeout=seconds + 120, cwd=report.parent)
    text = out + err
    assert code == 0, _failures(report) + text[-6000:]
    return text


def _failures(report: Path) -> str:
    """The failed checks in a schemathesis NDJSON report, one line each."""
    lines = []
    if report.exists():
        for line in report.read_text().splitlines():
            event = json.loads(line)
            scenario = event.get("ScenarioFinished")
            if not scenario:
                continue
            recorder = scenario["recorder"]
            for case, checks in recorder.get("checks", {}).items():
                for check in checks:
                    if check["status"] != "success":
                        request = recorder["interactions"].get(case, {}).get("request", {})
                        lines.append(f"{check['name']}: {request.get('method')} "
                                     f"{request.get('uri')}")
    return "\n".join(lines[:40]) + "\n"
