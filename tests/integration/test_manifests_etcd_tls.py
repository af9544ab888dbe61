"""deploy/kubernetes: etcd is served over TLS with client-certificate authentication in
every overlay, and every meshxl process that talks to etcd holds a certificate etcd
accepts: meshxl's pods mount theirs, the webhook tells the injected sidecars where
theirs is. Rendered with `kubectl kustomize` (the fixtures of test_manifests)."""

from __future__ import annotations

import base64
import fnmatch
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from meshxl.kube import STATESYNC_CONTAINER, InjectConfig, mutate_pod
from meshxl.kube.inject import ETCD_CLIENT_VOLUME
from tests.integration import test_manifests as manifests
from tests.integration.test_manifests import (
    NAMESPACE,
    OVERLAYS,
    Docs,
    Render,
    _arg,
    _etcd_member_urls,
    _etcd_of,
    _find,
    _kustomize,
    _meshxl_containers,
    _workloads,
)

# The overlays rendered once per module, from a copy with the self-signed certificates.
tree = manifests.tree
render = manifests.render

IN_CLUSTER = ["default", "self-signed", "istio", "istio-endpoints", "two-sites",
              "session-shards", "session-shards-self-signed"]
CERT_MANAGER = ["default", "external-etcd", "istio", "istio-endpoints", "two-sites",
                "session-shards"]
FIXTURES = Path(__file__).resolve().parents[1] / "unit" / "fixtures" / "kube"
ETCD_CLIENT_LABEL = "meshxl.io/etcd-client"


def _container(workload: dict[str, Any]) -> dict[str, Any]:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return container  # type: ignore[no-any-return]


def _secret_of(workload: dict[str, Any], container: dict[str, Any], path: str) -> str:
    """The Secret whose volume is mounted (read-only) where ``path`` lies."""
    pod = workload["spec"]["template"]["spec"]
    for mount in container.get("volumeMounts", []):
        if Path(path).parent == Path(mount["mountPath"]):
            assert mount.get("readOnly") is True, (path, mount)
            volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
            assert Path(path).name in ("tls.crt", "tls.key", "ca.crt"), path
            return str(volume["secret"]["secretName"])
    raise AssertionError(f"{workload['metadata']['name']}: nothing mounted at {path}")


class Issued:
    """What an overlay issues into a Secret: cert-manager Certificates or generated
    Secrets (self-signed), seen the same way: names, usages, issuer."""

    def __init__(self, docs: Docs) -> None:
        self.docs = docs
        self.certificates = {d["spec"]["secretName"]: d for d in docs
                             if d["kind"] == "Certificate"}
        self.secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}

    def __contains__(self, secret: str) -> bool:
        return secret in self.certificates or secret in self.secrets

    def _x509(self, secret: str, key: str = "tls.crt") -> Any:
        from cryptography import x509

        data = self.secrets[secret]["data"][key]
        return x509.load_pem_x509_certificate(base64.b64decode("".join(data.split())))

    def dns_names(self, secret: str) -> list[str]:
        if secret in self.certificates:
            return list(self.certificates[secret]["spec"].get("dnsNames", []))
        from cryptography import x509

        cert = self._x509(secret)
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return []
        return list(san.get_values_for_type(x509.DNSName))

    def common_name(self, secret: str) -> str:
        if secret in self.certificates:
            return str(self.certificates[secret]["spec"]["commonName"])
        from cryptography.x509.oid import NameOID

        return str(self._x509(secret).subject.get_attributes_for_oid(
            NameOID.COMMON_NAME)[0].value)

    def usages(self, secret: str) -> set[str]:
        """The extended key usages: ``server auth``, ``client auth``."""
        if secret in self.certificates:
            return set(self.certificates[secret]["spec"]["usages"]) & {"server auth",
                                                                       "client auth"}
        from cryptography import x509
        from cryptography.x509.oid import ExtendedKeyUsageOID

        eku = self._x509(secret).extensions.get_extension_for_class(
            x509.ExtendedKeyUsage).value
        names = {ExtendedKeyUsageOID.SERVER_AUTH: "server auth",
                 ExtendedKeyUsageOID.CLIENT_AUTH: "client auth"}
        return {names[u] for u in eku if u in names}

    def trust_anchor(self, secret: str) -> str:
        """Who vouches for the certificate: its issuer (cert-manager), or the CA it is
        verified against (self-signed: the Secret's own ca.crt, checked)."""
        if secret in self.certificates:
            issuer = _find(self.docs, "Issuer",
                           self.certificates[secret]["spec"]["issuerRef"]["name"])
            ca_secret = issuer["spec"]["ca"]["secretName"]
            ca = self.certificates[ca_secret]
            assert ca["spec"]["isCA"] is True
            return str(ca_secret)
        ca = self._x509(secret, "ca.crt")
        self._x509(secret).verify_directly_issued_by(ca)
        return ca.fingerprint(ca.signature_hash_algorithm).hex()  # type: ignore[no-any-return]


def _host_matches(host: str, names: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(host, name) and host.count(".") == name.count(".")
               for name in names)


@pytest.mark.parametrize("overlay", IN_CLUSTER)
def test_etcd_serves_clients_and_peers_over_tls_with_client_certificates(
        overlay: str, render: Render) -> None:
    docs = render(overlay)
    issued = Issued(docs)
    etcd = _find(docs, "StatefulSet", "meshxl-etcd")
    container = _container(etcd)
    for flag in ("--listen-client-urls", "--advertise-client-urls", "--listen-peer-urls",
                 "--initial-advertise-peer-urls"):
        assert _arg(container, flag).startswith("https://"), flag
    members = [m.split("=", 1)[1] for m in _arg(container, "--initial-cluster").split(",")]
    assert members and all(m.startswith("https://") for m in members)
    # Health and metrics stay plain HTTP on their own port: the kubelet's probes.
    assert _arg(container, "--listen-metrics-urls").startswith("http://")
    assert container["startupProbe"]["httpGet"]["port"] == "metrics"

    assert _arg(container, "--client-cert-auth") == "true"
    # TLS changes nothing of the members' election behaviour (etcd 3.4 needs it said).
    assert _arg(container, "--pre-vote") == "true"
    assert _arg(container, "--peer-client-cert-auth") == "true"
    server = _secret_of(etcd, container, _arg(container, "--cert-file"))
    assert _secret_of(etcd, container, _arg(container, "--key-file")) == server
    assert _arg(container, "--trusted-ca-file").endswith("/ca.crt")
    peer = _secret_of(etcd, container, _arg(container, "--peer-cert-file"))
    assert _secret_of(etcd, container, _arg(container, "--peer-key-file")) == peer
    assert _arg(container, "--peer-trusted-ca-file").endswith("/ca.crt")
    assert server in issued and peer in issued and server != peer
    assert issued.trust_anchor(server) == issued.trust_anchor(peer)
    # Only the members' certificate joins as a peer, not a client certificate of the CA.
    assert _arg(container, "--peer-cert-allowed-cn") == issued.common_name(peer)
    assert {"server auth", "client auth"} <= issued.usages(peer)
    assert "server auth" in issued.usages(server)

    # Each name a client or peer dials is in the certificate it is served.
    def member_host(url: str) -> str:
        return str(urlsplit(url.replace("$(POD_NAME)", "meshxl-etcd-0")
                            .replace("$(POD_NAMESPACE)", NAMESPACE)).hostname)

    for url in members:
        assert _host_matches(member_host(url), issued.dns_names(peer)), url
    assert _host_matches(member_host(_arg(container, "--advertise-client-urls")),
                         issued.dns_names(server))
    # What meshxl's pods and the sidecars dial: each member, by a name etcd is served as.
    assert set(_etcd_urls(docs)) == set(_etcd_member_urls(docs))
    for url in _etcd_urls(docs):
        assert _host_matches(str(urlsplit(url).hostname), issued.dns_names(server)), url


def _etcd_urls(docs: Docs) -> list[str]:
    """Every etcd URL meshxl is configured with: its pods' and the injector's
    MESHXL_ETCD, each endpoint of the list."""
    return [url for _, container in _meshxl_containers(docs)
            for url in _etcd_of(docs, container)]


def _connects_to_etcd(container: dict[str, Any]) -> bool:
    """A meshxl container that connects to etcd: any but the webhook, which only passes
    its endpoints on to the sidecars it injects."""
    return container["args"][:2] != ["serve", "webhook"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_meshxl_pod_talking_to_etcd_mounts_a_client_certificate(
        overlay: str, render: Render) -> None:
    docs = render(overlay)
    issued = Issued(docs)
    etcd_secret = "meshxl-etcd-server-tls"
    anchor = issued.trust_anchor(etcd_secret)
    talking = []
    for workload in _workloads(docs):
        name = workload["metadata"]["name"]
        container = _container(workload)
        labels = workload["spec"]["template"]["metadata"]["labels"]
        uses_etcd = (workload, container) in _meshxl_containers(docs) and \
            _connects_to_etcd(container)
        # The pods etcd's NetworkPolicy lets in are exactly the ones configured for it.
        assert uses_etcd is (labels.get(ETCD_CLIENT_LABEL) == "true"), name
        if not uses_etcd:
            continue
        talking.append(name)
        assert all(url.startswith("https://") for url in _etcd_of(docs, container)), name
        secrets = {_secret_of(workload, container, _arg(container, flag))
                   for flag in ("--etcd-ca", "--etcd-cert", "--etcd-key")}
        (secret,) = secrets
        assert secret in issued, (name, secret)
        assert issued.usages(secret) == {"client auth"}, (name, secret)
        assert issued.trust_anchor(secret) == anchor, (name, secret)
        volume = next(v for v in workload["spec"]["template"]["spec"]["volumes"]
                      if v.get("secret", {}).get("secretName") == secret)
        # The key is readable by meshxl's user through the pod's fsGroup, not by all.
        assert volume["secret"]["defaultMode"] == 0o440, name
        assert workload["spec"]["template"]["spec"]["securityContext"]["fsGroup"] == \
            workload["spec"]["template"]["spec"]["securityContext"]["runAsGroup"], name
    expected = {"istio": {"meshxl-istio-label"},
                "istio-endpoints": {"meshxl-xds", "meshxl-istio-label"}}.get(overlay,
                                                                             {"meshxl-xds"})
    assert set(talking) == expected


def _with_cluster_secrets(issued: Issued, overlay: str, tree: Path) -> Issued:
    """Self-signed overlays: the clusters' certificates are files of make-certs.sh
    (certs/etcd/cluster-CLUSTER.*), turned into each namespace's Secret by hand; seen
    here as the Secret ``meshxl-etcd-CLUSTER`` they become."""
    if "self-signed" not in overlay:
        return issued
    etcd = tree / "components" / "self-signed" / "certs" / "etcd"
    for crt in etcd.glob("cluster-*.crt"):
        files = {"tls.crt": crt, "tls.key": crt.with_suffix(".key"), "ca.crt": etcd / "ca.crt"}
        issued.secrets[f"meshxl-etcd-{crt.stem.removeprefix('cluster-')}"] = {
            "kind": "Secret", "data": {k: base64.b64encode(p.read_bytes()).decode()
                                       for k, p in files.items()}}
    return issued


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_webhook_injects_the_sidecars_etcd_client_secret(overlay: str, render: Render,
                                                         tree: Path) -> None:
    docs = render(overlay)
    issued = _with_cluster_secrets(Issued(docs), overlay, tree)
    webhook = _find(docs, "Deployment", "meshxl-webhook")
    container = _container(webhook)
    env = {e["name"]: e.get("value") for e in container["env"]}
    etcd_urls = ",".join(_etcd_of(docs, container))
    assert etcd_urls.startswith("https://")
    # Each cluster's own Secret, never one shared by every cluster: the fixture pod's
    # cluster orders (base/model.yaml's) gets meshxl-etcd-orders, whose common name is
    # the etcd user `meshxl etcd setup` makes for orders alone.
    assert env["MESHXL_ETCD_CLIENT_SECRET"] == "meshxl-etcd-{cluster}"
    secret = "meshxl-etcd-orders"
    # The template the namespaces of orders copy is issued by etcd's CA, for client
    # authentication only.
    assert secret in issued
    assert issued.common_name(secret) == "meshxl-cluster-orders"
    assert issued.usages(secret) == {"client auth"}
    assert issued.trust_anchor(secret) == issued.trust_anchor("meshxl-etcd-server-tls")
    # The webhook never connects to etcd: it holds no etcd credentials.
    mounted = {v["secret"]["secretName"] for v in webhook["spec"]["template"]["spec"]["volumes"]
               if "secret" in v}
    assert mounted == {"meshxl-webhook-tls"}
    # What the webhook is configured with injects a sidecar that mounts that Secret.
    config = InjectConfig(image=container["image"], etcd=etcd_urls,
                          etcd_client_secret=env["MESHXL_ETCD_CLIENT_SECRET"],
                          proxy=env["MESHXL_PROXY"])
    pod = mutate_pod(yaml.safe_load((FIXTURES / "pod.yaml").read_text()), config)
    (sidecar,) = [c for c in pod["spec"]["initContainers"] if c["name"] == STATESYNC_CONTAINER]
    assert "--etcd-cert" in sidecar["args"]
    # The sidecar dials what the webhook has: every member in the in-cluster overlays.
    assert sidecar["args"][sidecar["args"].index("--etcd") + 1] == etcd_urls
    assert etcd_urls.split(",") == (
        [f"https://meshxl-etcd.{NAMESPACE}.svc:2379"] if overlay == "external-etcd"
        else _etcd_member_urls(docs))
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == ETCD_CLIENT_VOLUME]
    assert volume["secret"]["secretName"] == secret


@pytest.mark.parametrize("overlay", CERT_MANAGER)
def test_etcd_ca_is_not_the_webhooks(overlay: str, render: Render) -> None:
    """Anything etcd's CA signs may use etcd: the webhook's CA must not be it."""
    issued = Issued(render(overlay))
    assert issued.trust_anchor("meshxl-etcd-server-tls") != \
        issued.trust_anchor("meshxl-webhook-tls")


def test_make_certs_renews_etcd_certificates_under_the_same_ca(tree: Path,
                                                              tmp_path: Path) -> None:
    """Re-running make-certs.sh renews every leaf and keeps etcd's CA, so the copies of
    the sidecars' Secret in other namespaces stay trusted; the CA key is in no Secret."""
    from cryptography import x509

    if not shutil.which("openssl"):
        pytest.fail("openssl is needed by make-certs.sh", pytrace=False)
    copy_ = tmp_path / "kubernetes"
    shutil.copytree(tree, copy_, ignore=shutil.ignore_patterns("single-node-*", "derived-*"))
    etcd = copy_ / "components" / "self-signed" / "certs" / "etcd"
    ca_before = (etcd / "ca.crt").read_bytes()
    leaf_before = (etcd / "cluster-orders.crt").read_bytes()
    proc = subprocess.run(["bash", str(copy_ / "components" / "self-signed" / "make-certs.sh")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert (etcd / "ca.crt").read_bytes() == ca_before
    assert (etcd / "cluster-orders.crt").read_bytes() != leaf_before
    ca = x509.load_pem_x509_certificate(ca_before)
    for stem in ("server", "peer", "system", "root", "cluster-orders"):
        x509.load_pem_x509_certificate((etcd / f"{stem}.crt").read_bytes()
                                       ).verify_directly_issued_by(ca)
    assert (etcd / "ca.key").stat().st_mode & 0o077 == 0
    secrets = [d for d in _kustomize(copy_ / "overlays" / "self-signed")
               if d["kind"] == "Secret"]
    assert {s["metadata"]["name"] for s in secrets} >= {
        "meshxl-etcd-server-tls", "meshxl-etcd-peer-tls", "meshxl-etcd-system-tls",
        "meshxl-etcd-root-tls"}
    ca_key = (etcd / "ca.key").read_bytes()
    for secret in secrets:
        for value in secret["data"].values():
            assert base64.b64decode("".join(value.split())) != ca_key


def test_documented_copy_of_the_sidecars_secret(tree: Path, tmp_path: Path) -> None:
    """docs/kubernetes.md's go-template copies the Secret as a valid Secret with the
    same type and data, and nothing of the source namespace's metadata."""
    import json
    import re

    import kubernetes_validate

    docs = (manifests.ROOT / "docs" / "kubernetes.md").read_text()
    templates = set(re.findall(r"^COPY='(.*)'$", docs, flags=re.MULTILINE))
    (template,) = templates  # the same wherever the docs show it
    etcd = tree / "components" / "self-signed" / "certs" / "etcd"
    proc = subprocess.run(
        [manifests._kubectl(), "-n", NAMESPACE,
         "create", "secret", "generic", "meshxl-etcd-orders", "--type=kubernetes.io/tls",
         f"--from-file=tls.crt={etcd / 'cluster-orders.crt'}",
         f"--from-file=tls.key={etcd / 'cluster-orders.key'}",
         f"--from-file=ca.crt={etcd / 'ca.crt'}",
         "--dry-run=client", "-o", f"go-template={template}"],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "KUBECONFIG": str(tmp_path / "no-cluster")})  # offline
    assert proc.returncode == 0, proc.stderr
    copied = json.loads(proc.stdout)
    kubernetes_validate.validate(copied, kubernetes_validate.latest_version(), strict=True)
    assert copied["metadata"] == {"name": "meshxl-etcd-orders"}
    assert copied["type"] == "kubernetes.io/tls"
    assert {k: base64.b64decode(v) for k, v in copied["data"].items()} == {
        "tls.crt": (etcd / "cluster-orders.crt").read_bytes(),
        "tls.key": (etcd / "cluster-orders.key").read_bytes(),
        "ca.crt": (etcd / "ca.crt").read_bytes()}


@pytest.mark.parametrize("overlay", IN_CLUSTER)
def test_the_installation_gives_each_cluster_its_own_etcd_user(
        overlay: str, render: Render) -> None:
    """The Job meshxl-etcd-setup runs `meshxl etcd setup` on the model as etcd's root
    user (a certificate of etcd's CA with the common name root, mounted by nothing
    else) and turns authentication on; the control plane's certificate is the user it
    gives the whole prefix."""
    from click.testing import CliRunner

    from meshxl.cli import main
    from meshxl.etcd.setup import DEFAULT_CONTROL_PLANE_USERS

    docs = render(overlay)
    issued = Issued(docs)
    job = _find(docs, "Job", "meshxl-etcd-setup")
    container = _container(job)
    args = container["args"]
    assert args[:3] == ["etcd", "setup", "/etc/meshxl/model/model.yaml"]
    assert "--enable-auth" in args
    pod = job["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (model,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/etc/meshxl/model"]
    assert volumes[model["name"]]["configMap"]["name"] == "meshxl-model"
    assert pod["automountServiceAccountToken"] is False
    assert job["spec"]["template"]["metadata"]["labels"][ETCD_CLIENT_LABEL] == "true"
    root = _secret_of(job, container, _arg(container, "--etcd-cert"))
    assert _secret_of(job, container, _arg(container, "--etcd-key")) == root
    assert issued.common_name(root) == "root"
    assert issued.trust_anchor(root) == issued.trust_anchor("meshxl-etcd-server-tls")
    # The root certificate is mounted by the setup Jobs alone (the main cluster's, and
    # with session shards each shard's).
    setups = [d for d in docs if d["kind"] == "Job"
              and d["metadata"]["name"].startswith("meshxl-etcd-setup")]
    shards = [d for d in docs if d["kind"] == "StatefulSet"
              and d["metadata"]["name"] != "meshxl-etcd" and "etcd" in d["metadata"]["name"]]
    assert len(setups) == 1 + len(shards)
    for setup in setups:
        assert _container(setup)["args"] == args
    for workload in docs:
        if workload["kind"] not in ("Deployment", "StatefulSet", "Job") or workload in setups:
            continue
        spec = workload["spec"].get("template", {}).get("spec", {})
        assert root not in {v.get("secret", {}).get("secretName")
                            for v in spec.get("volumes", [])}, workload["metadata"]["name"]
    # meshxl's own pods (the control plane, the labeler) are the setup's default
    # control-plane user.
    assert issued.common_name("meshxl-etcd-system-tls") in DEFAULT_CONTROL_PLANE_USERS
    # The command parses these arguments (its dry run needs no etcd).
    model_file = manifests.KUBE / "base" / "model.yaml"
    result = CliRunner().invoke(main, ["etcd", "setup", str(model_file), *args[3:],
                                       "--dry-run"], env={"MESHXL_ETCD": "https://e:2379"})
    assert result.exit_code == 0, result.output
    assert "etcdctl user grant-role meshxl-cluster-orders meshxl-cluster-orders" in \
        result.output.splitlines()
