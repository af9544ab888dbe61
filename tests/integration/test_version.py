"""`meshxl version --etcd URL` asks a real etcd server its version."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.etcd import EtcdServer

pytestmark = pytest.mark.integration


async def test_version_reports_the_etcd_server_and_the_local_binary(etcd: EtcdServer) -> None:
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "meshxl", "version", "--etcd", etcd.url,
                         "--output", "json"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    binary = (await asyncio.to_thread(subprocess.run, [report["etcd"]["path"], "--version"],
                                      capture_output=True, text=True, timeout=30)).stdout
    assert report["etcd"]["version"] in binary
    # The server in the test is that same binary.
    assert report["etcd_server"] == {"url": etcd.url, "version": report["etcd"]["version"]}
    assert re.fullmatch(r"\d+\.\d+\.\d+", report["etcd_server"]["version"])


def test_version_with_an_unreachable_etcd_still_lists_the_rest_and_exits_1() -> None:
    done = subprocess.run([sys.executable, "-m", "meshxl", "version", "--etcd",
                           "http://127.0.0.1:1"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.startswith("meshxl: etcd request failed")
    assert "etcd server" in done.stdout and "grpcio" in done.stdout


def test_binaries_are_asked_their_version_and_a_missing_one_is_named(tmp_path: Path) -> None:
    fake = tmp_path / "etcd"
    fake.write_text("#!/bin/sh\necho 'etcd Version: 9.8.7'\n")
    fake.chmod(0o755)
    env = {**os.environ, "MESHXL_ETCD_BINARY": str(fake), "PATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "meshxl", "version", "--output", "json"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["etcd"] == {"path": str(fake), "version": "9.8.7"}
    if "error" in report["envoy"]:  # no envoy on this PATH but the virtualenv's own
        assert "envoy" in report["envoy"]["error"]
