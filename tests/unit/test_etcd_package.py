"""``meshxl.etcd``'s face: the client's names, loaded on first use.

Every ``meshxl`` command imports the key layout (``meshxl.etcd.keys``); gRPC reads its
logging settings when it is first imported, and ``meshxl.cli.main`` sets them for the
command it runs, so importing the keys, or the command line, must not import gRPC.
"""

from __future__ import annotations

import importlib
import subprocess
import sys

import meshxl.etcd


def test_every_exported_name_resolves_to_its_home_module() -> None:
    assert sorted(meshxl.etcd.__all__) == sorted(meshxl.etcd._HOME)
    for name in meshxl.etcd.__all__:
        home = importlib.import_module(f"meshxl.etcd.{meshxl.etcd._HOME[name]}")
        assert getattr(meshxl.etcd, name) is getattr(home, name), name


def test_an_unknown_name_is_an_attribute_error() -> None:
    try:
        meshxl.etcd.no_such_name  # noqa: B018
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("no AttributeError")


def test_the_key_layout_and_the_command_line_import_no_grpc() -> None:
    code = ("import sys\n"
            "import meshxl.etcd.keys, meshxl.cli\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'aetcd')))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stdout
