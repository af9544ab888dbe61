"""The ``meshxl`` command as an operator runs it: real processes, real etcd and Envoy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import aetcd
import pytest
import yaml
from click.testing import CliRunner

from meshxl.cli import main
from meshxl.etcd.keys import Keys
from meshxl.local.envoy import find_envoy
from meshxl.operator.actions import apply_model
from tests.harness.cli import REPO, meshxl

pytestmark = pytest.mark.integration

QUICKSTART = REPO / "deploy" / "examples" / "quickstart.yaml"
KEYS = Keys()

BAD_MODEL = """\
clusters:
- name: c
  members:
  - {name: a, address: 127.0.0.1, port: 70000}
  - {name: b, address: 127.0.0.1, port: 8080, weight: 0}
"""

SITES_MODEL = """\
clusters:
- name: c
  sites: [{name: dc1}, {name: dc2}]
  members:
  - {name: a, address: 127.0.0.1, port: 8080, site: dc1}
  - {name: b, address: 127.0.0.1, port: 8081, site: dc2}
"""


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert "Traceback" not in err
    return lines[0]


# -- validate --------------------------------------------------------------------------


def test_validate_accepts_the_quickstart_example() -> None:
    result = CliRunner().invoke(main, ["validate", str(QUICKSTART)])
    assert result.exit_code == 0, result.output
    assert "ok (2 clusters, 6 members)" in result.output


def test_validate_warns_when_active_and_standby_share_the_only_site(tmp_path: Path) -> None:
    model = tmp_path / "one-site.yaml"
    model.write_text(SITES_MODEL.replace("site: dc2", "site: dc1"))
    proc = subprocess.run([sys.executable, "-m", "meshxl.cli", "validate", str(model)],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith("warning: clusters[0] (c): active and standby are both on "
                                  "site dc1"), proc.stderr
    assert "ok (1 clusters, 2 members)" in proc.stdout


def test_validate_reports_one_line_per_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_MODEL)
    proc = subprocess.run([sys.executable, "-m", "meshxl.cli", "validate", str(bad)],
                          capture_output=True, text=True, timeout=30, cwd=REPO)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2, proc.stderr
    assert lines[0].startswith("clusters[0].members[0].port:") and "70000" in lines[0]
    assert lines[1].startswith("clusters[0].members[1].weight:") and "(got 0)" in lines[1]
    assert "Traceback" not in proc.stderr


# -- apply -------------------------------------------------------------------------------


async def test_apply_stores_the_model_and_a_bad_file_writes_nothing(
    tmp_path: Path, etcd: Any, etcd_client: aetcd.Client,
) -> None:
    code, out, err = await meshxl("apply", str(QUICKSTART), "--etcd", etcd.url)
    assert code == 0, err
    assert "model stored: 2 clusters" in out
    stored = await etcd_client.get(KEYS.model.encode())
    assert stored is not None and stored.value == QUICKSTART.read_bytes()
    # Its data as JSON beside it, written in the same transaction.
    form = await etcd_client.get(KEYS.model_form.encode())
    assert form is not None and form.mod_revision == stored.mod_revision
    assert json.loads(form.value) == yaml.safe_load(QUICKSTART.read_text())

    code, out, err = await meshxl("apply", str(QUICKSTART), "--etcd", etcd.url)
    assert code == 0 and "model unchanged" in out, (out, err)
    # The same text put by hand leaves the form behind: applied again, both are written.
    await etcd_client.put(KEYS.model.encode(), QUICKSTART.read_bytes())
    code, out, err = await meshxl("apply", str(QUICKSTART), "--etcd", etcd.url)
    assert code == 0 and "model stored" in out, (out, err)
    stored = await etcd_client.get(KEYS.model.encode())
    form = await etcd_client.get(KEYS.model_form.encode())
    assert stored is not None and form is not None
    assert form.mod_revision == stored.mod_revision

    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_MODEL)
    code, out, err = await meshxl("apply", str(bad), "--etcd", etcd.url)
    assert code == 1
    assert "clusters[0].members[0].port" in err and "70000" in err
    after = await etcd_client.get(KEYS.model.encode())
    assert after is not None and after.value == QUICKSTART.read_bytes()
    assert after.mod_revision == stored.mod_revision


async def test_apply_to_unreachable_etcd_fails_in_one_line() -> None:
    code, out, err = await meshxl("apply", str(QUICKSTART), "--etcd", "http://127.0.0.1:1")
    assert code == 1
    line = one_line_error(err)
    assert line.startswith("meshxl: ") and "etcd" in line


# -- member and site admin -------------------------------------------------------------------


async def test_member_down_and_site_offline_reject_unknown_names(
    etcd: Any, etcd_client: aetcd.Client,
) -> None:
    await apply_model(etcd_client, KEYS, SITES_MODEL, "test")

    code, _, err = await meshxl("member", "down", "c", "unknown-member", "--etcd", etcd.url)
    assert code == 1
    assert "unknown-member" in one_line_error(err)
    code, _, err = await meshxl("site", "offline", "nosuchsite", "--etcd", etcd.url)
    assert code == 1
    assert "nosuchsite" in one_line_error(err)
    assert await etcd_client.get(KEYS.member_admin("c", "unknown-member").encode()) is None
    assert await etcd_client.get(KEYS.site_admin("nosuchsite").encode()) is None

    # Known names work and are recorded; "up"/"online" clear them.
    code, out, err = await meshxl("member", "down", "c", "a", "--reason", "patching",
                                  "--etcd", etcd.url)
    assert code == 0, err
    assert "c/a: down" in out
    record = await etcd_client.get(KEYS.member_admin("c", "a").encode())
    assert record is not None and b"patching" in record.value
    code, _, err = await meshxl("member", "up", "c", "a", "--etcd", etcd.url)
    assert code == 0, err
    assert await etcd_client.get(KEYS.member_admin("c", "a").encode()) is None
    code, _, err = await meshxl("site", "offline", "dc2", "--etcd", etcd.url)
    assert code == 0, err
    assert await etcd_client.get(KEYS.site_admin("dc2").encode()) is not None


# -- bootstrap ---------------------------------------------------------------------------------


# "n", "on", "1.5": strings YAML 1.1 (Envoy's parser) would read as a bool or a number.
@pytest.mark.parametrize("node_id", ["node-1", "n", "on", "1.5"])
def test_bootstrap_output_passes_envoy_validate(tmp_path: Path, node_id: str) -> None:
    result = CliRunner().invoke(main, ["bootstrap", "--node-id", node_id, "--xds",
                                       "127.0.0.1:18000", "--admin-port", "19000"])
    assert result.exit_code == 0, result.output
    path = tmp_path / "bootstrap.yaml"
    path.write_text(result.output)
    proc = subprocess.run([find_envoy(), "--mode", "validate", "-c", str(path),
                           "--use-dynamic-base-id"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "OK" in proc.stdout + proc.stderr


def test_bootstrap_rejects_a_bad_xds_address() -> None:
    proc = subprocess.run([sys.executable, "-m", "meshxl.cli", "bootstrap", "--node-id", "n",
                           "--xds", "bad"], capture_output=True, text=True, timeout=30,
                          cwd=REPO)
    assert proc.returncode != 0
    line = one_line_error(proc.stderr)
    assert "bad" in line and "HOST:PORT" in line
    assert proc.stdout == ""
