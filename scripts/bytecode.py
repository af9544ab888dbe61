"""Write the optimised bytecode (``.opt-2.pyc``) of meshxl's run-time dependencies.

Usage: ``VENV/bin/python scripts/bytecode.py`` (scripts/setup.sh runs it).

A sidecar runs with ``-OO`` (``meshxl.local.commands.SIDECAR_PYTHON_FLAGS``; an injected
one with ``PYTHONOPTIMIZE=2``), which reads ``.opt-2.pyc`` files only. pip writes plain
bytecode, and where ``PYTHONDONTWRITEBYTECODE`` is set (CI, containers) no process
writes any, so every sidecar compiled protobuf, grpc, aetcd, msgspec and the rest again
at each start: about 0.3 s of CPU of its 0.65. The container image compiles them the same
way (Dockerfile). Only the distributions meshxl needs at run time (its dependencies
and theirs, extras left out) are compiled: the whole virtualenv of the test set-up
holds ten times as many files (type checkers, browsers' drivers, plotting).
"""

from __future__ import annotations

import compileall
import importlib.metadata as md
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def closure(root: str) -> list[md.Distribution]:
    """``root`` and every distribution it requires at run time, recursively."""
    seen: dict[str, md.Distribution] = {}
    todo = [root]
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # an optional one this platform or set-up does without
        seen[name] = dist
        for text in dist.requires or ():
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return list(seen.values())


def main() -> int:
    files: list[Path] = []
    for dist in closure("meshxl"):
        if canonicalize_name(dist.metadata["Name"]) == "meshxl":
            continue  # an editable checkout: `make test` compiles it (Makefile, BYTECODE)
        files += [Path(str(dist.locate_file(f))) for f in dist.files or ()
                  if f.suffix == ".py"]
    ok = all(compileall.compile_file(f, quiet=2, optimize=2) for f in files if f.is_file())
    print(f"bytecode: {len(files)} modules of meshxl's dependencies at -OO")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
