"""deploy/kubernetes without cert-manager, sessions sharded: `make-certs.sh` with
MESHXL_ETCD_SHARDS issues each shard's serving and peer certificates from etcd's CA,
shaped as the main cluster's, and overlays/session-shards-self-signed mounts exactly
the files it wrote (docs/kubernetes.md, "Session shards").

The script runs for real (openssl); the certificates are checked with `cryptography`
and by TLS handshakes in memory (Python's ssl, OpenSSL's own chain, purpose and host
name checks) between the identities etcd's members and clients present.
"""

from __future__ import annotations

import base64
import os
import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshxl.errors import InputError
from meshxl.etcd.shards import parse_shard_map
from tests.integration import test_manifests as manifests
from tests.integration.test_manifests import (
    NAMESPACE,
    SHARDS,
    Docs,
    Render,
    _arg,
    _find,
    _workloads,
)
from tests.integration.test_manifests_etcd_tls import _container, _secret_of

# The overlays rendered once per module, from a copy where make-certs.sh ran with
# MESHXL_ETCD_SHARDS="s1 s2".
tree = manifests.tree
render = manifests.render

OVERLAY = "session-shards-self-signed"
SCRIPT = Path("components") / "self-signed" / "make-certs.sh"
ETCD = Path("components") / "self-signed" / "certs" / "etcd"
SHARDED = Path("components") / "self-signed" / "session-shards" / "certs" / "etcd"
#: Where each file etcd is given comes from in a shard's Secrets (flag: file stem).
SHARD_FILES = {"--cert-file": "server.crt", "--key-file": "server.key",
               "--trusted-ca-file": "ca.crt", "--peer-cert-file": "peer.crt",
               "--peer-key-file": "peer.key", "--peer-trusted-ca-file": "ca.crt"}


def _run(root: Path, shards: str | None = None,
         *args: str) -> subprocess.CompletedProcess[str]:
    """make-certs.sh of the tree ``root``, with MESHXL_ETCD_SHARDS=``shards`` (unset:
    None), whatever the caller's environment holds."""
    env = {k: v for k, v in os.environ.items() if k != "MESHXL_ETCD_SHARDS"}
    if shards is not None:
        env["MESHXL_ETCD_SHARDS"] = shards
    return subprocess.run(["bash", str(root / SCRIPT), *args], capture_output=True,
                          text=True, timeout=60, check=False, env=env)


def _fresh(tree: Path, tmp_path: Path) -> Path:
    """deploy/kubernetes as committed (no certificates), in ``tmp_path``."""
    copy_ = tmp_path / "kubernetes"
    shutil.copytree(tree, copy_, ignore=shutil.ignore_patterns(
        "certs", "single-node-*", "derived-*"))
    return copy_


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _dns_names(cert: x509.Certificate) -> set[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(san.get_values_for_type(x509.DNSName))


def _common_name(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def _usages(cert: x509.Certificate) -> set[str]:
    """The extended key usages, as cert-manager's Certificates spell them."""
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    names = {ExtendedKeyUsageOID.SERVER_AUTH: "server auth",
             ExtendedKeyUsageOID.CLIENT_AUTH: "client auth"}
    return {names.get(u, u.dotted_string) for u in eku}


def _decoded(secret: dict[str, Any], key: str) -> bytes:
    return base64.b64decode("".join(secret["data"][key].split()))


def _shard_statefulsets(docs: Docs) -> dict[str, dict[str, Any]]:
    """Shard name: its StatefulSet (meshxl-etcd-SHARD)."""
    return {w["metadata"]["name"].removeprefix("meshxl-etcd-"): w for w in _workloads(docs)
            if w["kind"] == "StatefulSet" and w["metadata"]["name"] != "meshxl-etcd"
            and _container(w)["command"] == ["etcd"]}


def _member_hosts(statefulset: dict[str, Any]) -> list[str]:
    """The name each member is dialled by (peers and clients alike), from the
    StatefulSet's own --initial-cluster."""
    urls = [m.split("=", 1)[1] for m in
            _arg(_container(statefulset), "--initial-cluster").split(",")]
    return [str(urlsplit(u.replace("$(POD_NAMESPACE)", NAMESPACE)).hostname) for u in urls]


# -- TLS handshakes in memory ---------------------------------------------------------------


def _server(certs: Path, stem: str, ca: Path) -> ssl.SSLContext:
    """An etcd member serving ``stem`` and requiring a client certificate from ``ca``
    (--client-cert-auth / --peer-client-cert-auth)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs / f"{stem}.crt", certs / f"{stem}.key")
    context.load_verify_locations(ca)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def _client(certs: Path, stem: str, ca: Path) -> ssl.SSLContext:
    """A client (or a peer dialling) with ``stem``'s certificate, checking the server
    against ``ca`` and the name it dials."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_cert_chain(certs / f"{stem}.crt", certs / f"{stem}.key")
    context.load_verify_locations(ca)
    return context


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext, host: str) -> str:
    """A full TLS handshake between the two over memory buffers, the client dialling
    ``host``; the common name of the client certificate the server accepted."""
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    server_in, server_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls_client = client.wrap_bio(to_client, to_server, server_hostname=host)
    tls_server = server.wrap_bio(server_in, server_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(16):
        for side, end in (("client", tls_client), ("server", tls_server)):
            if not done[side]:
                try:
                    end.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
        server_in.write(to_server.read())
        to_client.write(server_out.read())
        if all(done.values()):
            break
    assert all(done.values()), f"handshake with {host} did not finish: {done}"
    peer = tls_server.getpeercert(binary_form=True)
    assert peer, "the server accepted no client certificate"
    return _common_name(x509.load_der_x509_certificate(peer))


# -- the certificates ------------------------------------------------------------------------


def test_each_shard_gets_etcds_certificates_under_its_names(tree: Path,
                                                           render: Render) -> None:
    """From etcd's CA, with the common names, host names and usages the cert-manager
    Certificates of the same Secrets have; and the main cluster's, which the same code
    issues, still those of its Certificates."""
    etcd, sharded = tree / ETCD, tree / SHARDED
    ca = _cert(etcd / "ca.crt")
    assert (sharded / "ca.crt").read_bytes() == (etcd / "ca.crt").read_bytes()
    issued = {d["spec"]["secretName"]: d for d in render("session-shards")
              if d["kind"] == "Certificate"}
    issued.update({d["spec"]["secretName"]: d for d in render("default")
                   if d["kind"] == "Certificate"})
    files = {f"meshxl-etcd-{s}-{use}-tls": sharded / f"{s}-{use}"
             for s in SHARDS for use in ("server", "peer")}
    files |= {f"meshxl-etcd-{use}-tls": etcd / use for use in ("server", "peer")}
    for secret, stem in files.items():
        cert = _cert(stem.with_suffix(".crt"))
        cert.verify_directly_issued_by(ca)
        spec = issued[secret]["spec"]
        assert _common_name(cert) == spec["commonName"], secret
        assert _dns_names(cert) == set(spec["dnsNames"]), secret
        assert _usages(cert) == set(spec["usages"]) & {"server auth", "client auth"} \
            == {"server auth", "client auth"}, secret
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        assert constraints.ca is False, secret
        # The key next to it is the certificate's, and readable by its owner only.
        key = load_pem_private_key(stem.with_suffix(".key").read_bytes(), password=None)
        assert key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo) \
            == cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        assert stem.with_suffix(".key").stat().st_mode & 0o077 == 0, secret
    # Every shard's certificates differ from the others' (names, keys).
    assert len({_cert(f.with_suffix(".crt")).public_key().public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo) for f in files.values()}) == len(files)


def test_shard_members_and_clients_handshake(tree: Path, render: Render) -> None:
    """What a shard's members and clients do, done with the files: a client with meshxl's
    or a sidecar's (its cluster's) certificate dials each member by its name and the client Service;
    members dial each other with the shard's peer certificate, whose common name is the
    one the shard admits (--peer-cert-allowed-cn)."""
    etcd, sharded = tree / ETCD, tree / SHARDED
    ca = etcd / "ca.crt"
    statefulsets = _shard_statefulsets(render(OVERLAY))
    assert sorted(statefulsets) == sorted(SHARDS)
    hosts = {s: _member_hosts(w) for s, w in statefulsets.items()}
    assert "meshxl-etcd-s1-0.meshxl-etcd-s1-peer.meshxl-system.svc" in hosts["s1"]
    for shard, statefulset in statefulsets.items():
        assert len(hosts[shard]) == statefulset["spec"]["replicas"] == 3
        serving = _server(sharded, f"{shard}-server", ca)
        for client, user in (("system", "meshxl-system"),
                             ("cluster-orders", "meshxl-cluster-orders")):
            for host in [*hosts[shard], f"meshxl-etcd-{shard}.{NAMESPACE}.svc"]:
                common_name = _handshake(serving, _client(etcd, client, ca), host)
                assert common_name == user, (shard, host)
        peer = _server(sharded, f"{shard}-peer", ca)
        allowed = _arg(_container(statefulset), "--peer-cert-allowed-cn")
        for host in hosts[shard]:
            assert _handshake(peer, _client(sharded, f"{shard}-peer", ca), host) == allowed


def test_a_shards_certificates_are_good_for_that_shard_only(tree: Path,
                                                             render: Render) -> None:
    """A shard's serving or peer certificate does not pass for a member of another
    cluster (host name), nor is its peer certificate admitted by another cluster
    (common name): clusters stay apart though one CA signs them all."""
    etcd, sharded = tree / ETCD, tree / SHARDED
    ca = etcd / "ca.crt"
    docs = render(OVERLAY)
    statefulsets = _shard_statefulsets(docs)
    main = _find(docs, "StatefulSet", "meshxl-etcd")
    clusters = {**{s: (sharded, f"{s}-") for s in statefulsets}, "": (etcd, "")}
    admitted = {s: _arg(_container(w), "--peer-cert-allowed-cn")
                for s, w in statefulsets.items()}
    admitted[""] = _arg(_container(main), "--peer-cert-allowed-cn")
    hosts = {s: _member_hosts(w) for s, w in statefulsets.items()}
    hosts[""] = _member_hosts(main)
    assert len(set(admitted.values())) == len(admitted) == len(SHARDS) + 1
    for owner, (directory, prefix) in clusters.items():
        common_name = _handshake(_server(directory, f"{prefix}peer", ca),
                                 _client(directory, f"{prefix}peer", ca), hosts[owner][0])
        assert common_name == admitted[owner]
        for other in clusters:
            if other == owner:
                continue
            assert common_name != admitted[other], (owner, other)
            for use in ("server", "peer"):
                with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
                    _handshake(_server(directory, f"{prefix}{use}", ca),
                               _client(etcd, "system", ca), hosts[other][0])


# -- the overlay -----------------------------------------------------------------------------


def test_the_overlay_mounts_exactly_what_the_script_wrote(tree: Path, render: Render) -> None:
    """Each file etcd is given in a shard's pods is the file make-certs.sh wrote for that
    shard; every file it wrote is mounted; the Secrets are the ones the shards' volumes
    name, and the cert-manager overlay's Certificates fill Secrets of the same names."""
    sharded = tree / SHARDED
    docs = render(OVERLAY)
    statefulsets = _shard_statefulsets(docs)
    mounted: set[Path] = set()
    volumes: set[str] = set()
    for shard, statefulset in statefulsets.items():
        container = _container(statefulset)
        for flag, name in SHARD_FILES.items():
            path = _arg(container, flag)
            secret = _secret_of(statefulset, container, path)
            assert secret.startswith(f"meshxl-etcd-{shard}-"), (shard, flag, secret)
            wrote = sharded / (name if name == "ca.crt" else f"{shard}-{name}")
            assert _decoded(_find(docs, "Secret", secret), Path(path).name) == \
                wrote.read_bytes(), (shard, flag)
            mounted.add(wrote)
            volumes.add(secret)
    assert mounted == set(sharded.iterdir())
    secrets = {d["metadata"]["name"] for d in docs if d["kind"] == "Secret"
               and d["metadata"]["name"].startswith(tuple(f"meshxl-etcd-{s}-"
                                                           for s in SHARDS))}
    assert secrets == volumes == {f"meshxl-etcd-{s}-{use}-tls" for s in SHARDS
                                  for use in ("server", "peer")}
    # The Secrets cert-manager fills in the other shard overlay.
    main = {d["metadata"]["name"] for d in render("default") if d["kind"] == "Certificate"}
    assert volumes == {d["spec"]["secretName"] for d in render("session-shards")
                       if d["kind"] == "Certificate" and d["metadata"]["name"] not in main}
    # etcd's CA key stays in certs/etcd/: in no Secret.
    ca_key = (tree / ETCD / "ca.key").read_bytes()
    assert not [s for s in docs if s["kind"] == "Secret"
                for key in s["data"] if _decoded(s, key) == ca_key]


# -- the script's interface --------------------------------------------------------------


def test_without_shards_the_script_writes_what_it_always_did(tree: Path,
                                                             tmp_path: Path) -> None:
    """MESHXL_ETCD_SHARDS unset or empty: no shard files, the same files as before; the
    shards' overlay then names the file it misses."""
    copy_ = _fresh(tree, tmp_path)
    for shards in (None, ""):
        proc = _run(copy_, shards)
        assert proc.returncode == 0, proc.stderr
        assert not (copy_ / SHARDED).parent.exists()
        # What it says it wrote: the webhook's, etcd's and the control plane's only.
        assert len(proc.stdout.splitlines()) == 3 and "session-shards" not in proc.stdout
    certs = copy_ / "components" / "self-signed" / "certs"
    assert sorted(str(p.relative_to(certs)) for p in certs.rglob("*.crt")) == [
        "ca.crt", "etcd/ca.crt", "etcd/cluster-orders.crt", "etcd/peer.crt", "etcd/root.crt",
        "etcd/server.crt", "etcd/system.crt", "tls.crt", "xds/ca.crt", "xds/server.crt"]
    proc = subprocess.run([manifests._kubectl(), "kustomize", str(copy_ / "overlays" / OVERLAY)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode != 0 and "s1-server.crt" in proc.stderr


def test_renewing_keeps_etcds_ca_and_leaves_unlisted_shards_alone(tree: Path,
                                                                  tmp_path: Path) -> None:
    copy_ = _fresh(tree, tmp_path)
    sharded, etcd = copy_ / SHARDED, copy_ / ETCD
    assert _run(copy_, "s1,s2").returncode == 0  # commas or spaces
    assert sorted(p.name for p in sharded.iterdir()) == [
        "ca.crt", "s1-peer.crt", "s1-peer.key", "s1-server.crt", "s1-server.key",
        "s2-peer.crt", "s2-peer.key", "s2-server.crt", "s2-server.key"]
    before = {p.name: p.read_bytes() for p in sharded.iterdir()}
    ca_pem = (etcd / "ca.crt").read_bytes()
    assert before["ca.crt"] == ca_pem
    # Renewed: new leaves under the same CA.
    assert _run(copy_, " s1  s2 ").returncode == 0
    assert (etcd / "ca.crt").read_bytes() == (sharded / "ca.crt").read_bytes() == ca_pem
    ca = x509.load_pem_x509_certificate(ca_pem)
    for name in ("s1-server", "s1-peer", "s2-server", "s2-peer"):
        leaf = (sharded / f"{name}.crt").read_bytes()
        assert leaf != before[f"{name}.crt"], name
        x509.load_pem_x509_certificate(leaf).verify_directly_issued_by(ca)
    # A run that lists one shard renews that one; the others' files stay as they were.
    renewed = {p.name: p.read_bytes() for p in sharded.iterdir()}
    assert _run(copy_, "s2").returncode == 0
    now = {p.name: p.read_bytes() for p in sharded.iterdir()}
    assert {n for n in now if now[n] != renewed[n]} == {
        "s2-server.crt", "s2-server.key", "s2-peer.crt", "s2-peer.key"}
    # A run without shards (the webhook's or a namespace's certificate) leaves them all.
    assert _run(copy_, None, "shop").returncode == 0
    assert {p.name: p.read_bytes() for p in sharded.iterdir()} == now
    assert (etcd / "ca.crt").read_bytes() == ca_pem


@pytest.mark.parametrize("shards", ["S1", "s_1", "s1 -s2", "s2-", "a" * 33, "s1/../x"])
def test_shard_names_meshxl_would_refuse_are_refused_before_anything_is_written(
        shards: str, tree: Path, tmp_path: Path) -> None:
    # Names meshxl itself refuses for a shard map.
    with pytest.raises(InputError):
        parse_shard_map({"shards": [{"name": name, "etcd": f"https://{i}:2379"}
                                    for i, name in enumerate(shards.split())]})
    copy_ = _fresh(tree, tmp_path)
    proc = _run(copy_, shards)
    assert proc.returncode == 2
    assert "is not a shard name" in proc.stderr
    assert not (copy_ / "components" / "self-signed" / "certs").exists()
    assert not (copy_ / SHARDED).parent.exists()


def test_the_longest_shard_name_meshxl_accepts_is_accepted(tree: Path,
                                                           tmp_path: Path) -> None:
    name = "a" * 32
    parse_shard_map({"shards": [{"name": name, "etcd": "https://x:2379"}]})
    copy_ = _fresh(tree, tmp_path)
    assert _run(copy_, name).returncode == 0
    peer = _cert(copy_ / SHARDED / f"{name}-peer.crt")
    assert _common_name(peer) == f"meshxl-etcd-{name}-peer"
