"""A complete local meshxl deployment on loopback: etcd, control-plane replicas, three
members (the sample counter app plus its statesync sidecar each) and Envoy.

``meshxl demo`` runs its failover on it; the operator-command and control-plane HA
tests, and anything else that needs "a running meshxl", start one the same way::

    async with DemoDeployment(work_dir, mode="high-availability", replicas=2) as d:
        ...  # d.url is Envoy's listener, d.etcd_url / d.keys the etcd installation

Every process is owned by a :class:`meshxl.local.procs.Owner` (``d.owner``) and killed
on exit; ``d.owner.log_sections()`` has their log tails for a report.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from meshxl import headers as hdr
from meshxl.etcd.keys import Keys
from meshxl.local import commands
from meshxl.local.ports import free_ports
from meshxl.local.procs import Owner, Process
from meshxl.local.servers import HOST, start_etcd
from meshxl.local.wait import wait_http, wait_port, wait_until
from meshxl.proxy.admin import EnvoyAdmin, Host
from meshxl.xds.upgrades import model_cluster

__all__ = [
    "CLUSTER",
    "HA_MEMBERS",
    "LS_MEMBERS",
    "MODES",
    "PIN_COOKIE",
    "PROTOCOLS",
    "DemoDeployment",
    "DemoMember",
    "demo_model",
    "envoy_hosts",
    "healthy_host",
]

CLUSTER = "demo"
MODES = ("high-availability", "load-sharing")
# (member, site): in high-availability a is active, b standby (same site, next tier)
# and c the backup in the second site; in load-sharing all three share one site.
HA_MEMBERS = (("a", "dc1"), ("b", "dc1"), ("c", "dc2"))
LS_MEMBERS = (("a", "dc1"), ("b", "dc1"), ("c", "dc1"))
# The cookie Envoy keeps a pinned session's member in (``pin=True``).
PIN_COOKIE = "meshxl-pin"


#: The demo's protocols (``meshxl demo --protocol``) -> the model's ``protocol``.
PROTOCOLS = {"http": "http", "websocket": "http", "grpc": "grpc", "tcp": "tcp"}


def demo_model(mode: str, listen_port: int, members: Sequence[tuple[str, str]],
               algorithm: str = "maglev", pin: bool = False, protocol: str = "http",
               drain_window: float | None = None, failover: str = "",
               fields: Mapping[str, str] | None = None, pin_header: str | None = None,
               hash_cookie: str | None = None, sampling_percent: float | None = None) -> str:
    """The demo cluster; ``pin``: sessions are pinned to the member that served them
    (``stickiness.pin``, cookie :data:`PIN_COOKIE`), the hash places new ones;
    ``pin_header``: pinned, the pin carried in this header instead (a client that sends
    back what it was given, with no cookie jar).
    ``protocol``: what the members speak (:data:`PROTOCOLS`): gRPC and HTTP hash on the
    session header, TCP on the client's source address; ``failover``: the cluster's
    ``failover`` settings (YAML flow mapping); ``fields``: further cluster fields, each
    a YAML flow value (``{"degradation": "{action: off}"}``); ``hash_cookie``: HTTP
    sessions hash on this cookie instead of the session header (what a browser's
    WebSocket carries); ``sampling_percent``: of the traces Envoy starts, the share it
    records (None: the model's default)."""
    sites = sorted({site for _, site in members})
    pinned = (f", pin: {{header: {pin_header}}}" if pin_header
              else f", pin: {{cookie: {{name: {PIN_COOKIE}}}}}" if pin else "")
    spoken = PROTOCOLS[protocol]
    key = "source_ip: true" if spoken == "tcp" else \
        f"cookie: {{name: {hash_cookie}}}" if hash_cookie else f"header: {hdr.SESSION}"
    lines = [f"    protocol: {spoken}"] if spoken != "http" else []
    if spoken == "http":
        lines.append("    health_check: {path: /healthz}")
    if drain_window is not None:
        lines.append(f"    drain_window: {drain_window:g}s")
    fields = {"sessions": "{ttl: 5m}", **(fields or {})}  # fields may set sessions too
    lines += [f"    {name}: {value}" for name, value in fields.items()]
    extra = "".join(f"{line}\n" for line in lines)
    sampled = "" if sampling_percent is None else f", sampling_percent: {sampling_percent:g}"
    return f"""\
clusters:
  - name: {CLUSTER}
    mode: {mode}
    membership: registered
    stickiness: {{algorithm: {algorithm}, {key}{pinned}}}
    sites: [{", ".join(f"{{name: {s}}}" for s in sites)}]
{extra}    listener: {{address: {HOST}, port: {listen_port}}}
{f"    failover: {failover}{chr(10)}" if failover else ""}telemetry: {{tracing: true{sampled}}}
"""


@dataclass
class DemoMember:
    name: str
    site: str
    app_port: int
    sidecar_port: int
    app: Process | None = None
    sidecar: Process | None = None

    @property
    def sidecar_url(self) -> str:
        return f"http://{HOST}:{self.sidecar_port}"


@dataclass
class Replica:
    """One control-plane replica: ``meshxl serve xds`` with its admin endpoint."""

    name: str
    port: int
    admin_port: int
    process: Process | None = None

    @property
    def admin_url(self) -> str:
        return f"http://{HOST}:{self.admin_port}"

    async def status(self) -> dict[str, Any]:
        """Its ``/v1/status`` (versions served, judgements, ramps, upstream signals)."""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as http, \
                http.get(f"{self.admin_url}/v1/status") as resp:
            resp.raise_for_status()
            return dict(await resp.json())


async def envoy_hosts(admin_url: str, cluster: str = CLUSTER) -> list[Host]:
    """The hosts of ``cluster`` in Envoy's ``/clusters?format=json``."""
    async with EnvoyAdmin(admin_url, timeout=1.0) as admin:
        return await admin.hosts(cluster)


def healthy_host(host: Host) -> bool:
    """A host that takes traffic: :attr:`meshxl.proxy.admin.Host.healthy`."""
    return host.healthy


class DemoDeployment:
    """etcd + ``replicas`` control planes + three members + Envoy, all on loopback.

    ``trace_dir``: every process writes its spans there (and Envoy's go to an OTLP
    receiver writing ``envoy.jsonl``), and Envoy records every request it sees; None
    collects no spans (Envoy's tracer samples as the model's default). ``pin``: pinned
    sessions (see :func:`demo_model`; ``pin_header``: pinned by that header); ``fields``:
    further cluster fields (ditto); ``hash_cookie``: sessions hash on this cookie (ditto).
    ``faults``: every app reads injected faults from a file of its own
    (:meth:`set_faults`, :mod:`meshxl.demo.faults`).
    """

    def __init__(self, work_dir: Path, *, mode: str = "high-availability", replicas: int = 1,
                 etcd_url: str | None = None, trace_dir: Path | None = None,
                 delta: bool = False, lease_ttl: float = 2.0,
                 members: Sequence[tuple[str, str]] | None = None,
                 algorithm: str = "maglev", pin: bool = False, protocol: str = "http",
                 drain_window: float | None = None, failover: str = "",
                 fields: Mapping[str, str] | None = None, faults: bool = False,
                 pin_header: str | None = None, hash_cookie: str | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got "
                             f"{protocol!r}")
        self.protocol = protocol
        self.drain_window = drain_window
        if replicas < 1:
            raise ValueError("at least one control-plane replica")
        self.mode = mode
        self.work_dir = work_dir
        self.owner = Owner(work_dir, grace=3.0)
        self.trace_dir = trace_dir
        self.delta = delta
        self.lease_ttl = lease_ttl
        self.etcd_url = etcd_url or ""
        self._own_etcd = etcd_url is None
        self.etcd_process: Process | None = None
        """The deployment's own etcd (None when it was given ``etcd_url``)."""
        self.keys = Keys(f"/meshxl-demo-{os.getpid()}-{time.time_ns()}")
        self.algorithm = algorithm
        self.pin = pin
        self.pin_header = pin_header
        self.failover = failover
        self.fields = dict(fields or {})
        self.faults = faults
        self.hash_cookie = hash_cookie
        layout = list(members) if members is not None else (
            HA_MEMBERS if mode == "high-availability" else LS_MEMBERS)
        if not layout:
            raise ValueError("at least one member")
        ports = free_ports(2 + 2 * replicas + 2 * len(layout))
        self.listen_port, self.envoy_admin_port = ports[:2]
        self.replicas = [Replica(f"xds-{i}", ports[2 + 2 * i], ports[3 + 2 * i])
                         for i in range(replicas)]
        base = 2 + 2 * replicas
        self.members = [DemoMember(name, site, ports[base + 2 * i], ports[base + 2 * i + 1])
                        for i, (name, site) in enumerate(layout)]
        self.receiver: Any = None
        self.envoy: Any = None

    @property
    def url(self) -> str:
        """Envoy's listener for the demo cluster."""
        return f"http://{HOST}:{self.listen_port}"

    @property
    def target(self) -> str:
        """Envoy's listener as ``HOST:PORT`` (a gRPC channel's target, a TCP address)."""
        return f"{HOST}:{self.listen_port}"

    @property
    def admin_url(self) -> str:
        return f"http://{HOST}:{self.envoy_admin_port}"

    def member(self, name: str) -> DemoMember:
        return next(m for m in self.members if m.name == name)

    async def __aenter__(self) -> DemoDeployment:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- start and stop ---------------------------------------------------------------

    async def start(self) -> None:
        from meshxl import etcd
        from meshxl.operator.actions import apply_model

        if self._own_etcd:
            self.etcd_url, self.etcd_process = await start_etcd(self.owner)
        async with etcd.client(self.etcd_url) as client:
            await apply_model(client, self.keys, demo_model(
                self.mode, self.listen_port, [(m.name, m.site) for m in self.members],
                self.algorithm, self.pin, self.protocol, self.drain_window, self.failover,
                self.fields, self.pin_header, self.hash_cookie,
                # A run that keeps its traces records every request Envoy sees.
                100.0 if self.trace_dir is not None else None),
                "demo model")
        otlp_port = None
        if self.trace_dir is not None:
            from meshxl.telemetry.receiver import TraceReceiver

            self.trace_dir.mkdir(parents=True, exist_ok=True)
            self.receiver = TraceReceiver(self.trace_dir / "envoy.jsonl")
            otlp_port = await self.receiver.start(f"{HOST}:0")
        for replica in self.replicas:
            await self.start_replica(replica, wait=False)
        for m in self.members:
            await self.start_member(m, wait=False)
        for replica in self.replicas:
            assert replica.process is not None
            await wait_http(f"{replica.admin_url}/healthz", process=replica.process)
        for m in self.members:
            await self.wait_member(m)
        await self.start_envoy(otlp_port)

    def _trace_file(self, name: str) -> Path | None:
        return None if self.trace_dir is None else self.trace_dir / f"{name}.jsonl"

    async def start_replica(self, replica: Replica, wait: bool = True) -> None:
        argv = commands.xds(
            listen=f"{HOST}:{replica.port}", etcd=self.etcd_url, etcd_prefix=self.keys.root,
            admin=f"{HOST}:{replica.admin_port}", replica=replica.name,
            trace_file=self._trace_file(replica.name))
        if replica.process is None:
            replica.process = self.owner.process(replica.name, argv)
        replica.process.start()
        if wait:
            await wait_http(f"{replica.admin_url}/readyz", process=replica.process)

    async def start_member(self, m: DemoMember, wait: bool = True) -> None:
        if m.sidecar is None:
            m.sidecar = self.owner.process(f"sidecar-{m.name}", commands.statesync(
                cluster=CLUSTER, member=m.name, app=f"{HOST}:{m.app_port}", site=m.site,
                listen=f"{HOST}:{m.sidecar_port}", etcd=self.etcd_url,
                etcd_prefix=self.keys.root, lease_ttl=self.lease_ttl,
                trace_file=self._trace_file(f"sidecar-{m.name}")))
        if m.app is None:
            m.app = self.owner.process(f"app-{m.name}", commands.app(
                m.name, cluster=CLUSTER, listen=f"{HOST}:{m.app_port}",
                sidecar=m.sidecar_url, trace_file=self._trace_file(f"app-{m.name}"),
                protocol=self.protocol,
                faults=self.faults_file(m.name) if self.faults else None))
        m.sidecar.start()
        m.app.start()
        if wait:
            await self.wait_member(m)

    def faults_file(self, name: str) -> Path:
        """Where member ``name``'s app reads its injected faults (``faults=True``)."""
        return self.work_dir / f"faults-{name}.json"

    def set_faults(self, name: str, **faults: float) -> None:
        """Inject faults into member ``name``'s app (none given: heal it); the app
        picks them up within 0.1 s (:mod:`meshxl.demo.faults`)."""
        if not self.faults:
            raise ValueError("the deployment was started without faults=True")
        self.member(name)  # a known member
        path = self.faults_file(name)
        scratch = path.with_suffix(".tmp")
        scratch.write_text(json.dumps(faults))
        os.replace(scratch, path)  # the app never reads half a file

    async def wait_member(self, m: DemoMember) -> None:
        """Until the member's sidecar is ready and its app answers."""
        assert m.app is not None and m.sidecar is not None
        await wait_http(f"{m.sidecar_url}/readyz", process=m.sidecar, timeout=20)
        if PROTOCOLS[self.protocol] == "http":
            await wait_http(f"http://{HOST}:{m.app_port}/healthz", process=m.app, timeout=20)
        else:
            await wait_port(HOST, m.app_port, process=m.app, timeout=20)

    def bootstrap(self, otlp_port: int | None) -> dict[str, Any]:
        from meshxl.proxy.bootstrap import build_bootstrap

        bootstrap = build_bootstrap(
            "meshxl-demo", [(HOST, r.port) for r in self.replicas],
            admin_port=self.envoy_admin_port, delta=self.delta,
            otlp=(HOST, otlp_port) if otlp_port is not None else None)
        if otlp_port is not None:
            # Envoy exports request spans every 5 s or SPAN_BATCH spans; a demo flushes
            # them sooner, so none are left in its buffer when it stops.
            bootstrap["layered_runtime"]["layers"][0]["static_layer"].update({
                "tracing.opentelemetry.flush_interval_ms": 200,
                "tracing.opentelemetry.min_flush_spans": 64,
            })
        return bootstrap

    async def start_envoy(self, otlp_port: int | None) -> None:
        from meshxl.local.envoy import EnvoyProcess

        self.envoy = EnvoyProcess(self.bootstrap(otlp_port), self.work_dir,
                                  log_level="warning")
        self.owner.own(self.envoy)
        await self.envoy.start()
        await self.envoy.wait_ready(30)
        await self.wait_all_healthy()

    async def all_healthy(self) -> bool:
        """Every member healthy in each Envoy cluster of the demo's (its upgrades twin
        carries the WebSockets: :mod:`meshxl.xds.upgrades`)."""
        async with EnvoyAdmin(self.admin_url, timeout=1.0) as admin:
            clusters = await admin.clusters()
        served = [hosts for name, hosts in clusters.items() if model_cluster(name) == CLUSTER]
        return bool(served) and all(
            len(hosts) == len(self.members) and all(healthy_host(h) for h in hosts)
            for hosts in served)

    async def wait_all_healthy(self, timeout: float = 20) -> None:
        await wait_until(self.all_healthy, timeout=timeout,
                         what=f"Envoy to see all {len(self.members)} members healthy",
                         explain=lambda: envoy_hosts(self.admin_url))

    async def steady(self) -> bool:
        """Whether no EDS weight changes by itself: the live control-plane replicas ramp
        no member up (one that registered after another, or came back, warms over the
        cluster's ``warmup``, a new weight each step) and judge none degraded."""
        live = [r for r in self.replicas if r.process is not None and r.process.running]
        if not live:
            return False
        for replica in live:
            status = await replica.status()
            if status["warming"] or status["degraded"]:
                return False
        return True

    async def wait_steady(self, timeout: float = 30) -> None:
        await wait_until(self.steady, timeout=timeout,
                         what="no member ramping up or judged degraded")

    async def add_member(self, name: str, site: str) -> DemoMember:
        """Scale out: a new member (app + sidecar) that registers itself; returns once
        Envoy sees every member healthy."""
        if any(m.name == name for m in self.members):
            raise ValueError(f"member {name} exists")
        app_port, sidecar_port = free_ports(2)
        m = DemoMember(name, site, app_port, sidecar_port)
        self.members.append(m)
        await self.start_member(m)
        await self.wait_all_healthy()
        return m

    async def remove_member(self, name: str) -> None:
        """Scale in: stop a member gracefully (its sidecar withdraws the registration);
        returns once Envoy no longer has it."""
        m = self.member(name)
        for proc in (m.app, m.sidecar):
            if proc is not None:
                await proc.stop(5.0)
        self.members.remove(m)
        await self.wait_all_healthy()

    async def kill_member(self, name: str) -> float:
        """kill -9 a member's app and sidecar (process groups); returns the time."""
        m = self.member(name)
        killed = time.time()
        for proc in (m.app, m.sidecar):
            if proc is not None:
                proc.signal(signal.SIGKILL)
        return killed

    async def reap_member(self, name: str) -> None:
        m = self.member(name)
        for proc in (m.app, m.sidecar):
            if proc is not None:
                await proc.kill()

    async def kill_replica(self, index: int) -> None:
        """kill -9 a control-plane replica."""
        process = self.replicas[index].process
        if process is not None:
            await process.kill()

    async def stop_replicas(self, grace: float = 5.0) -> None:
        await asyncio.gather(*(r.process.stop(grace) for r in self.replicas
                               if r.process is not None))

    async def stop_envoy(self) -> None:
        if self.envoy is not None:
            await self.envoy.stop()
            self.envoy = None

    async def stop_members(self, grace: float = 5.0) -> None:
        await asyncio.gather(*(p.stop(grace) for m in self.members
                               for p in (m.app, m.sidecar) if p is not None))

    async def stop_receiver(self) -> None:
        if self.receiver is not None:
            await self.receiver.stop()
            self.receiver = None

    async def close(self) -> None:
        await self.stop_envoy()
        await self.owner.aclose()
        await self.stop_receiver()
