"""``meshxl validate`` passes implies Envoy ACKs: generated models (hypothesis), each
compiled and pushed through the real ADS server to one real Envoy, which must ACK every
type. Values are drawn across the whole range the model accepts, boundaries included.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from meshxl.local.envoy import EnvoyProcess, find_envoy
from meshxl.local.ports import free_port, free_ports
from meshxl.model import ModelError, parse_model
from meshxl.model.spec import MAX_DURATION, RETRY_CONDITIONS, UINT32_MAX
from meshxl.proxy.bootstrap import build_bootstrap
from meshxl.xds.cache import Snapshot, SnapshotCache
from meshxl.xds.compiler import compile_resources
from meshxl.xds.resources import CompileError
from meshxl.xds.server import AdsServer
from meshxl.xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE

T = TypeVar("T")
NODE = "hypothesis-envoy"
# Host-name members resolve as the control plane would resolve them.
RESOLVED = {"localhost": ("127.0.0.1", "::1"), "backend.example.test": ("127.0.0.9",)}
LISTENER_PORTS = free_ports(2)
LISTENER_ADDRESSES = ("127.0.0.1", "127.0.0.2", "::1")
VERDICT_WAIT = 20.0

try:
    find_envoy()
except Exception as exc:  # pragma: no cover - depends on the machine
    # Fail, not skip: a skipped check would look like a passing one (as for etcd).
    pytest.fail(f"envoy is not installed: {exc}", pytrace=False)


class AdsThread:
    """The real ADS server on its own event loop, so hypothesis drives it synchronously."""

    def __init__(self, work_dir: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.work_dir = work_dir
        self.previous: Snapshot | None = None

        async def setup() -> tuple[SnapshotCache, AdsServer, Any, int]:
            cache = SnapshotCache()
            ads = AdsServer(cache)
            server, port = await ads.serve("127.0.0.1:0")
            return cache, ads, server, port

        self.cache, self.ads, self.server, self.port = self.run(setup())
        bootstrap = build_bootstrap(NODE, [f"127.0.0.1:{self.port}"], admin_port=free_port(),
                                    otlp=f"127.0.0.1:{free_port()}")
        self.envoy = EnvoyProcess(bootstrap, work_dir, name="envoy-hypothesis",
                                  log_level="warning")
        self.run(self.envoy.start())

    def run(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        async def go() -> T:
            return fn()
        return self.run(go())  # type: ignore[no-any-return]

    def push(self, snapshot: Snapshot) -> None:
        self.call(lambda: self.cache.set(snapshot))

    def verdict(self, snapshot: Snapshot) -> str | None:
        """None once Envoy ACKed every type of ``snapshot``, else the NACK text."""
        versions = snapshot.versions
        wanted = [CLUSTER, ENDPOINT, LISTENER] + ([ROUTE] if snapshot.resources(ROUTE).entries
                                                  else [])
        deadline = time.monotonic() + VERDICT_WAIT
        while True:
            status = self.call(lambda: self.ads.node_status().get(NODE))
            if status is not None:
                nack = status["last_nack"]
                if nack is not None and nack["version"] == versions.get(nack["type_url"]):
                    return f"{nack['type_url']}: {nack['error']}"
                types = status["types"]
                if all(types.get(t, {}).get("acked_version") == versions[t] for t in wanted):
                    return None
            if time.monotonic() > deadline:
                return f"no answer from Envoy in {VERDICT_WAIT}s: {status}"
            time.sleep(0.01)

    def close(self) -> None:
        try:
            self.run(self.envoy.stop())
        finally:
            self.run(self.server.stop(None))
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


# One xdist worker runs the module: one Envoy for the module.
pytestmark = pytest.mark.xdist_group("test_envoy_accepts_models")


@pytest.fixture(scope="module")
def envoy_ads(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdsThread]:
    work_dir = tmp_path_factory.mktemp("envoy-accepts")
    ads = AdsThread(work_dir)
    try:
        yield ads
    finally:
        ads.close()
        shutil.rmtree(work_dir, ignore_errors=True)


# -- strategies: every field, across its whole accepted range -------------------------------

def durations(positive: bool = True) -> st.SearchStrategy[Any]:
    low = 0.001
    edge = st.sampled_from([low, 0.25, 1, "250ms", "2m", "1h", MAX_DURATION])
    some = st.floats(low, MAX_DURATION, allow_nan=False, allow_infinity=False)
    out = st.one_of(edge, some)
    return out if positive else st.one_of(st.just(0), out)


def ints(low: int, high: int) -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from([low, high]), st.integers(low, high))


addresses = st.sampled_from(["127.0.0.1", "127.0.0.2", "::1", "localhost",
                             "backend.example.test", "10.1.2.3"])
members = st.lists(st.fixed_dictionaries({
    "address": addresses, "port": ints(1, 65535)}, optional={
    "weight": ints(1, 10_000), "priority": ints(0, 100)}), min_size=1, max_size=3)

pins = st.one_of(
    st.none(), st.just({}),
    st.builds(lambda h, strict: {"header": h, "strict": strict},
              st.sampled_from(["x-meshxl-pin", "p", "y" * 256]), st.booleans()),
    st.builds(lambda name, ttl, path: {"cookie": {"name": name, "ttl": ttl, "path": path}},
              st.sampled_from(["pin", "P!#$%&'*+.^_`|~-"]), durations(positive=False),
              st.sampled_from(["/", "/a/b~c"])))

stickiness = st.one_of(st.none(), st.builds(
    lambda algorithm, key, table, ring, factor, pin: {
        "algorithm": algorithm, **key, "maglev_table_size": table,
        "ring_minimum_size": ring[0], "ring_maximum_size": ring[1],
        **({"balance_factor": factor} if factor is not None else {}),
        **({"pin": pin} if pin is not None else {})},
    st.sampled_from(["maglev", "ring_hash"]),
    st.one_of(st.just({"source_ip": True}),
              st.builds(lambda h: {"header": h}, st.sampled_from(["x-session", "a", "x" * 256])),
              st.builds(lambda ttl, path: {"cookie": {"name": "s", "ttl": ttl, "path": path}},
                        durations(positive=False), st.sampled_from(["/", "/a/b~c"]))),
    st.sampled_from([2, 3, 4099, 65537]),
    st.sampled_from([(1, 1), (1, 8_388_608), (1024, 8_388_608), (2, 3)]),
    st.one_of(st.none(), st.floats(1.0, 10.0)),
    pins,
))


@st.composite
def health_checks(draw: st.DrawFn) -> dict[str, Any]:
    interval = draw(durations())
    return {
        "enabled": draw(st.booleans()),
        "path": draw(st.sampled_from(["/", "/healthz", "/a?b=c&d"])),
        "interval": interval,
        "timeout": draw(st.one_of(st.just(interval), st.just(0.001), durations())),
        "healthy_threshold": draw(ints(1, 100)),
        "unhealthy_threshold": draw(ints(1, 100)),
        "no_traffic_interval": draw(durations()),
        "unhealthy_interval": draw(durations()),
        "unhealthy_edge_interval": draw(durations()),
        "healthy_edge_interval": draw(durations()),
        "expected_statuses": draw(st.lists(ints(100, 599), min_size=1, max_size=3)),
        **draw(st.fixed_dictionaries({}, optional={
            "type": st.sampled_from(["http", "grpc", "tcp"]),
            "grpc_service": st.sampled_from(["", "meshxl.demo.v1.Counter", "a/b~c"]),
            "port": ints(1, 65535)})),
    }


outliers = st.fixed_dictionaries({
    "enabled": st.booleans(),
    "consecutive_local_origin_failure": ints(1, UINT32_MAX),
    "consecutive_5xx": ints(1, UINT32_MAX),
    "consecutive_gateway_failure": ints(1, UINT32_MAX),
    "interval": durations(),
    "base_ejection_time": durations(),
    "max_ejection_percent": ints(0, 100),
})


@st.composite
def retries(draw: st.DrawFn) -> dict[str, Any]:
    base = draw(durations())
    return {
        "attempts": draw(ints(0, 20)),
        "retry_on": draw(st.lists(st.sampled_from(RETRY_CONDITIONS), max_size=4,
                                  unique=True)),
        "per_try_timeout": draw(durations(positive=False)),
        "previous_hosts": draw(st.booleans()),
        "host_selection_max_attempts": draw(ints(1, 1000)),
        "previous_priorities": draw(st.sampled_from([None, True, False])),
        "backoff_base": base,
        "backoff_max": draw(st.one_of(st.just(base), st.just(MAX_DURATION))),
        "budget_percent": draw(st.one_of(st.sampled_from([0.001, 100]),
                                         st.floats(0.001, 100))),
        "min_retry_concurrency": draw(ints(1, UINT32_MAX)),
    }


@st.composite
def clusters(draw: st.DrawFn, index: int) -> dict[str, Any]:
    sites = draw(st.lists(st.fixed_dictionaries({}, optional={
        "weight": ints(1, 10_000), "failover_rank": ints(0, 100)}), max_size=2))
    for i, site in enumerate(sites):
        site["name"] = f"s{i}"
    listed = draw(members)
    for i, member in enumerate(listed):
        member["name"] = f"m{i}"
        if sites:
            member["site"] = draw(st.sampled_from([s["name"] for s in sites]))
    spec: dict[str, Any] = {
        "name": f"c{index}",
        **draw(st.fixed_dictionaries({}, optional={
            "protocol": st.sampled_from(["http", "http2", "grpc", "tcp"]),
            "websocket": st.booleans(),
            "drain_window": durations(positive=False),
            # off: no access log on the listener; move, report: one to the control plane
            "degradation": st.builds(lambda a: {"action": a},
                                     st.sampled_from(["move", "report", "off"]))})),
        "mode": draw(st.sampled_from(["high-availability", "load-sharing"])),
        "members": listed,
        "health_check": draw(health_checks()),
        "outlier_detection": draw(outliers),
        "retries": draw(retries()),
        "route": {"domains": [f"c{index}.test", *draw(st.lists(
                      st.sampled_from(["*", "*.a.test", "a.*", "x.test:8080", "*-b.test"]),
                      max_size=2, unique=True))],
                  "prefix": draw(st.sampled_from(["/", "/api", "/a/b~c"])),
                  "timeout": draw(durations(positive=False))},
        "connect_timeout": draw(durations()),
        "priority_spillover": draw(st.booleans()),
    }
    if sites:
        spec["sites"] = sites
    if draw(st.booleans()):
        spec["overrides"] = {
            "cluster": {"perConnectionBufferLimitBytes": draw(ints(0, UINT32_MAX)),
                        "commonLbConfig": {"healthyPanicThreshold": {
                            "value": draw(st.floats(0, 100))}}},
            "route": {"route": {"idleTimeout": f"{draw(ints(0, 86_400))}s"}}}
    sticky = draw(stickiness)
    if sticky is not None:
        spec["stickiness"] = sticky
    if draw(st.booleans()):
        # Loopback addresses only; two of them on one port are two listeners (which
        # validation refuses when their addresses overlap: test_model_listeners.py).
        spec["listener"] = {"address": draw(st.sampled_from(LISTENER_ADDRESSES)),
                            "port": draw(st.sampled_from(LISTENER_PORTS))}
    if spec.get("protocol") == "tcp":
        # What TCP cannot carry is refused by validation (tests/unit/test_protocols.py);
        # keep the rest of the draw so TCP clusters reach Envoy.
        spec.pop("route", None)
        spec["retries"].pop("retry_on", None)
        spec.pop("websocket", None)
        spec["stickiness"] = {**{k: v for k, v in (sticky or {}).items()
                                 if k not in ("header", "cookie", "pin", "source_ip")},
                              "source_ip": True}
    return spec


@st.composite
def models(draw: st.DrawFn) -> dict[str, Any]:
    count = draw(st.integers(1, 3))
    return {
        "clusters": [draw(clusters(i)) for i in range(count)],
        "telemetry": {"tracing": draw(st.booleans()),
                      "sampling_percent": draw(st.one_of(st.sampled_from([0, 100]),
                                                         st.floats(0, 100))),
                      "service_name": draw(st.sampled_from(["envoy", "front door"]))},
    }


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.filter_too_much,
                                 HealthCheck.function_scoped_fixture])
@given(data=models())
def test_every_valid_model_is_acked_by_envoy(envoy_ads: AdsThread, data: dict[str, Any]) -> None:
    text = yaml.safe_dump(data, sort_keys=False)
    try:
        model = parse_model(text)  # what `meshxl validate` runs, then it compiles
        # A drained member's listener carries a drain generation (drains.py).
        drained = frozenset({(model.clusters[0].name, "m0")}) if len(text) % 2 else frozenset()
        resources = compile_resources(model, None, RESOLVED, drained)
    except (ModelError, CompileError):
        assume(False)
        return
    snapshot = Snapshot.build(resources.by_type(), previous=envoy_ads.previous)
    envoy_ads.previous = snapshot
    envoy_ads.push(snapshot)
    problem = envoy_ads.verdict(snapshot)
    assert problem is None, f"Envoy rejected a valid model:\n{text}\n{problem}"
