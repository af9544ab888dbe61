"""The one definition of a percentile and of a summary, used by every report.

The demo's report (``report.json``), the benchmarks in ``bench/``, ``meshxl slo review``
and the drill's report all say "p99" and mean the same thing by it.

**Nearest rank** (the definition of SLO tooling and of most latency reports): the
q-quantile of n values is the value at rank ``ceil(q * n)`` (1-based) of the sorted
values, the smallest value with at least ``q * n`` values at or below it. It is always
a value that was observed, never an interpolation between two: with 40 sessions the
p99 RTO is the slowest session, not a blend of the two slowest, and "p99 < 100 ms"
holds exactly when at least 99 % of the values are below 100 ms (the reading an SLO's
good/total gives). Linear interpolation (numpy's default) would report values nobody
measured and disagree with the SLO verdict beside it on small samples.

Also the per-process figures the benchmarks read from Linux ``/proc``. It imports neither
``statistics`` nor ``random`` (0.1 MiB), so the statesync sidecar uses it too
(:mod:`meshxl.statesync.signals`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PERCENTILES = (0.5, 0.9, 0.99)
"""The percentiles every summary carries, as ``p50``, ``p90`` and ``p99``."""


def quantile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank ``q``-quantile (``0 <= q <= 1``) of ``values``; None for none.

    ``quantile(v, 0)`` is the minimum, ``quantile(v, 1)`` the maximum.
    """
    if not 0 <= q <= 1:
        raise ValueError(f"quantile must be within [0, 1], got {q}")
    if not values:
        return None
    ordered = sorted(values)
    # round(): 0.07 * 100 is 7.000000000000001 in binary floating point, rank 7 not 8.
    rank = max(1, math.ceil(round(q * len(ordered), 9)))
    return ordered[rank - 1]


def _label(q: float) -> str:
    return f"p{round(q * 100):d}"


def summary(values: Sequence[float], digits: int | None = None) -> dict[str, Any]:
    """``{n, min, p50, p90, p99, max, mean}`` of ``values`` (``{"n": 0}`` for none).

    Percentiles by :func:`quantile`; floats rounded to ``digits`` when given.
    """
    if not values:
        return {"n": 0}
    out: dict[str, Any] = {"n": len(values), "min": min(values)}
    out.update((_label(q), quantile(values, q)) for q in PERCENTILES)
    out.update(max=max(values), mean=math.fsum(values) / len(values))  # statistics.fmean
    if digits is None:
        return out
    return {k: (round(v, digits) if isinstance(v, float) else v) for k, v in out.items()}


# -- process figures (Linux /proc) ------------------------------------------------------


_PAGE = os.sysconf("SC_PAGE_SIZE")
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int | None:
    """Resident set size of a process (``/proc/PID/statm``); None once it is gone."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (``/proc/PID/stat``); None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


__all__ = ["PERCENTILES", "cpu_seconds", "quantile", "rss_bytes", "summary"]
