"""What every statesync sidecar loads, read from the source: the modules its entry
imports when they load (module level, not in a function, not under ``TYPE_CHECKING``),
followed through meshxl's own modules. A feature's modules (hosting several clusters,
session shards, virtual systems and their placement, transactions, JSON merge patch,
etcd's TLS and authentication, several etcd endpoints, delayed sync's planned moves,
Dapr's API, tracing's exporters) load when the feature is used, so an import that
brings one into every sidecar fails here, before any process runs. The running
process is checked by ``tests/integration/test_sidecar_footprint.py``, its memory by
``bench/sidecar_memory.py`` (docs/performance.md, "Sidecar footprint")."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import meshxl

ROOT = Path(meshxl.__file__).parent

ENTRY = ("meshxl.cli.entry", "meshxl.cli.serving", "meshxl.statesync.app",
         "meshxl.etcd.connect", "meshxl.etcd.balancer", "meshxl.etcd.watch")
"""What ``meshxl serve statesync`` runs: the command's entry, what it calls once the
options are read (``serving``, then ``statesync.app``), and the parts of
:mod:`meshxl.etcd` its first etcd client loads (that package re-exports them lazily)."""

LOADED_WHEN_USED = (
    "meshxl.statesync.hosting", "meshxl.statesync.pool_liveness",
    "meshxl.statesync.shards", "meshxl.statesync.resharding", "meshxl.etcd.moving",
    "meshxl.model.vsls", "meshxl.model.placement", "meshxl.model.sticky",
    "meshxl.model.pool_roles", "meshxl.statesync.transactions",
    "meshxl.statesync.mergepatch", "json_merge_patch", "meshxl.statesync.planned",
    "meshxl.etcd.auth", "meshxl.etcd.balanced", "meshxl.etcd.roles", "shlex",
    "meshxl.statesync.dapr", "hpack", "meshxl.telemetry.spans", "opentelemetry",
    "meshxl.streams", "meshxl.client", "meshxl.xds", "meshxl.operator", "aiohttp",
    "click", "yaml", "pydantic",
)


def _path(module: str) -> Path | None:
    base = ROOT.parent.joinpath(*module.split("."))
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path
    return None


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _run_at_import(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """The statements a module's import runs: its body, into ifs (not ``if
    TYPE_CHECKING``), tries, withs and class bodies, not into functions."""
    for node in body:
        yield node
        if isinstance(node, ast.If):
            if not _type_checking(node.test):
                yield from _run_at_import(node.body)
            yield from _run_at_import(node.orelse)
        elif isinstance(node, ast.Try):
            for part in (node.body, *(h.body for h in node.handlers), node.orelse,
                         node.finalbody):
                yield from _run_at_import(part)
        elif isinstance(node, ast.With | ast.ClassDef):
            yield from _run_at_import(node.body)


def _with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def imported_by(module: str) -> set[str]:
    """The modules importing ``module`` loads (meshxl's followed, others named)."""
    path = _path(module)
    if path is None:
        return set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in _run_at_import(ast.parse(path.read_text(), str(path)).body):
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.update(_with_parents(alias.name))
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[:len(base) - node.level + 1]
                name = ".".join([*base, *([node.module] if node.module else [])])
            else:
                name = node.module or ""
            out.update(_with_parents(name))
            for alias in node.names:  # ``from package import submodule``
                if _path(f"{name}.{alias.name}") is not None:
                    out.add(f"{name}.{alias.name}")
    return out


def loaded(*roots: str) -> set[str]:
    """Everything loading ``roots`` loads, through meshxl's modules."""
    seen: set[str] = set()
    todo = [m for root in roots for m in _with_parents(root)]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        if module.split(".")[0] == "meshxl":
            todo.extend(imported_by(module) - seen)
    return seen


def features_in(modules: set[str]) -> list[str]:
    return sorted(m for m in modules
                  if any(m == f or m.startswith(f + ".") for f in LOADED_WHEN_USED))


def test_every_sidecar_loads_no_feature_it_does_not_use() -> None:
    modules = loaded(*ENTRY)
    # What every sidecar runs is there: the session engine, its store and cache, the
    # model's declaration, its HTTP server, the mesh it follows.
    for needed in ("meshxl.statesync.sessions", "meshxl.statesync.store",
                   "meshxl.statesync.cache", "meshxl.statesync.parts", "meshxl.model.spec",
                   "msgspec", "meshxl.statesync.http.server", "httptools",
                   "meshxl.etcd.mesh", "meshxl.statesync.following", "aetcd"):
        assert needed in modules, needed
    assert features_in(modules) == []


def test_the_check_sees_a_feature_coming_back() -> None:
    """The same walk from a feature's module finds what it brings: so it would in the
    entry's, were that imported there again."""
    assert "meshxl.model.vsls" in features_in(loaded("meshxl.statesync.hosting"))
    assert "meshxl.etcd.moving" in features_in(loaded("meshxl.statesync.shards"))
    assert "json_merge_patch" in features_in(loaded("meshxl.statesync.mergepatch"))
    assert "meshxl.model.placement" in features_in(loaded("meshxl.model.sticky"))
    assert "meshxl.etcd.auth" not in loaded("meshxl.etcd.connect")


def test_type_checking_imports_and_functions_are_not_followed(tmp_path: Path) -> None:
    tree = ast.parse("from typing import TYPE_CHECKING\nimport json\nif TYPE_CHECKING:\n"
                     "    import shlex\ndef f():\n    import yaml\ntry:\n    import zlib\n"
                     "except ImportError:\n    import gzip\n")
    names = {a.name for n in _run_at_import(tree.body) if isinstance(n, ast.Import)
             for a in n.names}
    assert names == {"json", "zlib", "gzip"}
