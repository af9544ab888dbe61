"""A cold start in any order: how long until everything serves again, and what is lost.

Run: ``.venv/bin/python bench/coldstart.py [--quick] [--orders N] [--sessions N]``

One local load-sharing deployment (``DemoDeployment``: etcd, ``meshxl serve xds``,
three members each the sample counter app plus its statesync sidecar, a real Envoy).
Sticky sessions are written through Envoy; then, ``--orders`` times, every process is
killed at once (SIGKILL: a power loss) and started again in an order
(``meshxl.local.coldstart``): random permutations of etcd, control plane, sidecars,
apps and Envoy, 0.3 s apart, none waiting for another, the last with etcd last.
Measured per order: seconds from the first start until every sidecar is ready, and until
Envoy serves every session with its acknowledged count; sessions lost; processes that
exited on their own. Targets: 0 lost, 0 exited, every order served within 15 s (the
sidecars' start back-off is at most 5 s; Envoy's ADS retry and health checks follow).
The reference is the same deployment's first start (``DemoDeployment.start``, which
starts each part after the one before is up). Writes ``bench/results/coldstart.json``.
Loopback only; bounded; every process is killed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import Verdict, env_info, print_verdicts, quick_requested, summary_ms, write_results

from meshxl.local.coldstart import cold_start, random_orders, write_sessions
from meshxl.local.deployment import DemoDeployment


async def run(orders: int, sessions: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="meshxl-coldstart-") as work:
        started = time.monotonic()
        async with DemoDeployment(Path(work), mode="load-sharing") as d:
            first = time.monotonic() - started
            counts = await write_sessions(d, [f"cold-{i}" for i in range(sessions)])
            results = []
            for order in random_orders(orders, rng):
                result = await cold_start(d, order, counts, timeout=60)
                print(f"  {' > '.join(order):<52} ready {result.ready_seconds:5.2f} s, "
                      f"served {result.seconds:5.2f} s, lost {len(result.lost)}, "
                      f"exited {len(result.exited)}")
                results.append(result.as_dict())
                counts = await write_sessions(d, list(counts))
    served = [r["seconds"] * 1000 for r in results if not r["lost"]]
    return {"first_start_seconds": round(first, 3), "sessions": sessions, "seed": seed,
            "orders": results, "served_ms": summary_ms(served) if served else None,
            "lost": sum(len(r["lost"]) for r in results),
            "exited": sum(len(r["exited"]) for r in results)}


def verdicts(result: dict[str, Any]) -> list[Verdict]:
    worst = max((r["seconds"] for r in result["orders"]), default=None)
    return [
        Verdict("sessions lost over every order", result["lost"], 0, "sessions"),
        Verdict("processes that exited on their own", result["exited"], 0, "processes"),
        Verdict("slowest order: until every session served", worst, 15.0, "s",
                reference=f"first start {result['first_start_seconds']} s, one part "
                          "after another"),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--orders", type=int, default=8)
    parser.add_argument("--sessions", type=int, default=30)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    orders = 2 if quick_requested(args.quick) else max(1, args.orders)
    print(f"cold start in {orders} orders, {args.sessions} sessions")
    result = asyncio.run(run(orders, args.sessions, args.seed))
    found = verdicts(result)
    print_verdicts("coldstart", found)
    path = write_results("coldstart", {"env": env_info(), **result}, found)
    print(f"\nwrote {path}")
    return 0 if all(v.met for v in found) else 1


if __name__ == "__main__":
    sys.exit(main())
