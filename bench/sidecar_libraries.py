"""What a library would add to the statesync sidecar's memory: the RSS growth of
importing it in the sidecar's own process.

Run: ``.venv/bin/python bench/sidecar_libraries.py [--runs N]``

Each measurement is a fresh interpreter started as the sidecar starts (``-OO``, the
bytecode compiled first as the image holds it: ``footprint.compile_bytecode``) that
imports what the sidecar imports (its entry, the app, its metrics, the model's one
declaration and its reader), then the candidate: its RSS growth, median of ``--runs``.
The candidates are the libraries the sidecar does without, each beside the module that
stands in for it (docs/performance.md, "What the sidecar does without"): click (the
entry's own reader of ``serve statesync``'s options), ``random`` (``meshxl/spread.py``),
prometheus-client (``statesync/metrics.py``) and pydantic (the model's former
declaration); msgspec, which the sidecar already holds, shows the method's floor (0).
No process but the interpreters; nothing written.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

import footprint

SIDECAR = ("from meshxl.cli import entry, serving\n"
           "from meshxl.statesync import app, following, mesh_reads\n"
           "from meshxl.statesync.metrics import StatesyncMetrics\n"
           "from meshxl.model.load import parse_unexpanded\n"
           "from meshxl.model.text import ModelForm\n"
           "StatesyncMetrics().render()\n"
           "parse_unexpanded(ModelForm({'clusters': [{'name': 'c', "
           "'membership': 'registered'}]}))\n")
CANDIDATES = {
    "click": "import click",
    "click + the serve command": "import meshxl.cli.serve",
    "random": "import random",
    "prometheus-client": "import prometheus_client",
    "pydantic": "import pydantic",
    "msgspec (held already)": "import msgspec",
}
_RSS = "int(open('/proc/self/statm').read().split()[1]) * 4096"


def growth(code: str) -> float:
    """MiB of RSS ``code`` adds to a process that imported what the sidecar imports."""
    script = (f"{SIDECAR}import gc\ngc.collect()\nbefore = {_RSS}\n{code}\ngc.collect()\n"
              f"print({_RSS} - before)")
    out = subprocess.run([sys.executable, "-OO", "-c", script], capture_output=True,
                         text=True, check=True, timeout=120)
    return int(out.stdout.strip().splitlines()[-1]) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    footprint.compile_bytecode()
    print(f"RSS a library adds to the sidecar's process (median of {args.runs}):")
    for name, code in CANDIDATES.items():
        values = [growth(code) for _ in range(args.runs)]
        print(f"  {name:28} +{statistics.median(values):5.2f} MiB   "
              f"[{', '.join(f'{v:.2f}' for v in values)}]")


if __name__ == "__main__":
    main()
