"""Who may speak for an Envoy node, with real Envoys: a forged NACK cannot cut a node
off, a rejection never leaves a restarted node below the configuration it accepted,
and the ADS port authenticates nodes (mutual TLS with the node id bound to the
certificate, or a bearer token) and refuses forgers.

Envoys are started with a short ``initial_fetch_timeout`` so that an Envoy the control
plane sends nothing becomes LIVE within seconds, empty, and the test fails on what it
lacks instead of waiting out Envoy's default 15 s.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from envoy.config.core.v3.base_pb2 import Node
from envoy.service.discovery.v3.ads_pb2_grpc import AggregatedDiscoveryServiceStub
from envoy.service.discovery.v3.discovery_pb2 import (
    DeltaDiscoveryRequest,
    DiscoveryRequest,
)
from google.rpc.status_pb2 import Status

from meshxl.local.ports import free_port
from meshxl.local.wait import wait_until
from meshxl.proxy.bootstrap import XdsTls
from meshxl.xds.app import ControlPlane
from meshxl.xds.types import CLUSTER, LISTENER
from tests.harness import EnvoyFixture
from tests.harness.certs import CA, Leaf

pytestmark = pytest.mark.integration

TOKEN = "0123456789abcdef0123456789abcdef"
FETCH = 2.0  # initial_fetch_timeout of the Envoys (s)


def write_model(path: Path, port: int, timeout: str = "1s") -> Path:
    model = {"clusters": [{
        "name": "orders", "mode": "high-availability", "connect_timeout": timeout,
        "listener": {"address": "127.0.0.1", "port": port},
        "members": [{"name": "a", "address": "127.0.0.1", "port": 9},
                    {"name": "b", "address": "127.0.0.1", "port": 10}]}]}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(model))
    os.replace(tmp, path)
    return path


async def configured(envoy: EnvoyFixture, listener_port: int) -> dict[str, Any] | None:
    """Envoy's cluster ``orders`` once it also has the listener on ``listener_port``."""
    clusters = await envoy.dynamic_clusters()
    ports = [port for _, port in (await envoy.listeners()).values()]
    if "orders" not in clusters or listener_port not in ports:
        return None
    found: dict[str, Any] = clusters["orders"]
    return found


async def restart(envoy: EnvoyFixture) -> None:
    """Kill -9 and start the same Envoy again: it comes back holding nothing."""
    await envoy.kill()
    await envoy.process.start()
    await envoy.wait_ready()


def credentials(ca: Path, leaf: Leaf | None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=leaf.key.read_bytes() if leaf else None,
        certificate_chain=leaf.cert.read_bytes() if leaf else None)


class Forger:
    """A gRPC client claiming ``node_id`` that rejects whatever it is sent."""

    def __init__(self, target: str, node_id: str, *, delta: bool = False,
                 channel_credentials: grpc.ChannelCredentials | None = None) -> None:
        self.channel = (grpc.aio.insecure_channel(target) if channel_credentials is None
                        else grpc.aio.secure_channel(target, channel_credentials))
        self.node = Node(id=node_id)
        self.delta = delta

    async def reject(self, *type_urls: str) -> list[str]:
        """Ask for each type, NACK the answer; the versions rejected."""
        stub = AggregatedDiscoveryServiceStub(self.channel)
        rejected: list[str] = []
        for type_url in type_urls:
            error = Status(code=3, message="forged rejection")
            if self.delta:
                call = stub.DeltaAggregatedResources(timeout=5)
                await call.write(DeltaDiscoveryRequest(node=self.node, type_url=type_url))
                response = await call.read()
                await call.write(DeltaDiscoveryRequest(
                    type_url=type_url, response_nonce=response.nonce, error_detail=error))
                rejected.append(response.system_version_info)
            else:
                call = stub.StreamAggregatedResources(timeout=5)
                await call.write(DiscoveryRequest(node=self.node, type_url=type_url))
                response = await call.read()
                await call.write(DiscoveryRequest(
                    type_url=type_url, response_nonce=response.nonce, error_detail=error))
                rejected.append(response.version_info)
            await call.done_writing()
        return rejected

    async def refusal(self) -> tuple[grpc.StatusCode, str]:
        """The status of a stream refused on its metadata alone. Nothing is written: a
        write racing the server's end is reported as INTERNAL in place of the server's
        status (grpc/grpc#36066)."""
        stub = AggregatedDiscoveryServiceStub(self.channel)
        call = (stub.DeltaAggregatedResources(timeout=5) if self.delta
                else stub.StreamAggregatedResources(timeout=5))
        return await call.code(), await call.details() or ""

    async def close(self) -> None:
        await self.channel.close()


async def nacks_reach(plane: ControlPlane, count: int) -> None:
    await wait_until(lambda: plane.ads.nacks >= count, timeout=10.0,
                     what=f"{count} NACKs recorded")


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_forged_nack_does_not_cut_off_a_restarting_envoy(
        tmp_path: Path, start_control_plane: Any, start_envoy: Any, delta: bool) -> None:
    """A client on the plaintext port claims the real node's id and NACKs the CDS and
    LDS versions it runs; the real Envoy restarts and still gets its cluster and
    listener (before: none, until the control plane restarted)."""
    listener_port = free_port()
    plane = await start_control_plane(config_path=write_model(tmp_path / "model.yaml",
                                                              listener_port))
    envoy = await start_envoy("edge", plane.port, delta=delta, initial_fetch_timeout=FETCH)
    await envoy.wait_ready()
    assert await configured(envoy, listener_port)

    forger = Forger(f"127.0.0.1:{plane.port}", "edge", delta=delta)
    try:
        rejected = await forger.reject(CLUSTER, LISTENER)
        # Recorded before the channel closes: closing it cancels the stream, which the
        # server may take up before the NACK written just ahead of it.
        await nacks_reach(plane, 2)
    finally:
        await forger.close()
    snapshot = plane.cache.snapshot
    assert snapshot is not None
    assert rejected == [snapshot.version(CLUSTER), snapshot.version(LISTENER)]

    await restart(envoy)
    assert await envoy.wait_until(lambda: configured(envoy, listener_port), timeout=10.0,
                                  what="cluster and listener after the restart")


# -- mutual TLS, node id bound to the certificate ------------------------------------------


class Pki:
    def __init__(self, root: Path) -> None:
        self.ca = CA(root / "ca")
        self.server = self.ca.issue("xds", client=False)
        self.edge = self.ca.issue("edge-1", names=("edge-1",), server=False)
        self.intruder = self.ca.issue("intruder", names=("intruder",), server=False)
        self.shop = self.ca.issue("shop", names=("spiffe://cluster.local/ns/shop/sa/cart",),
                                  server=False)


async def test_envoy_with_a_node_bound_certificate_and_forgers_refused(
        tmp_path: Path, start_control_plane: Any, start_envoy: Any) -> None:
    pki = Pki(tmp_path / "pki")
    listener_port = free_port()
    model = write_model(tmp_path / "model.yaml", listener_port, timeout="1s")
    plane = await start_control_plane(config_path=model, tls_cert=pki.server.cert,
                                      tls_key=pki.server.key, client_ca=pki.ca.cert)
    target = f"localhost:{plane.port}"

    def tls(leaf: Leaf) -> XdsTls:
        return XdsTls(ca=str(pki.ca.cert), cert=str(leaf.cert), key=str(leaf.key))

    envoy = await start_envoy("edge-1", plane.port, xds_tls=tls(pki.edge),
                              initial_fetch_timeout=FETCH)
    await envoy.wait_ready()
    assert (await configured(envoy, listener_port) or {})["connect_timeout"] == "1s"
    pod = await start_envoy("cart-0.shop", plane.port, xds_tls=tls(pki.shop),
                            initial_fetch_timeout=FETCH)
    await pod.wait_ready()
    assert "orders" in await pod.dynamic_clusters()

    # Forgers: another node's valid certificate, and no certificate at all.
    details = []
    for creds, code in ((credentials(pki.ca.cert, pki.intruder),
                         grpc.StatusCode.PERMISSION_DENIED),
                        (credentials(pki.ca.cert, None), grpc.StatusCode.UNAVAILABLE)):
        forger = Forger(target, "edge-1", channel_credentials=creds)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await forger.reject(CLUSTER)
        finally:
            await forger.close()
        assert info.value.code() == code
        details.append(info.value.details() or "")
    assert "does not name node id 'edge-1'" in details[0] and "DNS:intruder" in details[0]
    assert plane.ads.nacks == 0

    # A real Envoy whose certificate names another node gets nothing.
    impostor = await start_envoy("edge-2", plane.port, xds_tls=tls(pki.edge),
                                 initial_fetch_timeout=FETCH)
    await impostor.wait_ready()
    assert "orders" not in await impostor.dynamic_clusters()
    assert "edge-2" not in plane.ads.node_status()
    assert plane.ads.refused["permission_denied"] >= 2
    sample = plane.metrics.registry.get_sample_value(
        "meshxl_xds_streams_refused_total", {"reason": "permission_denied"})
    assert sample == plane.ads.refused["permission_denied"]

    # The node itself (its own certificate) rejects a new version while its Envoy is
    # down; the Envoy restarts on the version it accepted, not on nothing.
    await envoy.kill()
    accepted = plane.cache.snapshot
    write_model(model, listener_port, timeout="3s")
    await wait_until(lambda: plane.cache.snapshot is not accepted, timeout=10.0,
                     what="the new model built")
    node = Forger(target, "edge-1", channel_credentials=credentials(pki.ca.cert, pki.edge))
    try:
        await node.reject(CLUSTER)
        await nacks_reach(plane, 1)  # before the close cancels the stream (above)
    finally:
        await node.close()
    await envoy.process.start()
    await envoy.wait_ready()
    cluster = await envoy.wait_until(lambda: configured(envoy, listener_port), timeout=10.0,
                                     what="the accepted cluster after the restart")
    assert cluster["connect_timeout"] == "1s"


async def test_bearer_token_on_the_ads_port(
        tmp_path: Path, start_control_plane: Any, start_envoy: Any) -> None:
    listener_port = free_port()
    plane = await start_control_plane(
        config_path=write_model(tmp_path / "model.yaml", listener_port), token=TOKEN)
    envoy = await start_envoy("edge", plane.port, xds_token=TOKEN,
                              initial_fetch_timeout=FETCH)
    await envoy.wait_ready()
    assert await configured(envoy, listener_port)

    bare = await start_envoy("bare", plane.port, initial_fetch_timeout=FETCH)
    await bare.wait_ready()
    assert "orders" not in await bare.dynamic_clusters()
    await wait_until(lambda: plane.ads.refused.get("unauthenticated", 0) >= 1,
                     timeout=10.0, what="the bare Envoy refused")
    assert "bare" not in plane.ads.node_status()

    forger = Forger(f"127.0.0.1:{plane.port}", "edge")
    try:
        code, details = await forger.refusal()
    finally:
        await forger.close()
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "needs a token" in details
    assert plane.ads.nacks == 0
