"""Run the ``meshxl`` command as an operator does: a separate process."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from meshxl.local.procs import run
from tests.harness.clock import scaled

REPO = Path(__file__).resolve().parents[2]


async def meshxl(*args: str, timeout: float = 30,
                 env: Mapping[str, str | None] | None = None) -> tuple[int, str, str]:
    """Run ``python -m meshxl.cli ARGS`` without blocking the event loop (``env``: extra
    environment variables; None removes one)."""
    environ = None
    if env:
        merged = {**os.environ, **env}
        environ = {k: v for k, v in merged.items() if v is not None}
    return await run([sys.executable, "-m", "meshxl.cli", *args], timeout=scaled(timeout),
                     cwd=REPO, env=environ)


async def meshxl_json(*args: str, expect: int = 0, timeout: float = 30) -> Any:
    """Run ``meshxl ARGS --output json``; assert the exit code and parse stdout."""
    code, out, err = await meshxl(*args, "--output", "json", timeout=timeout)
    assert code == expect, f"meshxl {' '.join(args)} exited {code}:\n{out}\n{err}"
    return json.loads(out)
