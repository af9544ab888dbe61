"""Run a Python module with its garbage collections timed, between signals.

``python bench/gcwatched.py OUT [--python-default] -m MODULE ARGS...``: SIGUSR1 starts
a window, SIGUSR2 ends it and writes that window's collections to ``OUT.N`` (N = 0, 1,
...) as JSON: per generation the count and total seconds, and the longest pause.
``--python-default`` keeps Python's own thresholds (700, 10, 10): the module's
``gc.set_threshold`` calls do nothing, so a benchmark can run the shipped setting and
Python's default side by side.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from typing import Any

from benchlib import run_module_between_signals


def main() -> None:
    args = sys.argv[1:]
    if len(args) < 3:
        raise SystemExit("usage: gcwatched.py OUT [--python-default] -m MODULE [ARGS...]")
    out = args.pop(0)
    if args[0] == "--python-default":
        args.pop(0)
        gc.set_threshold(700, 10, 10)
        gc.set_threshold = lambda *_: None  # type: ignore[assignment]
    if args[0] != "-m" or len(args) < 2:
        raise SystemExit("usage: gcwatched.py OUT [--python-default] -m MODULE [ARGS...]")
    module = args[1]
    counts = [0, 0, 0]
    seconds = [0.0, 0.0, 0.0]
    longest = [0.0]
    started = [0.0]
    windows = 0
    watching = [False]

    def collected(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        elif watching[0]:
            took = time.perf_counter() - started[0]
            generation = info["generation"]
            counts[generation] += 1
            seconds[generation] += took
            longest[0] = max(longest[0], took)

    def start() -> None:
        counts[:] = [0, 0, 0]
        seconds[:] = [0.0, 0.0, 0.0]
        longest[0] = 0.0
        watching[0] = True

    def stop() -> None:
        nonlocal windows
        watching[0] = False
        with open(f"{out}.{windows}", "w") as f:
            json.dump({"collections": counts, "seconds": seconds, "longest_s": longest[0],
                       "threshold": gc.get_threshold()}, f)
        windows += 1

    gc.callbacks.append(collected)
    run_module_between_signals(module, args[2:], start, stop)


if __name__ == "__main__":
    main()
