"""Endpoints from meshxl under Istio (``meshxl istio render --endpoints meshxl``), through
a real Envoy given the outbound cluster the way istiod builds it.

istiod's part is played as in :mod:`tests.integration.test_istio_envoy` (its cluster
for the rendered DestinationRule, with istiod's own ADS ``eds_config``, and the
EnvoyFilter's patch merged in with Istio's merge semantics), and the cluster reaches
Envoy over CDS (a watched file) as istiod's pushes do. The endpoints come from a real
meshxl control plane over its EDS service; the Envoy's node id is an Istio sidecar's.

Asserted: Istio's merge leaves ``ads`` for meshxl's config source; every endpoint takes
Istio's mutual TLS match (``--istio-mtls``); traffic follows the member weights of the
model, which istiod cannot express, and a weight changed in the model; a new version
of the cluster (istiod pushing) warms from meshxl and keeps its weights, the same
version pushed again changes nothing; an ``envoy_grpc`` config source on a cluster
added over CDS (what an EnvoyFilter CLUSTER ADD would give) is refused by Envoy; a
member judged degraded has its weight halved step by step; a member joining ramps up
(warm-up of a hashed cluster). With ``--xds-tls``, against a server asking for Istio's
certificates (``--client-ca`` Istio's root): the sidecar's Istio certificate of its
own namespace gets the endpoints; one of another namespace gets none, refused with
PERMISSION_DENIED, as is a node id of another namespace or with two namespaces.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import jsonpatch
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3.base_pb2 import Node
from envoy.config.route.v3 import route_components_pb2
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest
from envoy.service.endpoint.v3.eds_pb2_grpc import EndpointDiscoveryServiceStub

from meshxl.etcd.keys import Keys
from meshxl.istio import IstioOptions, render_model
from meshxl.istio.credentials import epoch_patch
from meshxl.istio.endpoints import XdsClientTls
from meshxl.local.ports import free_port
from meshxl.model import parse_model
from meshxl.model.runtime import Health
from meshxl.operator.actions import apply_model
from meshxl.xds import types
from tests.harness.certs import CA, Leaf
from tests.harness.clock import window
from tests.integration.test_istio_envoy import (
    CLUSTER,
    NAMESPACE,
    SERVICE_PORT,
    bootstrap,
    istio_cluster,
    istio_default_route,
    patched,
    start_istio_envoy,
)

pytestmark = pytest.mark.asyncio

KEYS = Keys()
NODE = f"sidecar~127.0.0.1~client-7d9f.{NAMESPACE}~{NAMESPACE}.svc.cluster.local"
#: pilot/pkg/networking/core/cluster_builder.go, maybeApplyEdsConfig.
ISTIOD_EDS_CONFIG = {"ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"}
SESSIONS = [f"s{i}" for i in range(120)]
CDS_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
RAW_BUFFER = {"name": "envoy.transport_sockets.raw_buffer", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"}}


def model_text(ports: dict[str, int], weights: dict[str, int]) -> str:
    members = "".join(f"\n  - {{name: {name}, address: 127.0.0.1, port: {port}, "
                      f"weight: {weights[name]}}}" for name, port in ports.items())
    return f"""
clusters:
- name: orders
  mode: load-sharing
  stickiness: {{header: x-session-id}}
  warmup: 3s
  degradation: {{step: 0.4s, min_share: 0.05}}
  listener: {{port: {SERVICE_PORT}}}
  members:{members}
"""


class Cds:
    """istiod's CDS pushes, as a watched file."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir()
        self.directory = directory
        self.version = 0

    def config(self) -> dict[str, Any]:
        return {"path_config_source": {"path": str(self.directory / "cds.json"),
                                       "watched_directory": {"path": str(self.directory)}},
                "resource_api_version": "V3"}

    def push(self, *clusters: dict[str, Any]) -> None:
        self.version += 1
        tmp = self.directory / f".cds-{self.version}.json"
        tmp.write_text(json.dumps({"version_info": str(self.version), "resources": [
            {"@type": CDS_TYPE, **c} for c in clusters]}))
        os.replace(tmp, self.directory / "cds.json")


async def _placement(http: aiohttp.ClientSession, url: str) -> Counter[str]:
    seen: Counter[str] = Counter()
    for session in SESSIONS:
        async with http.get(url, headers={"x-session-id": session}) as resp:
            assert resp.status == 200, resp.status
            seen[(await resp.json())["member"]] += 1
    return seen


async def test_an_istio_cluster_takes_its_endpoints_from_meshxl(
        harness: Any, etcd: Any, etcd_client: Any, start_backends: Any,
        start_control_plane: Any, start_envoy: Any, tmp_path: Path) -> None:
    names = ["orders-0", "orders-1", "orders-2"]
    backends = await start_backends([*names, "orders-3"])  # orders-3 joins at the end
    every = {b.name: b.port for b in backends}
    ports = {name: every[name] for name in names}
    text = model_text(ports, {"orders-0": 100, "orders-1": 100, "orders-2": 600})
    await apply_model(etcd_client, KEYS, text, "test")
    # What the members' sidecars register under Istio (serve statesync --istio-workload,
    # --istio-tls-mode): orders-0's pod has an Istio proxy, orders-1's none; orders-2
    # registers nothing of Istio (an older sidecar).
    for name, tls_mode in (("orders-0", "istio"), ("orders-1", "")):
        value = {"address": "127.0.0.1", "port": ports[name], "ready": True, "problems": [],
                 "istio": {"tls_mode": tls_mode, "workload": f"{name};shop;orders;v1"}}
        await etcd_client.put(KEYS.member("orders", name).encode(), json.dumps(value).encode())
    plane = await start_control_plane(etcd=etcd.url, istio_mtls=True)
    rendered = render_model(parse_model(text), IstioOptions(
        namespace=NAMESPACE, ports={"orders": SERVICE_PORT}, endpoints="meshxl",
        xds_address=f"127.0.0.1:{plane.port}"))
    assert [w.split(":")[0] for w in rendered.warnings] == [
        "--endpoints meshxl without --xds-tls"]  # this server asks for no credentials
    dr, ef = rendered.objects
    patch_of = {p["applyTo"]: p["patch"]["value"] for p in ef["spec"]["configPatches"]}
    istiod_cluster = istio_cluster(dr, tmp_path)
    istiod_cluster["eds_cluster_config"]["eds_config"] = dict(ISTIOD_EDS_CONFIG)
    # The echo backends have no sidecar to end mutual TLS: the tlsMode-istio match keeps
    # its name (what is asserted: Envoy picks it for meshxl's endpoints), in plain text.
    istio_match, _ = istiod_cluster["transport_socket_matches"]
    istio_match["transport_socket"] = RAW_BUFFER
    cluster = patched(cluster_pb2.Cluster, istiod_cluster, patch_of["CLUSTER"])
    eds = cluster["eds_cluster_config"]
    # The oneof: meshxl's api_config_source replaced istiod's ads.
    assert eds["service_name"] == "orders" and "ads" not in eds["eds_config"]
    assert eds["eds_config"]["api_config_source"]["grpc_services"][0]["google_grpc"][
        "target_uri"] == f"127.0.0.1:{plane.port}"
    assert "locality_weighted_lb_config" not in cluster["common_lb_config"]
    route = patched(route_components_pb2.Route, istio_default_route("x-session-id"),
                    patch_of["HTTP_ROUTE"])
    admin_port, listen_port = free_port(), free_port()
    config = bootstrap(admin_port, listen_port, cluster, route)
    config["node"]["id"] = NODE
    config["static_resources"].pop("clusters")
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    manager["typed_config"]["route_config"]["validate_clusters"] = False  # as over RDS
    cds = Cds(tmp_path / "cds")
    config["dynamic_resources"] = {"cds_config": cds.config()}
    cds.push(cluster)

    envoy = await start_istio_envoy(start_envoy, "istio-eds", admin_port, config)
    url = f"http://127.0.0.1:{listen_port}/"

    async def weights(want: dict[str, int]) -> None:
        """The model's weights (meshxl scales them: compared as ratios)."""
        low = min(want.values())
        by_port = {ports[n]: w / low for n, w in want.items()}

        def ratios(hosts: list[Any]) -> dict[int, float]:
            least = min(h.weight for h in hosts)
            return {h.port: h.weight / least for h in hosts}
        await envoy.wait_hosts(CLUSTER, lambda hs: ratios(hs) == by_port
                               and all(h.healthy for h in hs), timeout=20,
                               what=f"weights {want}")

    await weights({"orders-0": 100, "orders-1": 100, "orders-2": 600})
    assert NODE in plane.ads.node_status()
    # --istio-mtls: each endpoint marked as its pod is: Istio's mutual TLS for the pod
    # with a proxy and for the member that did not say, plain text for the other; and
    # istiod's telemetry metadata for those that said.
    prefix = f"cluster.{CLUSTER}"
    assert await envoy.stat(f"{prefix}.tlsMode-istio.total_match_count") == 2
    assert await envoy.stat(f"{prefix}.tlsMode-disabled.total_match_count") == 1
    dump = await envoy.config_dump(include_eds=True)
    workloads = {
        e["endpoint"]["hostname"]: e.get("metadata", {}).get("filter_metadata", {}).get(
            "istio", {}).get("workload")
        for section in dump["configs"] if section["@type"].endswith(".EndpointsConfigDump")
        for c in section.get("dynamic_endpoint_configs", [])
        for g in c["endpoint_config"].get("endpoints", []) for e in g["lb_endpoints"]}
    assert workloads == {"orders-0": "orders-0;shop;orders;v1;Kubernetes",
                         "orders-1": "orders-1;shop;orders;v1;Kubernetes",
                         "orders-2": None}, workloads
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        seen = await _placement(http, url)
        print(f"\nweights 100/100/600: {dict(seen)}")
        assert seen.most_common(1)[0][0] == "orders-2" and seen["orders-2"] >= 60, seen

        # A weight changed in the model: meshxl's EDS moves the sessions.
        await apply_model(etcd_client, KEYS, model_text(
            ports, {"orders-0": 600, "orders-1": 100, "orders-2": 100}), "test")
        await weights({"orders-0": 600, "orders-1": 100, "orders-2": 100})
        seen = await _placement(http, url)
        print(f"weights 600/100/100: {dict(seen)}")
        assert seen.most_common(1)[0][0] == "orders-0" and seen["orders-0"] >= 60, seen

        # istiod pushes a new version of the cluster (a DestinationRule edit): Envoy
        # builds it anew, and it warms from meshxl again, weights and all.
        sent = plane.ads.responses_sent.get(types.ENDPOINT, 0)
        changed = {**cluster, "connect_timeout": "0.5s"}
        cds.push(changed)
        await envoy.wait_until(
            lambda: plane.ads.responses_sent.get(types.ENDPOINT, 0) > sent,
            timeout=10, what="the new cluster's EDS request answered")
        await envoy.wait_until(_active_timeout(envoy, "0.500s"), timeout=10,
                               what="the pushed cluster active")
        await weights({"orders-0": 600, "orders-1": 100, "orders-2": 100})
        assert (await _placement(http, url)) == seen
        # The same cluster pushed again (istiod pushes on unrelated changes): Envoy
        # keeps the cluster and its subscription as they are.
        sent = plane.ads.responses_sent.get(types.ENDPOINT, 0)
        pushes = await envoy.stat("cluster_manager.cds.update_success")
        cds.push(changed)
        await envoy.wait_until(lambda: _stat_above(envoy, "cluster_manager.cds.update_success",
                                                   pushes), timeout=10, what="the push")
        assert plane.ads.responses_sent.get(types.ENDPOINT, 0) == sent

        # What an EnvoyFilter CLUSTER ADD of a cluster for meshxl's server, named by an
        # envoy_grpc config source, would give: Envoy refuses the cluster.
        rejected = await envoy.stat("cluster_manager.cds.update_rejected")
        via_cds = {"name": "meshxl-xds", "type": "STRICT_DNS", "connect_timeout": "1s",
                   "typed_extension_protocol_options": {
                       "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                           "@type": "type.googleapis.com/envoy.extensions.upstreams.http."
                                    "v3.HttpProtocolOptions",
                           "explicit_http_config": {"http2_protocol_options": {}}}},
                   "load_assignment": {"cluster_name": "meshxl-xds", "endpoints": [
                       {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                           "address": "127.0.0.1", "port_value": plane.port}}}}]}]}}
        api = changed["eds_cluster_config"]["eds_config"]["api_config_source"]
        envoy_grpc = {**changed, "connect_timeout": "0.75s", "eds_cluster_config": {
            **changed["eds_cluster_config"], "eds_config": {
                **changed["eds_cluster_config"]["eds_config"], "api_config_source": {
                    **api, "grpc_services": [{"envoy_grpc": {"cluster_name": "meshxl-xds"}}]}}}}
        cds.push(envoy_grpc, via_cds)
        await envoy.wait_until(
            lambda: _stat_above(envoy, "cluster_manager.cds.update_rejected", rejected),
            timeout=10, what="the envoy_grpc config source refused")
        assert (await _placement(http, url)) == seen  # the last good cluster serves

        # The control plane judges orders-0 degraded (its etcd record, as a replica
        # writes it): its weight is halved every step, down to min_share, and its
        # sessions move to its peers bit by bit (istiod could only move them at once).
        ratios: list[float] = []

        async def stepped_down() -> bool:
            hosts = {h.port: h.weight for h in await envoy.hosts(CLUSTER)}
            ratio = hosts[ports["orders-0"]] / hosts[ports["orders-1"]]
            if not ratios or ratio != ratios[-1]:
                ratios.append(ratio)
            return ratio <= 6 * 0.05
        record = Health("degraded", "p90 400 ms against its peers' 10 ms", time.time(), "t")
        await etcd_client.put(KEYS.member_health("orders", "orders-0").encode(),
                              json.dumps(record.to_dict()).encode())
        await envoy.wait_until(stepped_down, timeout=10, what="orders-0 stepped down")
        print(f"orders-0's weight against a peer's: {ratios}")
        assert ratios == sorted(ratios, reverse=True) and len(ratios) >= 3, ratios
        sick = await _placement(http, url)
        print(f"placement at min_share: {dict(sick)}")
        # At min_share (a sixth of its peers' weight: 0.3 / 2.3 of the table) maglev
        # places about 16 of the 120 sessions there (binomial, sd 3.7): far fewer than
        # the 90 it had, with room for the hash's spread.
        assert sick["orders-0"] <= seen["orders-0"] // 3, (seen, sick)

        # A member joining a hashed cluster ramps up (warm-up) through meshxl's EDS
        # weights, step by step; istiod has no weight to ramp.
        await apply_model(etcd_client, KEYS, model_text(
            every, {"orders-0": 600, "orders-1": 100, "orders-2": 100, "orders-3": 100}),
            "test")
        ramp: list[float] = []

        async def ramped() -> bool:
            hosts = {h.port: h.weight for h in await envoy.hosts(CLUSTER)}
            if every["orders-3"] not in hosts:
                return False
            ratio = hosts[every["orders-3"]] / hosts[every["orders-1"]]
            if not ramp or ratio != ramp[-1]:
                ramp.append(ratio)
            return ratio >= 1.0
        await envoy.wait_until(ramped, timeout=15, what="orders-3 ramped up")
        print(f"orders-3's weight against a peer's, ramping: {ramp}")
        assert ramp == sorted(ramp) and ramp[0] <= 0.5 and len(ramp) >= 3, ramp


def _active_timeout(envoy: Any, timeout: str) -> Any:
    async def check() -> bool:
        active = await envoy.dynamic_clusters()
        return bool(active.get(CLUSTER, {}).get("connect_timeout") == timeout)
    return check


async def _stat_above(envoy: Any, name: str, before: int) -> bool:
    return bool(await envoy.stat(name) > before)


def _output_certs(directory: Path, leaf: Leaf, istio_root: CA) -> Path:
    """What istio-agent writes with OUTPUT_CERTS: the workload's certificate, its key and
    Istio's root."""
    directory.mkdir(parents=True, exist_ok=True)  # a renewal rewrites them in place
    (directory / "cert-chain.pem").write_bytes(leaf.cert.read_bytes())
    (directory / "key.pem").write_bytes(leaf.key.read_bytes())
    (directory / "root-cert.pem").write_bytes(istio_root.cert.read_bytes())
    return directory


async def _eds_refusal(target: str, server_ca: CA, leaf: Leaf, node_id: str) -> Any:
    """An EDS stream as ``node_id`` with ``leaf``: the error it ends with."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=server_ca.cert.read_bytes(),
        private_key=leaf.key.read_bytes(), certificate_chain=leaf.cert.read_bytes())
    async with grpc.aio.secure_channel(target, credentials) as channel:
        call = EndpointDiscoveryServiceStub(channel).StreamEndpoints(
            iter([DiscoveryRequest(node=Node(id=node_id), type_url=types.ENDPOINT,
                                   resource_names=["orders"])]), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in call:
                pass
    return info.value


async def test_istio_sidecars_authenticate_with_their_istio_certificate(
        harness: Any, etcd: Any, etcd_client: Any, start_backends: Any,
        start_control_plane: Any, start_envoy: Any, tmp_path: Path) -> None:
    """``--xds-tls``: the sidecar's Google gRPC presents its Istio certificate (the
    OUTPUT_CERTS files) and checks meshxl's server against meshxl's CA; the server
    (``--client-ca`` Istio's root) binds the Istio node id to the certificate's
    namespace."""
    istio_ca, meshxl_ca = CA(tmp_path / "istio", "istio-root"), CA(tmp_path / "xds", "xds-ca")
    server = meshxl_ca.issue("xds-server", client=False)
    web = istio_ca.issue("web", names=("spiffe://cluster.local/ns/shop/sa/web",), server=False)
    other = istio_ca.issue("other", names=("spiffe://cluster.local/ns/payments/sa/web",),
                           server=False)
    backends = await start_backends(["orders-0", "orders-1"])
    ports = {b.name: b.port for b in backends}
    text = model_text(ports, {"orders-0": 100, "orders-1": 300})
    await apply_model(etcd_client, KEYS, text, "test")
    plane = await start_control_plane(etcd=etcd.url, istio_mtls=True, tls_cert=server.cert,
                                      tls_key=server.key, client_ca=istio_ca.cert)

    def rendered_cluster(certs: Path, name: str, epoch: str | None = None) -> dict[str, Any]:
        rendered = render_model(parse_model(text), IstioOptions(
            namespace=NAMESPACE, ports={"orders": SERVICE_PORT}, endpoints="meshxl",
            xds_address=f"127.0.0.1:{plane.port}",
            xds_tls=XdsClientTls(certs_dir=str(certs), server_ca=str(meshxl_ca.cert))))
        # The test's server certificate names 127.0.0.1, not the overlay's Service.
        assert [w.split(":")[0] for w in rendered.warnings] == ["--xds-tls"]
        dr, ef = rendered.objects
        if epoch is not None:  # as meshxl istio label --credentials-refresh patches it
            ef = jsonpatch.apply_patch(ef, epoch_patch(ef, epoch))
        patch_of = {p["applyTo"]: p["patch"]["value"] for p in ef["spec"]["configPatches"]}
        istiod_cluster = istio_cluster(dr, tmp_path / name)
        istiod_cluster["eds_cluster_config"]["eds_config"] = dict(ISTIOD_EDS_CONFIG)
        istio_match, _ = istiod_cluster["transport_socket_matches"]
        istio_match["transport_socket"] = RAW_BUFFER
        return patched(cluster_pb2.Cluster, istiod_cluster, patch_of["CLUSTER"])

    cluster = rendered_cluster(_output_certs(tmp_path / "web-certs", web, istio_ca), "a")
    route = istio_default_route("x-session-id")
    admin_port, listen_port = free_port(), free_port()
    config = bootstrap(admin_port, listen_port, cluster, route)
    config["node"]["id"] = NODE
    config["static_resources"].pop("clusters")
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    manager["typed_config"]["route_config"]["validate_clusters"] = False
    cds = Cds(tmp_path / "cds")
    config["dynamic_resources"] = {"cds_config": cds.config()}
    cds.push(cluster)
    envoy = await start_istio_envoy(start_envoy, "istio-eds-tls", admin_port, config)
    await envoy.wait_hosts(CLUSTER, lambda hs: sorted(h.port for h in hs) == sorted(
        ports.values()), timeout=20, what="the endpoints over mutual TLS")
    assert NODE in plane.ads.node_status()
    assert plane.ads.refused.get("permission_denied", 0) == 0

    # The same Envoy, the cluster pushed again with a certificate of another namespace
    # (and a short initial fetch): the server refuses it, the cluster starts empty.
    prefix = f"cluster.{CLUSTER}"
    failures = await envoy.stat(f"{prefix}.update_failure")
    foreign = rendered_cluster(_output_certs(tmp_path / "other-certs", other, istio_ca), "b")
    foreign["eds_cluster_config"]["eds_config"]["initial_fetch_timeout"] = "1s"
    foreign["connect_timeout"] = "0.5s"
    cds.push(foreign)
    await envoy.wait_until(lambda: plane.ads.refused.get("permission_denied", 0) >= 1,
                           timeout=10, what="the foreign certificate refused")
    await envoy.wait_until(_active_timeout(envoy, "0.500s"), timeout=10,
                           what="the pushed cluster active")
    assert await envoy.hosts(CLUSTER) == []
    await envoy.wait_until(lambda: _stat_above(envoy, f"{prefix}.update_failure", failures),
                           timeout=10, what="the EDS stream's failure counted")
    log = harness.root.glob("control-plane-*.log")
    refusals = [line for path in log for line in path.read_text().splitlines()
                if "refused (permission_denied)" in line]
    assert any("spiffe://cluster.local/ns/payments/sa/web" in line for line in refusals), \
        refusals

    # The certificate renewed in place (istio-agent rewrites the files): Envoy read the
    # files when it built the cluster, so its reconnects still present the old one,
    # even with the cluster pushed again unchanged; a new credentials epoch (meshxl
    # istio label --credentials-refresh) is a new version of the cluster, built anew
    # with the renewed certificate.
    _output_certs(tmp_path / "other-certs", web, istio_ca)
    cds.push(foreign)
    await window(2, "Envoy would have fetched endpoints by now, had it taken the foreign "
                    "certificates")
    assert await envoy.hosts(CLUSTER) == []
    renewed = rendered_cluster(tmp_path / "other-certs", "c", epoch="1")
    renewed["eds_cluster_config"]["eds_config"]["initial_fetch_timeout"] = "1s"
    renewed["connect_timeout"] = "0.5s"
    cds.push(renewed)
    await envoy.wait_hosts(CLUSTER, lambda hs: sorted(h.port for h in hs) == sorted(
        ports.values()), timeout=20, what="the endpoints with the renewed certificate")

    # A node id of another namespace, or naming two, with the shop certificate.
    target = f"127.0.0.1:{plane.port}"
    payments = NODE.replace(NAMESPACE, "payments")
    mixed = f"sidecar~127.0.0.1~client.{NAMESPACE}~payments.svc.cluster.local"
    for node_id, words in ((payments, "does not name node id"),
                           (mixed, "names namespace 'shop' after the pod's name")):
        error = await _eds_refusal(target, meshxl_ca, web, node_id)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error
        assert words in (error.details() or ""), error.details()
    assert payments not in plane.ads.node_status() and mixed not in plane.ads.node_status()
