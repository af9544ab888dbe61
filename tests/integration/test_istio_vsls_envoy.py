"""Virtual systems under Istio, through a real Envoy given each VS's cluster the way Istio
builds it (the helpers and the fake istiod of test_istio_envoy.py): one pool of three
pods, each VS a Service over them whose EDS priorities istiod computes from the VS's
own role labels, which ``meshxl istio label`` writes from the placement (real etcd).
Asserted: each VS's sessions on its own active, a dead active failing over to its
VS's standby only while the other VSs stay where they are, and ``meshxl member down``
on the pool moving exactly the VSs whose active the member was."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_components_pb2

from meshxl.etcd.keys import Keys
from meshxl.istio import IstioOptions, render_model
from meshxl.istio.labels import istio_priority
from meshxl.local.ports import free_port
from meshxl.local.wait import wait_until
from meshxl.model import parse_model
from meshxl.model.runtime import AdminAction, RuntimeState
from meshxl.model.vsls import placement_of
from meshxl.operator import actions as ops
from tests.integration.test_istio_envoy import (
    NAMESPACE,
    FakeIstiod,
    bootstrap,
    istio_cluster,
    istio_default_route,
    patched,
    serving_istiod,
    start_istio_envoy,
)

pytestmark = pytest.mark.asyncio

PORT = 10000
PODS = ["web-0", "web-1", "web-2"]
VSS = ["t01", "t02", "t03", "t04", "t05", "t06"]
SESSIONS = [f"s{i}" for i in range(12)]
MODEL_TEXT = f"""
pools:
  - name: web
    listener: {{port: {PORT}}}
    members:
{"".join(f"      - {{name: {p}, address: 127.0.0.{i + 1}, port: 8080}}{chr(10)}"
          for i, p in enumerate(PODS))}
virtual_systems:
  - names: [{", ".join(VSS)}]
    pool: web
    stickiness: {{header: x-session-id}}
"""
MODEL = parse_model(MODEL_TEXT)


def _outbound(vs: str) -> str:
    return f"outbound|{PORT}||{vs}.{NAMESPACE}.svc.cluster.local"


class PoolIstiod(FakeIstiod):
    """The pool's pods, and one EDS file per VS (its priorities from its own chain)."""

    def __init__(self, root: Path, chains: dict[str, list[str]]) -> None:
        super().__init__(root, [])
        self.chains = chains

    def add_pod(self, name: str, site: str, port: int) -> None:
        super().add_pod(name, site, port)
        self.pods[name]["metadata"]["labels"]["meshxl.io/cluster"] = "web"

    def priorities_of(self, vs: str) -> dict[str, int]:
        raw = {name: istio_priority(pod["metadata"]["labels"], self.chains[vs])
               for name, pod in self.pods.items() if pod["status"]["ready"]}
        dense = {p: i for i, p in enumerate(sorted(set(raw.values())))}
        return {name: dense[p] for name, p in raw.items()}

    def write_eds(self) -> None:
        self.version += 1
        for vs in self.chains:
            groups: dict[int, list[dict[str, Any]]] = {}
            for name, priority in self.priorities_of(vs).items():
                groups.setdefault(priority, []).append({"endpoint": {"address": {
                    "socket_address": {"address": "127.0.0.1",
                                       "port_value": self.pods[name]["port"]}}}})
            cla = {"@type": "type.googleapis.com/envoy.config.endpoint.v3."
                            "ClusterLoadAssignment",
                   "cluster_name": _outbound(vs),
                   # Locality-weighted (Istio's failover settings): a weight per locality.
                   "endpoints": [{"locality": {"region": "dc1"}, "priority": p,
                                  "load_balancing_weight": len(eps), "lb_endpoints": eps}
                                 for p, eps in sorted(groups.items())]}
            folder = self.eds_dir / vs
            tmp = folder / f".eds-{self.version}.json"
            tmp.write_text(json.dumps({"version_info": str(self.version), "resources": [cla]}))
            os.replace(tmp, folder / "eds.json")


async def test_each_virtual_system_on_its_active_through_istio_shaped_envoy(
        harness: Any, etcd: Any, etcd_client: Any, start_backends: Any, start_envoy: Any,
        tmp_path: Path) -> None:
    objects = render_model(MODEL, IstioOptions(namespace=NAMESPACE)).objects
    drs = {o["spec"]["host"].split(".")[0]: o for o in objects if o["kind"] == "DestinationRule"}
    efs = {o["metadata"]["labels"]["meshxl.io/cluster"]: o for o in objects
           if o["kind"] == "EnvoyFilter"}
    chains = {vs: drs[vs]["spec"]["trafficPolicy"]["loadBalancer"]["localityLbSetting"][
        "failoverPriority"] for vs in VSS}
    roles = placement_of(MODEL, MODEL.pool("web")).roles
    # The member that is active for some VSs and not others is the one killed.
    victim = Counter(r.active for r in roles.values()).most_common(1)[0][0]
    hit = [vs for vs in VSS if roles[vs].active == victim]
    spared = [vs for vs in VSS if roles[vs].active != victim]
    assert hit and spared

    backends = await start_backends(PODS)
    istiod = PoolIstiod(tmp_path, chains)
    for vs in VSS:
        (tmp_path / vs).mkdir()
    for backend in backends:
        istiod.add_pod(backend.name, "dc1", backend.port)
    keys = Keys()
    async with serving_istiod(istiod, etcd_client, keys, MODEL_TEXT.encode()), \
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        await wait_until(lambda: all(istiod.priorities_of(vs)[roles[vs].active] == 0
                                     for vs in VSS), timeout=30, what="VS role labels")

        clusters, hosts = [], []
        for vs in VSS:
            patches = {p["applyTo"]: p["patch"]["value"]
                       for p in efs[vs]["spec"]["configPatches"]}
            base = istio_cluster(drs[vs], tmp_path / vs)
            base["name"] = base["eds_cluster_config"]["service_name"] = _outbound(vs)
            base["transport_socket_matches"] = base["transport_socket_matches"][1:]
            clusters.append(patched(cluster_pb2.Cluster, base, patches["CLUSTER"]))
            route = istio_default_route("x-session-id")
            route["route"]["cluster"] = _outbound(vs)
            hosts.append({"name": f"{vs}:{PORT}", "domains": [vs],
                          "routes": [patched(route_components_pb2.Route, route,
                                             patches["HTTP_ROUTE"])]})
        admin_port, listen_port = free_port(), free_port()
        config = bootstrap(admin_port, listen_port, clusters[0], {})
        config["static_resources"]["clusters"] = clusters
        manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        manager["typed_config"]["route_config"]["virtual_hosts"] = hosts

        await start_istio_envoy(start_envoy, "istio-client", admin_port, config)
        url = f"http://127.0.0.1:{listen_port}/"

        async def members(vs: str) -> Counter[str]:
            seen: Counter[str] = Counter()
            for session in SESSIONS:
                async with http.get(url, headers={"x-session-id": session,
                                                  "host": vs}) as resp:
                    seen[(await resp.json())["member"] if resp.status == 200
                         else f"HTTP {resp.status}"] += 1
            return seen

        async def on(where: dict[str, str]) -> bool:
            for vs, member in where.items():
                if await members(vs) != Counter({member: len(SESSIONS)}):
                    return False
            return True

        actives = {vs: str(roles[vs].active) for vs in VSS}
        await wait_until(lambda: on(actives), timeout=30, what="every VS on its active")

        # The victim dies: its VSs go to their standbys, the others do not move.
        await backends[PODS.index(victim)].kill()
        moved = {**actives, **{vs: str(roles[vs].standby) for vs in hit}}
        await wait_until(lambda: on(moved), timeout=30, what="failover to each standby")
        await backends[PODS.index(victim)].start()
        await wait_until(lambda: on(actives), timeout=30, what="back on the actives")

        # meshxl member down on the pool: the labels follow the new placement.
        await ops.set_member_admin(etcd_client, keys, "web", victim, down=True,
                                   reason="test drain")
        state = RuntimeState(members_down={("web", victim): AdminAction()})
        after = placement_of(MODEL, MODEL.pool("web"), state).roles
        assert {vs: after[vs].active for vs in VSS} == moved
        # Every VS: its new active 0, its new standby 1, the drained member last.
        await wait_until(lambda: all(istiod.priorities_of(vs) == {
            after[vs].active: 0, after[vs].standby: 1, victim: 2} for vs in VSS),
            timeout=20, what="labels of the placement without the drained member")
        await wait_until(lambda: on(moved), timeout=20, what="drained to the standbys")
