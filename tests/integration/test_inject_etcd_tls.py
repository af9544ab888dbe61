"""An injected statesync sidecar against a real etcd with ``--client-cert-auth``.

The pod comes out of the admission webhook's AdmissionReview answer; its etcd client
Secret (a ``kubernetes.io/tls`` Secret as cert-manager writes it) is projected into a
directory the way the kubelet projects the Secret volume, and the sidecar is started
with exactly the injected command line: only the mount path is resolved to that
directory and the downward-API variables to values.
"""

from __future__ import annotations

import base64
import json
import re
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from meshxl import etcd
from meshxl.etcd.keys import Keys
from meshxl.kube import STATESYNC_CONTAINER, InjectConfig
from meshxl.local.ports import free_port
from meshxl.local.procs import Owner, Process
from tests.harness.certs import CA
from tests.harness.secure_etcd import SecureEtcd, start_secure_etcd
from tests.harness.sidecar import SidecarProcess
from tests.unit.test_inject_etcd_tls import SECRET, _pod, admitted

pytestmark = pytest.mark.integration


def tls_secret(ca: CA, name: str, namespace: str) -> dict[str, Any]:
    """The Secret of the pod's namespace: a client certificate from etcd's CA."""
    leaf = ca.issue(f"meshxl-statesync.{namespace}", names=(), server=False)

    def b64(path: Path) -> str:
        return base64.b64encode(path.read_bytes()).decode()

    secret = {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
              "metadata": {"name": name, "namespace": namespace},
              "data": {"tls.crt": b64(leaf.cert), "tls.key": b64(leaf.key),
                       "ca.crt": b64(ca.cert)}}
    kubernetes_validate.validate(secret, kubernetes_validate.latest_version(), strict=True)
    return secret


def project(volume: dict[str, Any], secret: dict[str, Any], directory: Path) -> None:
    """What the kubelet does with a Secret volume: each item's key to its path, mode."""
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    directory.mkdir(parents=True)
    for item in volume["secret"]["items"]:
        path = directory / item["path"]
        path.write_bytes(base64.b64decode(secret["data"][item["key"]]))
        path.chmod(volume["secret"]["defaultMode"])


async def test_injected_sidecar_registers_and_serves_a_session_over_etcd_tls(
        harness: Owner) -> None:
    ca = CA(harness.path("pki"), name="meshxl-etcd-ca")
    server: SecureEtcd = await start_secure_etcd(harness, ca)
    port = free_port()
    config = InjectConfig(image="registry.example.com/meshxl:1.0", etcd=server.url,
                          etcd_client_secret=SECRET, proxy="none",
                          statesync_listen=f"127.0.0.1:{port}")
    pod = admitted(_pod(), config)
    (container,) = [c for c in pod["spec"]["initContainers"]
                    if c["name"] == STATESYNC_CONTAINER]
    (mount,) = container["volumeMounts"]
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == mount["name"]]
    mounted = harness.root / "volumes" / mount["name"]
    project(volume, tls_secret(ca, SECRET, "shop"), mounted)

    member = "orders-7d9f-abcde"
    values = {"MESHXL_MEMBER": member, "MESHXL_POD_IP": "127.0.0.1",
              "MESHXL_NAMESPACE": "shop"}
    args = [re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], a) for a in container["args"]]
    args = [str(mounted) + a[len(mount["mountPath"]):]
            if a.startswith(mount["mountPath"] + "/") else a for a in args]
    assert container["command"] == ["meshxl"]
    assert sum(a.startswith(str(mounted)) for a in args) == 3  # --etcd-ca/-cert/-key

    sidecar = SidecarProcess(harness, cluster="orders", member=member, etcd=server.url,
                             app_port=8080)
    sidecar.port = port
    sidecar.process = Process(sidecar.name, [sys.executable, "-u", "-m", "meshxl.cli",
                                                    *args], sidecar.log_path)
    await sidecar.start(timeout=30.0)  # /readyz: registered, cache caught up

    assert (await sidecar.put("cart-1", {"items": 3})).status == 201
    reply = await sidecar.get("cart-1")
    assert reply.status == 200 and reply.json() == {"items": 3}

    # Both are in etcd, read back with the same projected files.
    security = etcd.EtcdSecurity(ca=mounted / "ca.crt", cert=mounted / "tls.crt",
                                 key=mounted / "tls.key")
    keys = Keys()
    async with etcd.client(server.url, security=security) as client:
        registration = await client.get(keys.member("orders", member).encode())
        session = await client.get(keys.session("orders", "cart-1").encode())
    assert registration is not None and session is not None
    record = json.loads(registration.value)
    assert (record["address"], record["port"], record["ready"]) == ("127.0.0.1", 8080, True)
