"""xDS fan-out to real Envoys: a change written to etcd until every Envoy ACKed it.

Run: ``.venv/bin/python bench/xds_envoys.py [--quick] [--envoys N]``

A local etcd, one ``meshxl serve xds`` process (default debounce: 10 ms quiet, 100 ms
at most) and real Envoys (``.venv/bin/envoy``, one worker each), all on loopback; the
model is 20 load-sharing maglev clusters x 4 members behind two listeners. Each round
makes one change and times it until every connected Envoy ACKed every type the
change altered, as the control plane records the ACKs (``/v1/nodes``, ``ack_time``):

* ``member``: what ``meshxl member down|up`` writes for one member (its admin key put
  or deleted); EDS changes;
* ``model``: what ``meshxl apply`` writes, the model with one route's timeout changed
  (validated once beforehand); RDS changes.

Rounds alternate the two kinds. First with one Envoy connected (the reference), then
with all of them, same changes, same process; then once more with every cluster's
maglev table at 4,099 entries instead of Envoy's default 65,537, which is what an EDS
change costs each Envoy (it rebuilds the changed cluster's table before it ACKs).
"Total" runs from sending the etcd write to the last ACK; "from commit" from the
write's answer; beside them the control plane's own
``meshxl_xds_convergence_seconds`` (change seen in its watch -> last ACK). Polling
``/v1/status`` only finds the end (every 25 ms); the times are the control plane's.

Writes ``bench/results/xds_envoys.json``. Loopback only; bounded loops; every
process (Envoys, control plane, etcd) is stopped at the end, also on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import aiohttp
from benchlib import (
    Verdict,
    convergence_histogram,
    mesh_model,
    print_verdicts,
    quick_requested,
    run_benchmark,
    start_control_plane,
    summary_ms,
)
from prometheus_client.parser import text_string_to_metric_families

from meshxl import etcd
from meshxl.local.envoy import EnvoyError, EnvoyProcess
from meshxl.local.ports import free_ports
from meshxl.local.procs import Owner
from meshxl.local.servers import HOST
from meshxl.local.wait import LocalError
from meshxl.model.load import parse_model
from meshxl.proxy.bootstrap import build_bootstrap

NAME = "xds_envoys"
TARGET_P99_MS = 50.0
CLUSTERS = 20
MEMBERS = 4
ROUND_TIMEOUT = 10.0
POLL = 0.025
SETUP_TIMEOUT = 60.0
SMALL_TABLE = 4099
STICKY = "stickiness: {algorithm: maglev, header: x-session-id}"
STICKY_SMALL = f"stickiness: {{algorithm: maglev, header: x-session-id, " \
    f"maglev_table_size: {SMALL_TABLE}}}"
CHANGED_ROUTE = '    route: {domains: ["svc-0000.local"]}'
CHANGED_ROUTE_TO = '    route: {domains: ["svc-0000.local"], timeout: 7s}'


async def _json(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url) as resp:
        return await resp.json(content_type=None)



async def _histogram_sums(http: aiohttp.ClientSession, admin: str) -> dict[str, list[float]]:
    """``{"<histogram> <type>": [count, sum]}`` of the push and ACK histograms."""
    async with http.get(f"{admin}/metrics") as resp:
        text = await resp.text()
    out: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in ("meshxl_xds_push_duration_seconds",
                               "meshxl_xds_ack_duration_seconds"):
            continue
        for s in family.samples:
            if s.name.endswith(("_count", "_sum")):
                key = f"{family.name.split('_')[2]} {s.labels.get('type', '')}"
                entry = out.setdefault(key, [0.0, 0.0])
                entry[0 if s.name.endswith("_count") else 1] = s.value
    return out


def _means_ms(after: dict[str, list[float]], before: dict[str, list[float]]) -> dict[str, float]:
    """Mean of each histogram over the observations between two scrapes, in ms."""
    out = {}
    for key, (count, total) in after.items():
        c0, s0 = before.get(key, [0.0, 0.0])
        if count > c0:
            out[key] = round((total - s0) / (count - c0) * 1000, 2)
    return out


async def all_acked(http: aiohttp.ClientSession, admin: str, nodes: list[str],
                    timeout: float) -> dict[str, str]:
    """Wait until every node ACKed the served version of every type; returns them."""
    deadline = time.monotonic() + timeout
    while True:
        status = await _json(http, f"{admin}/v1/status")
        versions = status["versions"]
        seen = status["nodes"]
        if all(n in seen and seen[n]["streams"] > 0 and all(
                seen[n]["types"].get(t, {}).get("acked_version") == v
                for t, v in versions.items() if t in seen[n]["types"]) for n in nodes):
            return dict(versions)
        if time.monotonic() > deadline:
            raise LocalError(f"not every Envoy ACKed within {timeout:g}s: "
                             f"{ {n: seen.get(n, {}).get('types') for n in nodes} }")
        await asyncio.sleep(0.05)


async def one_round(http: aiohttp.ClientSession, admin: str, nodes: list[str],
                    change: Any) -> dict[str, Any]:
    """Make one change; time it until every node ACKed each changed type."""
    before = (await _json(http, f"{admin}/v1/status"))["versions"]
    hist_before = await convergence_histogram(http, admin)
    t0 = time.time()
    await change()  # one etcd write
    t_commit = time.time()
    # The ACK times are the control plane's own records; polling only finds the end, so
    # it is slow enough (POLL) not to load the process it observes.
    deadline = time.monotonic() + ROUND_TIMEOUT
    while True:
        await asyncio.sleep(POLL)
        status = await _json(http, f"{admin}/v1/status")
        changed = {t: v for t, v in status["versions"].items() if before.get(t) != v}
        seen = status["nodes"]
        pairs = [(seen.get(n, {}).get("types", {}).get(t, {}), v)
                 for n in nodes for t, v in changed.items()]
        if changed and all(a.get("acked_version") == v for a, v in pairs):
            last_ack = max(float(a["ack_time"]) for a, _ in pairs)
            break
        if any(seen.get(n, {}).get("nacks") for n in nodes):
            raise LocalError(f"an Envoy NACKed: {[seen[n]['last_nack'] for n in nodes]}")
        if time.monotonic() > deadline:
            raise LocalError(f"not every Envoy ACKed a new version in {ROUND_TIMEOUT:g}s "
                             f"(changed: {list(changed)})")
    hist_after = await convergence_histogram(http, admin)
    observed = hist_after[0] - hist_before[0]
    return {
        "types": sorted(t.rsplit(".", 1)[-1] for t in changed),
        "total_ms": (last_ack - t0) * 1000, "from_commit_ms": (last_ack - t_commit) * 1000,
        "write_ms": (t_commit - t0) * 1000,
        "control_plane_ms": (hist_after[1] - hist_before[1]) * 1000 if observed == 1 else None,
    }


async def measure(http: aiohttp.ClientSession, cp: dict[str, Any], nodes: list[str],
                  rounds: int, model: str, first: int = 0) -> dict[str, Any]:
    """``rounds`` changes; round ``first + r`` toggles the state the one before left."""
    changed_model = model.replace(CHANGED_ROUTE, CHANGED_ROUTE_TO, 1)
    assert changed_model != model
    parse_model(changed_model, source="bench")  # both are valid: writing them is a change
    keys = cp["keys"]
    admin_key = keys.member_admin("svc-0003", "m01").encode()
    admin_value = json.dumps({"reason": "bench", "by": "bench",
                              "at": "2026-01-01T00:00:00Z"}).encode()
    results: list[dict[str, Any]] = []
    sums_before = await _histogram_sums(http, cp["admin"])
    async with etcd.client(cp["etcd"]) as client:
        for r in range(first, first + rounds):
            toggle = (r // 2) % 2 == 0
            if r % 2 == 0:
                kind = "member"  # what `meshxl member down|up` writes

                async def change(toggle: bool = toggle) -> None:
                    if toggle:
                        await client.put(admin_key, admin_value)
                    else:
                        await client.delete(admin_key)
            else:
                kind = "model"  # what `meshxl apply` writes, once validated

                async def change(toggle: bool = toggle) -> None:
                    await client.put(keys.model.encode(),
                                     (changed_model if toggle else model).encode())
            found = await one_round(http, cp["admin"], nodes, change)
            found["kind"] = kind
            results.append(found)
            await asyncio.sleep(0.05)
    # Where the time goes, per type: snapshot published -> response written ("push"),
    # response written -> Envoy's ACK ("ack"), means over this phase.
    means = _means_ms(await _histogram_sums(http, cp["admin"]), sums_before)
    out: dict[str, Any] = {"envoys": len(nodes), "rounds": results,
                           "push_and_ack_mean_ms": means}
    for key in ("total_ms", "from_commit_ms", "write_ms", "control_plane_ms"):
        values = [x[key] for x in results if x[key] is not None]
        out[key] = summary_ms(values)
        for kind in ("member", "model"):
            out[f"{kind}_{key}"] = summary_ms([x[key] for x in results
                                               if x["kind"] == kind and x[key] is not None])
    return out


async def run(work: Path, envoys: int, rounds: int) -> dict[str, Any]:
    stack = Owner(work, grace=3.0)
    procs: list[EnvoyProcess] = []
    listener = free_ports(1)[0]
    model = mesh_model(CLUSTERS, MEMBERS, listener_port=listener, clusters_per_listener=10)
    nodes = [f"bench-envoy-{i:02d}" for i in range(envoys)]
    step = "starting etcd and the control plane"
    res: dict[str, Any] = {"model": f"{CLUSTERS} clusters x {MEMBERS} members, "
                           f"{(CLUSTERS + 9) // 10} listeners, maglev, health checks off"}
    try:
        async with asyncio.timeout(SETUP_TIMEOUT):
            cp = await start_control_plane(stack, model)
        admin_ports = free_ports(envoys)
        for node, admin_port in zip(nodes, admin_ports, strict=True):
            procs.append(EnvoyProcess(build_bootstrap(node, [(HOST, cp["port"])],
                                                      admin_port=admin_port),
                                      work, log_level="warning", name=node, hot_restart=False))
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5.0)) as http:
            step = "starting the first Envoy"
            await procs[0].start()
            await procs[0].wait_ready(SETUP_TIMEOUT)
            await all_acked(http, cp["admin"], nodes[:1], SETUP_TIMEOUT)
            step = "measuring with one Envoy"
            res["one"] = await measure(http, cp, nodes[:1], rounds, model)
            step = f"starting {envoys - 1} more Envoys"
            for p in procs[1:]:
                await p.start()
            for p in procs[1:]:
                await p.wait_ready(SETUP_TIMEOUT)
            await all_acked(http, cp["admin"], nodes, SETUP_TIMEOUT)
            step = f"measuring with {envoys} Envoys"
            res["all"] = await measure(http, cp, nodes, rounds, model, first=rounds)
            # Where an EDS change goes in Envoy: rebuilding the changed cluster's maglev
            # table (65,537 entries by default). The same rounds with a 4,099 table.
            step = f"measuring with {envoys} Envoys and maglev tables of {SMALL_TABLE}"
            small = model.replace(STICKY, STICKY_SMALL)
            async with etcd.client(cp["etcd"]) as client:
                await client.put(cp["keys"].model.encode(), small.encode())
            await asyncio.sleep(0.5)
            await all_acked(http, cp["admin"], nodes, SETUP_TIMEOUT)
            res["small_table"] = await measure(http, cp, nodes, rounds, small, first=0)
            res["small_table"]["maglev_table_size"] = SMALL_TABLE
            status = await _json(http, f"{cp['admin']}/v1/status")
            res["nacks"] = status["nacks"]
    except (LocalError, EnvoyError, TimeoutError, OSError) as exc:
        traceback.print_exc()
        logs = stack.report()
        envoy_logs = "\n".join(f"--- {p.name}:\n{p.logs()[-2000:]}" for p in procs)
        raise SystemExit(f"failed {step}: {exc!r}\n{logs}\n{envoy_logs}") from None
    finally:
        for p in procs:
            with contextlib.suppress(Exception):
                await p.stop()
        await stack.aclose()
    return res


def verdicts(res: dict[str, Any]) -> list[Verdict]:
    one, many = res["one"]["total_ms"], res["all"]["total_ms"]
    ratio = (many["p99"] / one["p99"]) if one.get("p99") else None
    small = res.get("small_table", {}).get("total_ms", {})
    return [Verdict(f"xDS: change -> all {res['all']['envoys']} real Envoys ACKed, p99",
                    many.get("p99"), TARGET_P99_MS, "ms",
                    reference=f"1 Envoy p99 {one.get('p99')} ms"
                    + (f" ({ratio:.2f}x)" if ratio else "")
                    + (f"; maglev table {SMALL_TABLE} instead of 65,537: p99 "
                       f"{small.get('p99')} ms" if small else ""))]


def print_report(res: dict[str, Any], verdict_list: list[Verdict]) -> None:
    print(f"\n== xDS change -> every real Envoy ACKed ({res['model']}; "
          f"{len(res['all']['rounds'])} rounds each, member and model changes alternating)")
    print(f"  {'':<44} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    phases = [("one", "1 Envoy (reference)"), ("all", f"{res['all']['envoys']} Envoys")]
    if "small_table" in res:
        phases.append(("small_table", f"{res['all']['envoys']} Envoys, maglev {SMALL_TABLE}"))
    for key, label in phases:
        part = res[key]
        for field, text in (("total_ms", "total (etcd write sent -> last ACK)"),
                            ("member_total_ms", "  member down/up (EDS)"),
                            ("model_total_ms", "  model apply (RDS)"),
                            ("from_commit_ms", "from the etcd write's answer"),
                            ("write_ms", "the etcd write itself"),
                            ("control_plane_ms", "control plane: seen -> last ACK")):
            s = part[field]
            if s.get("n"):
                print(f"  {label + ': ' + text:<44} {s['p50']:>8.1f} {s['p99']:>8.1f} "
                      f"{s['max']:>8.1f}")
    for key, label in phases:
        print(f"  {label}: mean push (published -> written) and ACK (written -> ACK) ms: "
              f"{res[key].get('push_and_ack_mean_ms')}")
    print(f"  NACKs: {res['nacks']}")
    print_verdicts("xDS fan-out to real Envoys", verdict_list)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 rounds")
    parser.add_argument("--envoys", type=int, default=10)
    parser.add_argument("--rounds", type=int, help="rounds per phase (default 40; quick 10)")
    args = parser.parse_args()
    quick = quick_requested(args.quick)
    rounds = args.rounds or (10 if quick else 40)
    rounds = -(-rounds // 4) * 4  # each phase ends as it started: member up, model stored
    if args.envoys < 1 or rounds < 2:
        parser.error("at least one Envoy and two rounds")
    return run_benchmark(
        NAME, quick, "meshxl-bench-envoys-", lambda work: run(work, args.envoys, rounds),
        verdicts, print_report)


if __name__ == "__main__":
    sys.exit(main())
