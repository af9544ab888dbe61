"""deploy/kubernetes: the control plane serves ADS over mutual TLS with the node id
bound to the Envoy's certificate in every overlay that runs it for meshxl's Envoys
(istio-endpoints: for Istio's sidecars, their Istio certificates against Istio's root),
and the injected Envoys get a certificate it accepts for their own namespace only. Rendered with
`kubectl kustomize` (as test_manifests), the self-signed certificates made by the
documented `make-certs.sh shop payments`; the cert-manager Certificate and the copy
template are taken from docs/kubernetes.md."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from cryptography import x509

from meshxl.istio.endpoints import SERVER_NAMES
from meshxl.kube import InjectConfig, mutate_pod
from meshxl.kube.containers import ENVOY_CONTAINER, XDS_CLIENT_DIR, XDS_CLIENT_VOLUME
from meshxl.proxy.bootstrap import parse_hostport
from meshxl.xds.auth import AdsAuth, Peer, PermissionDenied, ads_auth
from tests.integration import test_manifests as manifests
from tests.integration.test_manifests import (
    CERT_MANAGER_SCHEMAS,
    NAMESPACE,
    OVERLAYS,
    Docs,
    _arg,
    _find,
    _kustomize,
)
from tests.integration.test_manifests_etcd_tls import Issued, _container, _host_matches, _secret_of

NAMESPACES = ("shop", "payments")
SERVING = ("default", "self-signed", "external-etcd", "two-sites",  # running meshxl-xds
           "session-shards", "session-shards-self-signed")
FIXTURES = Path(__file__).resolve().parents[1] / "unit" / "fixtures" / "kube"
DOCS = manifests.ROOT / "docs" / "kubernetes.md"


# One xdist worker runs the module: the overlays render once.
pytestmark = pytest.mark.xdist_group("test_manifests_xds_tls")


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """deploy/kubernetes copied, `make-certs.sh shop payments` run in it (with the
    session shards' certificates, which their self-signed overlay needs)."""
    if not shutil.which("openssl"):
        pytest.fail("openssl is needed by make-certs.sh (apt-get install openssl)",
                    pytrace=False)
    copy_ = tmp_path_factory.mktemp("deploy") / "kubernetes"
    shutil.copytree(manifests.KUBE, copy_, ignore=shutil.ignore_patterns("certs"))
    proc = subprocess.run(["bash", str(copy_ / "components" / "self-signed" /
                                       "make-certs.sh"), *NAMESPACES],
                          capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ,
                               "MESHXL_ETCD_SHARDS": " ".join(manifests.SHARDS)})
    assert proc.returncode == 0, proc.stderr
    return copy_


@pytest.fixture(scope="module")
def render(tree: Path) -> Any:
    cache: dict[str, Docs] = {}

    def get(overlay: str) -> Docs:
        if overlay not in cache:
            cache[overlay] = tuple(_kustomize(tree / "overlays" / overlay))
        return cache[overlay]

    return get


def _certs(tree: Path) -> Path:
    return tree / "components" / "self-signed" / "certs" / "xds"


def _webhook_config(docs: Docs) -> InjectConfig:
    """What the rendered webhook injects with (its environment)."""
    webhook = _find(docs, "Deployment", "meshxl-webhook")
    env = {e["name"]: e.get("value") for e in _container(webhook)["env"]}
    return InjectConfig(image=_container(webhook)["image"],
                        etcd="https://meshxl-etcd.meshxl-system.svc:2379",
                        etcd_client_secret=env["MESHXL_ETCD_CLIENT_SECRET"],
                        xds=tuple(env["MESHXL_XDS"].split()),
                        xds_client_secret=env.get("MESHXL_XDS_CLIENT_SECRET"),
                        proxy=env["MESHXL_PROXY"])


def _uris(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


@pytest.mark.parametrize("overlay", SERVING)
def test_control_plane_serves_ads_over_mutual_tls(overlay: str, render: Any) -> None:
    docs = render(overlay)
    issued = Issued(docs)
    xds = _find(docs, "Deployment", "meshxl-xds")
    container = _container(xds)
    secret = _secret_of(xds, container, _arg(container, "--tls-cert"))
    assert secret == "meshxl-xds-tls"
    assert _secret_of(xds, container, _arg(container, "--tls-key")) == secret
    # The client CA is the CA of the Secret: the xDS CA, not the webhook's or etcd's.
    assert _secret_of(xds, container, _arg(container, "--client-ca")) == secret
    assert _arg(container, "--client-ca").endswith("/ca.crt")
    assert not any(a.startswith("--node-binding") for a in container["args"]), \
        "the default with --client-ca binds node ids (san)"
    assert issued.usages(secret) == {"server auth"}
    anchor = issued.trust_anchor(secret)
    assert anchor not in (issued.trust_anchor("meshxl-webhook-tls"),
                          issued.trust_anchor("meshxl-etcd-server-tls"))
    volume = next(v for v in xds["spec"]["template"]["spec"]["volumes"]
                  if v.get("secret", {}).get("secretName") == secret)
    assert volume["secret"]["defaultMode"] == 0o440
    # What the injected Envoys dial is a name of the certificate.
    config = _webhook_config(docs)
    assert config.xds_client_secret == "meshxl-envoy-xds"
    for address in config.xds:
        host, port = parse_hostport(address)
        assert _host_matches(host, issued.dns_names(secret)), host
        service = _find(docs, "Service", host.split(".")[0])
        assert port in [p["port"] for p in service["spec"]["ports"]]


@pytest.mark.parametrize("overlay", SERVING)
def test_injected_envoy_mounts_its_namespace_certificate(overlay: str, render: Any) -> None:
    config = _webhook_config(render(overlay))
    pod = mutate_pod(yaml.safe_load((FIXTURES / "pod.yaml").read_text()), config)
    (envoy,) = [c for c in pod["spec"]["initContainers"] if c["name"] == ENVOY_CONTAINER]
    args = envoy["args"]
    assert args[args.index("--node-id") + 1] == "$(MESHXL_MEMBER).$(MESHXL_NAMESPACE)"
    for flag, key in (("--xds-ca", "ca.crt"), ("--xds-cert", "tls.crt"),
                      ("--xds-key", "tls.key")):
        assert args[args.index(flag) + 1] == f"{XDS_CLIENT_DIR}/{key}"
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == XDS_CLIENT_VOLUME]
    assert volume["secret"]["secretName"] == "meshxl-envoy-xds"


def test_istio_overlay_has_no_xds_certificates(render: Any) -> None:
    docs = render("istio")
    names = {d["metadata"]["name"] for d in docs
             if d["kind"] in ("Certificate", "Issuer", "Secret")}
    assert not {n for n in names if n.startswith("meshxl-xds")}, names


def test_istio_endpoints_serves_sidecars_with_their_istio_certificates(render: Any) -> None:
    """istio-endpoints: the server's own certificate (what `istio render --xds-tls`'s
    sidecars check), Istio's root as the client CA (the ConfigMap Istio writes into
    every namespace), Istio's trust domain, and an Istio sidecar's node id bound to
    its certificate's namespace."""
    docs = render("istio-endpoints")
    issued = Issued(docs)
    xds = _find(docs, "Deployment", "meshxl-xds")
    container = _container(xds)
    secret = _secret_of(xds, container, _arg(container, "--tls-cert"))
    assert secret == "meshxl-xds-tls" == _secret_of(xds, container, _arg(container, "--tls-key"))
    assert issued.usages(secret) == {"server auth"}
    assert set(SERVER_NAMES) <= set(issued.dns_names(secret))
    client_ca = Path(_arg(container, "--client-ca"))
    mount = next(m for m in container["volumeMounts"]
                 if Path(m["mountPath"]) == client_ca.parent)
    assert mount.get("readOnly") is True
    volume = next(v for v in xds["spec"]["template"]["spec"]["volumes"]
                  if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == "istio-ca-root-cert"
    assert client_ca.name == "root-cert.pem"  # the ConfigMap's key
    auth = ads_auth(host="0.0.0.0", tls=True, client_ca=True, binding=None,
                    trust_domain=_arg(container, "--trust-domain"), token=None)
    node = "sidecar~10.4.0.7~web-5d8f7c-x2x9q.shop~shop.svc.cluster.local"
    auth.check_node(Peer(uris=("spiffe://cluster.local/ns/shop/sa/web",)), node)
    with pytest.raises(PermissionDenied):
        auth.check_node(Peer(uris=("spiffe://cluster.local/ns/payments/sa/web",)), node)


def test_make_certs_issues_namespace_bound_envoy_certificates(tree: Path,
                                                              render: Any) -> None:
    docs = render("self-signed")
    secret = _find(docs, "Secret", "meshxl-xds-tls")
    ca = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["ca.crt"]))
    certs = _certs(tree)
    auth = AdsAuth(binding="san")
    for namespace in NAMESPACES:
        cert = x509.load_pem_x509_certificate((certs / f"envoy-{namespace}.crt").read_bytes())
        cert.verify_directly_issued_by(ca)
        assert _uris(cert) == [f"spiffe://cluster.local/ns/{namespace}/meshxl-envoy"]
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert [u.dotted_string for u in eku] == ["1.3.6.1.5.5.7.3.2"]  # client auth only
        peer = Peer(uris=tuple(_uris(cert)))
        auth.check_node(peer, f"cart-0.{namespace}")
        other = next(n for n in NAMESPACES if n != namespace)
        with pytest.raises(PermissionDenied):
            auth.check_node(peer, f"cart-0.{other}")
    assert (certs / "ca.key").stat().st_mode & 0o077 == 0
    for value in secret["data"].values():
        assert base64.b64decode(value) != (certs / "ca.key").read_bytes()


def test_make_certs_keeps_the_xds_ca_and_refuses_bad_namespaces(tree: Path,
                                                                 tmp_path: Path) -> None:
    copy_ = tmp_path / "kubernetes"
    shutil.copytree(tree, copy_)
    script = copy_ / "components" / "self-signed" / "make-certs.sh"
    before = (_certs(copy_) / "ca.crt").read_bytes()
    proc = subprocess.run(["bash", str(script), "shop"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert (_certs(copy_) / "ca.crt").read_bytes() == before
    renewed = x509.load_pem_x509_certificate((_certs(copy_) / "envoy-shop.crt").read_bytes())
    renewed.verify_directly_issued_by(x509.load_pem_x509_certificate(before))
    proc = subprocess.run(["bash", str(script), "Shop_1"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 2 and "'Shop_1' is not a Kubernetes namespace" in proc.stderr


def _documented_certificate() -> dict[str, Any]:
    text = DOCS.read_text()
    blocks = [doc for block in re.findall(r"```yaml\n(.*?)```", text, re.DOTALL)
              for doc in yaml.safe_load_all(block)]
    (certificate,) = [b for b in blocks if isinstance(b, dict)
                      and b.get("metadata", {}).get("name") == "meshxl-envoy-shop"]
    return certificate


@pytest.mark.parametrize("overlay", ["default", "external-etcd"])
def test_documented_envoy_certificate_fits_the_cert_manager_overlays(overlay: str,
                                                                      render: Any) -> None:
    certificate = _documented_certificate()
    jsonschema.validate(certificate, CERT_MANAGER_SCHEMAS["Certificate"])
    assert certificate["metadata"]["namespace"] == NAMESPACE
    docs = render(overlay)
    issued = Issued(docs)
    # Issued by the CA whose certificates the control plane accepts.
    issuer = _find(docs, "Issuer", certificate["spec"]["issuerRef"]["name"])
    assert issuer["spec"]["ca"]["secretName"] == issued.trust_anchor("meshxl-xds-tls")
    assert set(certificate["spec"]["usages"]) & {"server auth", "client auth"} == \
        {"client auth"}
    peer = Peer(uris=tuple(certificate["spec"]["uris"]))
    AdsAuth(binding="san").check_node(peer, "cart-0.shop")
    with pytest.raises(PermissionDenied):
        AdsAuth(binding="san").check_node(peer, "cart-0.payments")


def test_documented_copy_of_the_envoy_secret(tree: Path, tmp_path: Path) -> None:
    """docs/kubernetes.md's XDS_COPY go-template copies the Secret under the name the
    webhook mounts, with the same type and data, nothing of the source's metadata."""
    templates = set(re.findall(r"^XDS_COPY='(.*)'$", DOCS.read_text(), flags=re.MULTILINE))
    (template,) = templates  # the same wherever the docs show it
    certs = _certs(tree)
    proc = subprocess.run(
        [manifests._kubectl(), "-n", NAMESPACE, "create", "secret", "generic",
         "meshxl-envoy-shop", "--type=kubernetes.io/tls",
         f"--from-file=tls.crt={certs / 'envoy-shop.crt'}",
         f"--from-file=tls.key={certs / 'envoy-shop.key'}",
         f"--from-file=ca.crt={certs / 'ca.crt'}",
         "--dry-run=client", "-o", f"go-template={template}"],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "KUBECONFIG": str(tmp_path / "no-cluster")})  # offline
    assert proc.returncode == 0, proc.stderr
    copied = json.loads(proc.stdout)
    kubernetes_validate.validate(copied, kubernetes_validate.latest_version(), strict=True)
    assert copied["metadata"] == {"name": "meshxl-envoy-xds"}
    assert copied["type"] == "kubernetes.io/tls"
    assert {k: base64.b64decode(v) for k, v in copied["data"].items()} == {
        "tls.crt": (certs / "envoy-shop.crt").read_bytes(),
        "tls.key": (certs / "envoy-shop.key").read_bytes(),
        "ca.crt": (certs / "ca.crt").read_bytes()}


def test_every_overlay_is_considered() -> None:
    assert set(SERVING) | {"istio", "istio-endpoints"} == set(OVERLAYS)
