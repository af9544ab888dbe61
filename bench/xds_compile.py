"""xDS compile/encode speed and one-member-change-to-Envoy-ACK latency.

Run: ``.venv/bin/python bench/xds_compile.py [--quick] [--profile]``

1. Compile + encode of a 1,000-cluster x 16-member model (in memory, no I/O):
   ``compile_resources`` and ``Snapshot.build`` timed separately and together against
   the 100 ms target; beside it, in the same run, the naive per-stream encoding
   (``Any.Pack`` + ``DiscoveryResponse.SerializeToString`` for each of 100 streams)
   against encode-once (one ``Snapshot.build`` + nonce appended to pre-encoded bytes);
   and a one-member change (member down) recompiled and re-encoded.
2. One-member change to Envoy ACK, end to end on loopback: a local etcd, two
   in-process control planes (default debounce, and no debounce) each serving one real
   Envoy. Every round toggles one member down/up with ``set_member_admin`` (one etcd
   write seen by both planes) and times write -> snapshot -> EDS ACK for each.

Prints a table and writes ``bench/results/xds_compile.json``. Loopback only; every
loop is bounded; all processes are stopped in ``finally``.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchlib import Verdict, env_info, print_verdicts, quick_requested, write_results
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryResponse
from google.protobuf import any_pb2
from google.protobuf.internal import api_implementation

from meshxl import etcd
from meshxl.etcd.keys import Keys
from meshxl.local.envoy import EnvoyProcess
from meshxl.local.ports import free_ports
from meshxl.local.procs import Owner
from meshxl.local.servers import HOST, start_etcd
from meshxl.model import AdminAction, ModelSpec, RuntimeState
from meshxl.model.decode import decode
from meshxl.model.load import check_model
from meshxl.operator.actions import apply_model, set_member_admin
from meshxl.proxy.bootstrap import build_bootstrap
from meshxl.stats import summary
from meshxl.xds.app import ControlPlane
from meshxl.xds.cache import Snapshot, stats, with_nonce
from meshxl.xds.compiler import Compiler, compile_resources
from meshxl.xds.config import ControlPlaneConfig
from meshxl.xds.types import ENDPOINT, TYPE_ORDER

RESULTS = Path(__file__).resolve().parent / "results" / "xds_compile.json"
TARGET_COMPILE_MS = 100.0
CLUSTERS = 1000
MEMBERS = 16
CLUSTERS_PER_LISTENER = 100
STREAMS = 100
ACK_TIMEOUT = 5.0
SETUP_TIMEOUT = 30.0


# -- helpers ---------------------------------------------------------------------------


def _ms(samples: list[float]) -> dict[str, Any]:
    """The summary (:func:`meshxl.stats.summary`) of samples in seconds, in ms;
    ``median`` is its p50 (nearest rank, as every percentile meshxl reports)."""
    out = summary([x * 1000 for x in samples], 3)
    if "p50" in out:
        out["median"] = out["p50"]
    return out


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[list[float], Any]:
    samples, result = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        samples.append(time.perf_counter() - t)
    return samples, result


def _row(label: str, s: dict[str, float], extra: str = "") -> str:
    return (f"  {label:<44} {s['min']:>9.2f} {s['median']:>9.2f} {s['max']:>9.2f}"
            f"  {extra}")


def _header() -> str:
    return f"  {'':<44} {'min ms':>9} {'median':>9} {'max':>9}"


# -- 1. compile + encode -----------------------------------------------------------------


def big_model() -> ModelSpec:
    """1,000 load-sharing clusters, maglev on a header, 16 members over two sites,
    one listener per 100 clusters with a virtual host per cluster."""
    clusters = []
    for i in range(CLUSTERS):
        clusters.append({
            "name": f"svc-{i:04d}",
            "mode": "load-sharing",
            "stickiness": {"algorithm": "maglev", "header": "x-session-id"},
            "sites": [{"name": "dc1"}, {"name": "dc2"}],
            "members": [
                {"name": f"m{j:02d}", "address": f"127.0.0.{j + 1}", "port": 20000 + i,
                 "site": "dc1" if j < MEMBERS // 2 else "dc2"}
                for j in range(MEMBERS)
            ],
            "listener": {"address": HOST, "port": 30000 + i // CLUSTERS_PER_LISTENER},
            "route": {"domains": [f"svc-{i:04d}.local"]},
        })
    model = decode({"clusters": clusters}, ModelSpec)
    problems = list(check_model(model))
    if problems:
        raise SystemExit(f"benchmark model is invalid: {problems[:3]}")
    return model


def _naive_streams(by_type: dict[str, Any], streams: int) -> int:
    """Per stream and type: pack every resource and serialize a fresh response."""
    total = 0
    for n in range(streams):
        for type_url in TYPE_ORDER:
            messages = by_type[type_url]
            packed = []
            for name in sorted(messages):
                a = any_pb2.Any()
                a.Pack(messages[name])
                packed.append(a)
            total += len(DiscoveryResponse(version_info="v", type_url=type_url,
                                           nonce=str(n), resources=packed)
                         .SerializeToString())
    return total


def _encode_once_streams(by_type: dict[str, Any], streams: int) -> int:
    """One Snapshot.build, then the pre-encoded bytes plus a nonce per stream."""
    snapshot = Snapshot.build(by_type)
    total = 0
    for n in range(streams):
        for type_url in TYPE_ORDER:
            total += len(with_nonce(snapshot.resources(type_url).response, str(n)))
    return total


def bench_compile(repeats: int, naive_repeats: int, profile: bool) -> dict[str, Any]:
    t = time.perf_counter()
    model = big_model()
    validate_s = time.perf_counter() - t
    state = RuntimeState()
    down = RuntimeState(members_down={("svc-0500", "m03"): AdminAction(reason="bench")})

    compile_resources(model, state)  # warm-up (imports, caches)
    compile_s, build_s, total_s = [], [], []
    snapshot = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        resources = compile_resources(model, state)
        t1 = time.perf_counter()
        snapshot = Snapshot.build(resources.by_type())
        t2 = time.perf_counter()
        compile_s.append(t1 - t0)
        build_s.append(t2 - t1)
        total_s.append(t2 - t0)
    assert snapshot is not None
    by_type = resources.by_type()
    sizes = {t.rsplit(".", 1)[-1]: len(snapshot.resources(t).response) for t in TYPE_ORDER}
    counts = {t.rsplit(".", 1)[-1]: len(by_type[t]) for t in TYPE_ORDER}

    # One member down, side by side: recompiling and re-encoding everything (what a
    # stateless compile does) vs the control plane's Compiler + Snapshot(previous=...).
    def full_rebuild() -> Snapshot:
        return Snapshot.build(compile_resources(model, down).by_type())

    inc_s, inc_snapshot = _timed(full_rebuild, repeats)
    changed = [t.rsplit(".", 1)[-1] for t in TYPE_ORDER
               if inc_snapshot.version(t) != snapshot.version(t)]

    compiler = Compiler()
    base = Snapshot.build(compiler.compile(model, state).by_type())
    delta_s: list[float] = []
    delta_encodes: list[int] = []
    for i in range(repeats):
        target = down if i % 2 == 0 else state  # toggle the member down and up
        before = stats.resources_encoded
        t0 = time.perf_counter()
        base = Snapshot.build(compiler.compile(model, target).by_type(), previous=base)
        delta_s.append(time.perf_counter() - t0)
        delta_encodes.append(stats.resources_encoded - before)
    assert base.versions == Snapshot.build(compile_resources(model, target).by_type()).versions

    # Reference, side by side: naive per-stream encoding vs encode-once.
    once_s, once_bytes = _timed(lambda: _encode_once_streams(by_type, STREAMS), naive_repeats)
    naive_s, naive_bytes = _timed(lambda: _naive_streams(by_type, STREAMS), naive_repeats)

    result: dict[str, Any] = {
        "model": {"clusters": CLUSTERS, "members_per_cluster": MEMBERS,
                  "listeners": len(by_type[TYPE_ORDER[2]]), "resources": counts,
                  "response_bytes": sizes, "validate_ms": round(validate_s * 1000, 3)},
        "compile_ms": _ms(compile_s),
        "snapshot_build_ms": _ms(build_s),
        "compile_plus_build_ms": _ms(total_s),
        "member_down_full_rebuild_ms": _ms(inc_s),
        "member_down_incremental_ms": _ms(delta_s),
        "member_down_incremental_encodes": max(delta_encodes),
        "member_down_changed_types": changed,
        "streams": STREAMS,
        "encode_once_streams_ms": _ms(once_s),
        "naive_streams_ms": _ms(naive_s),
        "bytes_sent": {"encode_once": once_bytes, "naive": naive_bytes},
    }
    result["ratio_compile_plus_build_vs_target"] = round(
        result["compile_plus_build_ms"]["median"] / TARGET_COMPILE_MS, 3)
    result["ratio_full_vs_incremental_member_down"] = round(
        result["member_down_full_rebuild_ms"]["median"]
        / result["member_down_incremental_ms"]["median"], 1)
    result["ratio_naive_vs_encode_once"] = round(
        result["naive_streams_ms"]["median"] / result["encode_once_streams_ms"]["median"], 2)
    if profile:
        prof = cProfile.Profile()
        prof.enable()
        Snapshot.build(compile_resources(model, state).by_type())
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(12)
        result["profile_top_tottime"] = out.getvalue()
    return result


# -- 2. one member change to Envoy ACK -----------------------------------------------------

SMALL_MODEL = """\
clusters:
{clusters}"""
SMALL_CLUSTER = """\
  - name: {name}
    mode: load-sharing
    stickiness: {{algorithm: maglev, header: x-session-id}}
    health_check: {{enabled: false}}
    members:
      - {{name: a, address: 127.0.0.1, port: {p0}}}
      - {{name: b, address: 127.0.0.1, port: {p1}}}
      - {{name: c, address: 127.0.0.1, port: {p2}}}
    listener: {{address: 127.0.0.1, port: {listen}}}
    route: {{domains: ["{name}.local"]}}
"""

PLANES = (("debounce 10ms/max 100ms", 0.01, 0.1), ("debounce 0 (off)", 0.0, 0.0))


def _acked(plane: ControlPlane, node: str, type_url: str) -> dict[str, Any]:
    return plane.ads.node_status().get(node, {}).get("types", {}).get(type_url) or {}


async def _all_acked(plane: ControlPlane, node: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        snapshot = plane.cache.snapshot
        if snapshot is not None and all(
                _acked(plane, node, t).get("acked_version") == snapshot.version(t)
                for t in TYPE_ORDER):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{node} did not ACK every type within {timeout:g}s: "
                               f"{plane.ads.node_status().get(node)}")
        await asyncio.sleep(0.01)


async def _one_round(planes: list[ControlPlane], nodes: list[str], client: Any, keys: Keys,
                     down: bool) -> list[dict[str, float] | None]:
    """One etcd write; per plane, the times to its snapshot and its Envoy's EDS ACK."""
    before = []
    for plane in planes:
        assert plane.cache.snapshot is not None
        before.append(plane.cache.snapshot.version(ENDPOINT))
    found: list[dict[str, float] | None] = [None] * len(planes)
    t0 = time.time()
    p0 = time.perf_counter()
    await set_member_admin(client, keys, "svc1", "b", down=down, reason="bench")
    t_put = time.time()
    deadline = p0 + ACK_TIMEOUT
    while time.perf_counter() < deadline and any(f is None for f in found):
        for i, plane in enumerate(planes):
            snapshot = plane.cache.snapshot
            if found[i] is not None or snapshot is None:
                continue
            version = snapshot.version(ENDPOINT)
            status = _acked(plane, nodes[i], ENDPOINT)
            if version == before[i] or status.get("acked_version") != version:
                continue
            build = plane.last_build
            found[i] = {
                "total": status["ack_time"] - t0,
                "polled": time.perf_counter() - p0,
                "ops_call": t_put - t0,
                "to_snapshot": build["at"] - t_put,
                "rebuild": build["seconds"],
                "to_ack": status["ack_time"] - build["at"],
            }
        await asyncio.sleep(0.001)
    return found


async def bench_ack(rounds: int, work: Path) -> dict[str, Any]:
    stack = Owner(work, grace=3.0)
    planes: list[ControlPlane] = []
    envoys: list[EnvoyProcess] = []
    client: Any = None
    keys = Keys(f"/meshxl-bench-{os.getpid()}")
    ports = free_ports(9 + 1 + 2 * len(PLANES))
    listen = ports.pop()
    model = SMALL_MODEL.format(clusters="".join(
        SMALL_CLUSTER.format(name=f"svc{k}", p0=ports.pop(), p1=ports.pop(), p2=ports.pop(),
                             listen=listen) for k in range(3)))
    nodes = [f"bench-envoy-{i}" for i in range(len(PLANES))]
    step = "starting etcd"
    try:
        async with asyncio.timeout(SETUP_TIMEOUT):
            url = (await start_etcd(stack))[0]
            step = "storing the model"
            client = etcd.client(url)
            await client.connect()
            await apply_model(client, keys, model, "bench model")
            for i, (_, quiet, max_delay) in enumerate(PLANES):
                step = f"starting control plane {i}"
                plane = ControlPlane(ControlPlaneConfig(
                    listen=f"{HOST}:{ports.pop()}", etcd=url, etcd_root=keys.root,
                    debounce=quiet, max_delay=max_delay, replica=f"bench-{i}"))
                planes.append(plane)
                await plane.start()
                envoys.append(EnvoyProcess(
                    build_bootstrap(nodes[i], [(HOST, plane.port)], admin_port=ports.pop()),
                    work, log_level="warning", name=nodes[i], hot_restart=False))
            step = "starting Envoy"
            for envoy in envoys:
                await envoy.start()
            for envoy in envoys:
                await envoy.wait_ready(SETUP_TIMEOUT)
            step = "waiting for every type to be ACKed"
            for plane, node in zip(planes, nodes, strict=True):
                await _all_acked(plane, node, SETUP_TIMEOUT)

        step = "measuring"
        samples: list[list[dict[str, float]]] = [[] for _ in PLANES]
        timeouts = [0 for _ in PLANES]
        for r in range(rounds):
            found = await _one_round(planes, nodes, client, keys, down=r % 2 == 0)
            for i, f in enumerate(found):
                if f is None:
                    timeouts[i] += 1
                else:
                    samples[i].append(f)
            await asyncio.sleep(0.02)  # let node-status publishing settle between rounds
        step = "cleaning up etcd"
        await set_member_admin(client, keys, "svc1", "b", down=False)
        await client.delete_prefix(keys.base.encode())
    except TimeoutError as exc:
        traceback.print_exc()
        logs = stack.report()
        raise SystemExit(f"timed out {step} (> {SETUP_TIMEOUT:g} s): {exc}\n{logs}") from None
    finally:
        for envoy in envoys:
            await envoy.stop()
        for plane in planes:
            await plane.stop()
        if client is not None:
            await client.close()
        await stack.aclose()

    out: dict[str, Any] = {"rounds": rounds, "model": "3 clusters x 3 members, maglev, "
                           "health checks off, one shared listener", "planes": []}
    for (label, quiet, max_delay), s, lost in zip(PLANES, samples, timeouts, strict=True):
        entry: dict[str, Any] = {"label": label, "debounce_s": quiet,
                                 "max_delay_s": max_delay, "timeouts": lost}
        for key in ("total", "polled", "ops_call", "to_snapshot", "rebuild", "to_ack"):
            if s:
                entry[key + "_ms"] = _ms([x[key] for x in s])
        out["planes"].append(entry)
    out["nacks"] = [p.ads.nacks for p in planes]
    return out


# -- report ---------------------------------------------------------------------------


def print_report(res: dict[str, Any]) -> None:
    c = res["compile"]
    m = c["model"]
    print(f"\n== compile + encode: {m['clusters']} clusters x {m['members_per_cluster']} "
          f"members, {m['listeners']} listeners (protobuf {res['env']['protobuf']})")
    print(f"   resources {m['resources']}; response bytes {m['response_bytes']}; "
          f"model validation {m['validate_ms']:.0f} ms (once)")
    print(_header())
    print(_row("compile_resources", c["compile_ms"]))
    print(_row("Snapshot.build (encode once)", c["snapshot_build_ms"]))
    print(_row("compile + Snapshot.build", c["compile_plus_build_ms"],
               f"median / {TARGET_COMPILE_MS:.0f} ms target = "
               f"{c['ratio_compile_plus_build_vs_target']:.2f}x"))
    print(_row("member down: full compile + build", c["member_down_full_rebuild_ms"],
               f"changed: {', '.join(c['member_down_changed_types']) or 'none'}"))
    print(_row("member down: Compiler + build(previous)", c["member_down_incremental_ms"],
               f"{c['member_down_incremental_encodes']} resource encoded; full / incremental"
               f" = {c['ratio_full_vs_incremental_member_down']:.0f}x"))
    print(_row(f"encode-once, {c['streams']} streams", c["encode_once_streams_ms"]))
    print(_row(f"naive Any.Pack+Serialize, {c['streams']} streams", c["naive_streams_ms"],
               f"naive / encode-once = {c['ratio_naive_vs_encode_once']:.1f}x"))
    if "profile_top_tottime" in c:
        print(c["profile_top_tottime"])

    a = res["ack"]
    print(f"\n== one member change -> Envoy EDS ACK ({a['rounds']} rounds, {a['model']})")
    print(f"  {'plane':<26} {'step':<34} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    steps = (("total", "write -> EDS ACK (total)"),
             ("ops_call", "  set_member_admin (get+parse+put)"),
             ("to_snapshot", "  put -> snapshot (watch+debounce)"),
             ("rebuild", "    of which compile+encode"),
             ("to_ack", "  snapshot -> ACK (push+apply)"))
    for p in a["planes"]:
        for key, label in steps:
            s = p.get(key + "_ms")
            if s:
                print(f"  {p['label']:<26} {label:<34} {s['median']:>8.2f} "
                      f"{s.get('p99', s['max']):>8.2f} {s['max']:>8.2f}")
        if p["timeouts"]:
            print(f"  {p['label']:<26} TIMEOUTS (> {ACK_TIMEOUT:g} s): {p['timeouts']}")
    if len(a["planes"]) == 2 and all("total_ms" in p for p in a["planes"]):
        d, z = (p["total_ms"]["median"] for p in a["planes"])
        print(f"  debounce cost (median, side by side): {d - z:+.2f} ms "
              f"({d / z:.2f}x of the undebounced path)")
    print(f"  NACKs: {a['nacks']}")

    print("\n== summary")
    print(f"  compile + encode 1000x16: {c['compile_plus_build_ms']['median']:.1f} ms median, "
          f"{c['ratio_compile_plus_build_vs_target']:.2f}x the {TARGET_COMPILE_MS:.0f} ms "
          f"target ({'MET' if c['ratio_compile_plus_build_vs_target'] <= 1 else 'MISSED'})")
    print(f"  encode-once vs naive per-stream ({c['streams']} streams): "
          f"{c['ratio_naive_vs_encode_once']:.1f}x faster")
    for p in a["planes"]:
        if "total_ms" in p:
            print(f"  member change -> ACK [{p['label']}]: p50 {p['total_ms']['median']:.1f} ms, "
                  f"p99 {p['total_ms']['p99']:.1f} ms (informational)")
    print(f"  results: {RESULTS}")


def verdicts(res: dict[str, Any]) -> list[Verdict]:
    c = res["compile"]
    m = c["model"]
    return [Verdict(
        f"xDS: compile + encode {m['clusters']:,} clusters x {m['members_per_cluster']} "
        "endpoints, median", c["compile_plus_build_ms"]["median"], TARGET_COMPILE_MS, "ms",
        reference=f"compile {c['compile_ms']['median']} + encode "
        f"{c['snapshot_build_ms']['median']} ms; one member down incremental "
        f"{c['member_down_incremental_ms']['median']} ms")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (< ~20 s)")
    parser.add_argument("--profile", action="store_true",
                        help="print a cProfile of one compile + build")
    args = parser.parse_args()
    args.quick = quick_requested(args.quick)
    repeats, naive_repeats, rounds = (3, 1, 10) if args.quick else (7, 3, 30)

    started = time.perf_counter()
    res: dict[str, Any] = {
        "benchmark": "xds_compile",
        "quick": args.quick,
        "env": {**env_info(), "protobuf": api_implementation.Type()},
    }
    res["compile"] = bench_compile(repeats, naive_repeats, args.profile)
    with tempfile.TemporaryDirectory(prefix="meshxl-bench-") as work:
        res["ack"] = asyncio.run(bench_ack(rounds, Path(work)))
    res["seconds"] = round(time.perf_counter() - started, 1)
    verdict_list = verdicts(res)
    write_results("xds_compile", res, verdict_list)
    print_report(res)
    print_verdicts("xDS compile + encode", verdict_list)
    print(f"  ran in {res['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
