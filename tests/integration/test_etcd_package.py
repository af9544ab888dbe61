"""Importing the key layout, or the command line, does not import gRPC: checked in a
fresh interpreter (tests/unit/test_etcd_package.py: the package's names)."""

from __future__ import annotations

import subprocess
import sys


def test_the_key_layout_and_the_command_line_import_no_grpc() -> None:
    code = ("import sys\n"
            "import meshxl.etcd.keys, meshxl.cli\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'aetcd')))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stdout
