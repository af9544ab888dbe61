"""The operator views (status, sync, verify, drill) and actions as an operator runs them,
against a real etcd: outside text shown literally, an empty prefix explained, every
command failing in one line when etcd is unreachable."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import aetcd
import pytest

from meshxl.etcd.keys import Keys
from meshxl.operator.actions import apply_model
from meshxl.xds.types import CLUSTER
from tests.harness.cli import meshxl

pytestmark = pytest.mark.integration

KEYS = Keys()
MODEL = """\
clusters:
- name: c
  sites: [{name: dc1}, {name: dc2}]
  members:
  - {name: a, address: 127.0.0.1, port: 8080, site: dc1}
  - {name: b, address: 127.0.0.1, port: 8081, site: dc2}
"""
REASON = "[/red] patch [bold]42[/] \x1b[31m"
NACK = "Proto constraint validation failed [/] (field [/link]): value must be > 0"


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert "Traceback" not in err
    return lines[0]


async def test_status_and_verify_show_reasons_and_nack_texts_as_typed(
    etcd: Any, etcd_client: aetcd.Client,
) -> None:
    await apply_model(etcd_client, KEYS, MODEL, "test")
    code, _, err = await meshxl("member", "down", "c", "a", "--reason", REASON,
                                "--etcd", etcd.url)
    assert code == 0, err
    node = {"streams": 1, "replica": "xds-[/]", "types": {CLUSTER: {"acked_version": "v1"}},
            "nacks": 1, "last_nack": {"type_url": CLUSTER, "version": None, "error": NACK}}
    await etcd_client.put(KEYS.node("envoy-[1]").encode(), json.dumps(node).encode())

    code, out, err = await meshxl("status", "--etcd", etcd.url)
    assert code == 0, err
    assert "Traceback" not in err
    assert "[/red] patch [bold]42[/] \\x1b[31m" in out  # the escape is shown, not obeyed
    assert "\x1b" not in out
    assert NACK in out and "envoy-[1]" in out and "xds-[/]" in out

    code, out, err = await meshxl("verify", "--settle", "0", "--etcd", etcd.url)
    assert code == 1, (out, err)  # the NACK is a mismatch, reported, not a crash
    assert "Traceback" not in err and NACK in out


async def test_status_without_a_model_says_why_and_suggests_the_prefix(
    etcd: Any, etcd_client: aetcd.Client,
) -> None:
    code, out, err = await meshxl("status", "--etcd", etcd.url)
    assert code == 1 and out == ""
    line = one_line_error(err)
    assert "no model stored under etcd prefix '/meshxl'" in line and "meshxl apply" in line

    await apply_model(etcd_client, KEYS, MODEL, "test")
    for command in (["status"], ["verify"], ["sync"], ["member", "down", "c", "a"],
                    ["site", "offline", "dc1"]):
        code, out, err = await meshxl(*command, "--etcd", etcd.url, "--etcd-prefix", "meshxl")
        assert code == 1, (command, out, err)
        line = one_line_error(err)
        assert "no model stored under etcd prefix 'meshxl'" in line, line
        assert "did you mean --etcd-prefix /meshxl?" in line, line


async def test_sync_flags_statistics_that_stopped_being_published(
    etcd: Any, etcd_client: aetcd.Client,
) -> None:
    await apply_model(etcd_client, KEYS, MODEL, "test")
    # The sidecar's own interval decides (a loaded machine runs this command slowly).
    fresh = {"ready": True, "revision": 3, "published": time.time(), "publish_interval": 60}
    old = {**fresh, "published": time.time() - 600, "publish_interval": 2.0}
    await etcd_client.put(KEYS.sync_stats("c", "a").encode(), json.dumps(fresh).encode())
    await etcd_client.put(KEYS.sync_stats("c", "b").encode(), json.dumps(old).encode())
    code, out, err = await meshxl("sync", "--etcd", etcd.url, "--output", "json")
    assert code == 0, err
    rows = {r["member"]: r for r in json.loads(out)["sidecars"]}
    assert not rows["a"]["stale"] and rows["b"]["stale"]
    code, out, err = await meshxl("sync", "--etcd", etcd.url)
    assert code == 0, err
    assert "c/b: statistics are" in out and "not publishing" in out
    assert "c/a: statistics" not in out


async def test_status_warns_of_members_the_model_does_not_know(
    etcd: Any, etcd_client: aetcd.Client,
) -> None:
    await apply_model(etcd_client, KEYS, MODEL, "test")
    registration = {"address": "127.0.0.1", "port": 9000, "site": "dc9", "ready": True}
    await etcd_client.put(KEYS.member("c", "x").encode(), json.dumps(registration).encode())
    await etcd_client.put(KEYS.member("typo", "y").encode(),
                          json.dumps({**registration, "site": "dc1"}).encode())
    code, out, err = await meshxl("status", "--etcd", etcd.url)
    assert code == 0, err
    assert "member c/x is registered on site 'dc9', which cluster c does not list" in out
    assert "member y is registered for cluster 'typo', which is not in the model" in out
    code, out, err = await meshxl("verify", "--settle", "0", "--etcd", etcd.url,
                                  "--output", "json")
    assert len(json.loads(out)["warnings"]) == 2


COMMANDS = [
    ["member", "down", "c", "a"], ["member", "up", "c", "a"],
    ["member", "down", "c", "a", "--wait", "1"],
    ["site", "offline", "dc1"], ["site", "online", "dc1"],
    ["status"], ["status", "--output", "json"], ["sync"], ["verify"],
    ["quickstart"], ["demo", "--duration", "3"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
async def test_every_etcd_command_fails_in_one_line_when_etcd_is_unreachable(
    command: list[str], tmp_path: Path,
) -> None:
    if command[0] == "demo":
        command = [*command, "--output-dir", str(tmp_path)]
    code, out, err = await meshxl(*command, "--etcd", "http://127.0.0.1:1", timeout=60)
    assert code == 1, (out, err)
    line = one_line_error(err)
    assert line.startswith("meshxl: etcd") and "127.0.0.1:1" in line, line


async def test_drill_fails_in_one_line_when_etcd_is_unreachable(tmp_path: Path) -> None:
    code, out, err = await meshxl("drill", "--site", "dc1", "--output-dir", str(tmp_path),
                                  "--etcd", "http://127.0.0.1:1", timeout=60)
    assert code == 1, (out, err)
    line = one_line_error(err)
    assert line.startswith("meshxl drill: aborted:") and "127.0.0.1:1" in line, line
    assert (tmp_path / "drill.json").exists()
