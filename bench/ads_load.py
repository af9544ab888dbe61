"""1,000 simulated ADS streams on one control plane: convergence and memory.

Run: ``.venv/bin/python bench/ads_load.py [--quick] [--streams N]``

A local etcd and one real ``meshxl serve xds`` process (default debounce) serving a
model of 100 load-sharing maglev clusters x 4 members behind 10 listeners. A load
client in a separate process opens ``--streams`` state-of-the-world ADS streams (gRPC,
one HTTP/2 connection each by default, like separate Envoys), each behaving as Envoy
does: it subscribes to CDS and LDS (wildcard), then to the EDS of every cluster and
the RDS of every listener it received, and ACKs every response by its nonce and
version. Each stream is its own Envoy node.

Measured:

* connect storm: all streams opened at once -> every stream ACKed all four types;
* a change (one member down/up, what ``meshxl member down|up`` writes to etcd) ->
  every stream ACKed the new EDS version: from the etcd write to the control plane's
  record of the last ACK (``/v1/nodes``); beside it the control plane's own
  ``meshxl_xds_convergence_seconds`` (change seen -> last ACK) and the client's view;
* the control plane's RSS with no stream, with all streams converged, and its peak.

The reference is the same client and the same changes with one stream, in the same
run. Writes ``bench/results/ads_load.json``. Loopback only; bounded loops; every
process is stopped at the end, also on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import aiohttp
import grpc
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
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest, DiscoveryResponse

from meshxl import etcd
from meshxl.etcd.keys import Keys
from meshxl.local.ports import free_ports
from meshxl.local.procs import Owner
from meshxl.local.procs import run as run_command
from meshxl.local.servers import HOST
from meshxl.local.wait import LocalError
from meshxl.stats import cpu_seconds, rss_bytes
from meshxl.xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE, TYPE_ORDER

NAME = "ads_load"
SCRIPT = Path(__file__).resolve()
TARGET_CONVERGE_S = 1.0
TARGET_RSS_MB = 150.0
CLUSTERS = 100
MEMBERS = 4
METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
TOGGLED = ("svc-0007", "m01")
SETUP_TIMEOUT = 60.0
ROUND_TIMEOUT = 30.0
POLL = 0.05


# -- the load client (a separate process: ``--client JSON``) -------------------------------


class Hub:
    """What all simulated Envoys ACKed: per (type, version), how many and when the last."""

    def __init__(self, streams: int) -> None:
        self.streams = streams
        self.count: dict[tuple[str, str], int] = {}
        self.complete: dict[tuple[str, str], float] = {}
        self.changed = asyncio.Event()
        self.errors: list[str] = []
        self._names: dict[tuple[str, str], list[str]] = {}

    def acked(self, type_url: str, version: str) -> None:
        key = (type_url, version)
        n = self.count[key] = self.count.get(key, 0) + 1
        if n == self.streams:
            self.complete[key] = time.time()
            self.changed.set()

    def forget(self, type_url: str) -> None:
        """Start counting ``type_url`` afresh (a version may come back: down, up)."""
        for key in [k for k in self.count if k[0] == type_url]:
            del self.count[key]
            self.complete.pop(key, None)

    def complete_versions(self, type_url: str) -> dict[str, float]:
        return {v: t for (tu, v), t in self.complete.items() if tu == type_url}

    def names(self, response: DiscoveryResponse) -> list[str]:
        """Cluster names of a CDS response, route names of an LDS one (decoded once per
        version: every stream gets the same bytes)."""
        key = (response.type_url, response.version_info)
        found = self._names.get(key)
        if found is None:
            if response.type_url == CLUSTER:
                found = sorted(cluster_pb2.Cluster.FromString(a.value).name
                               for a in response.resources)
            else:
                found = []
                for a in response.resources:
                    listener = listener_pb2.Listener.FromString(a.value)
                    for chain in listener.filter_chains:
                        for f in chain.filters:
                            hcm = hcm_pb2.HttpConnectionManager()
                            if f.typed_config.Unpack(hcm) and hcm.HasField("rds"):
                                found.append(hcm.rds.route_config_name)
                found = sorted(set(found))
            self._names[key] = found
        return found


async def sim_envoy(node_id: str, channel: grpc.aio.Channel, hub: Hub) -> None:
    """One ADS stream that behaves like Envoy's SotW ADS client."""
    call = channel.stream_stream(METHOD, request_serializer=DiscoveryRequest.SerializeToString,
                                 response_deserializer=DiscoveryResponse.FromString)()
    node = base_pb2.Node(id=node_id, cluster="bench-sim")
    subscribed: dict[str, list[str]] = {}
    await call.write(DiscoveryRequest(node=node, type_url=CLUSTER))
    await call.write(DiscoveryRequest(node=node, type_url=LISTENER))
    try:
        while True:
            response = await call.read()
            if response is grpc.aio.EOF:
                return
            type_url = response.type_url
            dependent = {CLUSTER: ENDPOINT, LISTENER: ROUTE}.get(type_url)
            if dependent is not None:
                names = hub.names(response)
                if subscribed.get(dependent) != names:
                    first = dependent not in subscribed
                    subscribed[dependent] = names
                    if first:  # Envoy asks for the new clusters' EDS before it ACKs CDS
                        await call.write(DiscoveryRequest(node=node, type_url=dependent,
                                                          resource_names=names))
            await call.write(DiscoveryRequest(
                node=node, type_url=type_url, version_info=response.version_info,
                response_nonce=response.nonce, resource_names=subscribed.get(type_url, [])))
            hub.acked(type_url, response.version_info)
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.CANCELLED:
            hub.errors.append(f"{node_id}: {exc.code().name}: {exc.details()}")
    finally:
        call.cancel()



async def _server_last_ack(http: aiohttp.ClientSession, admin: str, type_url: str,
                           version: str, streams: int, deadline: float) -> float:
    """The control plane's time of the last node's ACK of ``version`` (all nodes)."""
    while True:
        async with http.get(f"{admin}/v1/nodes") as resp:
            nodes = await resp.json(content_type=None)
        acks = [n["types"].get(type_url, {}) for n in nodes.values() if n["streams"] > 0]
        if len(acks) >= streams and all(a.get("acked_version") == version for a in acks):
            return max(float(a["ack_time"]) for a in acks)
        if time.monotonic() > deadline:
            raise TimeoutError(f"the control plane did not record every ACK of {version}")
        await asyncio.sleep(POLL)


async def _wait_complete(hub: Hub, type_urls: tuple[str, ...], exclude: dict[str, str],
                         deadline: float) -> dict[str, tuple[str, float]]:
    """Until every stream ACKed some version of each type (other than ``exclude``'s)."""
    while True:
        found = {}
        for t in type_urls:
            done = {v: at for v, at in hub.complete_versions(t).items() if v != exclude.get(t)}
            if done:
                version = max(done, key=lambda v: done[v])
                found[t] = (version, done[version])
        if len(found) == len(type_urls):
            return found
        if hub.errors:
            raise RuntimeError(f"streams failed: {hub.errors[:3]}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"not every stream ACKed {[t.rsplit('.', 1)[-1] for t in type_urls]}"
                               f" ({len(hub.complete)} complete)")
        hub.changed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(remaining):
                await hub.changed.wait()


async def _load(cfg: dict[str, Any]) -> dict[str, Any]:
    streams, per_channel = int(cfg["streams"]), int(cfg["streams_per_channel"])
    pid, admin = int(cfg["server_pid"]), str(cfg["admin"])
    hub = Hub(streams)
    keys = Keys(cfg["etcd_root"])
    admin_key = keys.member_admin(*TOGGLED).encode()
    admin_value = json.dumps({"reason": "bench", "by": "bench",
                              "at": "2026-01-01T00:00:00Z"}).encode()
    out: dict[str, Any] = {"streams": streams, "streams_per_channel": per_channel,
                           "rss_mb": {"before": (rss_bytes(pid) or 0) / 2**20}}
    peak = [rss_bytes(pid) or 0]

    async def sample() -> None:
        while True:
            peak[0] = max(peak[0], rss_bytes(pid) or 0)
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample())
    channels: list[grpc.aio.Channel] = []
    tasks: list[asyncio.Task[None]] = []
    client = etcd.client(cfg["etcd"])
    await client.connect()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10.0)) as http:
            cpu0, own0 = cpu_seconds(pid), time.process_time()
            t0 = time.time()
            for i in range(streams):
                if i % per_channel == 0:
                    channels.append(grpc.aio.insecure_channel(
                        cfg["target"], options=[("grpc.use_local_subchannel_pool", 1)]))
                tasks.append(asyncio.create_task(
                    sim_envoy(f"sim-{i:05d}", channels[-1], hub)))
            deadline = time.monotonic() + ROUND_TIMEOUT
            done = await _wait_complete(hub, TYPE_ORDER, {}, deadline)
            client_done = max(at for _, at in done.values())
            eds_version = done[ENDPOINT][0]
            server_done = await _server_last_ack(http, admin, ENDPOINT, eds_version, streams,
                                                 deadline)
            out["connect"] = {"client_all_acked_s": round(client_done - t0, 3),
                              "server_last_eds_ack_s": round(server_done - t0, 3),
                              "server_cpu_s": _delta(cpu_seconds(pid), cpu0),
                              "client_cpu_s": round(time.process_time() - own0, 3)}
            await asyncio.sleep(1.0)  # let node-status publishing settle
            out["rss_mb"]["connected"] = (rss_bytes(pid) or 0) / 2**20
            rounds = []
            for r in range(int(cfg["rounds"])):
                before = eds_version
                hub.forget(ENDPOINT)  # every stream has ACKed `before`: count from zero
                count0, sum0 = await convergence_histogram(http, admin)
                cpu0, own0 = cpu_seconds(pid), time.process_time()
                t_write = time.time()
                if r % 2 == 0:
                    await client.put(admin_key, admin_value)
                else:
                    await client.delete(admin_key)
                t_commit = time.time()
                deadline = time.monotonic() + ROUND_TIMEOUT
                done = await _wait_complete(hub, (ENDPOINT,), {ENDPOINT: before}, deadline)
                eds_version, client_done = done[ENDPOINT]
                server_done = await _server_last_ack(http, admin, ENDPOINT, eds_version,
                                                     streams, deadline)
                count1, sum1 = await convergence_histogram(http, admin)
                rounds.append({
                    "total_ms": (server_done - t_write) * 1000,
                    "from_commit_ms": (server_done - t_commit) * 1000,
                    "client_all_acked_ms": (client_done - t_write) * 1000,
                    "control_plane_ms": (sum1 - sum0) * 1000 if count1 - count0 == 1 else None,
                    "server_cpu_s": _delta(cpu_seconds(pid), cpu0),
                    "client_cpu_s": round(time.process_time() - own0, 3),
                })
                await asyncio.sleep(0.5 if streams > 1 else 0.05)
            out["rounds"] = rounds
            out["rss_mb"]["after_rounds"] = (rss_bytes(pid) or 0) / 2**20
            out["rss_mb"]["peak"] = peak[0] / 2**20
            out["errors"] = hub.errors[:5]
    finally:
        sampler.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, sampler, return_exceptions=True)
        for channel in channels:
            await channel.close()
        await client.close()
    out["rss_mb"] = {k: round(v, 1) for k, v in out["rss_mb"].items()}
    for key in ("total_ms", "from_commit_ms", "client_all_acked_ms", "control_plane_ms"):
        out[key] = summary_ms([x[key] for x in out["rounds"] if x[key] is not None])
    return out


def _delta(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else round(after - before, 3)


def client_main(raw: str) -> int:
    print(json.dumps(asyncio.run(_load(json.loads(raw)))))
    return 0


# -- the orchestrator ----------------------------------------------------------------------


async def _run_client(cfg: dict[str, Any], timeout: float) -> dict[str, Any]:
    code, out, err = await run_command(
        [sys.executable, str(SCRIPT), "--client", json.dumps(cfg)], timeout=timeout)
    if code != 0:
        raise LocalError(f"load client ({cfg['streams']} streams) failed:\n{err[-3000:]}")
    return dict(json.loads(out.strip().splitlines()[-1]))


async def run(work: Path, streams: int, rounds: int, per_channel: int) -> dict[str, Any]:
    stack = Owner(work, grace=3.0)
    listener = free_ports(1)[0]
    model = mesh_model(CLUSTERS, MEMBERS, listener_port=listener, clusters_per_listener=10)
    res: dict[str, Any] = {"model": f"{CLUSTERS} clusters x {MEMBERS} members, "
                           f"{CLUSTERS // 10} listeners, maglev"}
    step = "starting etcd and the control plane"
    try:
        async with asyncio.timeout(SETUP_TIMEOUT):
            cp = await start_control_plane(stack, model)
        pid = cp["process"].pid
        res["rss_mb_idle"] = round((rss_bytes(pid) or 0) / 2**20, 1)
        base = {"target": f"{HOST}:{cp['port']}", "admin": cp["admin"], "etcd": cp["etcd"],
                "etcd_root": cp["keys"].root, "server_pid": pid, "rounds": rounds,
                "streams_per_channel": per_channel}
        budget = SETUP_TIMEOUT + rounds * (ROUND_TIMEOUT + 1)
        step = "measuring one stream (reference)"
        res["one"] = await _run_client({**base, "streams": 1}, budget)
        step = f"measuring {streams} streams"
        res["many"] = await _run_client({**base, "streams": streams}, budget)
    except (LocalError, TimeoutError, OSError) as exc:
        traceback.print_exc()
        logs = stack.report()
        raise SystemExit(f"failed {step}: {exc!r}\n{logs}") from None
    finally:
        await stack.aclose()
    return res


def verdicts(res: dict[str, Any]) -> list[Verdict]:
    one, many = res["one"], res["many"]
    n = many["streams"]
    p99 = many["total_ms"].get("p99")
    return [
        Verdict(f"xDS: change -> all {n:,} simulated ADS streams ACKed, p99",
                None if p99 is None else p99 / 1000, TARGET_CONVERGE_S, "s",
                reference=f"1 stream p99 {one['total_ms'].get('p99')} ms; connect storm of "
                f"{n:,}: {many['connect']['server_last_eds_ack_s']} s"),
        Verdict(f"xDS: control-plane RSS with {n:,} streams", many["rss_mb"]["connected"],
                TARGET_RSS_MB, "MB",
                reference=f"no stream {many['rss_mb']['before']} MB; peak "
                f"{many['rss_mb']['peak']} MB"),
    ]


def print_report(res: dict[str, Any], verdict_list: list[Verdict]) -> None:
    one, many = res["one"], res["many"]
    print(f"\n== {many['streams']:,} simulated ADS streams on one control plane ({res['model']}; "
          f"{many['streams_per_channel']} stream(s) per connection; {len(many['rounds'])} "
          "member down/up changes)")
    print(f"  {'':<52} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for part, label in ((one, "1 stream (reference)"), (many, f"{many['streams']:,} streams")):
        for key, text in (("total_ms", "etcd write -> last ACK (server)"),
                          ("control_plane_ms", "control plane: seen -> last ACK"),
                          ("client_all_acked_ms", "client: every stream ACKed")):
            s = part[key]
            if s.get("n"):
                print(f"  {label + ': ' + text:<52} {s['p50']:>8.1f} {s['p99']:>8.1f} "
                      f"{s['max']:>8.1f}")
        cpu = [r["server_cpu_s"] for r in part["rounds"] if r["server_cpu_s"] is not None]
        ccpu = [r["client_cpu_s"] for r in part["rounds"]]
        if cpu:
            print(f"    CPU per change: control plane {max(cpu):.2f} s max, client "
                  f"{max(ccpu):.2f} s max")
    c = many["connect"]
    print(f"  connect storm: every stream ACKed all types after {c['client_all_acked_s']} s "
          f"(server's last EDS ACK {c['server_last_eds_ack_s']} s; control plane CPU "
          f"{c['server_cpu_s']} s, client CPU {c['client_cpu_s']} s)")
    print(f"  control-plane RSS MB: idle {res['rss_mb_idle']}, {many['rss_mb']}")
    if many.get("errors"):
        print(f"  stream errors: {many['errors']}")
    print_verdicts("ADS load", verdict_list)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 streams, 4 changes")
    parser.add_argument("--streams", type=int, help="streams (default 1000; quick 200)")
    parser.add_argument("--rounds", type=int, help="changes (default 10; quick 4)")
    parser.add_argument("--streams-per-channel", type=int, default=1,
                        help="ADS streams sharing one HTTP/2 connection (default 1)")
    parser.add_argument("--client", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        return client_main(args.client)
    quick = quick_requested(args.quick)
    streams = args.streams or (200 if quick else 1000)
    rounds = args.rounds or (4 if quick else 10)
    if streams < 1 or rounds < 1 or args.streams_per_channel < 1:
        parser.error("streams, rounds and streams per channel must be >= 1")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 4 * streams + 256))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # inherited by the children
    return run_benchmark(
        NAME, quick, "meshxl-bench-ads-",
        lambda work: run(work, streams, rounds, args.streams_per_channel),
        verdicts, print_report)


if __name__ == "__main__":
    sys.exit(main())
