"""The running sidecar loads what it uses and runs no thread of its own: a real
``meshxl serve statesync`` on a real etcd, with Python's ``-X importtime`` listing every
module the process imports (on its log), serves sessions, metrics and status; then what
it imported is checked, and its threads (gRPC's and the main one only), and that it runs
without docstrings (``-OO``, as an injected sidecar does). With a trace
file the OpenTelemetry SDK comes in, and still nothing of aiohttp. Memory figures are
``bench/sidecar_memory.py``'s."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import aetcd
import pytest

from meshxl.etcd.keys import Keys
from meshxl.local.ports import free_port
from meshxl.operator.actions import apply_model
from tests.harness import EtcdServer
from tests.integration.test_sidecar_imports import forbidden_in

pytestmark = pytest.mark.integration

_IMPORT = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)\s*$")
GRPC_THREADS = {"event_engine", "lifeguard", "grpc_global_tim"}
"""grpcio's own threads (its EventEngine pool, that pool's lifeguard, its timer
thread): as many in any program with a gRPC channel."""


def imported(log: str) -> set[str]:
    return {m.group(1) for line in log.splitlines() if (m := _IMPORT.match(line))}


def threads(pid: int) -> list[str]:
    names = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            names.append(Path(f"/proc/{pid}/task/{task}/comm").read_text().strip())
        except OSError:
            continue
    return names


def cmdline(pid: int) -> list[bytes]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")


async def serve_some(sidecar: Any) -> None:
    assert (await sidecar.put("cart", {"n": 1})).status == 201
    assert (await sidecar.get("cart")).status == 200
    assert (await sidecar.request("GET", "/metrics")).status == 200
    assert (await sidecar.request("GET", "/v1/status")).status == 200


async def test_the_running_sidecar_loads_only_what_it_uses(
        etcd: EtcdServer, etcd_client: aetcd.Client, start_sidecar: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [k for k in os.environ if k.startswith("OTEL_")]:  # tracing off
        monkeypatch.delenv(name)
    app_port = free_port()
    # Its cluster in the model: read from the stored JSON form, so no YAML parser loads.
    await apply_model(etcd_client, Keys(), f"""
clusters:
- name: lean
  members:
  - {{name: a, address: 127.0.0.1, port: {app_port}}}
""", "test")
    sidecar = await start_sidecar(cluster="lean", member="a", etcd=etcd.url,
                                  app_port=app_port, log_level="info",
                                  python=[sys.executable, "-X", "importtime"])
    await serve_some(sidecar)
    pid = sidecar.process.pid
    assert pid is not None
    names = threads(pid)
    modules = imported(sidecar.logs())
    assert "meshxl.statesync.app" in modules and "uvloop" in modules
    assert forbidden_in(modules) == []
    # The main thread and grpcio's completion-queue poller are its only Python threads
    # (no executor, no span processor); every other one is grpcio's.
    assert names.count("python") <= 2, names
    assert set(names) <= GRPC_THREADS | {"python"}, names
    # Docstrings dropped (-OO, docs/performance.md), and it serves as well without them.
    assert b"-OO" in cmdline(pid)


async def test_with_a_trace_file_spans_come_and_aiohttp_does_not(
        etcd: EtcdServer, start_sidecar: Any, tmp_path: Path) -> None:
    sidecar = await start_sidecar(cluster="traced", member="a", etcd=etcd.url,
                                  app_port=free_port(), log_level="info",
                                  trace_file=tmp_path / "spans.jsonl",
                                  python=[sys.executable, "-X", "importtime"])
    await serve_some(sidecar)
    modules = imported(sidecar.logs())
    assert "opentelemetry.sdk.trace" in modules and "meshxl.telemetry.spans" in modules
    assert not any(m == "aiohttp" or m.startswith("aiohttp.") for m in modules)
    assert "pydantic" not in modules and "prometheus_client" not in modules
