"""The control-plane process: sources -> debounced rebuild -> snapshot -> ADS streams.

It owns no state that is not in the model file or etcd: a restarted replica, or a
second one, serves byte-identical resources with identical versions. Node status
(what each Envoy ACKed or NACKed) is published to etcd under this replica's lease and
on an HTTP status endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aetcd
import grpc
from aiohttp import web
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from meshxl import etcd
from meshxl.addr import bind_grpc, bind_tcp, bound_port
from meshxl.etcd.keys import Keys
from meshxl.etcd.mesh import EtcdMeshSource
from meshxl.model import ModelSpec, RuntimeState
from meshxl.model.records import DEGRADED_KIND
from meshxl.model.vsls import placed

from .accesslog import AccessLogReceiver, member_hosts
from .cache import Snapshot, SnapshotCache
from .compiler import Compiler
from .config import ControlPlaneConfig
from .dns import Resolver, hostnames, is_ip_literal
from .drains import expired_drains
from .failover import FailoverTracer, Loss, losses
from .history import MemberHistory, transitions
from .judging import Judging
from .judging import report as health_report
from .metrics import Convergence, XdsMetrics, member_state_counts, placement_series
from .nodestatus import NodeStatuses
from .placements import PlacementWriter
from .planned import MoveGate
from .resources import CompileError
from .server import AdsServer
from .sources import Debouncer, ModelFileSource
from .stepdown import cut, released, shares
from .types import ENDPOINT
from .upstream import UpstreamSignals
from .upstream import status as upstream_status
from .warmup import Warming, WarmUp, report
from .warnings import ModelWarnings

log = logging.getLogger(__name__)


FAILOVER_RECORD_TTL = 300
"""Seconds a failover's trace context stays in etcd for late takeovers to link to."""


STOP_STEP = 5.0
"""Seconds each step of a stopping replica may take before it is given up."""


async def _bounded(step: Awaitable[None], seconds: float, what: str) -> None:
    try:
        async with asyncio.timeout(seconds):
            await step
    except TimeoutError:
        log.warning("stopping: %s took more than %.1f s; given up", what, seconds)


AdminPages = Callable[[web.Application, "ControlPlane"], None]
"""Adds pages to the admin port's application (``meshxl serve xds`` adds the live
view, :mod:`meshxl.ui`, which sits above this package)."""


class ControlPlane:
    """One replica of the xDS control plane."""

    def __init__(self, config: ControlPlaneConfig, *, admin_pages: AdminPages | None = None):
        self.config = config
        self.admin_pages = admin_pages
        self.tls = config.server_tls()
        self.keys = Keys(config.etcd_root)
        self.cache = SnapshotCache()
        self.metrics = XdsMetrics()
        self.convergence = Convergence(self.metrics)
        self.failovers = FailoverTracer(connected=self._acked_endpoints,
                                        on_change=self._record_failover)
        self.ads = AdsServer(self.cache, on_status_change=self._nodes_changed,
                             on_sent=self.failovers.sent, on_answer=self.failovers.answered,
                             metrics=self.metrics, auth=config.auth(),
                             max_nodes=config.max_nodes,
                             max_nodes_per_credential=config.max_nodes_per_credential)
        self.upstream = UpstreamSignals()
        """Per upstream host requests, errors and latency, from the Envoys' access logs."""
        self.access_log = AccessLogReceiver(self.upstream, self.ads.auth, self.metrics,
                                            connected_from=self.ads.connected_from,
                                            model=lambda: self.model,
                                            routes=self.ads.routes, members=self._member_hosts)
        self._hosts_of: tuple[Any, dict[str, frozenset[str]]] = ((), {})
        self.history: MemberHistory | None = None
        self.rebuilder = Debouncer(self.rebuild, quiet=config.debounce,
                                   max_delay=config.max_delay)
        self._changed_at: int | None = None
        self._built_runtime: RuntimeState | None = None
        self._built_model: ModelSpec | None = None
        self.file: ModelFileSource | None = None
        self.mesh: EtcdMeshSource[ModelSpec] | None = None
        self.client: aetcd.Client | None = None
        self.compiler = Compiler(istio_mtls=config.istio_mtls,
                                 istio_cluster_id=config.istio_cluster_id)
        self.resolver = Resolver(self._changed, interval=config.dns_interval)
        self._dns_inputs: tuple[ModelSpec, frozenset[str]] | None = None
        self.compile_error: str | None = None
        self.model_warnings = ModelWarnings()
        """The model's warnings against the registrations (log, /v1/status, metric)."""
        self.last_build: dict[str, Any] = {}
        self.port = 0
        self.admin_port = 0
        self._grpc: grpc.aio.Server | None = None
        self._serving = False
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self.nodes = NodeStatuses(self.keys, config.replica, config.status_ttl)
        """This replica's lease and the Envoy node statuses written under it."""
        self._counted: tuple[ModelSpec | None, RuntimeState] | None = None
        self._failover_records: dict[tuple[str, str], bytes] = {}  # waiting to be written
        self._failover_pending = asyncio.Event()
        self._wake_timer: asyncio.TimerHandle | None = None  # next drain end or ramp step
        self.warmup = WarmUp()
        self.warming = Warming()
        """The warm-up ramps under way (:mod:`meshxl.xds.warmup`)."""
        self.moves = MoveGate(self.metrics)
        self.judging = Judging(config.replica, self.keys, self.upstream, self._changed,
                               self.moves.began)
        """Sick members (:mod:`meshxl.xds.health`), judged from the Envoys' access logs."""
        self._local_runtime: tuple[Any, RuntimeState] | None = None
        self.placements: PlacementWriter | None = None
        """The pools' stored placements (:mod:`.placements`; with etcd only)."""

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the ports, load sources, publish the first snapshot, then accept Envoys.

        Both ports are bound first: a busy port or a bad address fails the start at
        once (ListenError), and the admin endpoint answers while the rest starts, with
        /readyz saying what the replica waits for. With etcd, the first snapshot waits
        for the first full read: a replica never serves a configuration that lacks the
        registrations every other replica sees.
        """
        cfg = self.config
        from .server import ADS_GRPC_OPTIONS

        self._grpc = grpc.aio.server(options=ADS_GRPC_OPTIONS)  # no SO_REUSEPORT
        self.ads.register(self._grpc)
        self.access_log.register(self._grpc)
        self.port = bind_grpc(self._grpc, cfg.listen,
                              None if self.tls is None else self.tls.credentials())
        if cfg.admin:
            await self._start_admin(cfg.admin)
        if cfg.config_path is not None:
            self.file = ModelFileSource(cfg.config_path, self._changed)
            self.file.load()  # ModelError: refuse to start on a bad file
            self._spawn(self.file.run())
        if cfg.etcd is not None:
            self.client = etcd.client(cfg.etcd, security=cfg.etcd_security)
            await self.client.connect()
            await etcd.check_credentials(self.client)  # a wrong password: fail now
            self.nodes.client = self.client
            self.mesh = EtcdMeshSource(self.client, self.keys, self._changed)
            self._spawn(self.mesh.run())
            await self.mesh.synced.wait()
            self._spawn(self.nodes.keep_lease())
            self._spawn(self._write_failovers())
            self.history = MemberHistory(self.client, self.keys, cfg.replica)
            self.history.start()
            self.placements = PlacementWriter(self.client, self.keys, self._unplaced,
                                              lambda: self.runtime)
            self._spawn(self.placements.run())
            self.placements.poke()
        model = self.model
        if model is not None:
            # The first snapshot already has the endpoints of members named by host name.
            self.resolver.want(hostnames(model, self.runtime))
            await self.resolver.resolve()
        await self.rebuild()
        self._spawn(self.resolver.run())
        self._spawn(self.rebuilder.run())
        self._spawn(self._tick_failovers())
        self._spawn(self.judging.run(lambda: self.model, lambda: self.runtime,
                                     lambda: self.resolver.addresses, self.client,
                                     lambda: self.nodes.lease))
        await self._grpc.start()
        self._serving = True
        log.log(logging.WARNING if self.ads.auth.unbound else logging.INFO,
                "xDS control plane %s serving ADS on %s (port %d, %s; %s)", cfg.replica,
                cfg.listen, self.port, "plaintext" if self.tls is None else
                "TLS" if self.tls.client_ca is None else "mutual TLS", self.ads.auth.describe())

    async def stop(self) -> None:
        """Stop serving and let go of what this replica holds, each step bounded: with
        etcd gone, grpc.aio's shutdown of the ADS server once waited minutes on its
        streams' handlers (a test's teardown, 281 s), and a replica told to stop must
        stop."""
        self._wake_at(None)
        if self._grpc is not None:
            grace = 0.5 if self._serving else None
            await _bounded(self._grpc.stop(grace=grace), (grace or 0.0) + STOP_STEP,
                           "the ADS server's shutdown")
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.ads.close()
        self.failovers.close()
        if self.history is not None:
            await self.history.stop()
        if self._runner is not None:
            await self._runner.cleanup()
        if self.client is not None:
            await _bounded(self.nodes.revoke(), STOP_STEP, "the node statuses' lease revoke")
            with contextlib.suppress(Exception):
                await _bounded(self.client.close(), STOP_STEP, "the etcd client's close")

    async def run_forever(self) -> None:
        try:
            await self.start()
            await asyncio.Event().wait()
        finally:
            await self.stop()

    def not_ready_reasons(self) -> list[str]:
        """Why this replica does not serve Envoys yet (empty: it does)."""
        if self._serving and self.cache.snapshot is not None:
            return []
        reasons = []
        if self.mesh is not None and not self.mesh.synced.is_set():
            reasons.append(f"etcd unreachable: {self.mesh.last_error}" if self.mesh.last_error
                           else "waiting for the first full read of etcd")
        elif self.config.etcd is not None and self.mesh is None:
            reasons.append("connecting to etcd")
        if self.model is None and (self.mesh is None or self.mesh.synced.is_set()):
            model_error = (self.file.error if self.file else None) or (
                self.mesh.model_error if self.mesh else None)
            reasons.append(f"no usable model: {model_error}" if model_error else
                           f"no model stored in etcd at {self.keys.model}")
        if self.compile_error is not None:
            reasons.append(f"the model does not compile: {self.compile_error}")
        if not reasons:
            reasons.append("starting")
        return reasons

    def _spawn(self, coro: Any) -> None:
        self._tasks.append(asyncio.get_running_loop().create_task(coro))

    # -- rebuild ------------------------------------------------------------------------

    def _unplaced(self) -> ModelSpec | None:
        """The model as loaded (its virtual systems not yet placed for the state)."""
        if self.file is not None:
            return self.file.model
        return self.mesh.model if self.mesh is not None else None

    @property
    def model(self) -> ModelSpec | None:
        """The model file wins when given; otherwise the model stored in etcd. Its
        virtual systems are placed for the runtime state (:func:`placed`), so the
        compiler, the metrics and the live view see the same roles."""
        model = self._unplaced()
        return placed(model, self.runtime) if model is not None else None

    @property
    def runtime(self) -> RuntimeState:
        """The runtime state in etcd; without etcd, this replica's own judgements."""
        if self.mesh is not None:
            return self.mesh.runtime
        local = dict(self.judging.local)
        if self._local_runtime is None or self._local_runtime[0] != local:
            self._local_runtime = (local, RuntimeState(health=local))
        return self._local_runtime[1]

    def _member_hosts(self) -> dict[str, frozenset[str]]:
        """Per cluster, its members' hosts now (what a node may report on), made again
        when the model, the runtime state or the DNS answers change (new objects)."""
        model, runtime, resolved = self.model, self.runtime, self.resolver.addresses
        key = (model, runtime, resolved)
        if len(self._hosts_of[0]) != 3 or any(
                a is not b for a, b in zip(self._hosts_of[0], key, strict=True)):
            self._hosts_of = (key, member_hosts(model, runtime, resolved) if model else {})
        return self._hosts_of[1]

    def _changed(self) -> None:
        """A source saw a change: remember when (a failover's detection starts there)."""
        if self._changed_at is None:
            self._changed_at = time.time_ns()
        self.rebuilder.poke()
        if self.placements is not None:
            self.placements.poke()

    async def rebuild(self) -> None:
        """Compile and publish a snapshot. A model that fails keeps the last good one."""
        model = self.model
        if model is None:
            return
        seen, self._changed_at = self._changed_at or time.time_ns(), None
        now = time.time()
        held = self.moves.gate(model, self.runtime, now)  # delayed sync: planned.py
        if (runtime := held.state) is not self.runtime:
            model = placed(model, runtime)
        revision = self.mesh.revision if self.mesh else None
        if self._built_model is not model:
            self.metrics.know_clusters(c.name for c in model.clusters)
        if self._built_runtime is not None and self._built_model is model:
            member_transitions = transitions(model, self._built_runtime, runtime)
            found = losses(model, self._built_runtime, runtime, member_transitions)
            for loss in found:
                self.metrics.failovers.labels(loss.cluster, loss.cause).inc()
            self.failovers.detected(found, seen, revision)
            if self.history is not None and revision is not None:
                self.history.record(member_transitions, revision, now)
        self.failovers.rebuilding()
        started = time.perf_counter()
        if self._dns_inputs is None or self._dns_inputs[0] is not model:
            # The model's host names, once per model (it is immutable).
            self._dns_inputs = (model, frozenset(hostnames(model)))
        self.resolver.want(self._dns_inputs[1].union(
            r.address for r in runtime.registrations.values() if not is_ip_literal(r.address)))
        drains = expired_drains(model, runtime, now, held.started)
        warming = self.warmup.update(model, runtime, now)
        sick, step = shares(model, runtime, now)
        self._wake_at(min((t for t in (drains.next_expiry, warming.next_change, step,
                                       held.next_release) if t is not None), default=None))
        fractions = cut(warming.fractions, sick, self.judging.loads)
        try:
            resources = self.compiler.compile(model, runtime, self.resolver.addresses,
                                              drains.expired, fractions,
                                              released(model, runtime, now))
        except CompileError as exc:
            self.compile_error = str(exc)
            self.metrics.rebuilds.labels("error").inc()
            log.error("model cannot be compiled, still serving the last good snapshot: %s", exc)
            return
        self._built_runtime, self._built_model = runtime, model
        self.warming = warming
        self.metrics.set_warming(warming.fractions)
        self.metrics.set_degraded((k for k, h in runtime.health.items()
                                   if h.kind == DEGRADED_KIND), sick)
        self.model_warnings.update(model, runtime)
        previous = self.cache.snapshot
        snapshot = Snapshot.build(resources.by_type(), previous=previous,
                                  zones=resources.by_zone())
        self.compile_error = None
        unchanged = (previous is not None and previous.versions == snapshot.versions
                     and previous.zones == snapshot.zones)
        node_zones = self.ads.zones()
        self.failovers.built(snapshot.version(ENDPOINT), changed=not unchanged, expected={
            node: snapshot.version(ENDPOINT, zone) for node, zone in node_zones.items()})
        self.metrics.rebuild_seconds.observe(time.perf_counter() - started)
        if unchanged:
            self.metrics.rebuilds.labels("unchanged").inc()
            return
        self.metrics.rebuilds.labels("published").inc()
        self.cache.set(snapshot)
        self.convergence.published(snapshot.versions, seen, self.ads.acked(),
                                   snapshot.zones, node_zones)
        self.last_build = {
            "at": time.time(),
            "seconds": round(time.perf_counter() - started, 6),
            "versions": snapshot.versions,
            "zones": snapshot.zones,
            "etcd_revision": self.mesh.revision if self.mesh else None,
        }
        log.info("snapshot %s", " ".join(f"{t.rsplit('.', 1)[-1]}={v}"
                                         for t, v in snapshot.versions.items()))

    def _wake_at(self, at: float | None) -> None:
        """Rebuild when the next drain window ends (its long-lived connections close),
        the next warm-up step or the next step of a degraded member is due."""
        if self._wake_timer is not None:
            self._wake_timer.cancel()
            self._wake_timer = None
        if at is not None:
            delay = max(0.0, at - time.time()) + 0.001
            self._wake_timer = asyncio.get_running_loop().call_later(delay, self._changed)

    # -- failovers ----------------------------------------------------------------------

    def _acked_endpoints(self) -> dict[str, str | None]:
        """Connected Envoy nodes and the EDS version each ACKed last."""
        return {node: types.get(ENDPOINT) for node, types in self.ads.acked().items()}

    def _record_failover(self, loss: Loss, root: Any, timeline: dict[str, Any]) -> None:
        """Publish the failover's trace context (sidecars link their takeovers to it) and
        its timeline (``meshxl status`` and the live view show it, from any replica).

        Called when the failover starts, is pushed and ends: the latest record per
        member waits for the writer, so a slow etcd never delays a push and never
        writes an older timeline over a newer one."""
        if self.client is None:
            return
        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier, context=trace.set_span_in_context(root))
        record = {**timeline, "traceparent": carrier.get("traceparent"), "cause": loss.cause,
                  "member": loss.member, "at": timeline.get("detected") or time.time(),
                  "replica": self.config.replica}
        self._failover_records[(loss.cluster, loss.member)] = json.dumps(record).encode()
        self._failover_pending.set()

    async def _write_failovers(self) -> None:
        """Write the waiting failover records, each under a lease of
        :data:`FAILOVER_RECORD_TTL` (a failover is kept that long after its last change)."""
        assert self.client is not None
        while True:
            await self._failover_pending.wait()
            self._failover_pending.clear()
            records, self._failover_records = self._failover_records, {}
            for (cluster, member), value in records.items():
                try:
                    lease = await self.client.lease(FAILOVER_RECORD_TTL)
                    await self.client.put(self.keys.failover(cluster, member).encode(),
                                          value, lease=lease)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("failover record for %s/%s not written: %s", cluster,
                                member, exc)

    async def _tick_failovers(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.failovers.tick()

    async def _nodes_changed(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        for node_id, status in batch:
            self.convergence.node_changed(node_id, status)
        await self.nodes.publish(batch)

    # -- HTTP status -----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        snapshot = self.cache.snapshot
        return {
            "replica": self.config.replica,
            "ready": not self.not_ready_reasons(),
            "reasons": self.not_ready_reasons(),
            "model_source": str(self.config.config_path) if self.file else
            (self.keys.model if self.mesh else None),
            "model_error": (self.file.error if self.file else None)
            or (self.mesh.model_error if self.mesh else None),
            "compile_error": self.compile_error,
            "model_warnings": self.model_warnings.all(),
            "warming": report(self.warming),
            "degraded": health_report(self.runtime, self.model, time.time()),
            "suspects": dict(self.judging.last.suspects),
            "load_shares": self.judging.loads,
            "etcd": None if self.mesh is None else {
                "revision": self.mesh.revision, "resyncs": self.mesh.resyncs,
                "last_error": self.mesh.last_error,
            },
            "versions": snapshot.versions if snapshot else {},
            "dns": self.resolver.status(),
            "last_build": self.last_build,
            "rebuilds": self.rebuilder.runs,
            "responses_sent": self.ads.responses_sent,
            "nacks": self.ads.nacks,
            "refused": self.ads.refused,
            "credentials": self.ads.credential_counts(),
            "nodes": self.ads.node_status(),
            "upstream": upstream_status(self.upstream, time.time()),
        }

    def refresh_gauges(self) -> None:
        """Gauges read at scrape time (they cost nothing between scrapes)."""
        m = self.metrics
        pending = self.rebuilder.pending_since
        m.debounce_pending.set(self.rebuilder.pending)
        m.debounce_wait.set(0.0 if pending is None else time.monotonic() - pending)
        m.etcd_revision.set(self.mesh.revision if self.mesh else 0)
        m.etcd_unreachable.set(self.mesh.unreachable_for() if self.mesh else 0.0)
        m.nodes.set(len(self.ads.acked()))
        model, runtime = self.model, self.runtime
        counted = self._counted
        if counted is None or counted[0] is not model or counted[1] is not runtime:
            # Model and runtime are immutable: recounted only after a change.
            m.set_members(member_state_counts(model, runtime))
            m.set_placement(placement_series(model, runtime))
            self._counted = (model, runtime)
        m.set_model_warnings({c: len(w) for c, w in self.model_warnings.current.items()})

    async def _metrics(self, _: web.Request) -> web.Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        self.refresh_gauges()
        return web.Response(body=generate_latest(self.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _start_admin(self, listen: str) -> None:
        from meshxl import web as mweb

        sock = bind_tcp(listen, "--admin")
        self.admin_port = bound_port(sock)
        app = mweb.application()

        async def healthz(_: web.Request) -> web.Response:
            return web.json_response({"status": "ok"})

        async def readyz(_: web.Request) -> web.Response:
            reasons = self.not_ready_reasons()
            return web.json_response({"ready": not reasons, "reasons": reasons},
                                     status=503 if reasons else 200)

        async def status(_: web.Request) -> web.Response:
            return web.json_response(self.status())

        async def nodes(_: web.Request) -> web.Response:
            return web.json_response(self.ads.node_status())

        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        app.router.add_get("/v1/status", status)
        app.router.add_get("/v1/nodes", nodes)
        app.router.add_get("/metrics", self._metrics)
        if self.admin_pages is not None:
            self.admin_pages(app, self)
        self._runner = mweb.Runner(app)
        await self._runner.setup()
        try:
            await web.SockSite(self._runner, sock).start()
        except BaseException:
            sock.close()
            raise
