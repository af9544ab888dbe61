"""A meshxl process's exit (meshxl.exiting): its status, its output and its ``atexit``
hooks as ``sys.exit`` would leave them, without the interpreter's teardown."""

from __future__ import annotations

import subprocess
import sys

import pytest

from meshxl.exiting import exit_code

pytestmark = pytest.mark.integration

PROGRAM = """
import atexit, logging, sys
from meshxl.exiting import run_main
logging.basicConfig(stream=sys.stderr, format="%(message)s")
atexit.register(lambda: print("hook ran", flush=False))
def main():
    print("buffered", end="")
    logging.getLogger("x").warning("logged")
    {ending}
run_main(main)
"""


def _run(ending: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", PROGRAM.format(ending=ending)],
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize(("ending", "status", "stderr"), [
    ("return None", 0, ""),
    ("return 3", 3, ""),
    ("sys.exit(4)", 4, ""),
    ("sys.exit('meshxl: one line')", 1, "meshxl: one line\n"),
])
def test_the_status_the_output_and_the_hooks_are_kept(ending: str, status: int,
                                                      stderr: str) -> None:
    done = _run(ending)
    assert done.returncode == status
    assert done.stdout == "bufferedhook ran\n"  # nothing buffered is lost
    assert done.stderr == "logged\n" + stderr


def test_an_error_ends_the_process_as_python_would() -> None:
    done = _run("raise RuntimeError('broken')")
    assert done.returncode == 1 and "RuntimeError: broken" in done.stderr


def test_exit_codes_are_those_of_sys_exit(capsys: pytest.CaptureFixture[str]) -> None:
    assert [exit_code(c) for c in (None, 0, 2, 130)] == [0, 0, 2, 130]
    assert exit_code("bad input") == 1
    assert capsys.readouterr().err == "bad input\n"
