"""Random spreads for the statesync sidecar's path, without the ``random`` module.

The sidecar needs chance twice: a retry's jitter while etcd does not answer
(:mod:`meshxl.statesync.starting`) and the etcd member a client tries first
(:mod:`meshxl.etcd.balancer`). ``random`` would cost every pod 0.10 MiB of RSS (its
module, ``_sha512``, ``bisect`` and a seeded Mersenne Twister; ``bench/sidecar_libraries.py``,
in the sidecar's own process, median of 5, 2026-11-27; docs/performance.md, "What the
sidecar does without") for two draws made at start and on retries, never per request:
the operating system's random bytes do as well here, in two functions, and the sidecar
sits at its memory target.
"""

from __future__ import annotations

import os

__all__ = ["below", "uniform"]

_SCALE = 1.0 / (1 << 53)


def uniform(low: float, high: float) -> float:
    """A float in [low, high), as ``random.uniform`` draws (53 random bits)."""
    return low + (high - low) * (int.from_bytes(os.urandom(7), "big") >> 3) * _SCALE


def below(n: int) -> int:
    """An integer in [0, n), as ``random.randrange(n)`` (64 random bits, reduced: the bias
    is below 2**-32 for any n under 2**32)."""
    if n < 1:
        raise ValueError(f"empty range for below({n})")
    return int.from_bytes(os.urandom(8), "big") % n
