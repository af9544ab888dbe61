"""The overlays' ADS mutual TLS against real processes: ``meshxl serve xds`` with the
rendered control plane's TLS flags and the self-signed overlay's own Secret, and a real
Envoy started by the injected container's own command line (``meshxl envoy``, node id
``POD.NAMESPACE``) with the namespace Secret made as docs/kubernetes.md says. Forgers
(another namespace's certificate, none at all) are refused.

Only what cannot run here is replaced: addresses (loopback ports; the name the pod
dials stays the TLS server name), the work directory and the admin port; Secret
volumes are projected into directories as the kubelet does.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from envoy.config.core.v3.base_pb2 import Node
from envoy.service.discovery.v3.ads_pb2_grpc import AggregatedDiscoveryServiceStub
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest

from meshxl.kube import mutate_pod
from meshxl.kube.containers import ENVOY_CONTAINER, XDS_CLIENT_DIR
from meshxl.local.ports import free_port
from meshxl.local.procs import Owner, Process
from meshxl.local.wait import wait_until
from meshxl.proxy.admin import EnvoyAdmin
from meshxl.proxy.bootstrap import parse_hostport
from meshxl.xds.types import CLUSTER
from tests.harness.controlplane import ControlPlaneProcess
from tests.integration import test_manifests_xds_tls as xds_manifests
from tests.integration.test_etcd_tls_overlay import _project, _secrets
from tests.integration.test_manifests import _find, _kustomize

pytestmark = pytest.mark.integration

tree = xds_manifests.tree  # deploy/kubernetes copied, `make-certs.sh shop payments` run
MEMBER, NAMESPACE = "cart-0", "shop"
TLS_FLAGS = ("--tls-cert", "--tls-key", "--client-ca", "--node-binding", "--trust-domain")


def _control_plane_tls(docs: Any, root: Path) -> list[str]:
    """The rendered control plane's TLS flags, paths resolved into projected Secrets."""
    xds = _find(docs, "Deployment", "meshxl-xds")
    (container,) = xds["spec"]["template"]["spec"]["containers"]
    mounted = _project(xds, container, _secrets(docs), root)
    out = []
    for arg in container["args"]:
        flag, _, value = arg.partition("=")
        if flag not in TLS_FLAGS:
            continue
        for mount_path, directory in mounted.items():
            if value.startswith(mount_path + "/"):
                value = str(directory) + value[len(mount_path):]
        out += [flag, value]
    assert {"--tls-cert", "--tls-key", "--client-ca"} <= set(out[::2]), container["args"]
    return out


def _namespace_secret(certs: Path, namespace: str, root: Path) -> Path:
    """`kubectl -n NS create secret generic meshxl-envoy-xds --from-file=...` as the
    docs give it, projected into a directory."""
    directory = root / f"meshxl-envoy-xds-{namespace}"
    directory.mkdir(parents=True)
    for key, source in (("tls.crt", f"envoy-{namespace}.crt"),
                        ("tls.key", f"envoy-{namespace}.key"), ("ca.crt", "ca.crt")):
        (directory / key).write_bytes((certs / source).read_bytes())
        (directory / key).chmod(0o600)
    return directory


def _envoy_command(docs: Any, secret_dir: Path, port: int, admin_port: int,
                   work_dir: Path) -> tuple[list[str], str]:
    """The injected Envoy's command line, made local; and the name it dials."""
    config = xds_manifests._webhook_config(docs)
    pod = mutate_pod(yaml.safe_load((xds_manifests.FIXTURES / "pod.yaml").read_text()),
                     config)
    (envoy,) = [c for c in pod["spec"]["initContainers"] if c["name"] == ENVOY_CONTAINER]
    assert envoy["command"] == ["meshxl"]
    values = {"$(MESHXL_MEMBER)": MEMBER, "$(MESHXL_NAMESPACE)": NAMESPACE}
    args: list[str] = []
    dialled = ""
    items = iter(envoy["args"])
    for arg in items:
        if arg in ("--xds", "--admin-port", "--work-dir"):
            value = next(items)
            if arg == "--xds":
                dialled = parse_hostport(value)[0]
                value = f"127.0.0.1:{port}"
            elif arg == "--admin-port":
                value = str(admin_port)
            else:
                value = str(work_dir)
            args += [arg, value]
            continue
        for variable, value in values.items():
            arg = arg.replace(variable, value)
        if arg.startswith(XDS_CLIENT_DIR + "/"):
            arg = str(secret_dir) + arg[len(XDS_CLIENT_DIR):]
        args.append(arg)
    # The pod dials the Service name: that name is what Envoy sends and checks.
    args += ["--xds-sni", dialled]
    return [sys.executable, "-m", "meshxl.cli", *args], dialled


def _credentials(secret_dir: Path | None, ca: Path) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=(secret_dir / "tls.key").read_bytes() if secret_dir else None,
        certificate_chain=(secret_dir / "tls.crt").read_bytes() if secret_dir else None)


async def _claim(port: int, name: str, credentials: grpc.ChannelCredentials,
                 node_id: str) -> grpc.StatusCode:
    """Open a stream as ``node_id``: OK with a response, or the refusal's code."""
    options = (("grpc.ssl_target_name_override", name),)
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials,
                                       options=options) as channel:
        call = AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources(
            iter([DiscoveryRequest(node=Node(id=node_id), type_url=CLUSTER)]), timeout=5)
        try:
            async for _ in call:
                call.cancel()
                return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    raise AssertionError("the stream ended without an answer")


async def test_self_signed_overlay_binds_envoys_to_their_namespace(
        harness: Owner, tree: Path) -> None:
    docs = tuple(_kustomize(tree / "overlays" / "self-signed"))
    volumes = harness.root / "volumes"
    model = tree / "base" / "model.yaml"
    plane = ControlPlaneProcess(harness, config_path=model,
                                extra_args=tuple(_control_plane_tls(docs, volumes)))
    await plane.start()

    certs = xds_manifests._certs(tree)
    shop = _namespace_secret(certs, "shop", volumes)
    payments = _namespace_secret(certs, "payments", volumes)
    admin_port = free_port()
    command, dialled = _envoy_command(docs, shop, plane.port, admin_port,
                                      harness.path("envoy-work"))
    envoy = Process("envoy-cart-0", command, harness.root / "envoy-cart-0.log")
    harness.own(envoy)
    envoy.start()
    node_id = f"{MEMBER}.{NAMESPACE}"
    expected = {c["name"] for c in yaml.safe_load(model.read_text())["clusters"]}

    async with EnvoyAdmin(f"http://127.0.0.1:{admin_port}") as admin:
        async def has_clusters() -> bool:
            try:
                return expected <= set(await admin.clusters())
            except Exception:  # noqa: BLE001 - not up yet
                return False

        await wait_until(has_clusters, timeout=30.0, what="the injected Envoy's clusters",
                         process=envoy)

    async def acked() -> bool:
        _, nodes = await plane.get("/v1/nodes")
        types = nodes.get(node_id, {}).get("types", {})
        return bool(types.get(CLUSTER, {}).get("acked_version"))

    await wait_until(acked, timeout=10.0, what=f"{node_id} ACKed CDS")
    # `meshxl envoy` keeps the bootstrap it wrote private (it may hold a token).
    assert (harness.path("envoy-work") / "bootstrap.yaml").stat().st_mode & 0o077 == 0

    ca = shop / "ca.crt"
    assert await _claim(plane.port, dialled, _credentials(shop, ca), "cart-1.shop") == \
        grpc.StatusCode.OK  # any pod of its own namespace
    assert await _claim(plane.port, dialled, _credentials(payments, ca), node_id) == \
        grpc.StatusCode.PERMISSION_DENIED
    assert await _claim(plane.port, dialled, _credentials(shop, ca), "cart-0.payments") == \
        grpc.StatusCode.PERMISSION_DENIED
    assert await _claim(plane.port, dialled, _credentials(None, ca), node_id) == \
        grpc.StatusCode.UNAVAILABLE  # no certificate: refused in the handshake
    _, nodes = await plane.get("/v1/nodes")
    assert "cart-0.payments" not in nodes
    assert "refused (permission_denied)" in plane.logs()
