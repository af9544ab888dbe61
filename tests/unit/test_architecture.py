"""The house's written rules, checked (docs/design.md, "The house"): the import contract
(pyproject.toml, ``[tool.importlinter]``: layers, independent parts, no cycles), no
module reaching into another's private names, child processes only through
``meshxl/local/procs.py``, and no module over 600 lines. A rule nobody checks decays."""

from __future__ import annotations

import ast
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "meshxl"
MAX_LINES = 600


def _modules() -> Iterator[tuple[str, Path, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path, ast.parse(path.read_text(), str(path))


def _is_module(name: str) -> bool:
    relative = Path(*name.split("."))
    return (ROOT / relative).with_suffix(".py").is_file() or (ROOT / relative).is_dir()


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_the_import_contract_holds(monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    from importlinter.cli import lint_imports

    # import-linter configures logging with dictConfig, which disables every logger
    # that exists (meshxl's too) for the rest of this process: undone below, or the
    # tests that read meshxl's log lines after this one would see none.
    loggers = [lg for lg in logging.root.manager.loggerDict.values()
               if isinstance(lg, logging.Logger) and not lg.disabled]
    monkeypatch.chdir(ROOT)
    try:
        code = lint_imports(config_filename="pyproject.toml", no_cache=True, no_logo=True)
    finally:
        for logger in loggers:
            logger.disabled = False
    out = capsys.readouterr()
    assert code == 0, out.out + out.err


def test_no_module_imports_another_modules_private_names() -> None:
    found = []
    for name, path, tree in _modules():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        aliases: dict[str, str] = {}  # local name -> meshxl module it stands for
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join([*parent, *([base] if base else [])])
                if not base.startswith("meshxl"):
                    continue
                for alias in node.names:
                    if _private(alias.name):
                        found.append(f"{name}:{node.lineno} imports {base}.{alias.name}")
                    elif _is_module(f"{base}.{alias.name}"):
                        aliases[alias.asname or alias.name] = f"{base}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("meshxl") and alias.asname:
                        aliases[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and _private(node.attr)):
                found.append(f"{name}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not found, "private names used across modules:\n" + "\n".join(found)


_SPAWNING_MODULES = {"subprocess", "multiprocessing"}
_SPAWNING_CALLS = {
    ("asyncio", "create_subprocess_exec"), ("asyncio", "create_subprocess_shell"),
    ("os", "fork"), ("os", "forkpty"), ("os", "system"), ("os", "popen"),
    ("os", "posix_spawn"), ("os", "posix_spawnp"), ("os", "spawnv"), ("os", "spawnve"),
    ("os", "spawnvp"), ("os", "spawnl"), ("os", "spawnlp"),
}


def test_child_processes_are_started_only_by_local_procs() -> None:
    """One owner of child processes: each in its process group, logged, killed with its
    parent (``meshxl/local/procs.py``). ``meshxl envoy`` replacing itself with Envoy
    (``os.execv``) starts no child."""
    found = []
    for name, _, tree in _modules():
        if name == "meshxl.local.procs":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                roots = ([a.name.split(".")[0] for a in node.names]
                         if isinstance(node, ast.Import) else [(node.module or "").split(".")[0]])
                found += [f"{name}:{node.lineno} imports {r}" for r in roots
                          if r in _SPAWNING_MODULES]
            elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and (node.value.id, node.attr) in _SPAWNING_CALLS):
                found.append(f"{name}:{node.lineno} calls {node.value.id}.{node.attr}")
    assert not found, "processes started outside meshxl.local.procs:\n" + "\n".join(found)


def test_no_module_is_over_600_lines() -> None:
    long = []
    for name, path, _ in _modules():
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES:
            long.append(f"{name}: {lines} lines")
    assert not long, f"modules over {MAX_LINES} lines (split them by job):\n" + "\n".join(long)
