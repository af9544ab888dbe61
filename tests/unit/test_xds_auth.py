"""Who may open an ADS stream and for which node: the rules (pure) and the configuration
that turns them on (the refusals a real server gives: tests/integration/test_xds_auth.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshxl.xds.auth import (
    AdsAuth,
    Peer,
    PermissionDenied,
    Unauthenticated,
    istio_node_namespace,
    node_namespace,
    peer_names,
    spiffe_namespace,
)
from meshxl.xds.config import ControlPlaneConfig
from tests.harness.certs import CA

TOKEN = "0123456789abcdef0123456789abcdef"


# -- the rules --------------------------------------------------------------------------


def test_token_is_checked_in_constant_form() -> None:
    auth = AdsAuth(token=TOKEN)
    auth.admit([("authorization", f"Bearer {TOKEN}")], Peer())
    auth.admit([("Authorization", f"bearer {TOKEN}")], Peer())  # case-insensitive scheme
    for metadata, words in (
        ([], "needs a token"),
        ([("authorization", f"Bearer {TOKEN[:-1]}")], "invalid token"),
        ([("authorization", f"Basic {TOKEN}")], "invalid token"),
        ([("authorization", TOKEN)], "invalid token"),
        ([("authorization", f"Bearer {TOKEN}"), ("authorization", "Bearer x")],
         "invalid token"),
    ):
        with pytest.raises(Unauthenticated, match=words):
            auth.admit(metadata, Peer())
    AdsAuth().admit([], Peer())  # no token configured: nothing asked


def test_node_id_must_be_named_by_the_certificate() -> None:
    auth = AdsAuth(binding="san")
    auth.check_node(Peer(dns=("edge-1",)), "edge-1")
    auth.check_node(Peer(uris=("spiffe://cluster.local/ns/shop/sa/cart",)), "cart-0.shop")
    auth.check_node(Peer(uris=("spiffe://cluster.local/ns/shop",)), "cart-7f9.x.shop")
    refused = [
        (Peer(dns=("edge-1",)), "edge-2"),
        (Peer(dns=("*.shop",)), "cart-0.shop"),  # no wildcards
        (Peer(dns=("EDGE-1",)), "edge-1"),  # node ids are case-sensitive
        (Peer(uris=("spiffe://cluster.local/ns/shop/sa/cart",)), "cart-0.other"),
        (Peer(uris=("spiffe://other.domain/ns/shop/sa/cart",)), "cart-0.shop"),
        (Peer(uris=("spiffe://cluster.local/ns/shop/sa/cart",)), "shop"),
        (Peer(uris=("https://cluster.local/ns/shop",)), "cart-0.shop"),
        (Peer(uris=("spiffe://cluster.local/namespace/shop",)), "cart-0.shop"),
    ]
    for peer, node_id in refused:
        with pytest.raises(PermissionDenied, match=f"does not name node id '{node_id}'"):
            auth.check_node(peer, node_id)
    with pytest.raises(PermissionDenied, match="presented none"):
        auth.check_node(Peer(), "edge-1")
    AdsAuth().check_node(Peer(), "anything")  # binding none


def test_refusal_names_what_the_certificate_names_bounded() -> None:
    peer = Peer(dns=tuple(f"n{i}" for i in range(10)) + ("x" * 1000,))
    with pytest.raises(PermissionDenied) as info:
        AdsAuth(binding="san").check_node(peer, "edge-1")
    text = str(info.value)
    assert "DNS:n0, DNS:n1, DNS:n2, DNS:n3 and 7 more" in text
    assert len(text) < 400


def test_spiffe_namespace() -> None:
    assert spiffe_namespace("spiffe://cluster.local/ns/shop/sa/a", "cluster.local") == "shop"
    assert spiffe_namespace("spiffe://td.example/ns/a-b", "td.example") == "a-b"
    for uri in ("spiffe://cluster.local/ns/Shop", "spiffe://cluster.local/ns/-a",
                "spiffe://cluster.local/ns/", "spiffe://cluster.local/sa/x/ns/shop",
                "spiffe://cluster.localx/ns/shop"):
        assert spiffe_namespace(uri, "cluster.local") is None, uri


ISTIO_NODE = "sidecar~10.4.0.7~web-5d8f7c-x2x9q.shop~shop.svc.cluster.local"
WEB = Peer(uris=("spiffe://cluster.local/ns/shop/sa/web",))


def test_istio_node_ids_bind_their_namespace() -> None:
    """An Istio proxy's node id names its namespace twice: the SPIFFE ID must name it,
    and the two fields must agree."""
    auth = AdsAuth(binding="san")
    assert auth.check_node(WEB, ISTIO_NODE) == f"URI:{WEB.uris[0]}"
    auth.check_node(WEB, "router~10.4.0.8~gw-1.a.b.shop~shop.svc.example.org")
    auth.check_node(WEB, "sidecar~::1~web.shop~shop.svc")
    for node_id in ("sidecar~10.4.0.7~web.payments~payments.svc.cluster.local",
                    "sidecar~10.4.0.7~web.shop~shop.cluster.local",  # no .svc: not Istio's
                    "sidecar~10.4.0.7~shop~shop.svc.cluster.local",  # no pod name
                    "sidecar~~web.shop~shop.svc.cluster.local",
                    "sidecar~10.4.0.7~web.shop~shop.svc.cluster.local~x",
                    "sidecar~10.4.0.7~web.Shop~Shop.svc.cluster.local"):
        with pytest.raises(PermissionDenied, match="does not name node id"):
            auth.check_node(WEB, node_id)
    # The fields disagree: refused whatever the certificate names, and said so.
    forged = "sidecar~10.4.0.7~web.shop~payments.svc.cluster.local"
    for peer in (WEB, Peer(uris=("spiffe://cluster.local/ns/payments/sa/web",)),
                 Peer(dns=(forged,))):
        with pytest.raises(PermissionDenied,
                           match="names namespace 'shop' after the pod's name and "
                                 "'payments' in its DNS domain"):
            auth.check_node(peer, forged)
    # The meshxl forms are unchanged by the Istio one.
    assert node_namespace("cart-0.shop") == "shop" and node_namespace("edge-1") is None
    assert node_namespace("a.") is None and node_namespace(ISTIO_NODE) == "shop"


_LABEL = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?", fullmatch=True)


@given(kind=st.sampled_from(["sidecar", "router"]), pod=_LABEL,
       ip=st.ip_addresses().map(str), namespace=_LABEL, other=_LABEL,
       domain=st.sampled_from(["", ".cluster.local", ".mesh.example"]))
def test_istio_node_ids_generated(kind: str, pod: str, ip: str, namespace: str,
                                  other: str, domain: str) -> None:
    node_id = f"{kind}~{ip}~{pod}.{namespace}~{namespace}.svc{domain}"
    assert istio_node_namespace(node_id) == (namespace, namespace)
    auth = AdsAuth(binding="san")
    own = Peer(uris=(f"spiffe://cluster.local/ns/{namespace}/sa/{pod}",))
    foreign = Peer(uris=(f"spiffe://cluster.local/ns/{other}/sa/{pod}",))
    assert auth.check_node(own, node_id) == f"URI:{own.uris[0]}"
    if other != namespace:
        with pytest.raises(PermissionDenied, match="does not name node id"):
            auth.check_node(foreign, node_id)
        mixed = f"{kind}~{ip}~{pod}.{namespace}~{other}.svc{domain}"
        assert istio_node_namespace(mixed) == (namespace, other)
        for peer in (own, foreign):
            with pytest.raises(PermissionDenied, match="names namespace"):
                auth.check_node(peer, mixed)


def test_peer_names_from_grpc_auth_context() -> None:
    peer = peer_names({"peer_dns": [b"edge-1"], "peer_uri": [b"spiffe://a/ns/b"],
                       "x509_common_name": [b"ignored"]}, "ipv4:127.0.0.1:5")
    assert peer == Peer("ipv4:127.0.0.1:5", ("edge-1",), ("spiffe://a/ns/b",))
    assert not peer_names({}).certified


def test_configuration(tmp_path: Path) -> None:
    model = tmp_path / "m.yaml"
    model.write_text("clusters: []\n")
    ca = CA(tmp_path / "ca")
    server = ca.issue("xds", client=False)
    tls = {"tls_cert": server.cert, "tls_key": server.key}
    assert ControlPlaneConfig(config_path=model).auth() == AdsAuth()
    assert ControlPlaneConfig(config_path=model, client_ca=ca.cert, **tls).auth().binding \
        == "san"
    assert ControlPlaneConfig(config_path=model, client_ca=ca.cert, node_binding="none",
                              **tls).auth().binding == "none"
    with pytest.raises(ValueError, match="needs client certificates"):
        ControlPlaneConfig(config_path=model, node_binding="san", **tls)
    with pytest.raises(ValueError, match="in clear"):
        ControlPlaneConfig(config_path=model, listen="0.0.0.0:18000", token=TOKEN)
    with pytest.raises(ValueError, match="16 to 4096"):
        ControlPlaneConfig(config_path=model, token="short")
    with pytest.raises(ValueError, match="trust-domain"):
        ControlPlaneConfig(config_path=model, trust_domain="Bad Domain")
    ControlPlaneConfig(config_path=model, listen="127.0.0.1:18000", token=TOKEN)
    ControlPlaneConfig(config_path=model, listen="0.0.0.0:18000", token=TOKEN, **tls)


# -- a real server ------------------------------------------------------------------------



# -- the commands ---------------------------------------------------------------------------


def test_serve_xds_authentication_flag_errors(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from meshxl.cli import main
    from tests.unit.test_security import one_line

    model = tmp_path / "model.yaml"
    model.write_text("clusters: []\n")
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    short = tmp_path / "short"
    short.write_text("abc\n")
    runner = CliRunner()
    for args, message in (
        (["--node-binding", "san"], "--node-binding san needs client certificates"),
        (["--listen", "0.0.0.0:0", "--token-file", str(token)], "would cross the network in "
         "clear"),
        (["--token-file", str(short)], "must be 16 to 4096 characters long"),
        (["--trust-domain", "Not A Domain", "--node-binding", "none"], "bad --trust-domain"),
    ):
        result = runner.invoke(main, ["serve", "xds", "--config", str(model), *args])
        assert result.exit_code == 1 and message in one_line(result), (args, result.output)
    both = runner.invoke(main, ["serve", "xds", "--config", str(model), "--token-file",
                                str(token)], env={"MESHXL_XDS_TOKEN": TOKEN})
    assert "give the token once" in one_line(both)


def test_bootstrap_sends_the_token_from_its_file(tmp_path: Path) -> None:
    import yaml
    from click.testing import CliRunner

    from meshxl.cli import main
    from tests.unit.test_security import one_line

    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    runner = CliRunner()
    result = runner.invoke(main, ["bootstrap", "--node-id", "edge-1", "--xds",
                                  "127.0.0.1:18000", "--xds-token-file", str(token)])
    assert result.exit_code == 0, result.output
    (service,) = yaml.safe_load(result.output)["dynamic_resources"]["ads_config"][
        "grpc_services"]
    assert service["initial_metadata"] == [{"key": "authorization",
                                            "value": f"Bearer {TOKEN}"}]
    missing = runner.invoke(main, ["bootstrap", "--node-id", "edge-1", "--xds",
                                   "127.0.0.1:18000", "--xds-token-file",
                                   str(tmp_path / "none")])
    assert missing.exit_code == 1 and "cannot read the token file" in one_line(missing)
