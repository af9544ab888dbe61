"""The flooding tenant of ``bench/vsls.py``'s flood part, in a process of its own (as a
tenant's app is): ``--writers`` concurrent writers PUT sessions of ``--vs`` at a
sidecar, one request at a time each, during each ``--window START END`` (epoch
seconds) given, idle in between: with no pause and ignoring ``Retry-After`` (the
adversarial tenant), or, in a ``--paced START END`` window, together at ``--rate``
writes a second (a tenant writing at its quota). Every writer is bounded in count.
The statuses seen, per window in time order, are written to ``--output`` as JSON.

Run: ``.venv/bin/python bench/vsls_flooder.py --url URL --vs VS --window S E
[--paced S E --rate R] ... --output FILE`` (``bench/vsls_parts.py`` starts it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp

MAX_PER_WRITER = 100_000
"""Requests one writer sends in one window at most."""


MAX_SPAN = 1200.0
"""Seconds from now the last window may end in, at most (``bench/vsls.py`` checks its
``--flood-rounds`` against it before it starts)."""

async def flood(url: str, vs: str, writers: int,
                windows: Sequence[tuple[float, float, float | None]],
                pad: int) -> list[dict[str, int]]:
    """Each window ``(start, end, rate)``: ``rate`` None floods, else paces."""
    out: list[dict[str, int]] = []
    connector = aiohttp.TCPConnector(limit=writers)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=5)) as http:
        for start, end, rate in windows:
            await asyncio.sleep(max(0.0, start - time.time()))
            statuses: dict[str, int] = {}

            async def writer(k: int, start: float = start, end: float = end,
                             rate: float | None = rate,
                             statuses: dict[str, int] = statuses) -> None:
                n = 0
                # Paced from the window's start, not from this writer's first turn: a
                # writer that starts late catches up, so the window carries its rate.
                at = start + (k / rate if rate else 0.0)
                while time.time() < end and n < MAX_PER_WRITER:
                    n += 1
                    if rate:  # the writers together at ``rate``, each its turn
                        if at >= end:
                            break
                        await asyncio.sleep(max(0.0, at - time.time()))
                        at += writers / rate
                    try:
                        async with http.put(f"{url}/v1/clusters/{vs}/sessions/flood-{k}",
                                            json={"n": n, "pad": "x" * pad}) as resp:
                            await resp.read()
                            key = str(resp.status)
                    except (aiohttp.ClientError, TimeoutError):
                        key = "0"
                    statuses[key] = statuses.get(key, 0) + 1

            await asyncio.gather(*(writer(k) for k in range(writers)))
            out.append(statuses)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the sidecar's base URL")
    parser.add_argument("--vs", required=True, help="the flooding virtual system")
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--pad", type=int, default=200, help="bytes of padding per state")
    parser.add_argument("--window", type=float, nargs=2, action="append", default=[],
                        metavar=("START", "END"), help="a flood window (epoch seconds)")
    parser.add_argument("--paced", type=float, nargs=2, action="append", default=[],
                        metavar=("START", "END"), help="a window paced at --rate")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="writes a second of the writers together in --paced windows")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    windows = sorted([(s, e, None) for s, e in args.window] +
                     [(s, e, args.rate) for s, e in args.paced])
    if not windows or any(e <= s for s, e, _ in windows) \
            or max(e for _, e, _ in windows) - time.time() > MAX_SPAN:
        parser.error(f"give windows, each ending after it starts, all within {MAX_SPAN:g} s")
    if args.paced and args.rate <= 0:
        parser.error("--paced takes --rate above 0")
    per_window = asyncio.run(flood(args.url, args.vs, args.writers, windows, args.pad))
    args.output.write_text(json.dumps({"windows": windows, "statuses": per_window}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
