"""``meshxl.etcd``'s face: the client's names, loaded on first use.

Every ``meshxl`` command imports the key layout (``meshxl.etcd.keys``); gRPC reads its
logging settings when it is first imported, and ``meshxl.cli.main`` sets them for the
command it runs, so importing the keys, or the command line, must not import gRPC.
"""

from __future__ import annotations

import importlib

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


