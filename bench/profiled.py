"""Run a Python module under cProfile, profiling only between signals.

``python bench/profiled.py OUT -m MODULE ARGS...``: SIGUSR1 starts profiling the main
thread (where asyncio runs), SIGUSR2 stops it and writes that window's profile to
``OUT.N`` (N = 0, 1, ...). So a benchmark profiles the load it measures, window by
window, not the start-up's imports.
"""

from __future__ import annotations

import cProfile
import sys

from benchlib import run_module_between_signals


def main() -> None:
    if len(sys.argv) < 4 or sys.argv[2] != "-m":
        raise SystemExit("usage: profiled.py OUT -m MODULE [ARGS...]")
    out, module = sys.argv[1], sys.argv[3]
    profiler = cProfile.Profile()
    windows = 0

    def start() -> None:
        profiler.enable()

    def stop() -> None:
        nonlocal profiler, windows
        profiler.disable()
        profiler.dump_stats(f"{out}.{windows}")
        windows += 1
        profiler = cProfile.Profile()

    run_module_between_signals(module, sys.argv[4:], start, stop)


if __name__ == "__main__":
    main()
