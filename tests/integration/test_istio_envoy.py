"""Active/standby under Istio, through a real Envoy given the cluster the way Istio builds it.

No istiod runs here; its part is played the way its source does it, and nothing else:

* the outbound cluster and the default route of a Service are written as
  pilot/pkg/networking/core builds them for the DestinationRule ``meshxl istio render``
  prints (EDS cluster ``outbound|PORT||HOST``, Maglev, outlier detection, panic
  threshold from ``minHealthPercent``, locality-weighted LB, transport-socket matches,
  the retry budget; the default route with Istio's non-hashing retry policy and the
  header hash policy), then the rendered EnvoyFilter's patch values are merged in with
  Istio's merge semantics (pkg/proto/merge: protobuf merge, lists appended, Durations
  replaced);
* its EDS: ready pods only (released Istio leaves unready endpoints out), each
  endpoint's priority from the DestinationRule's ``failoverPriority`` and the pod's
  labels (applyFailoverPriorityPerLocality, then made dense), served to Envoy from a
  watched file (Envoy's path config source) instead of ADS.

The pods live in a small in-process Kubernetes API (list by label selector, JSON merge
patch of labels); the members are real statesync sidecars registered in a real etcd,
the backends real echo servers, and ``meshxl istio label`` labels the pods from what
meshxl decides. Asserted: traffic only to the active, failover only to the standby,
``meshxl member down`` drains, no traffic to a pod that is not ready.

Pinned sessions (``stickiness.pin``): the outbound HTTP connection manager is Istio's
(its filter chain with or without istiod's own empty stateful session filter,
PILOT_ENABLE_PERSISTENT_SESSION_FILTER), the EnvoyFilter's HTTP_FILTER patch inserted
as Istio's INSERT_BEFORE does, and istiod's EDS leaves out pods labelled
``istio.io/draining`` (the Service has no persistent-session label). Asserted: every
answer pins, pins keep sessions where the hash would move them back, a pod leaving
moves exactly its sessions, ``meshxl member down`` moves the drained member's pins, and
istiod's own filter beside meshxl's sets no second pin.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.http.stateful_session.v3 import (  # noqa: F401
    stateful_session_pb2,
)
from envoy.extensions.http.stateful_session.cookie.v3 import cookie_pb2  # noqa: F401
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2  # noqa: F401
from envoy.extensions.retry.priority.previous_priorities.v3 import (  # noqa: F401
    previous_priorities_config_pb2,
)
from envoy.extensions.transport_sockets.raw_buffer.v3 import raw_buffer_pb2  # noqa: F401
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2  # noqa: F401
from google.protobuf import duration_pb2, json_format
from google.protobuf.message import Message

from meshxl.etcd.keys import Keys
from meshxl.etcd.mesh import EtcdMeshSource
from meshxl.istio import IstioOptions, render_model
from meshxl.istio.labeler import KubeApi, PodLabeler
from meshxl.istio.labels import DRAINING_LABEL, istio_priority
from meshxl.local.ports import free_port
from meshxl.local.procs import run
from meshxl.local.wait import wait_until
from meshxl.model import load_model, parse_model
from meshxl.model.runtime import Health
from meshxl.operator import actions as ops
from tests.integration.test_pinned_sessions import PIN, Browser, moved

pytestmark = pytest.mark.asyncio

REPO = Path(__file__).resolve().parents[2]
NAMESPACE = "shop"
SERVICE_PORT = 8080
HOST = f"orders.{NAMESPACE}.svc.cluster.local"
CLUSTER = f"outbound|{SERVICE_PORT}||{HOST}"
SESSIONS = [f"s{i}" for i in range(24)]


# -- Istio's merge (pkg/proto/merge) --------------------------------------------------------


def istio_merge(dst: Message, src: Message) -> None:
    """proto.Merge as Istio's EnvoyFilter MERGE does it: set scalars overwrite, messages
    merge recursively, lists append, a Duration is replaced whole."""
    for field, value in src.ListFields():
        if field.is_repeated:
            getattr(dst, field.name).MergeFrom(value)
        elif field.message_type is None:
            setattr(dst, field.name, value)
        elif field.message_type.full_name == duration_pb2.Duration.DESCRIPTOR.full_name:
            getattr(dst, field.name).CopyFrom(value)
        else:
            istio_merge(getattr(dst, field.name), value)


# -- the cluster, route and EDS as istiod builds them ------------------------------------------


def istio_cluster(dr: dict[str, Any], eds_dir: Path) -> dict[str, Any]:
    policy = dr["spec"]["trafficPolicy"]
    od = policy["outlierDetection"]
    hashing = policy["loadBalancer"]["consistentHash"]
    return {
        "name": CLUSTER,
        "type": "EDS",
        "eds_cluster_config": {
            "service_name": CLUSTER,
            # Istio: {"ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"}
            "eds_config": {"path_config_source": {"path": str(eds_dir / "eds.json"),
                                                  "watched_directory": {"path": str(eds_dir)}},
                           "resource_api_version": "V3"},
        },
        "connect_timeout": "0.25s",
        "lb_policy": "MAGLEV",
        "maglev_lb_config": {"table_size": hashing["maglev"]["tableSize"]},
        "common_lb_config": {
            # applyOutlierDetection: minHealthPercent -> panic threshold.
            "healthy_panic_threshold": {"value": float(od["minHealthPercent"])},
            # LocalityLBSettings.ApplyToCluster with failoverPriority and outlier detection
            # (nothing when locality load balancing is off).
            **({"locality_weighted_lb_config": {}}
               if policy["loadBalancer"]["localityLbSetting"].get("enabled") else {}),
        },
        "outlier_detection": {
            "consecutive_5xx": od["consecutive5xxErrors"],
            "enforcing_consecutive_5xx": 100,
            "consecutive_gateway_failure": od["consecutiveGatewayErrors"],
            "enforcing_consecutive_gateway_failure": 100,
            "split_external_local_origin_errors": True,
            "consecutive_local_origin_failure": od["consecutiveLocalOriginFailures"],
            "enforcing_consecutive_local_origin_failure": 100,
            "interval": "1s",
            "base_ejection_time": "5s",
            "max_ejection_percent": od["maxEjectionPercent"],
        },
        "circuit_breakers": {"thresholds": [{
            "max_connections": 4294967295, "max_pending_requests": 4294967295,
            "max_requests": 4294967295, "max_retries": 4294967295,
            "retry_budget": {"budget_percent": {"value": policy["retryBudget"]["percent"]},
                             "min_retry_concurrency":
                                 policy["retryBudget"]["minRetryConcurrency"]},
            "track_remaining": True}]},
        "transport_socket_matches": [
            {"name": "tlsMode-istio", "match": {"tlsMode": "istio"},
             "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                 "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
                          "UpstreamTlsContext", "sni": f"outbound_.{SERVICE_PORT}_._.{HOST}"}}},
            {"name": "tlsMode-disabled", "match": {},
             "transport_socket": {"name": "envoy.transport_sockets.raw_buffer", "typed_config": {
                 "@type": "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer."
                          "v3.RawBuffer"}}},
        ],
    }


def istio_default_route(header: str) -> dict[str, Any]:
    """BuildDefaultHTTPOutboundRoute plus the DestinationRule's hash policy."""
    return {
        "name": "default", "match": {"prefix": "/"},
        "route": {
            "cluster": CLUSTER, "timeout": "0s",
            "retry_policy": {
                "retry_on": "connect-failure,refused-stream,unavailable,cancelled,"
                            "retriable-status-codes",
                "num_retries": 2, "host_selection_retry_max_attempts": 5,
                "retry_host_predicate": [{
                    "name": "envoy.retry_host_predicates.previous_hosts",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry."
                                              "host.previous_hosts.v3.PreviousHostsPredicate"}}]},
            "hash_policy": [{"header": {"header_name": header}}],
        },
    }


def patched(kind: type[Message], base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    message = json_format.ParseDict(base, kind())
    istio_merge(message, json_format.ParseDict(patch, kind()))
    out: dict[str, Any] = json.loads(json.dumps(
        json_format.MessageToDict(message, preserving_proto_field_name=True)))
    return out


ROUTER = {"name": "envoy.filters.http.router",
          "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http."
                                    "router.v3.Router"}}
#: istiod's EmptySessionFilter, in every outbound HTTP connection manager when istiod
#: runs with PILOT_ENABLE_PERSISTENT_SESSION_FILTER (xdsfilters.EmptySessionFilter).
ISTIO_EMPTY_SESSION_FILTER = {
    "name": "envoy.filters.http.stateful_session",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http."
                              "stateful_session.v3.StatefulSession"}}


def insert_before(filters: list[dict[str, Any]], patch: dict[str, Any]) -> list[dict[str, Any]]:
    """An EnvoyFilter HTTP_FILTER INSERT_BEFORE: the value goes before the first filter
    named by the match's subFilter."""
    anchor = patch["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"]
    at = next(i for i, f in enumerate(filters) if f["name"] == anchor)
    return [*filters[:at], patch["patch"]["value"], *filters[at:]]


async def start_istio_envoy(start_envoy: Any, name: str, admin_port: int,
                            config: dict[str, Any]) -> Any:
    """An Envoy on ``config`` as given (the whole bootstrap: istiod's cluster and
    route, :func:`bootstrap`), ready."""

    def customize(boot: dict[str, Any]) -> None:
        boot.clear()
        boot.update(config)

    envoy = await start_envoy(name, 1, admin_port=admin_port, customize=customize)
    await envoy.wait_ready()
    return envoy


def bootstrap(admin_port: int, listen_port: int, cluster: dict[str, Any],
              route: dict[str, Any],
              http_filters: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "node": {"id": "sidecar~127.0.0.1~client.shop~shop.svc.cluster.local",
                 "cluster": "client.shop"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1",
                                                 "port_value": admin_port}}},
        "static_resources": {
            "clusters": [cluster],
            "listeners": [{
                "name": f"0.0.0.0_{SERVICE_PORT}",
                "address": {"socket_address": {"address": "127.0.0.1",
                                               "port_value": listen_port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network."
                                 "http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "outbound_0.0.0.0_8080",
                        "route_config": {"name": str(SERVICE_PORT), "virtual_hosts": [{
                            "name": f"{HOST}:{SERVICE_PORT}", "domains": ["*"],
                            "routes": [route]}]},
                        "http_filters": http_filters or [ROUTER],
                    }}]}],
            }],
        },
    }


class FakeIstiod:
    """Pods in a tiny Kubernetes API, and the EDS istiod would send for them."""

    def __init__(self, eds_dir: Path, chain: list[str]) -> None:
        self.eds_dir = eds_dir
        self.chain = chain
        #: The Service has Istio's persistent-session cookie label: draining pods are
        #: sent as DRAINING instead of being left out.
        self.persistent_session = False
        self.pods: dict[str, dict[str, Any]] = {}
        self.version = 0
        self.patches = 0

    def add_pod(self, name: str, site: str, port: int) -> None:
        self.pods[name] = {"metadata": {"name": name, "namespace": NAMESPACE, "labels": {
            "app": "orders", "meshxl.io/cluster": "orders", "meshxl.io/site": site,
            "meshxl.io/installation": "meshxl",  # as the injector writes it
            "statefulset.kubernetes.io/pod-name": name}},
            "status": {"podIP": "127.0.0.1", "ready": True}, "port": port}

    def labels(self, name: str) -> dict[str, str]:
        return dict(self.pods[name]["metadata"]["labels"])

    def set_ready(self, name: str, ready: bool) -> None:
        self.pods[name]["status"]["ready"] = ready
        self.write_eds()

    def draining(self, name: str) -> bool:
        return bool(self.pods[name]["metadata"]["labels"].get(DRAINING_LABEL))

    def priorities(self) -> dict[str, int]:
        """applyFailoverPriorities over the ready pods (dense, as Istio compacts); pods
        labelled draining only for a persistent-session Service (filterIstioEndpoint)."""
        raw = {name: istio_priority(pod["metadata"]["labels"], self.chain)
               for name, pod in self.pods.items() if pod["status"]["ready"]
               and (self.persistent_session or not self.draining(name))}
        dense = {p: i for i, p in enumerate(sorted(set(raw.values())))}
        return {name: dense[p] for name, p in raw.items()}

    def write_eds(self) -> None:
        groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
        for name, priority in self.priorities().items():
            pod = self.pods[name]
            groups.setdefault((priority, pod["metadata"]["labels"]["meshxl.io/site"]), []).append({
                "endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                            "port_value": pod["port"]}}},
                "health_status": "DRAINING" if self.draining(name) else "HEALTHY",
                "load_balancing_weight": 1,
                "metadata": {"filter_metadata": {"istio": {"workload": f"{name};{NAMESPACE}"}}},
            })
        self.version += 1
        cla = {
            "@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
            "cluster_name": CLUSTER,
            "endpoints": [{"locality": {"region": site}, "priority": priority,
                           "load_balancing_weight": len(eps), "lb_endpoints": eps}
                          for (priority, site), eps in sorted(groups.items())],
        }
        tmp = self.eds_dir / f".eds-{self.version}.json"
        tmp.write_text(json.dumps({"version_info": str(self.version), "resources": [cla]}))
        os.replace(tmp, self.eds_dir / "eds.json")  # a move: Envoy's directory watch fires

    def app(self) -> web.Application:
        async def list_pods(request: web.Request) -> web.Response:
            assert request.match_info["ns"] == NAMESPACE
            selector = request.query.get("labelSelector", "")
            items = [{k: v for k, v in p.items() if k != "port"} for p in self.pods.values()
                     if selected(p["metadata"]["labels"], selector)]
            return web.json_response({"kind": "PodList", "items": items})

        async def patch_pod(request: web.Request) -> web.Response:
            assert request.content_type == "application/merge-patch+json"
            pod = self.pods.get(request.match_info["name"])
            if pod is None:
                return web.json_response({"reason": "NotFound"}, status=404)
            body = await request.json()
            labels = pod["metadata"]["labels"]
            for key, value in body["metadata"]["labels"].items():
                if value is None:
                    labels.pop(key, None)
                else:
                    labels[key] = value
            self.patches += 1
            self.write_eds()
            return web.json_response(pod["metadata"])

        app = web.Application()
        app.router.add_get("/api/v1/namespaces/{ns}/pods", list_pods)
        app.router.add_patch("/api/v1/namespaces/{ns}/pods/{name}", patch_pod)
        return app


def selected(labels: dict[str, str], selector: str) -> bool:
    """The API server's equality-based label selector (``key``, ``key=value``, all of
    the comma-separated terms)."""
    for term in filter(None, selector.split(",")):
        key, eq, value = term.partition("=")
        if key not in labels or (eq and labels[key] != value):
            return False
    return True


@contextlib.asynccontextmanager
async def serving_istiod(istiod: FakeIstiod, etcd_client: Any, keys: Keys,
                         model_text: bytes) -> AsyncIterator[None]:
    """The fake istiod's pods written to Envoy's EDS file and served as the Kubernetes
    API on loopback, the model stored in etcd, and meshxl's pod labeler following etcd
    into that API; all of it stopped on leaving."""
    istiod.write_eds()
    runner = web.AppRunner(istiod.app())
    await runner.setup()
    api_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", api_port).start()
    await etcd_client.put(keys.model.encode(), model_text)
    api = KubeApi(f"http://127.0.0.1:{api_port}")
    labeler = PodLabeler(api, NAMESPACE, resync=1.0)
    source = EtcdMeshSource(etcd_client, keys, labeler.poke)
    tasks = [asyncio.create_task(source.run()), asyncio.create_task(labeler.run(source))]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await api.close()
        await runner.cleanup()


async def _members(http: aiohttp.ClientSession, url: str) -> Counter[str]:
    seen: Counter[str] = Counter()
    for session in SESSIONS:
        async with http.get(url, headers={"x-session-id": session}) as resp:
            if resp.status == 200:
                seen[(await resp.json())["member"]] += 1
            else:
                seen[f"HTTP {resp.status}"] += 1
    return seen


async def test_active_standby_drain_and_readiness_through_istio_shaped_envoy(
        harness: Any, etcd: Any, etcd_client: Any, start_backends: Any, start_sidecar: Any,
        start_envoy: Any, tmp_path: Path) -> None:
    model = load_model(REPO / "deploy" / "kubernetes" / "base" / "model.yaml")
    rendered = render_model(model, IstioOptions(namespace=NAMESPACE,
                                                ports={"orders": SERVICE_PORT}))
    dr, ef = rendered.objects
    chain = dr["spec"]["trafficPolicy"]["loadBalancer"]["localityLbSetting"]["failoverPriority"]
    patch_of = {p["applyTo"]: p["patch"]["value"] for p in ef["spec"]["configPatches"]}

    names = ["orders-0", "orders-1", "orders-2"]
    sites = {"orders-0": "dc1", "orders-1": "dc1", "orders-2": "dc2"}
    backends = await start_backends(names)
    eds_dir = tmp_path / "eds"
    eds_dir.mkdir()
    istiod = FakeIstiod(eds_dir, chain)
    for backend in backends:
        istiod.add_pod(backend.name, sites[backend.name], backend.port)
    keys = Keys()  # the EDS written before labelling: everyone at the lowest priority
    async with serving_istiod(istiod, etcd_client, keys, yaml_text(model)), \
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        for backend in backends:
            await start_sidecar(cluster="orders", member=backend.name, etcd=etcd.url,
                                app_port=backend.port, site=sites[backend.name])
        roles = {"orders-0": "active", "orders-1": "standby", "orders-2": "backup"}
        await wait_until(lambda: istiod.priorities() == {"orders-0": 0, "orders-1": 1,
                                                       "orders-2": 2}
                         and all(istiod.labels(pod).get("meshxl.io/role") == role
                                 for pod, role in roles.items()),
                         timeout=30, what="role labels: orders-0 active, orders-1 standby")
        assert istiod.labels("orders-0")["meshxl.io/role"] == "active"
        assert istiod.labels("orders-1")["meshxl.io/role"] == "standby"
        assert istiod.labels("orders-2")["meshxl.io/role"] == "backup"

        cluster = patched(cluster_pb2.Cluster, istio_cluster(dr, eds_dir), patch_of["CLUSTER"])
        assert cluster["ignore_health_on_host_removal"] is True
        assert cluster["health_checks"][0]["http_health_check"]["path"] == "/healthz"
        route = patched(route_components_pb2.Route, istio_default_route("x-session-id"),
                        patch_of["HTTP_ROUTE"])
        assert len(route["route"]["retry_policy"]["retry_host_predicate"]) == 1
        admin_port, listen_port = free_port(), free_port()
        config = bootstrap(admin_port, listen_port, cluster, route)

        envoy = await start_istio_envoy(start_envoy, "istio-client", admin_port, config)
        url = f"http://127.0.0.1:{listen_port}/"
        port_of = {b.name: b.port for b in backends}

        async def serving_priorities() -> dict[int, int] | None:
            hosts = await envoy.hosts(CLUSTER)
            return {h.port: h.priority for h in hosts}

        def expect(priorities: dict[str, int]) -> Any:
            want = {port_of[n]: p for n, p in priorities.items()}

            async def check() -> bool:
                return await serving_priorities() == want
            return check

        await envoy.wait_until(expect({"orders-0": 0, "orders-1": 1, "orders-2": 2}),
                               timeout=20, what="EDS: active 0, standby 1, backup 2")
        healthy = {port_of[n] for n in names}

        async def all_healthy() -> bool:
            return {h.port for h in await envoy.hosts(CLUSTER) if h.healthy} == healthy
        await envoy.wait_until(all_healthy, timeout=20, what="health checks pass")

        # Every session goes to the active member, from this client as from any other.
        assert await _members(http, url) == Counter({"orders-0": len(SESSIONS)})

        # A probe of the standby beside a sick active (predictive failover): labelled
        # active too, it shares the active's priority and the hash gives it sessions to
        # be compared on; when the probe ends they come back to the active.
        probe = Health("probe", "p90 400 ms against its peers' 10 ms", time.time(), "t",
                       behind="orders-0")
        standby_health = keys.member_health("orders", "orders-1").encode()
        await etcd_client.put(standby_health, json.dumps(probe.to_dict()).encode())
        await envoy.wait_until(expect({"orders-0": 0, "orders-1": 0, "orders-2": 1}),
                               timeout=20, what="EDS: the probed standby beside the active")
        split = await _members(http, url)
        assert set(split) == {"orders-0", "orders-1"}, split
        await etcd_client.delete(standby_health)
        await envoy.wait_until(expect({"orders-0": 0, "orders-1": 1, "orders-2": 2}),
                               timeout=20, what="EDS: the probe over")
        assert await _members(http, url) == Counter({"orders-0": len(SESSIONS)})

        # The active fails: only the standby takes over, never the backup.
        await backends[0].kill()

        async def on_standby() -> bool:
            return await _members(http, url) == Counter({"orders-1": len(SESSIONS)})
        await wait_until(on_standby, timeout=30, what="failover to the standby only")
        await backends[0].start()
        await wait_until(lambda: _members_is(http, url, "orders-0"), timeout=30,
                         what="back on the active")

        # meshxl member down drains: the labeler demotes orders-0, orders-1 is active.
        await ops.set_member_admin(etcd_client, keys, "orders", "orders-0", down=True,
                                   reason="test drain")
        await envoy.wait_until(expect({"orders-0": 2, "orders-1": 0, "orders-2": 1}),
                               timeout=20, what="drained member last, standby promoted")
        await wait_until(lambda: _members_is(http, url, "orders-1"), timeout=20,
                         what="traffic drained to orders-1")
        await ops.set_member_admin(etcd_client, keys, "orders", "orders-0", down=False,
                                   reason="test undrain")
        await wait_until(lambda: _members_is(http, url, "orders-0"), timeout=20,
                         what="orders-0 active again")

        # A pod that is not ready leaves EDS; its health check still passes, and
        # ignore_health_on_host_removal makes Envoy drop it anyway.
        istiod.set_ready("orders-0", False)
        await envoy.wait_until(expect({"orders-1": 0, "orders-2": 1}), timeout=20,
                               what="the unready pod out of Envoy")
        assert await _members(http, url) == Counter({"orders-1": len(SESSIONS)})


async def _members_is(http: aiohttp.ClientSession, url: str, member: str) -> bool:
    return await _members(http, url) == Counter({member: len(SESSIONS)})


def yaml_text(model: Any) -> bytes:
    return (REPO / "deploy" / "kubernetes" / "base" / "model.yaml").read_bytes()


PINNED_MODEL = {"clusters": [{
    "name": "orders", "mode": "load-sharing", "membership": "registered",
    "stickiness": {"header": "x-session-id", "pin": {"cookie": {"name": PIN}}},
    "listener": {"port": SERVICE_PORT}}]}


def _pins_set(resp_headers: Any) -> int:
    return sum(1 for raw in resp_headers.getall("Set-Cookie", [])
               if raw.startswith(f"{PIN}="))


async def test_pinned_sessions_through_istio_shaped_envoy(
        harness: Any, etcd: Any, etcd_client: Any, start_backends: Any, start_sidecar: Any,
        start_envoy: Any, tmp_path: Path) -> None:
    model = parse_model(yaml.safe_dump(PINNED_MODEL))
    rendered = render_model(model, IstioOptions(namespace=NAMESPACE,
                                                ports={"orders": SERVICE_PORT}))
    assert rendered.warnings == []
    dr, ef = rendered.objects
    # One tier; a degraded member goes behind its peers (degradation.action: move).
    locality = dr["spec"]["trafficPolicy"]["loadBalancer"]["localityLbSetting"]
    assert locality == {"enabled": True, "failoverPriority": ["meshxl.io/serving=true"]}
    patch_of = {p["applyTo"]: p for p in ef["spec"]["configPatches"]}

    names = ["orders-0", "orders-1", "orders-2"]
    backends = await start_backends(names)
    eds_dir = tmp_path / "eds"
    eds_dir.mkdir()
    istiod = FakeIstiod(eds_dir, locality["failoverPriority"])
    for backend in backends:
        istiod.add_pod(backend.name, "dc1", backend.port)
    keys = Keys()
    async with serving_istiod(istiod, etcd_client, keys,
                              yaml.safe_dump(PINNED_MODEL).encode()):
        for backend in backends:
            await start_sidecar(cluster="orders", member=backend.name, etcd=etcd.url,
                                app_port=backend.port)
        cluster = patched(cluster_pb2.Cluster, istio_cluster(dr, eds_dir),
                          patch_of["CLUSTER"]["patch"]["value"])
        assert cluster["common_lb_config"]["override_host_status"]["statuses"] == [
            "HEALTHY", "UNKNOWN", "DEGRADED"]
        route = patched(route_components_pb2.Route, istio_default_route("x-session-id"),
                        patch_of["HTTP_ROUTE"]["patch"]["value"])
        assert list(route["typed_per_filter_config"]) == [f"meshxl.pin.{NAMESPACE}.orders"]
        envoys = {}
        # Istio's default (no session filter of its own), and istiod with
        # PILOT_ENABLE_PERSISTENT_SESSION_FILTER (its empty filter first).
        for label, chain in (("default", [ROUTER]),
                             ("istiod-filter", [ISTIO_EMPTY_SESSION_FILTER, ROUTER])):
            filters = insert_before(chain, patch_of["HTTP_FILTER"])
            assert [f["name"] for f in filters][-2:] == [f"meshxl.pin.{NAMESPACE}.orders",
                                                        "envoy.filters.http.router"]
            admin_port, listen_port = free_port(), free_port()
            config = bootstrap(admin_port, listen_port, cluster, route, filters)

            envoy = await start_istio_envoy(start_envoy, f"istio-{label}", admin_port,
                                            config)
            envoys[label] = (envoy, f"http://127.0.0.1:{listen_port}/")
        envoy, url = envoys["default"]
        port_of = {b.name: b.port for b in backends}

        async def serving(members: list[str], which: Any = envoy) -> None:
            want = {port_of[n] for n in members}
            await which.wait_hosts(
                CLUSTER, lambda hs: {h.port for h in hs} == want and all(
                    h.healthy for h in hs), timeout=20, what=f"healthy hosts {members}")

        for which, _ in envoys.values():
            await serving(names, which)

        browser = Browser(url)
        sessions = [f"s{i}" for i in range(60)]
        placed = await browser.visit(sessions)
        assert len(browser.pins) == len(sessions), "Envoy did not pin every answer"
        assert set(placed.values()) == set(names), placed

        # A pod leaves (not ready): exactly its sessions move, and are pinned anew.
        leaving = "orders-0"
        theirs = sorted(s for s, m in placed.items() if m == leaving)
        istiod.set_ready(leaving, False)
        await serving(["orders-1", "orders-2"])
        after = await browser.visit(sessions)
        assert sorted(moved(placed, after)) == theirs
        # It comes back: the hash alone would send its sessions back to it (a client
        # without pins shows it), the pins keep them where they are now.
        istiod.set_ready(leaving, True)
        await serving(names)
        unpinned = await Browser(url).visit(sessions)
        assert {s for s, m in unpinned.items() if m == leaving} == set(theirs)
        assert not moved(after, await browser.visit(sessions)), "a return moved pins"

        # meshxl member down: the labeler marks the pod draining, istiod leaves it out
        # of EDS, and its pinned sessions move (a priority change would not move them).
        drained = "orders-1"
        before = await browser.visit(sessions)
        mine = sorted(s for s, m in before.items() if m == drained)
        assert mine
        await ops.set_member_admin(etcd_client, keys, "orders", drained, down=True,
                                   reason="test drain")
        await wait_until(lambda: istiod.labels(drained).get(DRAINING_LABEL) == "meshxl",
                         timeout=20, what=f"{drained} labelled {DRAINING_LABEL}")
        await serving(["orders-0", "orders-2"])
        drained_after = await browser.visit(sessions)
        assert sorted(moved(before, drained_after)) == mine
        await ops.set_member_admin(etcd_client, keys, "orders", drained, down=False,
                                   reason="test undrain")
        await wait_until(lambda: DRAINING_LABEL not in istiod.labels(drained),
                         timeout=20, what=f"{drained} no longer draining")
        await serving(names)
        assert not moved(drained_after, await browser.visit(sessions))

        # The control plane judges a member degraded (its etcd record): the labeler
        # takes its serving label (behind its peers) and marks it draining (a pin
        # outlives a priority): its pinned sessions move at once, no new session goes
        # to it; when the judgement ends both come back.
        sick = "orders-2"
        before = await browser.visit(sessions)
        mine = sorted(s for s, m in before.items() if m == sick)
        record = Health("degraded", "p90 400 ms against its peers' 10 ms", time.time(), "t")
        await etcd_client.put(keys.member_health("orders", sick).encode(),
                              json.dumps(record.to_dict()).encode())
        await wait_until(lambda: "meshxl.io/serving" not in istiod.labels(sick)
                         and istiod.draining(sick), timeout=20, what=f"{sick} put behind")
        await serving(["orders-0", "orders-1"])
        sick_after = await browser.visit(sessions)
        assert mine and sorted(moved(before, sick_after)) == mine
        fresh = await Browser(url).visit([f"n{i}" for i in range(30)])
        assert sick not in fresh.values(), fresh
        await etcd_client.delete(keys.member_health("orders", sick).encode())
        await wait_until(lambda: istiod.labels(sick).get("meshxl.io/serving") == "true"
                         and not istiod.draining(sick), timeout=20, what=f"{sick} back")
        await serving(names)

        # istiod's own empty filter beside meshxl's: one pin per answer, and a pin set
        # by one client holds on the other.
        other, other_url = envoys["istiod-filter"]
        await serving(names, other)
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(),
                                         timeout=aiohttp.ClientTimeout(total=5)) as http:
            for session in sessions[:12]:
                async with http.get(other_url, headers={"x-session-id": session}) as resp:
                    assert resp.status == 200
                    assert _pins_set(resp.headers) == 1, resp.headers.getall("Set-Cookie")
        shared = Browser(other_url, pins=dict(browser.pins))
        assert not moved(sick_after, await shared.visit(sessions))


async def _placement(http: aiohttp.ClientSession, url: str,
                     sessions: list[str]) -> dict[str, str]:
    out = {}
    for session in sessions:
        async with http.get(url, headers={"x-session-id": session}) as resp:
            assert resp.status == 200
            out[session] = (await resp.json())["member"]
    return out


async def test_a_degraded_load_sharing_member_goes_behind_its_peers(
        harness: Any, etcd: Any, etcd_client: Any, start_backends: Any, start_sidecar: Any,
        start_envoy: Any, tmp_path: Path) -> None:
    """No pin: the serving label alone. Judged degraded, the member is one priority
    behind its peers: its hashed sessions move, no new one goes to it; the judgement
    ends and the hash sends its sessions back."""
    spec = {**PINNED_MODEL["clusters"][0], "stickiness": {"header": "x-session-id"}}
    model = parse_model(yaml.safe_dump({"clusters": [spec]}))
    dr, ef = render_model(model, IstioOptions(namespace=NAMESPACE,
                                              ports={"orders": SERVICE_PORT})).objects
    chain = dr["spec"]["trafficPolicy"]["loadBalancer"]["localityLbSetting"]["failoverPriority"]
    patch_of = {p["applyTo"]: p["patch"]["value"] for p in ef["spec"]["configPatches"]}
    names = ["orders-0", "orders-1", "orders-2"]
    backends = await start_backends(names)
    eds_dir = tmp_path / "eds"
    eds_dir.mkdir()
    istiod = FakeIstiod(eds_dir, chain)
    for backend in backends:
        istiod.add_pod(backend.name, "dc1", backend.port)
    keys = Keys()
    async with serving_istiod(istiod, etcd_client, keys,
                              yaml.safe_dump({"clusters": [spec]}).encode()), \
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        for backend in backends:
            await start_sidecar(cluster="orders", member=backend.name, etcd=etcd.url,
                                app_port=backend.port)
        await wait_until(lambda: all(istiod.labels(n).get("meshxl.io/serving") == "true"
                                     for n in names), timeout=20, what="serving labels")
        cluster = patched(cluster_pb2.Cluster, istio_cluster(dr, eds_dir), patch_of["CLUSTER"])
        route = patched(route_components_pb2.Route, istio_default_route("x-session-id"),
                        patch_of["HTTP_ROUTE"])
        admin_port, listen_port = free_port(), free_port()
        config = bootstrap(admin_port, listen_port, cluster, route)

        envoy = await start_istio_envoy(start_envoy, "istio-ls", admin_port, config)
        url = f"http://127.0.0.1:{listen_port}/"
        port_of = {b.name: b.port for b in backends}

        async def priorities(want: dict[str, int]) -> None:
            ports = {port_of[n]: p for n, p in want.items()}
            await envoy.wait_hosts(CLUSTER, lambda hs: {h.port: h.priority for h in hs}
                                   == ports and all(h.healthy for h in hs),
                                   timeout=20, what=f"priorities {want}")

        await priorities(dict.fromkeys(names, 0))
        before = await _placement(http, url, SESSIONS)
        sick = Counter(before.values()).most_common(1)[0][0]
        record = Health("degraded", "p90 400 ms against its peers' 10 ms", time.time(), "t")
        await etcd_client.put(keys.member_health("orders", sick).encode(),
                              json.dumps(record.to_dict()).encode())
        await priorities({n: int(n == sick) for n in names})
        after = await _placement(http, url, SESSIONS)
        assert sick not in after.values(), after
        fresh = await _placement(http, url, [f"n{i}" for i in range(24)])
        assert sick not in fresh.values(), fresh
        await etcd_client.delete(keys.member_health("orders", sick).encode())
        await priorities(dict.fromkeys(names, 0))
        assert await _placement(http, url, SESSIONS) == before


async def test_label_command_once_over_every_namespace(etcd: Any, etcd_client: Any,
                                                       tmp_path: Path) -> None:
    """``meshxl istio label --once`` as a process: model file, registrations in etcd,
    pods in two namespaces found without -n, health endpoint flag checked."""
    import sys

    istiod = FakeIstiod(tmp_path, [])
    for name, site in [("orders-0", "dc1"), ("orders-1", "dc1")]:
        istiod.add_pod(name, site, 1)
    istiod.pods["orders-1"]["metadata"]["namespace"] = "other"
    app = web.Application()

    async def list_all(request: web.Request) -> web.Response:
        assert request.query["labelSelector"] == "meshxl.io/cluster,meshxl.io/installation=meshxl"
        return web.json_response({"items": [
            {k: v for k, v in p.items() if k != "port"} for p in istiod.pods.values()]})

    async def patch(request: web.Request) -> web.Response:
        pod = istiod.pods[request.match_info["name"]]
        assert pod["metadata"]["namespace"] == request.match_info["ns"]
        pod["metadata"]["labels"].update((await request.json())["metadata"]["labels"])
        return web.json_response({})
    app.router.add_get("/api/v1/pods", list_all)
    app.router.add_patch("/api/v1/namespaces/{ns}/pods/{name}", patch)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    keys = Keys()
    for name in ("orders-0", "orders-1"):
        await etcd_client.put(keys.member("orders", name).encode(), json.dumps(
            {"address": "127.0.0.1", "port": 1, "site": "dc1", "ready": True}).encode())
    model = REPO / "deploy" / "kubernetes" / "base" / "model.yaml"
    try:
        code, out, err = await run([
            sys.executable, "-m", "meshxl.cli", "istio", "label", "--once", "-f", str(model),
            "--kube-api", f"http://127.0.0.1:{port}", "--etcd", etcd.url], timeout=60)
        assert code == 0, err
        assert istiod.labels("orders-0")["meshxl.io/role"] == "active"
        assert istiod.labels("orders-1")["meshxl.io/role"] == "standby"
        code, _, err = await run([
            sys.executable, "-m", "meshxl.cli", "istio", "label", "--once",
            "--health-listen", "nope", "--etcd", etcd.url], timeout=60)
        assert code == 1
        assert err.startswith("meshxl: bad --health-listen 'nope'")
        # A busy health port: one line, exit 1, before any labelling.
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            taken = f"127.0.0.1:{busy.getsockname()[1]}"
            code, _, err = await run([
                sys.executable, "-m", "meshxl.cli", "istio", "label", "--once",
                "--health-listen", taken, "--etcd", etcd.url], timeout=60)
        assert code == 1 and err.count("\n") == 1, err
        assert err.startswith(f"meshxl: bad --health-listen '{taken}'"), err
    finally:
        await runner.cleanup()
