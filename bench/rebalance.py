"""Rebalancing on scale-out and scale-in, with state following the sessions.

Run: ``.venv/bin/python bench/rebalance.py [--quick] [--sessions N] [--sizes 3,5,8]``

For each cluster size N and each of three runs: consistent hashing with maglev, with
ring hash, and **pinned** sessions (maglev under ``stickiness.pin``: Envoy's stateful
session filter keeps a session on the member that served it while that member is in the
cluster and healthy; the hash places new sessions and those whose member is gone). Each
run is a local load-sharing deployment (``DemoDeployment``: etcd, ``meshxl serve xds``, N
members (the sample counter app plus its statesync sidecar each), a real Envoy). Every
session sends one POST through Envoy (the app reads the session's counter from its
sidecar and writes it back + 1: an acknowledged write), and the member that answered is
recorded. In the pinned run each session's client keeps the pin cookie Envoy gives it
and sends it back, like a browser. Then:

* **scale out** N -> N+1: a new member registers; every session POSTs again; then as
  many fresh sessions POST once (the new member's share of them, beside the ideal
  1/(N+1)) and join the sessions of the next steps;
* **scale in** N+1 -> N: the new member stops (graceful: its registration goes at once);
  every session POSTs again;
* **scale in** N -> N-1: one of the original members stops; every session POSTs again;

and finally every session is read back. Measured per step: the fraction of sessions
whose member changed, beside the ideal of a perfectly consistent hash (1/(N+1) when a
member joins N, 1/N when one of N leaves); when a member leaves, how many of its own
sessions moved and how many sessions of the other members moved; and the lost
acknowledged writes (a POST answered with a counter not above the session's previous
acknowledged one). At the end, a counter read back below the session's number of
acknowledged POSTs is a lost write too.

Targets: zero lost writes in every run. Maglev (the default): the moved fraction within
1.5x of the ideal plus the sampling error of the session count. Pinned: no session moves
when a member joins, none of the other members' sessions moves when a member leaves
(exactly the leaving member's sessions move), and the new member takes its share of
new sessions (at least the ideal / 1.5 minus the sampling error). Ring hash is reported
beside the ideal but not judged: Envoy resizes every member's share of its fixed-size
ring when the member count changes, which moves about twice the ideal.
Writes ``bench/results/rebalance.json``. Loopback only; bounded request counts; every
process is killed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from http.cookies import CookieError, SimpleCookie
from pathlib import Path
from typing import Any

import aiohttp
from benchlib import Verdict, env_info, print_verdicts, quick_requested, write_results

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshxl import headers as hdr  # noqa: E402
from meshxl.local.deployment import PIN_COOKIE, DemoDeployment  # noqa: E402

# (run, hash algorithm, pinned sessions)
RUNS = (("maglev", "maglev", False), ("ring_hash", "ring_hash", False),
        ("pinned", "maglev", True))


# -- pure parts (tests/unit/test_bench.py) -------------------------------------------------


def pin_from(set_cookies: Iterable[str], name: str) -> str | None:
    """The value of cookie ``name`` among a response's ``Set-Cookie`` headers (the last
    one wins), None when none sets it."""
    pin = None
    for raw in set_cookies:
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(raw)
        except CookieError:
            continue
        if name in jar:
            pin = jar[name].value
    return pin


def moved(before: Mapping[str, str], after: Mapping[str, str]) -> list[str]:
    """Sessions answered in both rounds, by different members."""
    return [s for s, m in after.items() if s in before and before[s] != m]


def moves(before: Mapping[str, str], after: Mapping[str, str],
          leaving: str | None) -> dict[str, Any]:
    """What a step moved: every session answered in both rounds, split into those of
    the ``leaving`` member (None: a member joined) and those of the others."""
    common = [s for s in after if s in before]
    changed = set(moved(before, after))
    own = [s for s in common if before[s] == leaving]
    others = [s for s in common if before[s] != leaving]
    moved_others = sum(1 for s in others if s in changed)
    return {"moved": len(changed), "sessions": len(common),
            "fraction": round(len(changed) / max(1, len(common)), 4),
            "leaving": leaving, "on_leaving": len(own),
            "moved_on_leaving": sum(1 for s in own if s in changed),
            "moved_others": moved_others,
            "others_fraction": round(moved_others / max(1, len(others)), 4)}


def lost_in_step(acked_before: Mapping[str, int], acked_now: Mapping[str, int]) -> int:
    """Writes lost between two rounds: a session's counter must come back above the one
    acknowledged before (a retried write both members applied only skips a number)."""
    return sum(acked_before[s] + 1 - seq for s, seq in acked_now.items()
               if s in acked_before and seq <= acked_before[s])


def lost_on_readback(acked_posts: Mapping[str, int], final: Mapping[str, int | None]) -> int:
    """Acknowledged POSTs the counters read back at the end do not account for."""
    return sum(max(0, n - (final.get(s) or 0)) for s, n in acked_posts.items())


def share_of(members: Mapping[str, str], member: str) -> float:
    """The fraction of the sessions ``member`` answered."""
    return sum(1 for m in members.values() if m == member) / max(1, len(members))


def sampling_error(p: float, n: int) -> float:
    """Three binomial standard errors of a fraction ``p`` of ``n`` random sessions."""
    return 3 * math.sqrt(p * (1 - p) / max(1, n))


# -- the clients -------------------------------------------------------------------------------


class Clients:
    """The sessions' clients: one request per session per round. With ``pin_cookie``,
    every session keeps the pin Envoy set on its last answer and sends it back, like a
    browser (the shared aiohttp session stores no cookies)."""

    def __init__(self, http: aiohttp.ClientSession, url: str, pin_cookie: str | None) -> None:
        self.http = http
        self.url = url
        self.pin_cookie = pin_cookie
        self.pins: dict[str, str] = {}

    def headers(self, session: str) -> dict[str, str]:
        out = {hdr.SESSION: session}
        pin = self.pins.get(session)
        if self.pin_cookie and pin is not None:
            out["Cookie"] = f"{self.pin_cookie}={pin}"
        return out

    def keep(self, session: str, resp: aiohttp.ClientResponse) -> None:
        if self.pin_cookie:
            pin = pin_from(resp.headers.getall("Set-Cookie", []), self.pin_cookie)
            if pin is not None:
                self.pins[session] = pin

    async def post_all(self, sessions: list[str]
                       ) -> tuple[dict[str, str], dict[str, int], int]:
        """One POST per session: (session -> member, session -> acknowledged seq,
        failures)."""
        members: dict[str, str] = {}
        acked: dict[str, int] = {}
        failed = 0
        gate = asyncio.Semaphore(32)

        async def one(session: str) -> None:
            nonlocal failed
            async with gate, self.http.post(self.url, headers=self.headers(session)) as resp:
                body = await resp.read()
                if resp.status != 200:
                    failed += 1
                    return
                self.keep(session, resp)
                members[session] = resp.headers.get(hdr.MEMBER, "?")
                acked[session] = int(json.loads(body)["seq"])

        await asyncio.gather(*(one(s) for s in sessions))
        return members, acked, failed

    async def read_all(self, sessions: list[str]) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        gate = asyncio.Semaphore(32)

        async def one(session: str) -> None:
            async with gate, self.http.get(self.url, headers=self.headers(session)) as resp:
                body = await resp.read()
                out[session] = int(json.loads(body)["seq"]) if resp.status == 200 else None

        await asyncio.gather(*(one(s) for s in sessions))
        return out


# -- one run ------------------------------------------------------------------------------------


async def run_size(n: int, run: str, algorithm: str, pin: bool, sessions: int,
                   work: Path) -> dict[str, Any]:
    layout = [(f"m{i}", "dc1") for i in range(n)]
    names = [f"s{i:05d}" for i in range(sessions)]
    fresh = [f"f{i:05d}" for i in range(sessions)]
    steps: list[dict[str, Any]] = []
    acked_last: dict[str, int] = {}
    acked_posts: Counter[str] = Counter()
    moved_any: set[str] = set()
    failures = 0
    new_sessions: dict[str, Any] = {}
    async with DemoDeployment(work / f"{run}-{n}", mode="load-sharing", members=layout,
                              algorithm=algorithm, pin=pin) as d:
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout,
                                         cookie_jar=aiohttp.DummyCookieJar(),
                                         connector=aiohttp.TCPConnector(limit=64)) as http:
            clients = Clients(http, f"{d.url}/counter", PIN_COOKIE if pin else None)

            async def post(batch: list[str]) -> tuple[dict[str, str], int]:
                """One POST per session of ``batch``: (session -> member, lost writes)."""
                nonlocal failures
                members, acked, failed = await clients.post_all(batch)
                lost = lost_in_step(acked_last, acked)
                acked_last.update(acked)
                acked_posts.update(acked.keys())
                failures += failed
                return members, lost

            owners, _ = await post(names)
            pinned_at_start = sum(1 for s in names if s in clients.pins)

            async def step(name: str, members_before: int, ideal: float,
                           change: Callable[[], Awaitable[Any]],
                           leaving: str | None) -> None:
                nonlocal owners
                started = time.perf_counter()
                await change()
                settle = time.perf_counter() - started
                now, lost = await post(names)
                found = moves(owners, now, leaving)
                moved_any.update(moved(owners, now))
                steps.append({"step": name, "members_before": members_before, **found,
                              "ideal": round(ideal, 4),
                              "ratio_to_ideal": round(found["fraction"] / ideal, 3),
                              "lost_writes": lost, "settle_s": round(settle, 2)})
                owners = now

            await step(f"{n}->{n + 1}", n, 1 / (n + 1),
                       lambda: d.add_member(f"m{n}", "dc1"), None)
            # Fresh sessions after the join: the hash places them, the new member
            # included; from here on they are sessions like the others.
            placed, _ = await post(fresh)
            by_member = Counter(placed.values())
            new_sessions = {"sessions": len(placed), "member": f"m{n}",
                            "share": round(share_of(placed, f"m{n}"), 4),
                            "ideal": round(1 / (n + 1), 4),
                            "by_member": dict(sorted(by_member.items()))}
            names = names + fresh
            owners = {**owners, **placed}
            await step(f"{n + 1}->{n}", n + 1, 1 / (n + 1),
                       lambda: d.remove_member(f"m{n}"), f"m{n}")
            await step(f"{n}->{n - 1}", n, 1 / n, lambda: d.remove_member("m0"), "m0")
            final = await clients.read_all(names)
    readback = lost_on_readback(acked_posts, final)
    step_lost = sum(s["lost_writes"] for s in steps)
    return {"members": n, "run": run, "algorithm": algorithm, "pinned": pin,
            "sessions": sessions, "steps": steps, "new_sessions": new_sessions,
            "pinned_sessions": pinned_at_start if pin else None,
            "failed_requests": failures, "moved_sessions": len(moved_any),
            "lost_writes_readback": readback, "lost_writes_in_steps": step_lost,
            "lost_writes": max(readback, step_lost)}


def print_run(result: dict[str, Any]) -> None:
    for s in result["steps"]:
        line = (f"   {s['step']:>6}: moved {s['fraction']:.3f} of sessions "
                f"(ideal {s['ideal']:.3f}, x{s['ratio_to_ideal']:.2f})")
        if s["leaving"]:
            line += (f"; {s['moved_on_leaving']}/{s['on_leaving']} of {s['leaving']}'s, "
                     f"{s['moved_others']} of the others'")
        print(f"{line}; lost {s['lost_writes']}; settled in {s['settle_s']} s", flush=True)
    new = result["new_sessions"]
    print(f"   new sessions after the join: {new['member']} took {new['share']:.3f} "
          f"(ideal {new['ideal']:.3f}) of {new['sessions']}")
    pinned = "" if result["pinned_sessions"] is None else (
        f", pinned {result['pinned_sessions']}/{result['sessions']}")
    print(f"   lost writes {result['lost_writes']} (moved sessions: "
          f"{result['moved_sessions']}), failed requests {result['failed_requests']}{pinned}")


async def main_async(sizes: list[int], sessions: int, runs: list[str]) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="meshxl-bench-rebalance-"))
    results = []
    for run, algorithm, pin in RUNS:
        if run not in runs:
            continue
        for n in sizes:
            print(f"-- {run}, {n} members, {sessions} sessions", flush=True)
            result = await run_size(n, run, algorithm, pin, sessions, work)
            print_run(result)
            results.append(result)
    return {"env": env_info(), "sessions": sessions, "runs": results}


def verdicts(result: dict[str, Any]) -> list[Verdict]:
    out = []
    runs = result["runs"]
    for run in runs:
        name = f"rebalance {run['run']}"
        if run["run"] == "maglev":
            for s in run["steps"]:
                # The moved fraction of `sessions` random sessions has a binomial
                # sampling error of sqrt(p(1-p)/n): allow 1.5x the ideal plus three.
                p = s["ideal"]
                out.append(Verdict(
                    f"{name} {s['step']}: moved fraction", s["fraction"],
                    round(1.5 * p + sampling_error(p, s["sessions"]), 4), "",
                    at_most=True, reference=f"ideal {p:.3f}"))
        # Envoy's ring hash resizes every member's share of a fixed-size ring when the
        # member count changes, so it moves about twice the ideal by design: reported
        # beside the ideal, not judged.
        if run["pinned"]:
            maglev = {r["members"]: r for r in runs if r["run"] == "maglev"}
            for s in run["steps"]:
                beside = maglev.get(run["members"])
                ref = next((m for m in beside["steps"] if m["step"] == s["step"]),
                           None) if beside else None
                if s["leaving"] is None:
                    out.append(Verdict(
                        f"{name} {s['step']}: moved fraction", s["fraction"], 0, "",
                        at_most=True,
                        reference=(f"maglev {ref['fraction']:.3f}" if ref
                                   else f"ideal hash {s['ideal']:.3f}")))
                else:
                    own = (f"{s['moved_on_leaving']}/{s['on_leaving']} of "
                           f"{s['leaving']}'s moved")
                    out.append(Verdict(
                        f"{name} {s['step']}: others' sessions moved",
                        s["moved_others"], 0, "sessions", at_most=True,
                        reference=own + (f"; maglev moved {ref['moved_others']} others'"
                                         if ref else "")))
            new = run["new_sessions"]
            p = new["ideal"]
            beside = maglev.get(run["members"])
            out.append(Verdict(
                f"{name} N={run['members']}: new sessions to the new member",
                new["share"], round(max(0.0, p / 1.5 - sampling_error(p, new["sessions"])), 4),
                "", at_most=False,
                reference=f"ideal {p:.3f}" + (
                    f"; maglev {beside['new_sessions']['share']:.3f}" if beside else "")))
        per_step = "/".join(str(s["lost_writes"]) for s in run["steps"])
        out.append(Verdict(f"{name} N={run['members']}: lost writes", run["lost_writes"], 0,
                           "writes", at_most=True,
                           reference=f"per step {per_step}, read back "
                                     f"{run['lost_writes_readback']}; "
                                     f"{run['moved_sessions']} sessions moved"))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 members only, 200 sessions")
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--sizes", default="3,5,8")
    parser.add_argument("--runs", default=",".join(r for r, _, _ in RUNS),
                        help="which of maglev, ring_hash, pinned (default: all)")
    args = parser.parse_args()
    quick = quick_requested(args.quick)
    sizes = [3] if quick else [int(x) for x in args.sizes.split(",")]
    sessions = 200 if quick else args.sessions
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if any(n < 2 for n in sizes) or not 1 <= sessions <= 20_000:
        parser.error("sizes must be >= 2 and sessions 1..20000")
    unknown = sorted(set(runs) - {r for r, _, _ in RUNS})
    if unknown or not runs:
        parser.error(f"unknown run {', '.join(unknown) or '(none given)'}: "
                     "choose from maglev, ring_hash, pinned")
    result = asyncio.run(main_async(sizes, sessions, runs))
    result["quick"] = quick
    found = verdicts(result)
    print_verdicts("rebalance", found)
    path = write_results("rebalance", result, found)
    print(f"results: {path}")
    return 0 if all(v.met for v in found) else 1


if __name__ == "__main__":
    sys.exit(main())
