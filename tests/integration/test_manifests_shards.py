"""deploy/kubernetes, overlays/session-shards and session-shards-self-signed: sessions
over two more etcd clusters (docs/scaling.md, "Past one etcd cluster";
docs/kubernetes.md, "Session shards"), with certificates from cert-manager or from
make-certs.sh; every check here is made on both.

Each shard is the main etcd under names of its own (same TLS, same CA, its own cluster
token and peer certificate). The Job that stores the shard map runs a command line the
real ``meshxl`` parses, naming every member of every shard by the names the shard's
Services give it, with a client certificate every cluster accepts; run again, it
writes nothing. Rendered with `kubectl kustomize` (the fixtures of test_manifests).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import kubernetes_validate
import pytest
from aetcd import rpc

from meshxl.cli import main
from meshxl.cli.ops import _shard_option
from meshxl.cli.options import _ETCD_META
from meshxl.errors import Conflict
from meshxl.etcd import parse_urls
from meshxl.etcd.keys import DEFAULT_ROOT, Keys
from meshxl.etcd.shards import ShardMap
from meshxl.operator.shards import read_map, set_map
from tests.integration import test_manifests as manifests
from tests.integration.test_manifests import (
    K8S_VERSIONS,
    NAMESPACE,
    OVERLAYS,
    Docs,
    Render,
    _admits,
    _arg,
    _env,
    _etcd_member_urls,
    _find,
    _meshxl_containers,
    _workloads,
)
from tests.integration.test_manifests_etcd_tls import (
    Issued,
    _container,
    _host_matches,
    _secret_of,
    _with_cluster_secrets,
)

# The overlays rendered once per module, from a copy with the self-signed certificates.
tree = manifests.tree
render = manifests.render

#: The shard overlays, each with the installation it adds the shards to (the same
#: certificates: cert-manager, or make-certs.sh's).
SHARD_OVERLAYS = {"session-shards": "default", "session-shards-self-signed": "self-signed"}
JOB = "meshxl-shard-map"
MAIN = "meshxl-etcd"
#: The main cluster's objects that every shard has too, under its own names.
MAIN_OBJECTS = [("ServiceAccount", MAIN), ("Service", f"{MAIN}-peer"), ("Service", MAIN),
                ("NetworkPolicy", MAIN), ("PodDisruptionBudget", MAIN),
                ("StatefulSet", MAIN)]
#: Set on the base's objects only (base/kustomization.yaml), not on a component's.
BASE_ONLY_LABELS = {"app.kubernetes.io/version"}


def _member_urls(docs: Docs, statefulset: str) -> list[str]:
    """The client URL of each member of an etcd StatefulSet, from its replicas,
    serviceName, namespace, and the headless Service's client port, checked to reach
    the port the members listen on."""
    etcd = _find(docs, "StatefulSet", statefulset)
    peer = _find(docs, "Service", etcd["spec"]["serviceName"])
    assert peer["spec"]["clusterIP"] == "None", statefulset
    (port,) = [p for p in peer["spec"]["ports"] if p["name"] == "client"]
    container = _container(etcd)
    listen = int(_arg(container, "--listen-client-urls").rsplit(":", 1)[1])
    assert {p["name"]: p["containerPort"] for p in container["ports"]}[port["targetPort"]] \
        == listen, statefulset
    namespace = etcd["metadata"]["namespace"]
    return [f"https://{statefulset}-{i}.{peer['metadata']['name']}.{namespace}.svc:"
            f"{port['port']}" for i in range(etcd["spec"]["replicas"])]


@dataclass
class JobCommand:
    """The Job's command line as ``meshxl`` parses it (not run)."""

    path: list[str]
    params: dict[str, Any]
    security: dict[str, Any]
    shard_map: ShardMap


def _job_container(docs: Docs) -> dict[str, Any]:
    job = _find(docs, "Job", JOB)
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return container  # type: ignore[no-any-return]


def _parse(args: list[str], env: dict[str, str],
           monkeypatch: pytest.MonkeyPatch) -> JobCommand:
    """``args`` resolved through the real click groups and parsed by the command they
    name, with ``env`` as the container's only MESHXL_ variables: options, their types,
    required ones and environment variables, as ``meshxl`` would before running."""
    for name in [n for n in os.environ if n.startswith("MESHXL_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    words = list(args)
    command: click.Command = main
    ctx = click.Context(main, info_name="meshxl")
    path: list[str] = []
    while isinstance(command, click.Group):
        assert words, f"{' '.join(path)} needs a command"
        name = words.pop(0)
        sub = command.get_command(ctx, name)
        assert sub is not None, f"meshxl {' '.join(path)} has no command {name!r}"
        path.append(name)
        command = sub
        if isinstance(command, click.Group):
            ctx = click.Context(command, info_name=name, parent=ctx)
    assert path == ["shards", "set"], path
    leaf = command.make_context(path[-1], words, parent=ctx)
    with leaf:  # the map checked as the command checks it first
        shard_map = _shard_option(leaf.params["shard_items"])
    return JobCommand(path, dict(leaf.params), dict(leaf.meta.get(_ETCD_META, {})),
                      shard_map)


def _job_command(docs: Docs, monkeypatch: pytest.MonkeyPatch) -> JobCommand:
    container = _job_container(docs)
    env = {e["name"]: _env(docs, container, e["name"]) for e in container.get("env", [])}
    # The image's entrypoint is `meshxl` (test_manifests: the Dockerfile): args only.
    assert "command" not in container
    return _parse(container["args"], {k: v for k, v in env.items() if v is not None},
                  monkeypatch)


def _shard_statefulsets(docs: Docs) -> list[str]:
    """Every etcd StatefulSet of the overlay but the main cluster's."""
    return sorted(w["metadata"]["name"] for w in _workloads(docs)
                  if w["kind"] == "StatefulSet" and w["metadata"]["name"] != MAIN
                  and _container(w)["command"] == ["etcd"])


def _renamed(obj: Any, name: str) -> Any:
    """``obj`` of the main cluster as it reads for the cluster called ``name``."""
    return json.loads(json.dumps(obj).replace(MAIN, name))


def _without_base_labels(obj: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    for label in BASE_ONLY_LABELS:
        out["metadata"].get("labels", {}).pop(label, None)
    return out


@pytest.fixture(params=sorted(SHARD_OVERLAYS))
def overlay(request: pytest.FixtureRequest) -> str:
    """Each shard overlay in turn."""
    return str(request.param)


# -- the overlay -----------------------------------------------------------------------------


def test_the_overlay_is_rendered_and_validated_with_the_others(overlay: str,
                                                               render: Render) -> None:
    """The checks every overlay gets (test_manifests*.py, strict Kubernetes schemas
    included) cover this one; and the Job's kind is validated strictly too."""
    assert overlay in OVERLAYS
    docs = render(overlay)
    job = _find(docs, "Job", JOB)
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(job, version, strict=True)
    misspelled = copy.deepcopy(job)
    misspelled["spec"]["backofLimit"] = misspelled["spec"].pop("backoffLimit")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelled, K8S_VERSIONS[0], strict=True)
    # The main cluster stays the installation's; the shards come on top.
    default = render(SHARD_OVERLAYS[overlay])
    assert _find(docs, "StatefulSet", MAIN) == _find(default, "StatefulSet", MAIN)
    assert _etcd_member_urls(docs) == _etcd_member_urls(default)
    assert _shard_statefulsets(default) == []
    assert _shard_statefulsets(docs) == ["meshxl-etcd-s1", "meshxl-etcd-s2"]


def test_both_shard_overlays_add_the_same_shards(render: Render) -> None:
    """On top of their installation the two overlays add the same objects, but for where
    the shards' four certificates come from: cert-manager Certificates, or Secrets of
    the same names generated from make-certs.sh's files (and nothing of cert-manager)."""

    def key(doc: dict[str, Any]) -> tuple[str, str]:
        return doc["kind"], doc["metadata"]["name"]

    added = {}
    for overlay, installation in SHARD_OVERLAYS.items():
        before = {key(d) for d in render(installation)}
        added[overlay] = {key(d): d for d in render(overlay) if key(d) not in before}
    issued, generated = added["session-shards"], added["session-shards-self-signed"]
    certificates = {k: d for k, d in issued.items() if k[0] == "Certificate"}
    secrets = {k: d for k, d in generated.items() if k[0] == "Secret"}
    assert sorted(d["spec"]["secretName"] for d in certificates.values()) == \
        sorted(name for _, name in secrets) == [
            f"meshxl-etcd-{shard}-{use}-tls" for shard in ("s1", "s2")
            for use in ("peer", "server")]
    assert all(d["type"] == "kubernetes.io/tls" for d in secrets.values())
    assert {k: d for k, d in issued.items() if k not in certificates} == \
        {k: d for k, d in generated.items() if k not in secrets}
    assert not [d for d in render("session-shards-self-signed")
                if d["apiVersion"].startswith("cert-manager.io/")]


# -- the Job's command line -----------------------------------------------------------------


def test_the_jobs_command_line_is_one_meshxl_parses(overlay: str, render: Render,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    docs = render(overlay)
    command = _job_command(docs, monkeypatch)
    assert command.path == ["shards", "set"]
    # It stores the map (not a dry run) in the main cluster, every member by its name.
    assert command.params["dry_run"] is False
    assert command.params["etcd_urls"].split(",") == _etcd_member_urls(docs)
    # The installation's key prefix: the default, as for every meshxl process here
    # (the webhook's sidecars included), where the sidecars look for the map.
    assert command.params["etcd_root"] == DEFAULT_ROOT
    for _, container in _meshxl_containers(docs):
        assert not [a for a in container["args"] if a.startswith("--etcd-prefix")]
        assert "MESHXL_ETCD_PREFIX" not in {e["name"] for e in container.get("env", [])}
    assert [s.name for s in command.shard_map.shards] == ["s1", "s2"]
    assert command.shard_map.version == 0 and not command.shard_map.moving
    for shard in command.shard_map.shards:
        tls, endpoints = parse_urls(shard.etcd)
        assert tls is True, shard
        assert len(endpoints) == 3, shard


def test_the_parse_would_catch_a_wrong_command_line(overlay: str, render: Render,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    docs = render(overlay)
    container = _job_container(docs)
    env = {"MESHXL_ETCD": _env(docs, container, "MESHXL_ETCD") or ""}
    args = list(container["args"])
    with pytest.raises(click.NoSuchOption):
        _parse([a.replace("--shard=", "--shards=") for a in args], env, monkeypatch)
    with pytest.raises(click.MissingParameter):
        _parse([a for a in args if not a.startswith("--shard=")], env, monkeypatch)
    with pytest.raises(AssertionError, match="no command"):
        _parse(["shard", *args[1:]], env, monkeypatch)
    with pytest.raises(SystemExit):  # the shard map itself is checked: s1 twice
        _parse([a.replace("--shard=s2=", "--shard=s1=") for a in args], env, monkeypatch)


def test_the_jobs_shards_are_the_members_of_the_components_statefulsets(
        overlay: str, render: Render, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each shard's URLs are exactly its StatefulSet's members, by their names under its
    headless Service and on that Service's client port; each etcd StatefulSet of the
    component is a shard, once; none is the main cluster."""
    docs = render(overlay)
    shard_map = _job_command(docs, monkeypatch).shard_map
    named = {}
    for shard in shard_map.shards:
        urls = shard.etcd.split(",")
        hosts = {str(urlsplit(url).hostname) for url in urls}
        (service_host,) = {host.split(".", 1)[1] for host in hosts}
        service, namespace, svc = service_host.split(".")
        assert (namespace, svc) == (NAMESPACE, "svc"), shard
        (statefulset,) = [w for w in _workloads(docs) if w["kind"] == "StatefulSet"
                          and w["spec"].get("serviceName") == service]
        assert urls == _member_urls(docs, statefulset["metadata"]["name"]), shard
        named[statefulset["metadata"]["name"]] = urls
    assert sorted(named) == _shard_statefulsets(docs)
    assert len(named) == len(shard_map.shards) and MAIN not in named
    main_urls = set(_etcd_member_urls(docs))
    assert all(not main_urls & set(s.etcd.split(",")) for s in shard_map.shards)
    # Each shard's client Service (for etcdctl) selects that shard's members alone, on
    # the port the map names.
    for name, urls in named.items():
        client = _find(docs, "Service", name)
        selected = [w["metadata"]["name"] for w in _workloads(docs)
                    if client["spec"]["selector"].items()
                    <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert selected == [name]
        assert {p["port"] for p in client["spec"]["ports"]} == \
            {urlsplit(url).port for url in urls}


# -- the shards' etcd clusters ------------------------------------------------------------


@pytest.mark.parametrize("shard", ["meshxl-etcd-s1", "meshxl-etcd-s2"])
def test_each_shard_is_the_main_etcd_under_its_own_names(shard: str, overlay: str,
                                                         render: Render) -> None:
    """Same image, flags, TLS, probes, volumes, scheduling, NetworkPolicy and disruption
    budget as base/etcd.yaml; only the names differ."""
    docs = render(overlay)
    for kind, name in MAIN_OBJECTS:
        theirs = _find(docs, kind, name.replace(MAIN, shard))
        assert _without_base_labels(theirs) == \
            _renamed(_without_base_labels(_find(docs, kind, name)), shard), (kind, name)


def test_the_shard_statefulsets_are_well_formed(overlay: str, render: Render) -> None:
    docs = render(overlay)
    issued = Issued(docs)
    tokens = {_arg(_container(_find(docs, "StatefulSet", MAIN)), "--initial-cluster-token")}
    for name in _shard_statefulsets(docs):
        etcd = _find(docs, "StatefulSet", name)
        spec = etcd["spec"]
        assert spec["replicas"] == 3 and spec["podManagementPolicy"] == "Parallel"
        own = {"app.kubernetes.io/name": name}
        assert spec["selector"]["matchLabels"] == own
        assert own.items() <= spec["template"]["metadata"]["labels"].items()
        peer = _find(docs, "Service", spec["serviceName"])
        assert peer["spec"]["clusterIP"] == "None"
        assert peer["spec"]["publishNotReadyAddresses"] is True
        assert peer["spec"]["selector"] == own
        container = _container(etcd)
        members = [m.split("=", 1) for m in _arg(container, "--initial-cluster").split(",")]
        assert [n for n, _ in members] == [f"{name}-{i}" for i in range(spec["replicas"])]
        for member, url in members:
            assert url == f"https://{member}.{peer['metadata']['name']}.$(POD_NAMESPACE).svc:2380"
        assert _arg(container, "--initial-advertise-peer-urls") == \
            f"https://$(POD_NAME).{peer['metadata']['name']}.$(POD_NAMESPACE).svc:2380"
        assert _arg(container, "--advertise-client-urls") == \
            f"https://$(POD_NAME).{peer['metadata']['name']}.$(POD_NAMESPACE).svc:2379"
        # A cluster of its own: another cluster's member is never taken for one.
        token = _arg(container, "--initial-cluster-token")
        assert token not in tokens
        tokens.add(token)
        assert spec["volumeClaimTemplates"][0]["metadata"]["name"] in {
            m["name"] for m in container["volumeMounts"]}
        assert _find(docs, "PodDisruptionBudget", name)["spec"]["selector"]["matchLabels"] \
            == own

        # TLS: its own serving and peer certificates, from the main cluster's CA.
        server = _secret_of(etcd, container, _arg(container, "--cert-file"))
        peer_secret = _secret_of(etcd, container, _arg(container, "--peer-cert-file"))
        assert server in issued and peer_secret in issued
        assert {server, peer_secret}.isdisjoint({"meshxl-etcd-server-tls",
                                                 "meshxl-etcd-peer-tls"})
        anchor = issued.trust_anchor("meshxl-etcd-server-tls")
        assert issued.trust_anchor(server) == issued.trust_anchor(peer_secret) == anchor
        assert _arg(container, "--peer-cert-allowed-cn") == issued.common_name(peer_secret)
        assert issued.common_name(peer_secret) != issued.common_name("meshxl-etcd-peer-tls")
        for _, url in members:
            host = url.replace("$(POD_NAMESPACE)", NAMESPACE)
            assert _host_matches(str(urlsplit(host).hostname), issued.dns_names(peer_secret))
        for url in _member_urls(docs, name):
            assert _host_matches(str(urlsplit(url).hostname), issued.dns_names(server)), url
            assert not _host_matches(str(urlsplit(url).hostname),
                                     issued.dns_names("meshxl-etcd-server-tls")), url
        assert {"server auth", "client auth"} <= issued.usages(peer_secret)
        assert "server auth" in issued.usages(server)


def test_every_client_of_a_shard_gets_in(overlay: str, render: Render, tree: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The Job and the injected sidecars reach the main cluster and every shard: the
    NetworkPolicies admit them, and their client certificates come from the CA every
    cluster trusts."""
    docs = render(overlay)
    issued = _with_cluster_secrets(Issued(docs), overlay, tree)
    job = _find(docs, "Job", JOB)
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert labels["meshxl.io/inject"] == "false"
    member = {"app": "orders", "meshxl.io/cluster": "orders"}
    for name in [MAIN, *_shard_statefulsets(docs)]:
        policy = _find(docs, "NetworkPolicy", name)
        assert _admits(policy, "client", labels, same_namespace=True), name
        assert _admits(policy, "client", member, same_namespace=False), name
        assert not _admits(policy, "client", {"app": "intruder"}, same_namespace=True), name
        assert not _admits(policy, "peer", labels, same_namespace=True), name
        # Peers: only this cluster's own members, not another cluster's.
        others = [n for n in [MAIN, *_shard_statefulsets(docs)] if n != name]
        for other in others:
            assert not _admits(policy, "peer", {"app.kubernetes.io/name": other}, True)
        # Which CA the members trust: their serving Secret's (checked issued above).
        etcd = _find(docs, "StatefulSet", name)
        container = _container(etcd)
        trusted = _secret_of(etcd, container, _arg(container, "--trusted-ca-file"))
        anchor = issued.trust_anchor(trusted)
        for client in ("meshxl-etcd-system-tls", "meshxl-etcd-orders"):
            assert issued.trust_anchor(client) == anchor, (name, client)
    # The Job's certificate: meshxl's own client certificate, read-only, 0440.
    command = _job_command(docs, monkeypatch)
    container = _job_container(docs)
    secrets = {_secret_of(job, container, str(command.security[k]))
               for k in ("ca", "cert", "key")}
    assert secrets == {"meshxl-etcd-system-tls"}
    assert issued.usages("meshxl-etcd-system-tls") == {"client auth"}
    (volume,) = job["spec"]["template"]["spec"]["volumes"]
    assert volume["secret"] == {"secretName": "meshxl-etcd-system-tls", "defaultMode": 0o440}


def test_the_job_runs_once_at_a_time_retries_and_holds_no_api_access(overlay: str,
                                                                      render: Render) -> None:
    docs = render(overlay)
    job = _find(docs, "Job", JOB)
    spec = job["spec"]
    assert spec.get("parallelism", 1) == 1 and spec.get("completions", 1) == 1
    # Retried while the main etcd is not up yet (a new installation).
    assert spec["backoffLimit"] >= 6
    # Gone some time after it finished, so a later apply (another image) re-creates it
    # instead of failing on the immutable pod template; it is then run again.
    assert 0 < spec["ttlSecondsAfterFinished"] <= 24 * 3600
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    account = _find(docs, "ServiceAccount", pod["serviceAccountName"])
    assert account["automountServiceAccountToken"] is False
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    container = _job_container(docs)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
    # The overlay's meshxl image, as every other meshxl container.
    xds = _container(_find(docs, "Deployment", "meshxl-xds"))
    assert container["image"] == xds["image"]


# -- run twice, it writes once ---------------------------------------------------------------


@dataclass
class _KV:
    key: bytes
    value: bytes
    mod_revision: int
    version: int


class _Etcd:
    """An in-memory etcd of the calls `meshxl shards set` makes: get, prefix reads and
    compare-and-put transactions (mod revision, version; and as etcd's own messages:
    Range, and Txn comparing mod revision, version or value), with a revision counter
    and a cluster id."""

    _ids = iter(range(0x1000, 0x2000))

    def __init__(self) -> None:
        self.data: dict[bytes, _KV] = {}
        self.revision = 0
        self.transactions = self
        self.kvstub = self
        self.metadata = None
        self.cluster_id = next(self._ids)

    def _header(self) -> rpc.ResponseHeader:
        return rpc.ResponseHeader(cluster_id=self.cluster_id, revision=self.revision)

    async def Range(self, request: rpc.RangeRequest, **_: Any) -> rpc.RangeResponse:  # noqa: N802
        found = rpc.RangeResponse(header=self._header())
        kv = self.data.get(request.key)
        if kv is not None:
            found.kvs.append(rpc.KeyValue(key=kv.key, value=kv.value,
                                          mod_revision=kv.mod_revision, version=kv.version))
            found.count = 1
        return found

    def _holds(self, compare: rpc.Compare) -> bool:
        kv = self.data.get(compare.key)
        assert compare.result == rpc.Compare.EQUAL
        if compare.target == rpc.Compare.MOD:
            return (kv.mod_revision if kv else 0) == compare.mod_revision
        if compare.target == rpc.Compare.VERSION:
            return (kv.version if kv else 0) == compare.version
        assert compare.target == rpc.Compare.VALUE
        return kv is not None and kv.value == compare.value

    async def Txn(self, request: rpc.TxnRequest, **_: Any) -> rpc.TxnResponse:  # noqa: N802
        ok = all(self._holds(c) for c in request.compare)
        for op in request.success if ok else request.failure:
            assert op.HasField("request_put"), op
            self.put(op.request_put.key, op.request_put.value)()
        return rpc.TxnResponse(header=self._header(), succeeded=ok)

    def put(self, key: bytes, value: bytes) -> Callable[[], None]:
        def apply() -> None:
            self.revision += 1
            old = self.data.get(key)
            self.data[key] = _KV(key, value, self.revision, (old.version if old else 0) + 1)
        return apply

    def mod(self, key: bytes) -> _Compare:
        return _Compare(lambda: kv.mod_revision if (kv := self.data.get(key)) else 0)

    def version(self, key: bytes) -> _Compare:
        return _Compare(lambda: kv.version if (kv := self.data.get(key)) else 0)

    async def get(self, key: bytes) -> _KV | None:
        return self.data.get(key)

    async def get_prefix(self, prefix: bytes, keys_only: bool = False) -> list[_KV]:
        return [kv for key, kv in sorted(self.data.items()) if key.startswith(prefix)]

    async def transaction(self, compare: list[Callable[[], bool]],
                          success: list[Callable[[], None]],
                          failure: list[Callable[[], None]]) -> tuple[bool, list[Any]]:
        ok = all(check() for check in compare)
        for op in success if ok else failure:
            op()
        return ok, []


class _Compare:
    def __init__(self, read: Callable[[], int]) -> None:
        self.read = read

    def __eq__(self, value: object) -> Any:  # what aetcd's comparisons are built with
        return lambda: self.read() == value

    __hash__ = None  # type: ignore[assignment]


@pytest.fixture
def job_map(overlay: str, render: Render,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[ShardMap]:
    yield _job_command(render(overlay), monkeypatch).shard_map


async def test_the_job_run_again_writes_nothing(job_map: ShardMap) -> None:
    """The Job's map, set by the real `set_map`: stored once; run again once sidecars
    run and sessions are in the shards (a later apply re-creates the Job), it exits
    without a write; the first map is refused while a sidecar is registered."""
    keys = Keys()
    main_etcd = _Etcd()
    shards = {s.etcd: _Etcd() for s in job_map.shards}

    dialled: list[str] = []

    @contextlib.asynccontextmanager
    async def connect(urls: str) -> Any:
        dialled.append(urls)
        yield shards[urls]

    stored, planned = await set_map(main_etcd, keys, job_map, connect)
    assert stored is not None
    assert (stored.version, stored.moving) == (1, False)
    # Each shard as listed, known by the cluster that answered at its URLs.
    assert [(s.name, s.etcd, s.cluster_id) for s in stored.shards] == [
        (s.name, s.etcd, f"{shards[s.etcd].cluster_id:x}") for s in job_map.shards]
    assert planned.sessions == 0
    assert (await read_map(main_etcd, keys))[0] == stored
    assert main_etcd.revision == 1

    # Sidecars start and keep sessions in the shards.
    main_etcd.put(keys.member("orders", "orders-0").encode(), b"{}")()
    for i in range(8):
        session = f"session-{i}"
        shards[job_map.of(session).etcd].put(keys.session("orders", session).encode(),
                                             b"{}")()
    assert all(shard.data for shard in shards.values())
    before = (main_etcd.revision, copy.deepcopy(main_etcd.data))
    dialled.clear()
    again, planned = await set_map(main_etcd, keys, job_map, connect)
    assert again == stored and planned.unchanged and planned.moved == 0
    assert dialled == [], "an unchanged map read the shards' sessions"
    assert (main_etcd.revision, main_etcd.data) == before
    # The same shards listed in another order place every session where it is.
    reordered = ShardMap(job_map.version, tuple(reversed(job_map.shards)))
    again, planned = await set_map(main_etcd, keys, reordered, connect)
    assert again == stored and planned.unchanged and dialled == []
    assert (main_etcd.revision, main_etcd.data) == before

    # The first map of an installation whose sidecars already run: refused, nothing
    # written (the Job fails and says why).
    unsharded = _Etcd()
    unsharded.put(keys.member("orders", "orders-0").encode(), b"{}")()
    with pytest.raises(Conflict, match="sidecars are registered"):
        await set_map(unsharded, keys, job_map, connect)
    assert keys.shards.encode() not in unsharded.data


@pytest.mark.parametrize("overlay", sorted(SHARD_OVERLAYS))
def test_each_shard_gets_the_etcd_users_of_the_main_cluster(overlay: str,
                                                            render: Render) -> None:
    """Sessions live in the shards: each shard's etcd gets the same users and roles as
    the main cluster's (a setup Job per shard, dialling exactly the members the map
    names for it), so a cluster's certificate reaches no other cluster's sessions there
    either."""
    docs = render(overlay)
    shard_map = _job_container(docs)
    named = dict(a.removeprefix("--shard=").split("=", 1) for a in shard_map["args"]
                 if a.startswith("--shard="))
    assert sorted(f"meshxl-etcd-{s}" for s in named) == sorted(_shard_statefulsets(docs))
    for shard, urls in named.items():
        job = _find(docs, "Job", f"meshxl-etcd-setup-{shard}")
        container = _container(job)
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["MESHXL_ETCD"] == urls
        assert "--enable-auth" in container["args"]
        assert job["spec"]["template"]["metadata"]["labels"]["meshxl.io/etcd-client"] == "true"
