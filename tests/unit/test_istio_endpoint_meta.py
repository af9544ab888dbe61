"""Endpoints from meshxl under Istio, marked per pod as istiod marks them: the
injector's environment (its pod's tls mode label and workload), the registration that
carries them, and the control plane's EDS metadata (``serve xds --istio-mtls``)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from click.testing import CliRunner
from google.protobuf import json_format

from meshxl.cli import main
from meshxl.kube import InjectConfig, mutate_pod
from meshxl.kube.istio_pod import ENV_TLS_MODE, ENV_WORKLOAD, workload_name
from meshxl.model import Registration, RuntimeState, parse_model
from meshxl.statesync.config import StatesyncConfig
from meshxl.statesync.registration import registration_document
from meshxl.xds.compiler import ISTIO_TLS_MATCH, Compiler

MODEL = """
clusters:
- name: orders
  mode: load-sharing
  membership: registered
  stickiness: {header: x-session-id}
"""


def registration(member: str, port: int, istio: dict[str, str] | None) -> Registration:
    return Registration.from_dict(registration_document(
        address="10.1.0.1", port=port, site=None, weight=None, ready=True, problems={},
        sidecar="127.0.0.1:7070", pid=1, since="s", updated="u", istio=istio))


def metadata(cluster: Any) -> dict[str, dict[str, Any]]:
    return {e.endpoint.hostname: json_format.MessageToDict(e.metadata)
            for g in cluster.endpoints for e in g.lb_endpoints}


def test_each_endpoint_is_marked_as_its_pod_is() -> None:
    state = RuntimeState(registrations={
        ("orders", "orders-0"): registration("orders-0", 8080, {
            "tls_mode": "istio", "workload": "orders;shop;orders;v2"}),
        ("orders", "orders-1"): registration("orders-1", 8081, {  # no Istio proxy
            "tls_mode": "", "workload": "orders-legacy;shop;orders;"}),
        ("orders", "orders-2"): registration("orders-2", 8082, None),  # older sidecar
    })
    marked = Compiler(istio_mtls=True, istio_cluster_id="east").compile(
        parse_model(MODEL), state)
    assert metadata(marked.endpoints["orders"]) == {
        "orders-0": {"filterMetadata": {
            ISTIO_TLS_MATCH: {"tlsMode": "istio"},
            "istio": {"workload": "orders;shop;orders;v2;east"}}},
        "orders-1": {"filterMetadata": {
            "istio": {"workload": "orders-legacy;shop;orders;;east"}}},
        "orders-2": {"filterMetadata": {ISTIO_TLS_MATCH: {"tlsMode": "istio"}}},
    }
    plain = Compiler().compile(parse_model(MODEL), state)
    assert all(not m for m in metadata(plain.endpoints["orders"]).values())


@pytest.mark.parametrize(("istio", "expected"), [
    ("not an object", "registration istio must be an object"),
    ({"tls_mode": "ist io", "workload": "a;b;c;d"}, "tls_mode is not a label value"),
    ({"tls_mode": "istio", "workload": "a;b;c"}, "istio.workload must be NAME;NAMESPACE"),
    ({"tls_mode": "istio", "workload": ";b;c;d"}, "istio.workload must be NAME;NAMESPACE"),
    ({"tls_mode": "istio"}, "istio.workload must be NAME;NAMESPACE"),
])
def test_a_bad_istio_object_is_named(istio: Any, expected: str) -> None:
    doc = registration_document(address="10.1.0.1", port=80, site=None, weight=None,
                                ready=True, problems={}, sidecar="s", pid=1, since="s",
                                updated="u")
    with pytest.raises(ValueError, match=expected):
        Registration.from_dict({**doc, "istio": istio})


def test_the_sidecar_refuses_what_the_control_plane_would() -> None:
    def config(**kw: Any) -> StatesyncConfig:
        return StatesyncConfig(cluster="orders", member="orders-0", app="10.1.0.1:80",
                               etcd="http://127.0.0.1:2379", **kw)

    assert config().istio is None
    assert config(istio_workload="orders;shop;orders;").istio == {
        "tls_mode": "", "workload": "orders;shop;orders;"}
    with pytest.raises(ValueError, match="needs the Istio workload"):
        config(istio_tls_mode="istio")
    with pytest.raises(ValueError, match="istio.workload must be"):
        config(istio_workload="orders")
    result = CliRunner().invoke(main, [
        "serve", "statesync", "--cluster", "orders", "--member", "orders-0",
        "--app", "10.1.0.1:80", "--istio-workload", "orders;shop"])
    assert result.exit_code != 0
    assert "istio.workload must be NAME;NAMESPACE" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


POD: dict[str, Any] = {
    "apiVersion": "v1", "kind": "Pod",
    "metadata": {
        "generateName": "orders-7d9f8c-", "namespace": "shop",
        "labels": {"meshxl.io/cluster": "orders", "app": "orders", "version": "v3",
                   "pod-template-hash": "7d9f8c"},
        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                             "name": "orders-7d9f8c", "controller": True, "uid": "u"}]},
    "spec": {"containers": [{"name": "app", "image": "app:1",
                             "ports": [{"containerPort": 8080}]}]},
}


def env_of(pod: dict[str, Any], proxy: str) -> dict[str, Any]:
    config = InjectConfig(image="registry.example.com/meshxl:1.0", proxy=proxy,
                          xds=() if proxy == "none" else ("127.0.0.1:18000",))
    out = mutate_pod(pod, config)
    sync = next(c for c in out["spec"]["initContainers"] if c["name"] == "meshxl-statesync")
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in sync["env"]}


def test_under_istio_the_injector_passes_the_pods_istio_metadata() -> None:
    env = env_of(POD, "none")
    # The tls mode label is Istio's injector's, which may run after meshxl's: read
    # from the running pod, not at admission.
    assert env[ENV_TLS_MODE] == {"fieldRef": {
        "apiVersion": "v1", "fieldPath": "metadata.labels['security.istio.io/tlsMode']"}}
    # The ReplicaSet's Deployment, its namespace from the downward API, app and version.
    assert env[ENV_WORKLOAD] == "orders;$(MESHXL_NAMESPACE);orders;v3"
    assert re.findall(r"\$\((\w+)\)", env[ENV_WORKLOAD]) == ["MESHXL_NAMESPACE"]
    assert list(env).index("MESHXL_NAMESPACE") < list(env).index(ENV_WORKLOAD)
    assert ENV_TLS_MODE not in env_of(POD, "envoy")  # meshxl's own Envoy: not needed


@pytest.mark.parametrize(("meta", "expected"), [
    ({"generateName": "web-", "ownerReferences": [
        {"kind": "StatefulSet", "name": "web", "controller": True}]}, "web"),
    ({"generateName": "x-", "labels": {"service.istio.io/workload-name": "chosen"},
      "ownerReferences": [{"kind": "StatefulSet", "name": "web", "controller": True}]},
     "chosen"),
    ({"name": "bare"}, "bare"),  # no controller: the pod itself
    ({"generateName": "job-", "ownerReferences": [
        {"kind": "ReplicaSet", "name": "rs-abc", "controller": True}]}, "rs-abc"),
    ({}, "$(MESHXL_MEMBER)"),  # a template: named when it runs
])
def test_the_workload_name_is_istiods(meta: dict[str, Any], expected: str) -> None:
    assert workload_name(meta, "$(MESHXL_MEMBER)") == expected
