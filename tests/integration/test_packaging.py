"""The lock files match pyproject.toml (the lock tool runs; the rest of reproducible
installs: tests/unit/test_packaging.py)."""

from __future__ import annotations

import subprocess
import sys

from tests.unit.test_packaging import ROOT


def test_lock_files_match_pyproject() -> None:
    """Fails when a dependency changed without `make lock` (make setup stops the same way)."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "lockfile.py"), "check"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
