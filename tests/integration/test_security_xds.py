"""ADS over TLS and mutual TLS, with a real Envoy and real gRPC clients.

A throwaway CA signs the control plane's certificate (127.0.0.1, ::1, localhost) and
Envoy's client certificate (naming its node ids: mutual TLS binds the node id to the
certificate, tests/integration/test_xds_node_auth.py); a second CA signs a rogue
client. Envoy bootstrapped with ``--xds-ca`` (and ``--xds-cert``/``--xds-key``) gets its
configuration; clients without a certificate, with one from the other CA, or in
plaintext get nothing.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from cryptography import x509
from envoy.config.core.v3.base_pb2 import Node
from envoy.service.discovery.v3.ads_pb2_grpc import AggregatedDiscoveryServiceStub
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest

from meshxl.local.envoy import find_envoy
from meshxl.local.procs import run
from meshxl.local.wait import wait_until
from meshxl.proxy.bootstrap import XdsTls
from meshxl.xds.types import CLUSTER
from tests.harness.certs import CA, Leaf

pytestmark = pytest.mark.integration

MODEL = {"clusters": [{"name": "orders", "mode": "high-availability",
                       "members": [{"name": "a", "address": "127.0.0.1", "port": 9},
                                   {"name": "b", "address": "127.0.0.1", "port": 10}]}]}


class Pki:
    def __init__(self, root: Path) -> None:
        self.ca = CA(root / "ca")
        self.server = self.ca.issue("xds-server", client=False)
        self.envoy = self.ca.issue("envoy-edge", names=("edge", "probe"), server=False)
        self.other_ca = CA(root / "other", "other-ca")
        self.rogue = self.other_ca.issue("rogue", server=False)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(MODEL))
    return path


async def _ads_first_response(target: str, credentials: grpc.ChannelCredentials | None,
                              timeout: float = 3.0) -> Any:
    """Open an ADS stream as node ``probe`` and return the first CDS response."""
    channel = (grpc.aio.insecure_channel(target) if credentials is None
               else grpc.aio.secure_channel(target, credentials))
    async with channel:
        stub = AggregatedDiscoveryServiceStub(channel)
        request = DiscoveryRequest(node=Node(id="probe", cluster="test"), type_url=CLUSTER)
        call = stub.StreamAggregatedResources(iter([request]), timeout=timeout)
        async for response in call:
            call.cancel()
            return response
    raise AssertionError("the ADS stream ended without a response")


async def _refused(target: str, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _ads_first_response(target, credentials)
    return info.value.code()


def _creds(ca: Path, leaf: Leaf | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=leaf.key.read_bytes() if leaf else None,
        certificate_chain=leaf.cert.read_bytes() if leaf else None)


async def test_envoy_gets_config_over_tls_and_plaintext_is_refused(
        pki: Pki, model: Path, start_control_plane: Any, start_envoy: Any) -> None:
    plane = await start_control_plane(config_path=model, tls_cert=pki.server.cert,
                                      tls_key=pki.server.key)
    target = f"127.0.0.1:{plane.port}"

    envoy = await start_envoy("edge", f"localhost:{plane.port}",
                              xds_tls=XdsTls(ca=str(pki.ca.cert)))
    await envoy.wait_ready()
    assert "orders" in await envoy.dynamic_clusters()
    assert await envoy.stat("cluster.meshxl_xds.ssl.handshake") >= 1

    # A gRPC client that trusts the CA gets config; plaintext and an untrusting client
    # do not (the server speaks TLS only; the client cannot verify the server).
    response = await _ads_first_response(target, _creds(pki.ca.cert))
    assert response.type_url == CLUSTER and response.resources
    assert await _refused(target, None) == grpc.StatusCode.UNAVAILABLE
    assert await _refused(target, _creds(pki.other_ca.cert)) == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_refuses_clients_without_a_valid_certificate(
        pki: Pki, model: Path, start_control_plane: Any, start_envoy: Any) -> None:
    plane = await start_control_plane(config_path=model, tls_cert=pki.server.cert,
                                      tls_key=pki.server.key, client_ca=pki.ca.cert)
    target = f"127.0.0.1:{plane.port}"

    envoy = await start_envoy("edge", plane.port, xds_tls=XdsTls(
        ca=str(pki.ca.cert), cert=str(pki.envoy.cert), key=str(pki.envoy.key)))
    await envoy.wait_ready()
    assert "orders" in await envoy.dynamic_clusters()
    assert plane.ads.node_status()["edge"]["streams"] == 1

    # Positive control, then every way of not having a valid client certificate.
    assert (await _ads_first_response(target, _creds(pki.ca.cert, pki.envoy))).resources
    assert await _refused(target, _creds(pki.ca.cert)) == grpc.StatusCode.UNAVAILABLE
    assert await _refused(target, _creds(pki.ca.cert, pki.rogue)) \
        == grpc.StatusCode.UNAVAILABLE
    assert await _refused(target, None) == grpc.StatusCode.UNAVAILABLE
    assert set(plane.ads.node_status()) == {"edge", "probe"}  # probe: the positive control

    # A real Envoy without a client certificate never gets a stream, let alone config.
    bare = await start_envoy("bare", plane.port, xds_tls=XdsTls(ca=str(pki.ca.cert)))
    await bare.wait_until(lambda: _ssl_failures(bare), timeout=15.0,
                          what="bare Envoy's TLS failures")
    assert "bare" not in plane.ads.node_status()
    assert "orders" not in await bare.dynamic_clusters()


async def _ssl_failures(envoy: Any) -> bool:
    stats = await envoy.stats(filter=r"^cluster\.meshxl_xds\.(ssl\.connection_error|"
                                     r"upstream_cx_connect_fail|upstream_cx_destroy_remote)")
    return sum(stats.values()) > 0


async def test_envoy_refuses_a_control_plane_its_ca_did_not_sign(
        pki: Pki, model: Path, start_control_plane: Any, start_envoy: Any) -> None:
    plane = await start_control_plane(config_path=model, tls_cert=pki.server.cert,
                                      tls_key=pki.server.key)
    envoy = await start_envoy("wary", plane.port, xds_tls=XdsTls(ca=str(pki.other_ca.cert)))
    await envoy.wait_until(lambda: _verify_failed(envoy), timeout=15.0,
                           what="a failed verification")
    assert "wary" not in plane.ads.node_status()


async def _verify_failed(envoy: Any) -> bool:
    return await envoy.stat("cluster.meshxl_xds.ssl.fail_verify_error") > 0


async def test_envoy_checks_the_control_plane_name(
        pki: Pki, model: Path, start_control_plane: Any, start_envoy: Any) -> None:
    """A certificate from the right CA for another name is refused (SAN matching)."""
    elsewhere = pki.ca.issue("not-xds", names=("other.example",), client=False)
    plane = await start_control_plane(config_path=model, tls_cert=elsewhere.cert,
                                      tls_key=elsewhere.key)
    envoy = await start_envoy("strict", plane.port, xds_tls=XdsTls(ca=str(pki.ca.cert)))

    async def san_refused() -> bool:
        return await envoy.stat("cluster.meshxl_xds.ssl.fail_verify_san") > 0

    await envoy.wait_until(san_refused, timeout=15.0, what="a refused subject alternative name")
    assert "strict" not in plane.ads.node_status()


def _peer_serial(port: int, ca: Path) -> int:
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=3) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


async def test_renewed_server_certificate_is_served_without_restart(
        pki: Pki, model: Path, start_control_plane: Any) -> None:
    cert_path, key_path = pki.server.cert, pki.server.key
    plane = await start_control_plane(config_path=model, tls_cert=cert_path,
                                      tls_key=key_path)
    first = await asyncio.to_thread(_peer_serial, plane.port, pki.ca.cert)

    renewed = pki.ca.issue("xds-server-renewed", client=False)
    # Written the way a Secret volume or cert-manager does it: whole files replaced.
    for src, dst in ((renewed.key, key_path), (renewed.cert, cert_path)):
        tmp = dst.with_suffix(".new")
        tmp.write_bytes(src.read_bytes())
        os.replace(tmp, dst)
    expected = x509.load_pem_x509_certificate(renewed.cert.read_bytes()).serial_number

    async def serves_renewed() -> bool:
        return await asyncio.to_thread(_peer_serial, plane.port, pki.ca.cert) == expected

    await wait_until(serves_renewed, timeout=10.0, what="the renewed certificate")
    assert first != expected
    assert plane.tls is not None and plane.tls.reloads == 1


async def test_bootstrap_command_output_passes_envoy_validation(pki: Pki, tmp_path: Path) -> None:
    """``meshxl bootstrap --xds-ca/--xds-cert/--xds-key/--xds-sni``, checked by Envoy."""
    code, out, err = await run([
        sys.executable, "-m", "meshxl.cli", "bootstrap", "--node-id", "n1",
        "--xds", "xds-0.meshxl.test:18000", "--xds", "127.0.0.1:18001",
        "--xds-ca", str(pki.ca.cert), "--xds-cert", str(pki.envoy.cert),
        "--xds-key", str(pki.envoy.key), "--xds-sni", "meshxl-xds.meshxl-system.svc"])
    assert code == 0, err
    boot = yaml.safe_load(out)
    (xds,) = [c for c in boot["static_resources"]["clusters"] if c["name"] == "meshxl_xds"]
    tls = xds["transport_socket"]["typed_config"]
    assert tls["sni"] == "meshxl-xds.meshxl-system.svc"
    sans = tls["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"]
    assert {(m["san_type"], m["matcher"]["exact"]) for m in sans} == {
        ("DNS", "meshxl-xds.meshxl-system.svc"), ("DNS", "xds-0.meshxl.test"),
        ("IP_ADDRESS", "127.0.0.1")}

    path = tmp_path / "bootstrap.yaml"
    path.write_text(out)
    code, vout, verr = await run(
        [find_envoy(), "--mode", "validate", "--disable-hot-restart", "-c", str(path)],
        timeout=60)
    text = vout + verr
    assert code == 0 and "OK" in text, text
