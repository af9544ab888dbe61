"""Session moves caused by a flapping member, with and without the failback hold.

Run: ``.venv/bin/python bench/flap.py [--quick] [--flaps N] [--sessions N] [--delay S]``

Three runs, side by side, each a local high-availability deployment
(``DemoDeployment``: etcd, ``meshxl serve xds``, members a (active) and b (standby) in
dc1 and c in dc2, each the sample counter app plus its statesync sidecar, and a real
Envoy), with sticky sessions hashed on a header (no pin) driven through Envoy at 10
requests per second each (``meshxl.local.traffic``). In each run the active member a
flaps ``--flaps`` times (``meshxl.local.flap``): it reports a problem until Envoy has
withdrawn it and every session has been answered twice since, then clears it until
Envoy has it back and every session has been answered twice since (a flap lasts well
under a second). Then the run waits for what its policy does after the last flap.

* ``none`` (``failback_delay: 0``): a member takes its place back at once, the
  behaviour before the hold existed;
* ``automatic`` (``failback_delay: --delay``, ClusterXL's Primary Up with a hold): it
  takes its place back once it has stayed well for the delay;
* ``manual`` (``failback: manual``, Active Up): it stays behind the member that took
  over.

Measured per run: how many times each session's answering member changed (from the
clients' records), per session and per flap, and the failed requests. Targets: with the
hold, at most one move per session per flap (the session leaves at the first fall and
comes back once: 2 moves for any number of flaps) and at most one move per session with
manual failback; no failed request in any run. The ``none`` run is the reference
(every flap moves every session twice). Writes ``bench/results/flap.json``. Loopback
only; bounded request counts; every process is killed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import Verdict, env_info, print_verdicts, quick_requested, write_results

from meshxl.local.deployment import DemoDeployment
from meshxl.local.flap import every_session_answered, flap, served_since, session_moves
from meshxl.local.traffic import Traffic
from meshxl.local.wait import wait_until

POLICIES = {
    "none": "{{failback_delay: 0}}",
    "automatic": "{{failback_delay: {delay}s}}",
    "manual": "{{failback: manual}}",
}


async def _all_on(traffic: Traffic, member: str) -> bool:
    since = time.time()
    await every_session_answered(traffic, since)
    return set().union(*served_since(traffic, since).values()) == {member}


async def run(policy: str, flaps: int, sessions: int, delay: float) -> dict[str, Any]:
    failover = POLICIES[policy].format(delay=delay)
    with tempfile.TemporaryDirectory(prefix=f"meshxl-flap-{policy}-") as work:
        async with DemoDeployment(Path(work), failover=failover) as d:
            traffic = Traffic(f"{d.url}/counter", sessions, time.time() + 300,
                              max_requests=sessions * 10 * 300)
            load = asyncio.create_task(traffic.run())
            try:
                await every_session_answered(traffic, time.time())
                started = time.time()
                await flap(d, "a", flaps, traffic)
                flapped = time.time() - started
                # What the policy does once the flapping stops: back to a (none,
                # automatic), or staying on b (manual), seen by every session.
                back = "b" if policy == "manual" else "a"
                await wait_until(lambda: _all_on(traffic, back), timeout=delay + 30,
                                 what=f"the sessions on {back}")
                await every_session_answered(traffic, time.time(), times=3)
            finally:
                traffic.until = time.time()
                await load
    moves = session_moves(traffic.records, since=started)
    per_session = sorted(moves.values())
    return {
        "policy": policy, "failover": failover, "flaps": flaps, "sessions": sessions,
        "flapping_seconds": round(flapped, 2),
        "moves_per_session": {"min": per_session[0], "max": per_session[-1],
                              "mean": round(sum(per_session) / len(per_session), 2)},
        "moves_per_session_per_flap": round(max(per_session) / flaps, 2),
        "requests": len(traffic.records), "failed_requests": traffic.failures,
    }


def verdicts(runs: list[dict[str, Any]]) -> list[Verdict]:
    by = {r["policy"]: r for r in runs}
    ref = by.get("none")
    reference = (f"no hold: {ref['moves_per_session']['max']} moves per session over "
                 f"{ref['flaps']} flaps" if ref else "")
    out = []
    if "automatic" in by:
        out.append(Verdict("automatic failback: moves per session per flap",
                           by["automatic"]["moves_per_session_per_flap"], 1.0, "moves",
                           reference=reference))
    if "manual" in by:
        out.append(Verdict("manual failback: moves per session (all flaps)",
                           by["manual"]["moves_per_session"]["max"], 1.0, "moves",
                           reference=reference))
    for r in runs:
        out.append(Verdict(f"{r['policy']}: failed requests", r["failed_requests"], 0,
                           "requests"))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--flaps", type=int, default=5)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--delay", type=float, default=3.0)
    args = parser.parse_args()
    flaps = 3 if quick_requested(args.quick) else args.flaps
    runs = []
    for policy in POLICIES:
        result = asyncio.run(run(policy, flaps, args.sessions, args.delay))
        print(f"{policy:>9}: {result['failover']:<28} moves per session "
              f"{result['moves_per_session']} over {flaps} flaps "
              f"({result['moves_per_session_per_flap']} per flap), "
              f"{result['failed_requests']} failed of {result['requests']} requests")
        runs.append(result)
    found = verdicts(runs)
    print_verdicts("flap", found)
    path = write_results("flap", {"env": env_info(), "runs": runs}, found)
    print(f"\nwrote {path}")
    return 0 if all(v.met for v in found) else 1


if __name__ == "__main__":
    sys.exit(main())
