#!/usr/bin/env python3
"""Keep requirements/*.lock in step with pyproject.toml.

Each lock file carries a fingerprint of the dependency declarations it was compiled
from (``requires-python``, ``dependencies``, ``optional-dependencies``):

    python3 scripts/lockfile.py fingerprint      # print it (scripts/lock.sh stamps it)
    python3 scripts/lockfile.py check [FILE...]  # exit 1 when a lock is out of date

``make setup`` runs the check, so a dependency added to pyproject.toml without
``make lock`` fails at once with a message saying so, not later as a missing import.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCKS = (ROOT / "requirements" / "dev.lock", ROOT / "requirements" / "demo.lock",
         ROOT / "requirements" / "image.lock")
PREFIX = "# pyproject-fingerprint: "


def fingerprint(pyproject: Path = ROOT / "pyproject.toml") -> str:
    project = tomllib.loads(pyproject.read_text())["project"]
    declared = {key: project.get(key) for key in
                ("requires-python", "dependencies", "optional-dependencies")}
    return hashlib.sha256(json.dumps(declared, sort_keys=True).encode()).hexdigest()[:16]


def stamped(lock: Path) -> str | None:
    for line in lock.read_text().splitlines():
        if line.startswith(PREFIX):
            return line[len(PREFIX):].strip()
    return None


def check(locks: list[Path]) -> int:
    want = fingerprint()
    stale = [lock for lock in locks if not lock.is_file() or stamped(lock) != want]
    for lock in stale:
        print(f"{lock.relative_to(ROOT)} does not match pyproject.toml's dependencies: "
              "run `make lock` (regenerates the lock files) and commit them", file=sys.stderr)
    return 1 if stale else 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["fingerprint"]:
        print(fingerprint())
        return 0
    if argv[:1] == ["check"]:
        return check([Path(a).resolve() for a in argv[1:]] or list(LOCKS))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
