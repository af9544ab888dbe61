"""Per-node and per-site ADS credentials: the file's format (and every way it is written
wrong), what each credential allows (node ids, zones), how a stream is admitted (the
shared token, the file's tokens and certificate names, the node binding), the node-id
bound per credential and overall (over a real server:
tests/integration/test_xds_credentials.py)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from meshxl.xds.auth import AdsAuth, Peer, PermissionDenied, Unauthenticated
from meshxl.xds.config import ControlPlaneConfig
from meshxl.xds.credentials import (
    CredentialsError,
    CredentialsFile,
    parse_credentials,
    token_sha256,
)

EAST = "east-token-0123456789abcdef0123"
WEST = "west-token-0123456789abcdef0123"
SHARED = "shared-token-0123456789abcdef01"


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def text(*entries: dict[str, Any]) -> str:
    return yaml.safe_dump({"credentials": list(entries)})


SITES = text(
    {"name": "site-east", "token_sha256": token_sha256(EAST), "nodes": ["edge-east-*"],
     "zones": ["east"]},
    {"name": "site-west", "token_sha256": token_sha256(WEST), "nodes": ["edge-west-*"],
     "zones": ["west"], "max_nodes": 2},
    {"name": "east-mesh", "san_uri": "spiffe://cluster.local/ns/edge/sa/envoy-east",
     "nodes": ["*.edge"], "zones": ["east", ""]},
    {"name": "lab", "san_dns": "lab-1.example", "nodes": ["lab-1"]},
)


# -- the file ---------------------------------------------------------------------------


def test_a_token_is_named_by_its_sha256() -> None:
    assert token_sha256(EAST) == hashlib.sha256(EAST.encode()).hexdigest()
    creds = parse_credentials(SITES, "c.yaml")
    assert [c.name for c in creds.entries] == ["site-east", "site-west", "east-mesh", "lab"]
    assert creds.for_token(EAST) is creds.entries[0]
    assert creds.for_token(WEST + "x") is None
    assert creds.has_tokens
    assert creds.for_peer(Peer(uris=("spiffe://cluster.local/ns/edge/sa/envoy-east",))) \
        == (creds.entries[2],)
    assert creds.for_peer(Peer(dns=("lab-1.example", "other"))) == (creds.entries[3],)
    assert creds.for_peer(Peer(dns=("LAB-1.example",))) == ()  # exact, as the binding


@pytest.mark.parametrize(("entries", "words"), [
    ([{"name": "a", "nodes": ["x"]}], "exactly one of token_sha256, san_dns, san_uri"),
    ([{"name": "a", "token_sha256": "0" * 64, "san_dns": "x", "nodes": ["x"]}],
     "exactly one of"),
    ([{"name": "a", "token_sha256": "abc", "nodes": ["x"]}], "64 hexadecimal"),
    ([{"name": "a", "token_sha256": "0" * 64}], "nodes"),
    ([{"name": "a", "token_sha256": "0" * 64, "nodes": []}], "nodes"),
    ([{"name": "a", "token_sha256": "0" * 64, "nodes": ["x"], "colour": "red"}], "colour"),
    ([{"name": "A b", "token_sha256": "0" * 64, "nodes": ["x"]}], "name"),
    ([{"name": "shared", "token_sha256": "0" * 64, "nodes": ["x"]}], "reserved"),
    ([{"name": "a", "token_sha256": "0" * 64, "nodes": ["x"]},
      {"name": "a", "token_sha256": "1" * 64, "nodes": ["x"]}], "duplicate name 'a'"),
    ([{"name": "a", "token_sha256": "0" * 64, "nodes": ["x"]},
      {"name": "b", "token_sha256": "0" * 64, "nodes": ["x"]}], "the same token as 'a'"),
    ([{"name": "a", "san_dns": "x", "nodes": ["x"]},
      {"name": "b", "san_dns": "x", "nodes": ["x"]}], "the same certificate name as 'a'"),
    ([{"name": "a", "token_sha256": "0" * 64, "nodes": ["x"], "max_nodes": 0}], "max_nodes"),
    ([{"name": "a", "token_sha256": "0" * 64, "nodes": ["x"], "max_nodes": float("nan")}],
     "max_nodes: expected a whole number"),
    ([{"name": "a", "token_sha256": "0" * 64, "nodes": ["x"], "max_nodes": float("inf")}],
     "max_nodes: expected a whole number"),
    ([{"name": "a", "token_sha256": "0" * 64, "nodes": ["x"], "max_nodes": 10**30}],
     "max_nodes: expected a whole number"),
    ([{"name": "a", "token_sha256": "0" * 64, "nodes": ["x" * 300]}], "nodes"),
    ([{"name": "a", "token_sha256": "0" * 64, "nodes": ["x"], "zones": ["e\nw"]}], "zones"),
])
def test_a_bad_file_is_one_line_naming_the_entry_and_field(entries: list[Any],
                                                           words: str) -> None:
    with pytest.raises(CredentialsError) as info:
        parse_credentials(text(*entries), "c.yaml")
    message = str(info.value)
    assert message.startswith("c.yaml: ") and words in message, message
    assert "\n" not in message


@pytest.mark.parametrize(("source", "words"), [
    ("", "no credentials"), ("credentials: []\n", "no credentials"), ("- a\n", "a mapping"),
    ("credentials: {a: 1}\n", "a list"), ("credentials: [\n", "not YAML"),
    ("a: &a [*a]\n", "YAML"),
])
def test_what_is_no_credentials_file_at_all(source: str, words: str) -> None:
    with pytest.raises(CredentialsError, match=words):
        parse_credentials(source, "c.yaml")


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=300))
def test_any_text_is_credentials_or_one_clear_error(source: str) -> None:
    try:
        parse_credentials(source, "c.yaml")
    except CredentialsError as exc:
        assert str(exc).startswith("c.yaml: ") and "\n" not in str(exc)


def test_the_file_is_read_again_when_it_changes_and_a_bad_one_keeps_the_last(
        tmp_path: Path) -> None:
    path = tmp_path / "credentials.yaml"
    path.write_text(SITES)
    loaded = CredentialsFile(path, recheck=0.0)
    assert loaded.current().for_token(EAST) is not None
    path.write_text(text({"name": "only", "token_sha256": token_sha256(WEST),
                          "nodes": ["*"]}))
    os.utime(path, ns=(1, 1))  # a new stamp even within the clock's resolution
    assert loaded.current().for_token(EAST) is None
    assert loaded.current().for_token(WEST) is not None
    path.write_text("credentials: [\n")
    os.utime(path, ns=(2, 2))
    assert loaded.current().for_token(WEST) is not None  # the last good one
    assert loaded.reloads == 1 and "not YAML" in (loaded.error or "")
    with pytest.raises(CredentialsError, match="cannot read"):
        CredentialsFile(tmp_path / "missing.yaml")


# -- what a credential allows ------------------------------------------------------------


def auth_for(tmp_path: Path, source: str = SITES, **options: Any) -> AdsAuth:
    path = tmp_path / "credentials.yaml"
    path.write_text(source)
    return AdsAuth(credentials=CredentialsFile(path), **options)


def test_a_site_token_speaks_for_its_nodes_in_its_zone(tmp_path: Path) -> None:
    auth = auth_for(tmp_path)
    grant = auth.admit(bearer(EAST), Peer())
    assert [c.name for c in grant.credentials] == ["site-east"]
    assert auth.authorize(grant, Peer(), "edge-east-1", "east") == [("site-east", None)]
    for node_id, zone, words in (
            ("edge-west-1", "west", "may not speak for node id 'edge-west-1'"),
            ("edge-east-1", "west", "may not declare zone 'west'"),
            ("edge-east-1", "", "may not declare zone ''"),
            ("xedge-east-1", "east", "'edge-east-*'")):
        with pytest.raises(PermissionDenied) as info:
            auth.authorize(grant, Peer(), node_id, zone)
        assert words in str(info.value) and "'site-east'" in str(info.value)
    west = auth.admit(bearer(WEST), Peer())
    assert auth.authorize(west, Peer(), "edge-west-9", "west") == [("site-west", 2)]


def test_admission_by_token_shared_token_and_certificate_names(tmp_path: Path) -> None:
    auth = auth_for(tmp_path, token=SHARED)
    # The shared token still speaks for any node, in any zone.
    grant = auth.admit(bearer(SHARED), Peer())
    assert auth.authorize(grant, Peer(), "anything", "anywhere") == [("shared", None)]
    with pytest.raises(Unauthenticated, match="invalid token"):
        auth.admit(bearer("not-a-known-token-0123456789"), Peer())
    with pytest.raises(Unauthenticated, match="needs a token"):
        auth.admit([], Peer())
    # A certificate the file names needs no token, and is bound by its entry.
    mesh = Peer(uris=("spiffe://cluster.local/ns/edge/sa/envoy-east",))
    grant = auth.admit([], mesh)
    assert auth.authorize(grant, mesh, "pod-1.edge", "") == [("east-mesh", None)]
    with pytest.raises(PermissionDenied, match="may not declare zone 'west'"):
        auth.authorize(grant, mesh, "pod-1.edge", "west")
    # A token and a certificate: both apply.
    grant = auth.admit(bearer(EAST), mesh)
    with pytest.raises(PermissionDenied, match="'east-mesh'"):
        auth.authorize(grant, mesh, "edge-east-1", "east")


def test_without_tokens_in_the_file_a_stream_needs_none(tmp_path: Path) -> None:
    auth = auth_for(tmp_path, text({"name": "lab", "san_dns": "lab-1", "nodes": ["lab-1"]}))
    grant = auth.admit([], Peer())
    assert [c.name for c in grant.credentials] == ["anonymous"]
    assert auth.authorize(grant, Peer(), "x", "y") == [("anonymous", None)]
    # A token sent to a control plane that asks none is not looked at.
    assert [c.name for c in auth.admit(bearer(EAST), Peer()).credentials] == ["anonymous"]


def test_the_node_binding_counts_a_certificate_as_its_own_credential(tmp_path: Path) -> None:
    auth = auth_for(tmp_path, binding="san")
    edge = Peer(dns=("edge-7",))
    grant = auth.admit([], edge)
    assert auth.authorize(grant, edge, "edge-7", "west") == [("DNS:edge-7", None)]
    with pytest.raises(PermissionDenied, match="does not name node id"):
        auth.authorize(grant, edge, "edge-8", "")
    shop = Peer(uris=("spiffe://cluster.local/ns/shop/sa/cart",))
    assert auth.authorize(auth.admit([], shop), shop, "cart-0.shop", "") == [
        ("URI:spiffe://cluster.local/ns/shop/sa/cart", None)]
    # A certificate the file names is bound by its entry instead.
    lab = Peer(dns=("lab-1.example",))
    assert auth.authorize(auth.admit([], lab), lab, "lab-1", "x") == [("lab", None)]


def test_configuration_checks_the_credentials(tmp_path: Path) -> None:
    from tests.harness.certs import CA

    model = tmp_path / "m.yaml"
    model.write_text("clusters: []\n")
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(text({"name": "site-east", "token_sha256": token_sha256(EAST),
                            "nodes": ["edge-east-*"]}))
    config = ControlPlaneConfig(config_path=model, credentials=tokens)
    assert config.auth().credentials is not None
    with pytest.raises(ValueError, match="in clear"):
        ControlPlaneConfig(config_path=model, listen="0.0.0.0:18000", credentials=tokens)
    ca = CA(tmp_path / "ca")
    server = ca.issue("xds", client=False)
    tls = {"tls_cert": server.cert, "tls_key": server.key}
    ControlPlaneConfig(config_path=model, listen="0.0.0.0:18000", credentials=tokens, **tls)
    path = tmp_path / "credentials.yaml"
    path.write_text(SITES)
    with pytest.raises(ValueError, match="certificate names.*--client-ca"):
        ControlPlaneConfig(config_path=model, credentials=path, **tls)
    assert ControlPlaneConfig(config_path=model, credentials=path, client_ca=ca.cert,
                              **tls).auth().binding == "san"
    with pytest.raises(ValueError, match="max_nodes|--max-nodes"):
        ControlPlaneConfig(config_path=model, max_nodes=0)
    (tmp_path / "bad.yaml").write_text("credentials: [\n")
    with pytest.raises(ValueError, match="bad.yaml: not YAML"):
        ControlPlaneConfig(config_path=model, credentials=tmp_path / "bad.yaml")


# -- a real server: zones per stream, bounds per credential ---------------------------------




def test_serve_xds_credentials_flag_errors(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from meshxl.cli import main
    from tests.unit.test_security import one_line

    model = tmp_path / "model.yaml"
    model.write_text("clusters: []\n")
    good = tmp_path / "good.yaml"
    good.write_text(text({"name": "site-east", "token_sha256": token_sha256(EAST),
                          "nodes": ["*"]}))
    bad = tmp_path / "bad.yaml"
    bad.write_text(text({"name": "site-east", "token_sha256": "nope", "nodes": ["*"]}))
    runner = CliRunner()
    for args, message in (
        (["--credentials", str(bad)], "bad.yaml: credentials[0]: token_sha256 must be 64"),
        (["--credentials", str(tmp_path / "none.yaml")], "cannot read"),
        (["--credentials", str(good), "--listen", "0.0.0.0:0"], "in clear"),
    ):
        result = runner.invoke(main, ["serve", "xds", "--config", str(model), *args])
        assert message in one_line(result), (args, result.output)
    usage = runner.invoke(main, ["serve", "xds", "--config", str(model), "--max-nodes", "0"])
    assert usage.exit_code == 2 and "--max-nodes" in usage.output


def test_the_documented_example_is_a_valid_file() -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "security.md").read_text()
    start = docs.index("# /etc/meshxl/xds/credentials.yaml")
    example = docs[start:docs.index("```", start)]
    creds = parse_credentials(example, "docs/security.md")
    assert [c.name for c in creds.entries] == ["site-east", "site-west", "east-mesh"]
    east = creds.entries[0]
    assert east.refusal("edge-east-1", "east") is None
    assert east.refusal("edge-east-1", "west") is not None
