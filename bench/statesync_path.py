"""statesync sidecar: the CPU of its request path in one process, etcd answered in-process.

Run: ``.venv/bin/python bench/statesync_path.py [--quick]``

``bench/statesync.py`` measures writes per second with client, sidecar and etcd sharing
two cores: what users get, but its rounds spread by a fifth or more as this machine's
speed moves. This benchmark measures the sidecar's own work per request alone in one
process, where repetitions agree within a few percent, so a change to the write path is
judged here before it is measured end to end.

What runs is the sidecar's code from a request's bytes to its answer's bytes: the server
(:mod:`meshxl.statesync.http`) parses pipelined requests, the API checks them,
:class:`~meshxl.statesync.sessions.Sessions` and
:class:`~meshxl.statesync.store.SessionStore` build the guarded writes and batch them,
and each batch's answer and its watch events, as etcd sends them (every write
succeeds), are taken up by the store and the session cache (events first, as they
usually arrive). Building etcd's answers is timed apart and left out; gRPC, the kernel
and the other processes of a real run are not here (``docs/performance.md``: a write
costs the sidecar about twice as much CPU end to end).

Six loads, each a round of 4 connections x 16 pipelined requests:

* ``floor``: the same server with a PUT route that answers at once (HTTP in and out);
* ``put``: ``PUT /v1/sessions/{id}`` with a ~1 KiB JSON state;
* ``put batch 1``: the same through a store sending each write in a transaction of its
  own, 64 in flight (``bench/statesync.py``'s unbatched sidecar; etcd's side answers
  each transaction as it does a batch);
* ``bulk``: ``POST /v1/sessions:bulkSave`` of 16 sessions (figures per session);
* ``put fenced``, ``bulk fenced``: the same through a session shard's store, whose
  every batch compares the shard map version fence (docs/scaling.md, "The map version
  fence"), side by side with the two above.

Reported: CPU microseconds per request (per session for bulk saves), the least of
several repetitions of process time; and Python function calls per request, from one
profiled pass, which do not depend on the machine's speed at all. No targets: the
throughput targets are ``bench/statesync.py``'s.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import pstats
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aetcd import rpc
from benchlib import env_info, quick_requested, write_results

from meshxl.etcd.keys import Keys
from meshxl.loops import loop_factory
from meshxl.statesync.api import SessionRoutes
from meshxl.statesync.cache import SessionCache
from meshxl.statesync.http import WRITE, Connection, HttpServer, Request, Response, Router
from meshxl.statesync.metrics import StatesyncMetrics
from meshxl.statesync.quota import QuotaGuard
from meshxl.statesync.sessions import Sessions
from meshxl.statesync.store import Fencing, SessionStore
from meshxl.statesync.writes import Settings

CONNECTIONS = 4
PIPELINED = 16
STATE = json.dumps({"tag": "x", "user": "u-0001", "cart": [], "pad": "x" * 960}).encode()
CLUSTER, MEMBER = "bench", "m1"
ANSWER = b'{"session":"s","etag":"1","owner":"m1","created":false,"takeover":false,' \
         b'"replicated":true}'


class _Etcd:
    """etcd's side, in-process: ``Txn`` answers every guarded put with success at the
    next revision; the puts' watch events go to the session cache before the answer
    comes back. Its own time (building answers and events) is counted in
    :attr:`spent` to be taken out."""

    def __init__(self, cache: SessionCache):
        self.cache = cache
        self.revision = 100
        self.spent = 0.0
        self.profiler: cProfile.Profile | None = None
        """Paused while etcd's side runs."""
        self.channel = self  # what the store takes the Txn call from
        self.metadata = None

    def unary_unary(self, _method: str, **_codecs: Any) -> Callable[..., Awaitable[Any]]:
        return self.txn

    async def txn(self, request: bytes, timeout: float | None = None,
                  metadata: Any = None) -> Any:
        if self.profiler is not None:
            self.profiler.disable()
        started = time.process_time()
        self.revision += 1
        ops = rpc.TxnRequest.FromString(request).success
        answer = rpc.TxnResponse(succeeded=True)  # the batch's own compares hold
        answer.header.revision = self.revision
        events = rpc.WatchResponse()
        for op in ops:
            answer.responses.add().response_txn.succeeded = True
            put = op.request_txn.success[0].request_put
            event = events.events.add()
            event.kv.key, event.kv.value = put.key, put.value
            event.kv.mod_revision = self.revision
        wire_answer, wire_events = answer.SerializeToString(), events.SerializeToString()
        self.spent += time.process_time() - started
        if self.profiler is not None:
            self.profiler.enable()
        await asyncio.sleep(0)  # the round trip: the answer comes in a later turn
        for event in rpc.WatchResponse.FromString(wire_events).events:
            self.cache._apply(event)  # as the cache's watch loop applies them
        return rpc.TxnResponse.FromString(wire_answer)


class _Transport:
    """A connection's transport: counts the answers' bytes."""

    def __init__(self) -> None:
        self.written = 0
        self.answers = 0
        """Answers written (status lines: a state in a body cannot hold one)."""

    def write(self, data: bytes) -> None:
        self.written += len(data)
        self.answers += data.count(b"HTTP/1.1 20")

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0  # a client that reads everything at once

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


@dataclass
class _Sidecar:
    """What the API's routes use of a sidecar."""

    sessions: Sessions
    metrics: StatesyncMetrics = field(default_factory=StatesyncMetrics)
    quota: QuotaGuard = field(default_factory=QuotaGuard.unlimited)


def _sessions(fenced: bool = False, unbatched: bool = False) -> tuple[Sessions, _Etcd]:
    keys = Keys("/meshxl")
    cache = SessionCache(None, keys.sessions_prefix(CLUSTER))  # type: ignore[arg-type]
    etcd = _Etcd(cache)
    # Unbatched: bench/statesync.py's "batch 1, 64 in flight" sidecar, a transaction a write.
    store = SessionStore(etcd, ttl=1800.0,  # type: ignore[arg-type]
                         **({"max_batch_ops": 1, "max_inflight": CONNECTIONS * PIPELINED}
                            if unbatched else {}))
    if fenced:  # a session shard's store: every batch compares the map version fence
        store.fence(Fencing(keys.shard_fence.encode(), lambda: 7, lambda _: None, "s1"))
    bucket = int(time.time() // store.leases.bucket)
    store.leases._leases = {bucket: 7, bucket + 1: 7}  # granted: no lease calls
    return Sessions(store, cache, keys, CLUSTER, MEMBER, Settings(),
                    StatesyncMetrics()), etcd


def _requests(load: str, connection: int) -> bytes:
    """One round's pipelined requests on one connection."""
    head = (b"%s %s HTTP/1.1\r\nHost: 127.0.0.1:7070\r\nUser-Agent: meshxl-client\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n")
    if load.startswith("bulk"):
        document = json.loads(STATE)
        body = json.dumps({"items": [{"session": f"s-{connection}-{i:03d}", "data": document}
                                     for i in range(PIPELINED)]}).encode()
        return head % (b"POST", b"/v1/sessions:bulkSave", len(body)) + body
    return b"".join(head % (b"PUT", f"/v1/sessions/s-{connection}-{i:03d}".encode(),
                            len(STATE)) + STATE for i in range(PIPELINED))


async def _answer_at_once(_request: Request) -> Response:
    return Response(200, ANSWER, [("ETag", '"1"'), ("X-Meshxl-Owner", MEMBER),
                                  ("X-Meshxl-Source", "etcd"),
                                  ("Content-Type", "application/json")])


def _server(load: str) -> tuple[HttpServer, _Etcd | None]:
    if load == "floor":
        router = Router()
        router.add("PUT", "/v1/sessions/{session_id}", _answer_at_once, max_body=1 << 20,
                   access=WRITE, key="session_id")
        return HttpServer(router), None
    sessions, etcd = _sessions(fenced=load.endswith("fenced"), unbatched=load == "put batch 1")
    routes = SessionRoutes(_Sidecar(sessions))
    return HttpServer(routes.router(sessions.settings.max_bytes)), etcd


async def measure(load: str, rounds: int, repeats: int, profile: bool = False
                  ) -> dict[str, Any]:
    """CPU microseconds per request of ``load`` (the least of ``repeats`` runs of
    ``rounds`` rounds), and its Python function calls per request."""
    server, etcd = _server(load)
    connections = []
    for i in range(CONNECTIONS):
        connection = Connection(server.site)
        transport = _Transport()
        connection.connection_made(transport)  # type: ignore[arg-type]
        connections.append((connection, transport, _requests(load, i)))
    per_round = CONNECTIONS * PIPELINED

    async def one_round() -> None:
        for connection, _, data in connections:
            connection.data_received(data)
        for _ in range(8):  # parse, batch, etcd's turn, answers, flushes
            await asyncio.sleep(0)

    for _ in range(20):
        await one_round()
    answered = sum(t.written for _, t, _ in connections)
    if not answered:
        raise RuntimeError(f"{load}: no answers written")
    gc.collect()
    runs = []
    for _ in range(repeats):
        spent = etcd.spent if etcd is not None else 0.0
        started = time.process_time()
        for _ in range(rounds):
            await one_round()
        cpu = time.process_time() - started - ((etcd.spent - spent) if etcd else 0.0)
        runs.append(cpu / (rounds * per_round) * 1e6)
    profiler = cProfile.Profile()
    if etcd is not None:
        etcd.profiler = profiler  # etcd's own calls are not the sidecar's
    profiler.enable()
    for _ in range(rounds):
        await one_round()
    profiler.disable()
    calls = pstats.Stats(profiler).total_calls  # type: ignore[attr-defined]
    return {"us_per_request": round(min(runs), 2), "runs_us": [round(r, 2) for r in runs],
            "calls_per_request": round(calls / (rounds * per_round), 1),
            "requests": per_round * rounds * (repeats + 1)}


async def run(quick: bool) -> dict[str, Any]:
    rounds, repeats = (60, 3) if quick else (300, 9)
    loads = {load: await measure(load, rounds, repeats)
             for load in ("floor", "put", "put batch 1", "put fenced", "bulk", "bulk fenced")}
    return {"rounds": rounds, "repeats": repeats, "connections": CONNECTIONS,
            "pipelined": PIPELINED, "state_bytes": len(STATE), "loads": loads,
            "bulk_sessions_per_request": PIPELINED}


def print_report(res: dict[str, Any]) -> None:
    loads = res["loads"]
    floor = loads["floor"]["us_per_request"]
    print(f"\n== the sidecar's request path in one process ({res['connections']} connections "
          f"x {res['pipelined']} pipelined, ~{res['state_bytes']} B states, least of "
          f"{res['repeats']} runs of {res['rounds']} rounds)")
    print(f"  {'load':<44} {'CPU us':>8} {'x floor':>8} {'calls':>7}  runs")
    labels = {"floor": "floor: HTTP in and out, answered at once",
              "put": "PUT of one session",
              "put batch 1": "PUT, batch 1 (a transaction each)",
              "put fenced": "PUT, a shard's store (map version fence)",
              "bulk": f"bulk save of {res['bulk_sessions_per_request']}, per session",
              "bulk fenced": "bulk save, a shard's store, per session"}
    for load, label in labels.items():
        m = loads[load]
        print(f"  {label:<44} {m['us_per_request']:>8.2f} "
              f"{m['us_per_request'] / floor:>7.2f}x {m['calls_per_request']:>7.1f}  "
              f"{m['runs_us']}")
    for load in ("put", "bulk"):
        print(f"  {load} with the fence / without: "
              f"{loads[load + ' fenced']['us_per_request'] / loads[load]['us_per_request']:.3f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a few seconds)")
    args = parser.parse_args()
    quick = quick_requested(args.quick)
    started = time.perf_counter()
    res: dict[str, Any] = {"benchmark": "statesync_path", "quick": quick, "env": env_info()}
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        res.update(runner.run(run(quick)))
    res["seconds"] = round(time.perf_counter() - started, 1)
    path = write_results("statesync_path", res, [])
    print_report(res)
    print(f"  results: {path}\n  ran in {res['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
