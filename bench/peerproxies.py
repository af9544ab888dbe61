"""The data-plane peers of ``bench/peers.py``: HAProxy and a static Envoy, each
configured by hand for the same high-availability failover meshxl compiles, and the
clients that drive them.

The members are a local meshxl deployment's (:class:`meshxl.local.deployment.DemoDeployment`:
a active, b standby, c backup; the sample counter app and its statesync sidecar each), so
the three proxies fail over between the same processes, the same state and the same
kill -9; only the proxy in front differs.

* HAProxy 2.6 (Debian's ``haproxy``), tuned as its documentation allows: checks every
  250 ms (100 ms while a server changes state), ``observe layer4`` with ``error-limit 1``
  and ``on-error mark-down`` (one failed connection marks a server down),
  ``on-marked-down shutdown-sessions`` (its connections are closed at once),
  ``option redispatch`` with ``retries 3`` (a failed connect goes to another server),
  L7 ``retry-on`` for requests that never got an answer, sticky by a consistent hash of
  the session header (HTTP, WebSocket, gRPC) or of the source address (TCP); b and c are
  ``backup`` servers (the first one serves while a is down).
* a static Envoy 1.40 written by hand from Envoy's documentation: the same members as
  priorities 0, 1, 2 of one cluster, Maglev on the same keys, health checks every
  250 ms, ejection on the first local-origin failure, retries to the next priority,
  WebSocket listeners without a delayed close, TCP connect retries with a backoff.

Clients (:class:`Sessions`): one per session; HTTP/1.1 and unary gRPC send one request at
a time (``meshxl.local.traffic`` / ``meshxl.local.streams``); WebSocket and TCP keep one
connection per session and, between requests, wait on it, so a close is seen when it
happens, not at the next request; a broken connection is opened again at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from meshxl import headers as hdr
from meshxl.local import counter
from meshxl.local.servers import HOST
from meshxl.local.streams import StreamTraffic, source_address
from meshxl.local.traffic import Record, Traffic

KINDS = ("http", "grpc", "websocket", "tcp")
PROXIES = ("meshxl", "haproxy", "envoy-static")
RECONNECT_DEADLINE = 10.0
CALL_TIMEOUT = 5.0


# -- HAProxy ---------------------------------------------------------------------------


def haproxy_config(kind: str, listen: tuple[str, int], members: Sequence[tuple[str, int]],
                   check_timeout: str = "200ms") -> str:
    """The HAProxy configuration for ``kind`` in front of ``members`` ((name, port), the
    first active, the others backups in order). ``check_timeout``: a health check's
    answer at most this late (a busy member misses a tight one, and is marked down)."""
    host, port = listen
    http = kind != "tcp"
    h2 = " proto h2" if kind == "grpc" else ""
    balance = f"hdr({hdr.SESSION})" if http else "source"
    lines = [
        "global",
        "    nbthread 1",  # as the local Envoys' --concurrency 1
        "    maxconn 4000",
        "defaults",
        f"    mode {'http' if http else 'tcp'}",
        "    timeout connect 250ms",
        "    timeout client 1h",
        "    timeout server 1h",
        "    timeout tunnel 1h",
        f"    timeout check {check_timeout}",
        "    retries 3",
        "    option redispatch 1",
        "    default-server inter 250ms fastinter 100ms downinter 500ms rise 1 fall 2 "
        "observe layer4 error-limit 1 on-error mark-down on-marked-down shutdown-sessions",
        "frontend front",
        f"    bind {host}:{port}{h2}",
        "    default_backend members",
        "backend members",
        f"    balance {balance}",
        "    hash-type consistent",
    ]
    if http:
        lines.append("    retry-on conn-failure empty-response response-timeout")
    if kind in ("http", "websocket"):
        lines += ["    option httpchk GET /healthz", "    http-check expect status 200"]
    for i, (name, member_port) in enumerate(members):
        backup = " backup" if i else ""
        lines.append(f"    server {name} {host}:{member_port} check{backup}{h2}")
    return "\n".join(lines) + "\n"


# -- a static Envoy, by hand --------------------------------------------------------------


def _dur(ms: float) -> str:
    return f"{ms / 1000:.3f}s"


def _cluster(kind: str, host: str, members: Sequence[tuple[str, int]]) -> dict[str, Any]:
    check: dict[str, Any] = {"timeout": _dur(200), "interval": _dur(250),
                             "interval_jitter": _dur(25), "healthy_threshold": 1,
                             "unhealthy_threshold": 2, "no_traffic_interval": _dur(500),
                             "unhealthy_interval": _dur(500),
                             "unhealthy_edge_interval": _dur(100),
                             "healthy_edge_interval": _dur(100)}
    if kind == "grpc":
        check["grpc_health_check"] = {}
    elif kind == "tcp":
        check["tcp_health_check"] = {}
    else:
        check["http_health_check"] = {"path": "/healthz"}
    cluster: dict[str, Any] = {
        "name": "members", "type": "STATIC", "connect_timeout": _dur(250),
        "lb_policy": "MAGLEV", "maglev_lb_config": {"table_size": 4099},
        "common_lb_config": {"healthy_panic_threshold": {"value": 0},
                             "update_merge_window": "0s"},
        "health_checks": [check],
        "close_connections_on_host_health_failure": True,
        "outlier_detection": {"split_external_local_origin_errors": True,
                              "consecutive_local_origin_failure": 1,
                              "enforcing_consecutive_local_origin_failure": 100,
                              "interval": "1s", "base_ejection_time": "5s",
                              # Envoy's default, 10 %, ejects none of three hosts.
                              "max_ejection_percent": 50},
        "circuit_breakers": {"thresholds": [{"retry_budget": {
            "budget_percent": {"value": 100}, "min_retry_concurrency": 1024}}]},
        "load_assignment": {"cluster_name": "members", "endpoints": [
            {"priority": i, "lb_endpoints": [{"endpoint": {
                "hostname": name,
                "address": {"socket_address": {"address": host, "port_value": port}}}}]}
            for i, (name, port) in enumerate(members)]},
    }
    if kind == "grpc":
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                         "HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}}
    return cluster


def _http_filter_chain(kind: str) -> dict[str, Any]:
    retry_on = ("connect-failure,refused-stream,reset,unavailable" if kind == "grpc"
                else "connect-failure,refused-stream,reset,gateway-error")
    route: dict[str, Any] = {
        "cluster": "members", "timeout": "0s" if kind == "grpc" else "15s",
        "hash_policy": [{"header": {"header_name": hdr.SESSION}, "terminal": True}],
        "retry_policy": {
            "retry_on": retry_on, "num_retries": 3, "per_try_timeout": "2s",
            "retry_back_off": {"base_interval": "0.005s", "max_interval": "0.05s"},
            "host_selection_retry_max_attempts": 5,
            "retry_host_predicate": [{
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host."
                                          "previous_hosts.v3.PreviousHostsPredicate"}}],
            "retry_priority": {
                "name": "envoy.retry_priorities.previous_priorities",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry."
                                          "priority.previous_priorities.v3."
                                          "PreviousPrioritiesConfig",
                                 "update_frequency": 1}}},
    }
    if kind == "grpc":
        route["max_stream_duration"] = {"grpc_timeout_header_max": "0s"}
    hcm: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
                 "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "front", "codec_type": "AUTO",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "route": route}]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    if kind in ("http", "websocket"):
        hcm["upgrade_configs"] = [{"upgrade_type": "websocket"}]
        hcm["delayed_close_timeout"] = "0s"
    return {"filters": [{"name": "envoy.filters.network.http_connection_manager",
                         "typed_config": hcm}]}


def static_envoy_config(kind: str, listen: tuple[str, int], admin_port: int,
                        members: Sequence[tuple[str, int]]) -> dict[str, Any]:
    """A bootstrap with everything static: one listener, one cluster of ``members`` as
    priorities 0, 1, 2."""
    host, port = listen
    if kind == "tcp":
        chain: dict[str, Any] = {"filters": [{
            "name": "envoy.filters.network.tcp_proxy", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy."
                         "v3.TcpProxy",
                "stat_prefix": "front", "cluster": "members",
                "hash_policy": [{"source_ip": {}}], "max_connect_attempts": 7,
                "backoff_options": {"base_interval": "0.005s", "max_interval": "0.05s"}}}]}
    else:
        chain = _http_filter_chain(kind)
    return {
        "admin": {"address": {"socket_address": {"address": host, "port_value": admin_port}}},
        "static_resources": {
            "listeners": [{"name": "front", "address": {"socket_address": {
                "address": host, "port_value": port}}, "filter_chains": [chain]}],
            "clusters": [_cluster(kind, host, members)]},
    }


# -- clients of long-lived connections that see a close when it happens ---------------------


class Broken(Exception):
    """The connection broke or could not be opened."""


@dataclass
class Reconnect:
    session: str
    broken: float
    answered: float
    member_before: str | None
    member_after: str
    seq_before: int | None
    seq_after: int
    dials: int
    """Connections opened until one answered (1: the proxy's first one did)."""


class _Line:
    def __init__(self, host: str, port: int, session: str, k: int) -> None:
        self.host, self.port, self.session, self.source = host, port, session, \
            source_address(k)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        # A socket of our own: asyncio's local_addr resolves both addresses in its
        # thread pool first, 100 reconnects at once queued behind 6 threads.
        sock = socket.socket()
        sock.setblocking(False)
        try:
            sock.bind((self.source, 0))
            async with asyncio.timeout(CALL_TIMEOUT):
                await asyncio.get_running_loop().sock_connect(
                    sock, (self.host, self.port))
            self.reader, self.writer = await asyncio.open_connection(sock=sock)
        except (OSError, TimeoutError) as exc:
            sock.close()
            raise Broken(str(exc)) from None

    async def request(self) -> tuple[str, int]:
        assert self.reader is not None and self.writer is not None
        try:
            self.writer.write(counter.tcp_request("INC", self.session))
            await self.writer.drain()
            async with asyncio.timeout(CALL_TIMEOUT):
                line = await self.reader.readline()
            member, _, seq = counter.parse_tcp_answer(line)
        except (OSError, TimeoutError, ValueError) as exc:
            raise Broken(str(exc)) from None
        return member, seq

    async def idle(self, seconds: float) -> None:
        assert self.reader is not None
        try:
            async with asyncio.timeout(seconds):
                data = await self.reader.read(1)
        except TimeoutError:
            return
        except OSError as exc:
            raise Broken(str(exc)) from None
        raise Broken("closed" if not data else "unexpected data")

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()


class _WebSocket:
    def __init__(self, host: str, port: int, session: str, k: int) -> None:
        self.url = f"http://{host}:{port}/counter/ws"
        self.session = session
        self.http: Any = None
        self.ws: Any = None

    async def open(self) -> None:
        import aiohttp

        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                self.ws = await self.http.ws_connect(
                    self.url, headers={hdr.SESSION: self.session}, autoping=True)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise Broken(str(exc)) from None

    async def request(self) -> tuple[str, int]:
        import aiohttp

        try:
            await self.ws.send_str("inc")
            message = await self.ws.receive(timeout=CALL_TIMEOUT)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise Broken(str(exc)) from None
        if message.type != aiohttp.WSMsgType.TEXT:
            raise Broken(message.type.name)
        answer = json.loads(message.data)
        if "seq" not in answer:
            raise Broken(str(answer)[:200])
        return str(answer["member"]), int(answer["seq"])

    async def idle(self, seconds: float) -> None:
        import aiohttp

        try:
            message = await self.ws.receive(timeout=seconds)
        except TimeoutError:
            return
        except (aiohttp.ClientError, OSError) as exc:
            raise Broken(str(exc)) from None
        raise Broken(message.type.name)

    async def close(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.close()
        if self.http is not None:
            await self.http.close()


class Sessions:
    """``sessions`` long-lived connections of ``kind`` (websocket or tcp) to ``target``
    (HOST:PORT), each incrementing its session's counter every ``interval``."""

    def __init__(self, kind: str, target: str, sessions: int, interval: float,
                 until: float, prefix: str) -> None:
        self.kind = kind
        self.host, _, port = target.rpartition(":")
        self.port = int(port)
        self.sessions = [f"{prefix}{i:03d}" for i in range(sessions)]
        self.interval = interval
        self.until = until
        self.records: list[Record] = []
        self.reconnects: list[Reconnect] = []
        self.failures = 0

    def _more(self) -> bool:
        return time.time() < self.until

    async def run(self) -> None:
        await asyncio.gather(*(self._session(k, s) for k, s in enumerate(self.sessions)))

    async def _session(self, k: int, session: str) -> None:
        opener = _Line if self.kind == "tcp" else _WebSocket
        await asyncio.sleep(self.interval * k / len(self.sessions))
        conn: Any = None
        member: str | None = None
        seq: int | None = None
        broken: float | None = None
        dials = 0
        try:
            while self._more():
                try:
                    if conn is None:
                        dials += 1
                        conn = opener(self.host, self.port, session, k)
                        await conn.open()
                    sent = time.time()
                    new_member, new_seq = await conn.request()
                except Broken:
                    if conn is not None:
                        await conn.close()
                        conn = None
                    now = time.time()
                    broken = broken or now
                    if now - broken > RECONNECT_DEADLINE:
                        self.failures += 1
                        self.records.append(Record(broken, now, session, 0, None, None))
                        broken, dials = None, 0
                    await asyncio.sleep(0.001)
                    continue
                now = time.time()
                self.records.append(Record(sent, now, session, 200, new_member, new_seq))
                if broken is not None:
                    self.reconnects.append(Reconnect(session, broken, now, member, new_member,
                                                     seq, new_seq, dials))
                    broken = None
                member, seq, dials = new_member, new_seq, 0
                try:
                    await conn.idle(self.interval)
                except Broken:
                    broken = time.time()
                    await conn.close()
                    conn = None
        finally:
            if conn is not None:
                await conn.close()


# -- before the first kill -------------------------------------------------------------


WARM_SECONDS = 1.0
"""Seconds of warm-up writes on each member, straight to its app."""


async def warm_members(d: Any, kind: str, sessions: int) -> None:
    """Sessions written on a, then taken over by b, then by c, straight to each member's
    app, before the first kill. The first failover of a deployment otherwise finds the
    standby cold (its first session lease still to grant, its takeover path never run)
    and is slower, and it always went through the proxy that comes first in the first
    run; through no proxy, the warm-up favours none."""
    names = [f"warm{i:03d}" for i in range(sessions)]
    for m in d.members:
        target = f"{HOST}:{m.app_port}"
        until = time.time() + WARM_SECONDS
        warm: Any
        if kind == "http":
            warm = Traffic(f"http://{target}/counter", sessions, until,
                           max_requests=sessions * 100, interval=0.05, prefix="warm")
        elif kind == "grpc":
            warm = StreamTraffic("grpc", target, sessions, until, max_requests=sessions * 100,
                                 interval=0.05, prefix="warm")
        else:
            warm = Sessions(kind, target, sessions, 0.05, until, "warm")
        async with asyncio.timeout(WARM_SECONDS + 30):
            await warm.run()
        taken = {r.session for r in warm.records if r.ok}
        if taken != set(names):
            print(f"    warm-up: {m.name} served {len(taken)} of {sessions} sessions",
                  flush=True)
