"""Per-node and per-site ADS credentials: the file's format (and every way it is written
wrong), what each credential allows (node ids, zones), how a stream is admitted (the
shared token, the file's tokens and certificate names, the node binding), the node-id
bound per credential and overall, and the zone as a stream's own: over a real grpc.aio
server on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
from google.protobuf.message import Message
from hypothesis import given, settings
from hypothesis import strategies as st

from meshxl.xds.auth import AdsAuth, Peer, PermissionDenied, Unauthenticated
from meshxl.xds.cache import Snapshot, SnapshotCache
from meshxl.xds.config import ControlPlaneConfig
from meshxl.xds.credentials import (
    CredentialsError,
    CredentialsFile,
    parse_credentials,
    token_sha256,
)
from meshxl.xds.metrics import XdsMetrics
from meshxl.xds.server import AdsServer
from meshxl.xds.types import CLUSTER, ENDPOINT
from tests.unit.test_xds_server import Envoy, Harness

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


def zoned_snapshot(version: int) -> Snapshot:
    """One cluster with a global EDS and an east and a west variant (each names its
    zone in the endpoint's address), all changing with ``version``."""
    def cla(zone: str) -> ClusterLoadAssignment:
        out = ClusterLoadAssignment(cluster_name="shop")
        address = out.endpoints.add().lb_endpoints.add().endpoint.address.socket_address
        address.address = {"": "127.0.0.1", "east": "127.0.0.2", "west": "127.0.0.3"}[zone]
        address.port_value = 8000 + version
        return out

    cluster = Cluster(name="shop", type=Cluster.EDS)
    cluster.eds_cluster_config.eds_config.ads.SetInParent()
    resources: dict[str, dict[str, Message]] = {CLUSTER: {"shop": cluster},
                                               ENDPOINT: {"shop": cla("")}}
    return Snapshot.build(resources, zones={z: {ENDPOINT: {"shop": cla(z)}}
                                            for z in ("east", "west")})


def zone_of(response: Any) -> str:
    cla = ClusterLoadAssignment()
    response.resources[0].Unpack(cla)
    address = cla.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address
    return {"127.0.0.1": "", "127.0.0.2": "east", "127.0.0.3": "west"}[address]


class Served(Harness):
    """The server's harness, with its port and metrics."""

    def __init__(self, cache: SnapshotCache, ads: AdsServer, channel: grpc.aio.Channel,
                 port: int, metrics: XdsMetrics) -> None:
        super().__init__(cache, ads, channel)
        self.port, self.metrics = port, metrics


@pytest.fixture
async def served() -> AsyncIterator[Any]:
    harnesses: list[tuple[Served, Any, grpc.aio.Channel]] = []

    async def start(**options: Any) -> Served:
        cache = SnapshotCache()
        metrics = XdsMetrics()
        ads = AdsServer(cache, metrics=metrics, **options)
        server, port = await ads.serve("127.0.0.1:0")
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        harness = Served(cache, ads, channel, port, metrics)
        harnesses.append((harness, server, channel))
        return harness

    yield start
    for harness, server, channel in harnesses:
        for envoy in harness.envoys:
            await envoy.stop()
        await channel.close()
        await server.stop(None)
        await harness.ads.close()


async def eds(envoy: Envoy) -> Any:
    """Ask for CDS and EDS, ACK both; the EDS response."""
    envoy.request(CLUSTER)
    envoy.ack(await envoy.recv())
    envoy.request(ENDPOINT, ["shop"])
    response = await envoy.recv()
    envoy.ack(response, ["shop"])
    return response


async def next_eds(envoy: Envoy) -> Any:
    """After a push: the CDS response ACKed, the EDS one returned (and ACKed)."""
    while True:
        response = await envoy.recv()
        if response.type_url == ENDPOINT:
            envoy.ack(response, ["shop"])
            return response
        envoy.ack(response)
        envoy.request(ENDPOINT, ["shop"], version="", nonce=response.nonce)


async def test_a_zone_is_its_streams_own_and_leaves_with_it(served: Any) -> None:
    xds = await served()
    xds.cache.set(zoned_snapshot(1))
    east = xds.envoy("edge-1", zone="east")
    assert zone_of(await eds(east)) == "east"
    hostile = xds.envoy("edge-1", zone="west")
    assert zone_of(await eds(hostile)) == "west"  # its own stream: its own zone
    xds.cache.set(zoned_snapshot(2))
    assert zone_of(await next_eds(east)) == "east"
    assert zone_of(await next_eds(hostile)) == "west"
    status = xds.ads.node_status()["edge-1"]
    assert (status["zone"], status["zones"], status["streams"]) == ("east", ["east", "west"], 2)
    await hostile.stop()
    await wait_for(lambda: xds.ads.node_status()["edge-1"]["streams"] == 1)
    xds.cache.set(zoned_snapshot(3))
    assert zone_of(await next_eds(east)) == "east"
    assert xds.ads.zones() == {"edge-1": "east"}


async def test_a_fallback_never_crosses_zones(served: Any) -> None:
    """The node's east stream ACKs east's view, then a west stream of it west's; another
    east stream rejects east's version: east falls back to what east accepted (the same
    version: an ACK outweighs), never to west's view, the node's last ACK."""
    xds = await served()
    xds.cache.set(zoned_snapshot(1))
    east = xds.envoy("edge-1", zone="east")
    assert zone_of(await eds(east)) == "east"
    west = xds.envoy("edge-1", zone="west")
    assert zone_of(await eds(west)) == "west"
    await wait_for(lambda: xds.ads.node_status()["edge-1"]["types"][ENDPOINT][
        "acked_version"] == zoned_snapshot(1).version(ENDPOINT, "west"))
    rejecter = xds.envoy("edge-1", zone="east")
    rejecter.request(CLUSTER)
    rejecter.ack(await rejecter.recv())
    rejecter.request(ENDPOINT, ["shop"])
    current = await rejecter.recv()
    assert zone_of(current) == "east"
    rejecter.nack(current, "forged rejection")
    await wait_for(lambda: xds.ads.nacks >= 1)
    east.request(ENDPOINT, ["shop"])  # asks again (a re-subscription)
    again = await east.recv()
    assert zone_of(again) == "east"
    assert again.version_info == zoned_snapshot(1).version(ENDPOINT, "east")


async def wait_for(condition: Any, within: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def refused_with(envoy: Envoy) -> tuple[grpc.StatusCode, str]:
    envoy.request(CLUSTER)
    code = await asyncio.wait_for(envoy.call.code(), 3)
    return code, await envoy.call.details()


async def test_new_node_ids_past_the_bound_are_refused(
        served: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "meshxl.xds.server")
    changes: list[str] = []

    async def record(batch: Iterable[tuple[str, dict[str, Any]]]) -> None:
        changes.extend(node for node, _ in batch)

    xds = await served(max_nodes=3, max_nodes_per_credential=2, on_status_change=record)
    xds.cache.set(zoned_snapshot(1))
    first = [xds.envoy(f"node-{i}") for i in range(3)]
    for envoy in first:
        await eds(envoy)
    code, details = await refused_with(xds.envoy("node-3"))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "3 node ids" in details and "--max-nodes" in details and "'node-3'" in details
    await eds(xds.envoy("node-0"))  # another stream of a node already counted
    await first[0].stop()
    await wait_for(lambda: xds.ads.node_status()["node-0"]["streams"] == 1)
    code, _ = await refused_with(xds.envoy("node-4"))  # node-0 still has a stream
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    await first[1].stop()
    await wait_for(lambda: xds.ads.node_status()["node-1"]["streams"] == 0)
    await eds(xds.envoy("node-5"))
    assert xds.ads.refused == {"too_many_nodes": 2}
    await wait_for(lambda: "node-5" in changes)
    assert "node-3" not in changes and "node-4" not in changes
    assert set(xds.ads.node_status()) == {f"node-{i}" for i in (0, 1, 2, 5)}
    sample = xds.metrics.registry.get_sample_value
    assert sample("meshxl_xds_streams_refused_total", {"reason": "too_many_nodes"}) == 2
    # Invented node ids do not each make a log line: one per credential and minute.
    logged = [r for r in caplog.records if "(too_many_nodes)" in r.getMessage()]
    assert len(logged) == 1, [r.getMessage() for r in logged]


async def test_the_bound_per_credential(served: Any, tmp_path: Path) -> None:
    path = tmp_path / "credentials.yaml"
    path.write_text(SITES)
    auth = AdsAuth(credentials=CredentialsFile(path))
    xds = await served(auth=auth, max_nodes_per_credential=100)
    xds.cache.set(zoned_snapshot(1))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{xds.port}")
    try:
        west = [Envoy(AuthStub(channel, WEST), f"edge-west-{i}", zone="west")
                for i in range(3)]
        xds.envoys.extend(west)
        for envoy in west[:2]:
            assert zone_of(await eds(envoy)) == "west"
        code, details = await refused_with(west[2])
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "credential 'site-west'" in details and "2 node ids" in details
        # Another credential has its own count.
        east = Envoy(AuthStub(channel, EAST), "edge-east-1", zone="east")
        xds.envoys.append(east)
        assert zone_of(await eds(east)) == "east"
        assert xds.ads.credential_counts() == {
            "site-west": {"nodes": 2, "max_nodes": 2},
            "site-east": {"nodes": 1, "max_nodes": 100}}
    finally:
        await channel.close()


class AuthStub:
    """The ADS stub, sending ``token`` on every call (as Envoy's initial_metadata)."""

    def __init__(self, channel: grpc.aio.Channel, token: str) -> None:
        from envoy.service.discovery.v3.ads_pb2_grpc import AggregatedDiscoveryServiceStub

        self._stub = AggregatedDiscoveryServiceStub(channel)
        self._metadata = tuple(bearer(token))

    def StreamAggregatedResources(self, requests: Any) -> Any:  # noqa: N802 (gRPC's name)
        return self._stub.StreamAggregatedResources(requests, metadata=self._metadata)


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
