"""The overlays' etcd TLS against real processes: etcd started with the rendered
StatefulSet's own flags and the self-signed overlay's own Secrets, meshxl with the
control plane's flags and the sidecars' Secret (the external-etcd overlay's bridge:
test_etcd_external_lp).

Only what cannot run here is replaced: names, data directory and URLs (loopback ports,
``localhost``, which etcd's certificate names); Secret volumes are projected into
directories as the kubelet does.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import aetcd
import pytest

from meshxl import etcd
from meshxl.local.ports import free_port, free_ports
from meshxl.local.procs import Owner, Process
from meshxl.local.wait import wait_until
from tests.harness.cli import meshxl
from tests.harness.etcd import find_etcd
from tests.harness.sidecar import SidecarProcess
from tests.integration import test_manifests as manifests
from tests.integration.test_manifests import _find, _kustomize

pytestmark = pytest.mark.integration

tree = manifests.tree  # deploy/kubernetes copied, make-certs.sh run (a fixture)

#: Flags that name this member, its data or its network addresses: replaced.
LOCAL = {"--name", "--data-dir", "--listen-client-urls", "--advertise-client-urls",
         "--listen-peer-urls", "--initial-advertise-peer-urls", "--listen-metrics-urls",
         "--initial-cluster"}


def _secrets(docs: tuple[dict[str, Any], ...]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}


def _project(workload: dict[str, Any], container: dict[str, Any],
             secrets: dict[str, dict[str, Any]], root: Path) -> dict[str, Path]:
    """Each mounted Secret volume written under ``root``: mountPath -> directory."""
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
    mounted: dict[str, Path] = {}
    for mount in container["volumeMounts"]:
        source = volumes.get(mount["name"], {}).get("secret")
        if source is None or source["secretName"] not in secrets:
            continue
        directory = root / workload["metadata"]["name"] / mount["name"]
        directory.mkdir(parents=True)
        for key, value in secrets[source["secretName"]]["data"].items():
            path = directory / key
            path.write_bytes(base64.b64decode("".join(value.split())))
            path.chmod(0o600)
        mounted[mount["mountPath"]] = directory
    return mounted


def _local_args(container: dict[str, Any], mounted: dict[str, Path],
                local: dict[str, str]) -> list[str]:
    """The container's args with mount paths resolved and LOCAL flags replaced."""
    out = []
    for arg in container["args"]:
        flag, eq, value = arg.partition("=")
        if eq and flag in LOCAL:
            assert flag in local, f"no local value for {flag}"
            continue
        for mount_path, directory in mounted.items():
            if value.startswith(mount_path + "/"):
                arg = f"{flag}={directory}{value[len(mount_path):]}"
        out.append(arg)
    return out + [f"{flag}={value}" for flag, value in local.items()]


def _tls_options(mounted: dict[str, Path], container: dict[str, Any]) -> list[str]:
    options = []
    for arg in container["args"]:
        flag, _, value = arg.partition("=")
        if flag in ("--etcd-ca", "--etcd-cert", "--etcd-key"):
            for mount_path, directory in mounted.items():
                if value.startswith(mount_path + "/"):
                    options += [flag, str(directory) + value[len(mount_path):]]
    assert len(options) == 6, container["args"]
    return options


async def _etcd_answers(url: str, files: Path) -> None:
    security = etcd.EtcdSecurity(ca=files / "ca.crt", cert=files / "tls.crt",
                                 key=files / "tls.key")

    async def answers() -> bool:
        try:
            async with etcd.client(url, security=security, timeout=2) as client:
                await client.get(b"/health-check")
            return True
        except Exception:  # noqa: BLE001 - not up yet
            return False

    await wait_until(answers, timeout=30.0, what=f"etcd at {url}", interval=0.1)


async def test_self_signed_overlay_runs_etcd_with_tls_and_client_certificates(
        harness: Owner, tree: Path) -> None:
    docs = tuple(_kustomize(tree / "overlays" / "self-signed"))
    secrets = _secrets(docs)
    statefulset = _find(docs, "StatefulSet", "meshxl-etcd")
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    mounted = _project(statefulset, container, secrets, harness.root / "volumes")
    client_port, peer_port, metrics_port = free_ports(3)
    peer = f"https://127.0.0.1:{peer_port}"
    args = _local_args(container, mounted, {
        "--name": "meshxl-etcd-0", "--data-dir": str(harness.path("etcd-data") / "data"),
        "--listen-client-urls": f"https://127.0.0.1:{client_port}",
        "--advertise-client-urls": f"https://localhost:{client_port}",
        "--listen-peer-urls": peer, "--initial-advertise-peer-urls": peer,
        "--listen-metrics-urls": f"http://127.0.0.1:{metrics_port}",
        "--initial-cluster": f"meshxl-etcd-0={peer}"})
    assert any(a.startswith("--client-cert-auth=") for a in args)
    server = Process("etcd", [find_etcd(), *args], harness.root / "etcd.log")
    harness.own(server)
    server.start()
    url = f"https://localhost:{client_port}"
    system_dir = harness.root / "system"
    for name, value in secrets["meshxl-etcd-system-tls"]["data"].items():
        (system_dir / name).parent.mkdir(exist_ok=True)
        (system_dir / name).write_bytes(base64.b64decode("".join(value.split())))
    await _etcd_answers(url, system_dir)

    # The Job meshxl-etcd-setup, with its own arguments and Secret: a user per cluster of
    # the model, authentication on.
    job = _find(docs, "Job", "meshxl-etcd-setup")
    (job_container,) = job["spec"]["template"]["spec"]["containers"]
    job_mounted = _project(job, job_container, secrets, harness.root / "volumes")
    model = tree / "base" / "model.yaml"
    job_args = [model.as_posix() if a == "/etc/meshxl/model/model.yaml" else a
                for a in _local_args(job_container, job_mounted, {})]
    code, out, err = await meshxl(*job_args, "--etcd", url)
    assert code == 0, err
    assert "authentication: enabled" in out, out

    # The control plane's own flags and Secret.
    xds = _find(docs, "Deployment", "meshxl-xds")
    (xds_container,) = xds["spec"]["template"]["spec"]["containers"]
    xds_mounted = _project(xds, xds_container, secrets, harness.root / "volumes")
    options = _tls_options(xds_mounted, xds_container)
    code, _, err = await meshxl("apply", str(model), "--etcd", url, *options)
    assert code == 0, err
    code, out, err = await meshxl("status", "-o", "json", "--etcd", url, *options)
    assert code == 0, err
    assert [c["name"] for c in json.loads(out)["clusters"]] == ["orders"]

    # A sidecar of orders with its cluster's certificate (make-certs.sh's, the Secret
    # meshxl-etcd-orders the webhook mounts) registers and writes; that certificate
    # may not rewrite the model (etcd refuses its user).
    files = tree / "components" / "self-signed" / "certs" / "etcd"
    orders = etcd.EtcdSecurity(ca=files / "ca.crt", cert=files / "cluster-orders.crt",
                               key=files / "cluster-orders.key")
    sidecar = SidecarProcess(harness, cluster="orders", member="orders-0", etcd=url,
                             app_port=free_port(), etcd_ca=orders.ca, etcd_cert=orders.cert,
                             etcd_key=orders.key)
    await sidecar.start(timeout=30.0)
    assert (await sidecar.put("cart-1", {"items": 1})).status == 201
    async with etcd.client(url, security=orders) as client:
        with pytest.raises(aetcd.exceptions.ClientError, match="permission denied"):
            await client.put(b"/meshxl/v1/mesh/model", b"clusters: []")

    # Refused: no client certificate, and one from the webhook's CA (not etcd's).
    webhook = secrets["meshxl-webhook-tls"]["data"]
    other = harness.root / "webhook"
    other.mkdir()
    for name, value in webhook.items():
        (other / name).write_bytes(base64.b64decode("".join(value.split())))
    for refused in (["--etcd-ca", str(files / "ca.crt")],
                    ["--etcd-ca", str(files / "ca.crt"), "--etcd-cert", str(other / "tls.crt"),
                     "--etcd-key", str(other / "tls.key")]):
        code, _, err = await meshxl("status", "-o", "json", "--etcd", url, *refused,
                                    timeout=60)
        assert code != 0, refused
        assert "certificate" in err, err
