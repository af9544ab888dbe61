"""The admission webhook over real TLS on loopback: AdmissionReview v1 in, patch out.

Certificates are made for the test (a CA and a server certificate for 127.0.0.1); the
client trusts only that CA, as the API server trusts only the caBundle.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import json
import os
import ssl
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshxl.kube import STATESYNC_CONTAINER, InjectConfig, mutate_pod
from meshxl.kube.webhook import WebhookConfig, running
from meshxl.local.ports import free_port
from meshxl.local.procs import Owner, Process, run
from meshxl.local.wait import wait_until
from tests.harness.clock import scaled

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).resolve().parents[1] / "unit" / "fixtures" / "kube"
CONFIG = InjectConfig(image="registry.example.com/meshxl:1.0")


@dataclass
class Certs:
    ca: Path
    cert: Path
    key: Path


def make_certs(directory: Path, common_name: str = "meshxl-test-ca") -> Certs:
    """A CA and a serving certificate for 127.0.0.1 / localhost, signed by it."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False,
                                       decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    certs = Certs(directory / "ca.crt", directory / "tls.crt", directory / "tls.key")
    certs.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    certs.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    certs.key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    return certs


def review(obj: Any, *, kind: str = "Pod", uid: str | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid or str(uuid.uuid4()),
            "kind": {"group": "", "version": "v1", "kind": kind},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "object": obj,
            "dryRun": False,
        },
    }


def pod(name: str) -> dict[str, Any]:
    data = yaml.safe_load((FIXTURES / name).read_text())
    assert isinstance(data, dict)
    return data


@dataclass
class Webhook:
    url: str
    session: aiohttp.ClientSession
    certs: Certs

    async def post(self, body: Any, *, raw: bytes | None = None) -> tuple[int, Any]:
        data = raw if raw is not None else json.dumps(body).encode()
        async with self.session.post(f"{self.url}/inject", data=data,
                                     headers={"Content-Type": "application/json"}) as resp:
            return resp.status, await resp.json()


def client_context(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


@pytest.fixture
async def webhook(tmp_path: Path) -> AsyncIterator[Webhook]:
    certs = make_certs(tmp_path / "certs")
    config = WebhookConfig(tls_cert=certs.cert, tls_key=certs.key, inject=CONFIG,
                           listen="127.0.0.1:0", cert_reload_interval=0.05)
    async with running(config) as (_, port):
        connector = aiohttp.TCPConnector(ssl=client_context(certs.ca))
        async with aiohttp.ClientSession(connector=connector,
                                         timeout=aiohttp.ClientTimeout(total=10)) as session:
            yield Webhook(f"https://127.0.0.1:{port}", session, certs)


async def test_pod_gets_a_patch_over_tls(webhook: Webhook) -> None:
    original = pod("pod.yaml")
    uid = str(uuid.uuid4())
    status, answer = await webhook.post(review(original, uid=uid))
    assert status == 200
    assert answer["apiVersion"] == "admission.k8s.io/v1"
    assert answer["kind"] == "AdmissionReview"
    response = answer["response"]
    assert response["uid"] == uid
    assert response["allowed"] is True
    assert response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    patched = jsonpatch.apply_patch(original, patch)
    assert patched == mutate_pod(original, CONFIG)
    assert "warnings" not in response
    # Members of the cluster keep apart: a node anti-affinity and a zone spread.
    term = patched["spec"]["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"] == {"matchLabels": {"meshxl.io/cluster": "orders"}}
    assert patched["spec"]["topologySpreadConstraints"][0]["topologyKey"] == \
        "topology.kubernetes.io/zone"


@pytest.mark.parametrize(("fixture", "expect_warning"), [
    ("injected-pod.yaml", False), ("opted-out-pod.yaml", False)])
async def test_nothing_to_inject_is_allowed_without_patch(webhook: Webhook, fixture: str,
                                                         expect_warning: bool) -> None:
    status, answer = await webhook.post(review(pod(fixture)))
    assert status == 200
    assert answer["response"]["allowed"] is True
    assert "patch" not in answer["response"]
    assert ("warnings" in answer["response"]) is expect_warning


async def test_injecting_the_patched_pod_again_changes_nothing(webhook: Webhook) -> None:
    status, answer = await webhook.post(review(pod("pod.yaml")))
    patched = jsonpatch.apply_patch(pod("pod.yaml"),
                                    json.loads(base64.b64decode(answer["response"]["patch"])))
    status, again = await webhook.post(review(patched))
    assert status == 200 and "patch" not in again["response"]


async def test_pod_without_cluster_is_allowed_with_a_warning(webhook: Webhook) -> None:
    bare = pod("pod.yaml")
    bare["metadata"]["labels"] = {}
    status, answer = await webhook.post(review(bare))
    assert status == 200
    assert answer["response"]["allowed"] is True and "patch" not in answer["response"]
    assert "no meshxl cluster" in answer["response"]["warnings"][0]


@pytest.mark.parametrize("change", [
    lambda p: p["spec"]["containers"][0].update({"name": ["a", "list"]}),
    lambda p: p["spec"]["containers"][0].update({"ports": 8080}),
    lambda p: p["spec"]["containers"][0].update({"volumeMounts": 3}),
    lambda p: p["spec"].update({"volumes": [{"name": {"nested": 1}}]}),
    lambda p: p["spec"].update({"affinity": {"podAntiAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": [{"topologyKey": ["x"]}]}}}),
    lambda p: p["metadata"].update({"labels": {"meshxl.io/cluster": {"x": 1}}}),
])
async def test_malformed_pods_are_allowed_with_a_warning(webhook: Webhook,
                                                         change: Any) -> None:
    bad = pod("pod.yaml")
    change(bad)
    status, answer = await webhook.post(review(bad))
    assert status == 200, answer
    response = answer["response"]
    assert response["allowed"] is True and "patch" not in response
    assert response["warnings"][0].startswith("meshxl: not injected:"), response


async def test_http_errors_are_json_and_nesting_is_bounded(webhook: Webhook) -> None:
    for raw in (b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 70 + b"1" + b"}" * 70):
        status, answer = await webhook.post(None, raw=raw)
        assert status == 400 and "nests deeper" in answer["error"], answer
    for method, path, expected in (("GET", "/inject", 405), ("GET", "/nowhere", 404)):
        async with webhook.session.request(method, webhook.url + path) as resp:
            assert resp.status == expected
            assert resp.content_type == "application/json"
            assert (await resp.json())["status"] == expected


async def test_other_kinds_pass(webhook: Webhook) -> None:
    status, answer = await webhook.post(review({"metadata": {"name": "x"}}, kind="Service"))
    assert status == 200
    assert answer["response"]["allowed"] is True and "patch" not in answer["response"]


@pytest.mark.parametrize(("body", "message"), [
    (b"{not json", "the body is not JSON"),
    (b"[1, 2]", "must be a JSON AdmissionReview object"),
    (json.dumps({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview",
                 "request": {"uid": "x"}}).encode(), "expected apiVersion admission.k8s.io/v1"),
    (json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}).encode(),
     "has no request"),
    (json.dumps({**review({}), "request": {**review({})["request"], "uid": ""}}).encode(),
     "request.uid is missing"),
    (json.dumps({**review(None)}).encode(), "request.object must be the Pod"),
    (json.dumps(review({"metadata": "x", "spec": {}})).encode(), "metadata is not a mapping"),
    (json.dumps(review({"metadata": {}})).encode(), "the Pod has no spec"),
])
async def test_malformed_review_is_400_with_a_message(webhook: Webhook, body: bytes,
                                                      message: str) -> None:
    status, answer = await webhook.post(None, raw=body)
    assert status == 400
    assert message in answer["error"]
    assert answer["status"] == 400


async def test_only_tls_clients_that_trust_the_ca_get_in(webhook: Webhook,
                                                          tmp_path: Path) -> None:
    other = make_certs(tmp_path / "other", "someone-else")
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await session.get(f"{webhook.url}/healthz", ssl=client_context(other.ca))
        plain = webhook.url.replace("https://", "http://")
        with pytest.raises(aiohttp.ClientError):
            await session.get(f"{plain}/healthz")
    async with webhook.session.get(f"{webhook.url}/healthz") as resp:
        assert resp.status == 200


async def test_renewed_certificate_is_served_without_restart(webhook: Webhook,
                                                              tmp_path: Path) -> None:
    renewed = make_certs(tmp_path / "renewed", "renewed-ca")
    webhook.certs.cert.write_bytes(renewed.cert.read_bytes())
    webhook.certs.key.write_bytes(renewed.key.read_bytes())
    deadline = time.monotonic() + scaled(10)
    while True:
        try:
            async with aiohttp.ClientSession() as session, session.get(
                    f"{webhook.url}/readyz", ssl=client_context(renewed.ca)) as resp:
                assert resp.status == 200
                break
        except aiohttp.ClientConnectorCertificateError:
            assert time.monotonic() < deadline, "the renewed certificate was never served"
            await asyncio.sleep(0.05)


async def test_metrics_count_reviews(webhook: Webhook) -> None:
    await webhook.post(review(pod("pod.yaml")))
    await webhook.post(None, raw=b"nope")
    async with webhook.session.get(f"{webhook.url}/metrics") as resp:
        text = await resp.text()
    assert 'meshxl_webhook_reviews_total{result="injected"} 1.0' in text
    assert 'meshxl_webhook_reviews_total{result="malformed"} 1.0' in text


# -- the real command ------------------------------------------------------------------------


def _meshxl(*args: str) -> list[str]:
    return [sys.executable, "-m", "meshxl.cli", *args]


async def test_serve_webhook_command(harness: Owner, tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs")
    port = free_port()
    proc = Process("webhook", _meshxl(
        "serve", "webhook", "--tls-cert", str(certs.cert), "--tls-key", str(certs.key),
        "--listen", f"127.0.0.1:{port}", "--image", "registry.example.com/meshxl:3.0",
        "--proxy", "none", "--anti-affinity", "required"),
        harness.path("webhook") / "webhook.log",
        # As the webhook's Deployment would set it (docs/kubernetes.md).
        env={**os.environ, "MESHXL_SITE_TOPOLOGY_KEY": "topology.kubernetes.io/zone"})
    harness.own(proc)
    proc.start()
    connector = aiohttp.TCPConnector(ssl=client_context(certs.ca))
    async with aiohttp.ClientSession(connector=connector) as session:

        async def ready() -> bool:
            async with session.get(f"https://127.0.0.1:{port}/readyz") as resp:
                return resp.status == 200

        await wait_until(ready, timeout=20, what="the webhook to listen", process=proc)
        async with session.post(f"https://127.0.0.1:{port}/inject",
                                json=review(pod("pod.yaml"))) as resp:
            answer = await resp.json()
    patch = json.loads(base64.b64decode(answer["response"]["patch"]))
    added = next(op["value"] for op in patch if op["path"] == "/spec/initContainers")
    assert [c["name"] for c in added] == [STATESYNC_CONTAINER]
    assert added[0]["image"] == "registry.example.com/meshxl:3.0"
    affinity = next(op["value"] for op in patch if op["path"] == "/spec/affinity")
    assert affinity["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"] == [
        {"topologyKey": "kubernetes.io/hostname",
         "labelSelector": {"matchLabels": {"meshxl.io/cluster": "orders"}}}]
    assert affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"] == {
        "nodeSelectorTerms": [{"matchExpressions": [
            {"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["dc1"]}]}]}
    await proc.stop()
    assert proc.returncode == 0, proc.tail()


async def test_serve_webhook_bad_certificate_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.crt"
    bad.write_text("not a certificate")
    code, _, stderr = await run(_meshxl("serve", "webhook", "--tls-cert", str(bad),
                                        "--tls-key", str(bad), "--listen", "127.0.0.1:0"),
                                timeout=30)
    assert code == 1
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("meshxl: bad TLS certificate or key")
