"""One benchmark, two versions of meshxl, in alternation: the ratio of their figures.

Run: ``.venv/bin/python bench/ab.py [--base REV] [--runs N] BENCH [ARGS...]``
(e.g. ``bench/ab.py --base main statesync_path --quick``)

The machine's speed moves between runs (other processes share its cores), so a figure
measured before a change and one measured after, an hour apart, do not compare. This
exports both versions (``--base``, default ``HEAD~1``, and ``--head``, default the
working tree's ``HEAD``) with ``git archive`` into a temporary directory, then runs
``bench/BENCH.py ARGS`` from each in turn, ``--runs`` times (base, head, base, head...),
each with its own code on ``PYTHONPATH`` and its results written into its own copy.
Printed: every numeric figure of the results file whose path ends in one of
``--figures`` (default ``us_per_request``), each run's value and the ratio head / base
of their medians. Nothing in the working tree is written.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def export(rev: str, into: Path) -> Path:
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def figures(value: Any, wanted: tuple[str, ...], path: str = "") -> dict[str, float]:
    """Numeric leaves of a results document whose path ends in one of ``wanted`` (list
    items by their position)."""
    out: dict[str, float] = {}
    if isinstance(value, dict):
        for key, inner in value.items():
            out.update(figures(inner, wanted, f"{path}.{key}" if path else str(key)))
    elif isinstance(value, list):  # by position: owned.0.idle.rss_mb
        for i, inner in enumerate(value):
            out.update(figures(inner, wanted, f"{path}.{i}" if path else str(i)))
    elif isinstance(value, int | float) and not isinstance(value, bool):
        if path.endswith(wanted):
            out[path] = float(value)
    return out


def run_once(tree: Path, bench: str, args: list[str], wanted: tuple[str, ...]
             ) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    subprocess.run([sys.executable, str(tree / "bench" / f"{bench}.py"), *args], cwd=tree,
                   env=env, check=True, stdout=subprocess.DEVNULL, timeout=3600)
    return figures(json.loads((tree / "bench" / "results" / f"{bench}.json").read_text()),
                   wanted)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="HEAD~1", help="the version compared against")
    parser.add_argument("--head", default="HEAD", help="the version measured")
    parser.add_argument("--runs", type=int, default=3, help="runs of each (alternating)")
    parser.add_argument("--figures", default="us_per_request",
                        help="comma-separated ends of the figures' paths to compare")
    parser.add_argument("bench", help="a benchmark of bench/, without .py")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    opts = parser.parse_args()
    if opts.runs < 1:
        parser.error("--runs must be >= 1")
    wanted = tuple(f.strip() for f in opts.figures.split(",") if f.strip())
    with tempfile.TemporaryDirectory(prefix="meshxl-ab-") as work:
        trees = {"base": export(opts.base, Path(work) / "base"),
                 "head": export(opts.head, Path(work) / "head")}
        seen: dict[str, list[dict[str, float]]] = {"base": [], "head": []}
        for i in range(opts.runs):
            for side in ("base", "head"):
                seen[side].append(run_once(trees[side], opts.bench, opts.args, wanted))
                print(f"run {i + 1} {side}: {seen[side][-1]}", flush=True)
    print(f"\n== {opts.bench} {' '.join(opts.args)}: {opts.head} against {opts.base}, "
          f"{opts.runs} runs each, medians")
    for name in sorted(seen["head"][0]):
        base = statistics.median(r[name] for r in seen["base"] if name in r)
        head = statistics.median(r[name] for r in seen["head"] if name in r)
        ratio = head / base if base else float("nan")
        print(f"  {name:<40} base {base:>10.2f}  head {head:>10.2f}  head/base {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
