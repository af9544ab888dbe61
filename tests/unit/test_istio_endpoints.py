"""Endpoints from meshxl under Istio: the EnvoyFilter's EDS patch (``meshxl istio render
--endpoints meshxl``). The control plane's side: tests/unit/test_xds_istio_endpoints.py;
through a real Envoy: tests/integration/test_istio_eds.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from envoy.config.cluster.v3 import cluster_pb2
from google.protobuf import json_format

from meshxl.cli import main
from meshxl.istio import IstioOptions, IstioRenderError, render_model
from meshxl.istio.check import check
from meshxl.istio.endpoints import INITIAL_FETCH_TIMEOUT, STAT_PREFIX, XdsClientTls
from meshxl.model import load_model, parse_model
from tests.unit.test_istio import MODELS, check_crd

REPO = Path(__file__).resolve().parents[2]
OPTIONS = IstioOptions(namespace="shop", endpoints="meshxl",
                       xds_address="meshxl-xds.meshxl-system.svc.cluster.local:18000")
PLAIN = ("--endpoints meshxl without --xds-tls: the sidecars' EDS streams carry no "
         "credentials")
#: pilot/pkg/networking/core/cluster_builder.go, maybeApplyEdsConfig.
ISTIOD_EDS = {"service_name": "outbound|9090||cart.shop.svc.cluster.local",
              "eds_config": {"ads": {}, "initial_fetch_timeout": "0s",
                             "resource_api_version": "V3"}}


def _cluster_patch(objects: list[dict[str, Any]]) -> dict[str, Any]:
    ef = next(o for o in objects if o["kind"] == "EnvoyFilter")
    patch: dict[str, Any] = next(p for p in ef["spec"]["configPatches"]
                                 if p["applyTo"] == "CLUSTER")
    return patch


def test_the_cluster_patch_takes_the_endpoints_from_meshxl() -> None:
    rendered = render_model(parse_model(MODELS["LS_COOKIE"]), OPTIONS)
    for obj in rendered.objects:
        check_crd(obj)
    # Member weights reach the client sidecars: no warning that they are dropped, only
    # that the port must then be open to anyone.
    assert [w[:len(PLAIN)] for w in rendered.warnings] == [PLAIN]
    dr = rendered.objects[0]
    # meshxl's priorities, not istiod's: no locality weighting of meshxl's localities.
    assert dr["spec"]["trafficPolicy"]["loadBalancer"]["localityLbSetting"] == {
        "enabled": False}
    patch = _cluster_patch(rendered.objects)
    assert patch["patch"]["operation"] == "MERGE"
    assert patch["match"]["cluster"] == {"service": "cart.shop.svc.cluster.local",
                                         "portNumber": 9090}
    assert patch["patch"]["value"]["eds_cluster_config"] == {
        "service_name": "cart",
        "eds_config": {
            "api_config_source": {
                "api_type": "GRPC", "transport_api_version": "V3",
                "grpc_services": [{"google_grpc": {
                    "target_uri": "meshxl-xds.meshxl-system.svc.cluster.local:18000",
                    "stat_prefix": STAT_PREFIX}}],
                "set_node_on_first_message_only": True},
            "initial_fetch_timeout": INITIAL_FETCH_TIMEOUT,
            "resource_api_version": "V3"}}
    # The rest of the patch is what istiod's endpoints get.
    istiod = _cluster_patch(render_model(parse_model(MODELS["LS_COOKIE"]),
                                         IstioOptions(namespace="shop")).objects)
    value = dict(patch["patch"]["value"])
    value.pop("eds_cluster_config")
    assert value == istiod["patch"]["value"]


def test_the_merge_replaces_istiods_ads_config_source() -> None:
    """Protobuf merge (Istio's pkg/proto/merge; Python's MergeFrom alike): the patch's
    ``api_config_source`` is another case of the ``config_source_specifier`` oneof, so
    istiod's ``ads`` goes; the service name is the meshxl cluster's."""
    value = _cluster_patch(render_model(parse_model(MODELS["LS_COOKIE"]),
                                        OPTIONS).objects)["patch"]["value"]
    cluster = json_format.ParseDict({"name": "outbound|9090||cart.shop.svc.cluster.local",
                                     "type": "EDS", "eds_cluster_config": ISTIOD_EDS},
                                    cluster_pb2.Cluster())
    cluster.MergeFrom(json_format.ParseDict(value, cluster_pb2.Cluster()))
    config = cluster.eds_cluster_config
    assert config.service_name == "cart"
    assert config.eds_config.WhichOneof("config_source_specifier") == "api_config_source"
    assert config.eds_config.initial_fetch_timeout.seconds == 10
    grpc_service = config.eds_config.api_config_source.grpc_services
    assert [g.google_grpc.target_uri for g in grpc_service] == [
        "meshxl-xds.meshxl-system.svc.cluster.local:18000"]


def test_each_virtual_system_takes_its_own_assignment() -> None:
    """A VS's Service gets the VS's assignment (meshxl's EDS names it after the VS)."""
    model = load_model(REPO / "deploy" / "examples" / "vsls.yaml")
    rendered = render_model(model, IstioOptions(namespace="shop", endpoints="meshxl",
                                                xds_address="10.0.0.9:18000"))
    for obj in rendered.objects:
        if obj["kind"] != "Service":
            check_crd(obj)
    filters = {o["metadata"]["labels"]["meshxl.io/cluster"]: _cluster_patch([o])
               for o in rendered.objects if o["kind"] == "EnvoyFilter"}
    assert filters and set(filters) <= set(model.virtual_names)
    for name, patch in filters.items():
        assert patch["patch"]["value"]["eds_cluster_config"]["service_name"] == name


@pytest.mark.parametrize(("args", "message"), [
    (["--endpoints", "meshxl"], "meshxl: --endpoints meshxl needs --xds-address HOST:PORT"),
    (["--endpoints", "meshxl", "--xds-address", "meshxl-xds"],
     "meshxl: --xds-address: bad HOST:PORT 'meshxl-xds'"),
    (["--xds-address", "meshxl-xds:18000"],
     "meshxl: --xds-address goes with --endpoints meshxl"),
    # --xds-tls
    (["--xds-tls"], "meshxl: --xds-tls goes with --endpoints meshxl"),
    (["--endpoints", "meshxl", "--xds-address", "a:1", "--xds-ca", "/x/ca.crt"],
     "meshxl: --xds-certs-dir and --xds-ca go with --xds-tls"),
    (["--endpoints", "meshxl", "--xds-address", "a:1", "--xds-tls", "--xds-ca", "ca.crt"],
     "meshxl: --xds-ca: 'ca.crt' must be an absolute, normalized path"),
    (["--endpoints", "meshxl", "--xds-address", "a:1", "--xds-tls", "--xds-certs-dir",
      "/etc/certs/"], "meshxl: --xds-certs-dir: '/etc/certs/' must be an absolute"),
    (["--endpoints", "meshxl", "--xds-address", "a:1", "--xds-tls", "--xds-ca",
      "/etc/istio-output-certs/key.pem"],
     "meshxl: --xds-ca /etc/istio-output-certs/key.pem is in --xds-certs-dir"),
])
def test_render_command_endpoint_errors(tmp_path: Path, args: list[str], message: str) -> None:
    path = tmp_path / "model.yaml"
    path.write_text(MODELS["LS_COOKIE"])
    result = CliRunner().invoke(main, ["istio", "render", "-f", str(path), *args])
    assert result.exit_code == 1
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1
    assert result.stdout == ""


def test_render_command_with_endpoints_from_meshxl(tmp_path: Path) -> None:
    path = tmp_path / "model.yaml"
    path.write_text(MODELS["LS_COOKIE"])
    result = CliRunner().invoke(main, ["istio", "render", "-f", str(path), "-n", "shop",
                                       "--endpoints", "meshxl",
                                       "--xds-address", "[fd00::9]:18000"])
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith(f"meshxl: warning: {PLAIN}")
    assert result.stderr.count("\n") == 1
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    eds = _cluster_patch(docs)["patch"]["value"]["eds_cluster_config"]
    assert eds["eds_config"]["api_config_source"]["grpc_services"][0]["google_grpc"][
        "target_uri"] == "[fd00::9]:18000"


def test_xds_tls_presents_the_istio_certificate_and_checks_meshxls_server() -> None:
    """--xds-tls: Google gRPC's ssl_credentials from istio-agent's OUTPUT_CERTS files and
    meshxl's CA; Envoy's Cluster proto takes the merged patch."""
    options = IstioOptions(namespace="shop", endpoints="meshxl",
                           xds_address="meshxl-xds.meshxl-system.svc:18000",
                           xds_tls=XdsClientTls())
    rendered = render_model(parse_model(MODELS["LS_COOKIE"]), options)
    assert rendered.warnings == []
    for obj in rendered.objects:
        check_crd(obj)
    # The sidecars' other traffic to the server (Istio's access log provider) in the
    # same mutual TLS, through istiod's cluster: a DestinationRule of file certificates.
    xds_rule = rendered.objects[-1]
    assert xds_rule["metadata"]["name"] == "meshxl-xds-tls"
    assert xds_rule["metadata"]["namespace"] == "shop"
    host = "meshxl-xds.meshxl-system.svc.cluster.local"  # the FQDN: dotted hosts are whole
    assert xds_rule["spec"] == {"host": host, "exportTo": ["."], "trafficPolicy": {
        "portLevelSettings": [{"port": {"number": 18000}, "tls": {
            "mode": "MUTUAL", "clientCertificate": "/etc/istio-output-certs/cert-chain.pem",
            "privateKey": "/etc/istio-output-certs/key.pem",
            "caCertificates": "/etc/meshxl-xds-ca/ca.crt", "sni": host}}]}}
    value = _cluster_patch(rendered.objects)["patch"]["value"]
    (grpc_service,) = value["eds_cluster_config"]["eds_config"]["api_config_source"][
        "grpc_services"]
    assert grpc_service["google_grpc"]["channel_credentials"] == {"ssl_credentials": {
        "root_certs": {"filename": "/etc/meshxl-xds-ca/ca.crt"},
        "private_key": {"filename": "/etc/istio-output-certs/key.pem"},
        "cert_chain": {"filename": "/etc/istio-output-certs/cert-chain.pem"}}}
    cluster = json_format.ParseDict({"name": "outbound|9090||cart.shop.svc.cluster.local",
                                     "type": "EDS", "eds_cluster_config": ISTIOD_EDS},
                                    cluster_pb2.Cluster())
    cluster.MergeFrom(json_format.ParseDict(value, cluster_pb2.Cluster()))
    ssl = cluster.eds_cluster_config.eds_config.api_config_source.grpc_services[
        0].google_grpc.channel_credentials.ssl_credentials
    assert ssl.cert_chain.filename == "/etc/istio-output-certs/cert-chain.pem"
    # Another host than the overlay's certificate names, and mesh-wide filters: said.
    wide = IstioOptions(namespace="shop", endpoints="meshxl", xds_address="10.0.0.9:18000",
                        filter_namespace="istio-system", client_selector={"app": "web"},
                        xds_tls=XdsClientTls())
    wide_rendered = render_model(parse_model(MODELS["LS_COOKIE"]), wide)
    warnings = wide_rendered.warnings
    # No DestinationRule names an IP address.
    assert [o["kind"] for o in wide_rendered.objects] == ["DestinationRule", "EnvoyFilter"]
    assert len(warnings) == 2
    assert "checks the server's certificate against '10.0.0.9'" in warnings[0]
    assert "root namespace" in warnings[1]


def test_xds_tls_client_pod_annotations() -> None:
    """What istio-agent needs to write the files (OUTPUT_CERTS, a volume in the
    istio-proxy container) and, unless Istio's root signed the server, meshxl's CA."""
    annotations = XdsClientTls().pod_annotations()
    assert yaml.safe_load(annotations["proxy.istio.io/config"]) == {
        "proxyMetadata": {"OUTPUT_CERTS": "/etc/istio-output-certs"}}
    volumes = yaml.safe_load(annotations["sidecar.istio.io/userVolume"])
    mounts = yaml.safe_load(annotations["sidecar.istio.io/userVolumeMount"])
    assert volumes == [{"name": "istio-output-certs", "emptyDir": {"medium": "Memory"}},
                       {"name": "meshxl-xds-ca", "configMap": {
                           "name": "meshxl-xds-ca",
                           "items": [{"key": "ca.crt", "path": "ca.crt"}]}}]
    assert mounts == [{"name": "istio-output-certs", "mountPath": "/etc/istio-output-certs"},
                      {"name": "meshxl-xds-ca", "mountPath": "/etc/meshxl-xds-ca",
                       "readOnly": True}]
    istio_root = XdsClientTls(certs_dir="/certs", server_ca="/certs/root-cert.pem")
    assert istio_root.trusts_istio_root
    assert [m["mountPath"] for m in yaml.safe_load(
        istio_root.pod_annotations()["sidecar.istio.io/userVolumeMount"])] == ["/certs"]


def test_render_command_prints_the_client_pod_annotations(tmp_path: Path) -> None:
    path = tmp_path / "model.yaml"
    path.write_text(MODELS["LS_COOKIE"])
    result = CliRunner().invoke(main, [
        "istio", "render", "-f", str(path), "-n", "shop", "--endpoints", "meshxl",
        "--xds-address", "meshxl-xds.meshxl-system.svc.cluster.local:18000", "--xds-tls"])
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    header = [line.removeprefix("#   ") for line in result.stdout.splitlines()
              if line.startswith("#   ")]
    # The comment is YAML the user can paste under metadata.annotations.
    annotations = yaml.safe_load("\n".join(
        line for line in header if line.startswith(("proxy.", "sidecar.", "  "))))
    assert annotations == XdsClientTls().pod_annotations()
    assert any("ConfigMap meshxl-xds-ca" in line for line in header)
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    google_grpc = _cluster_patch(docs)["patch"]["value"]["eds_cluster_config"][
        "eds_config"]["api_config_source"]["grpc_services"][0]["google_grpc"]
    assert "ssl_credentials" in google_grpc["channel_credentials"]


def test_check_asks_no_role_labels_of_a_cluster_whose_endpoints_are_meshxls() -> None:
    """The failover order is meshxl's EDS: no pod label, no outlier detection needed."""
    model = parse_model(MODELS["HA_ONE_SITE"].replace(
        "    members:", "    outlier_detection: {enabled: false}\n    listener: {port: 8080}\n"
                       "    members:"))
    service = {"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "orders", "namespace": "shop"},
               "spec": {"ports": [{"name": "http", "port": 8080}]}}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": "orders-0", "namespace": "shop", "labels": {"meshxl.io/cluster": "orders"}}}
    objects = [*render_model(model, OPTIONS).objects, service, pod]
    assert check(model, objects, OPTIONS, istio_version=(1, 27)) == []
    # The same cluster with istiod's endpoints: the labels and outlier detection matter.
    istiod = IstioOptions(namespace="shop")
    with pytest.raises(IstioRenderError, match="outlier detection"):
        render_model(model, istiod)
    objects = [*render_model(parse_model(MODELS["HA_ONE_SITE"]), istiod).objects, service, pod]
    assert [f.level for f in check(parse_model(MODELS["HA_ONE_SITE"]), objects, istiod,
                                   istio_version=(1, 27))] == ["error"]


def test_documented_client_pod_annotations_are_the_rendered_ones() -> None:
    """docs/istio.md, "Authentication": the annotations users copy are render's."""
    text = (REPO / "docs" / "istio.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```yaml")[1:]]
    (block,) = [b for b in blocks if "OUTPUT_CERTS" in b]
    assert yaml.safe_load(block) == XdsClientTls().pod_annotations()


def test_check_finds_client_pods_without_the_certificate_files() -> None:
    """A pod the --xds-tls EnvoyFilter patches needs OUTPUT_CERTS and the mounts, or its
    Envoy refuses the cluster: meshxl istio check says which."""
    model = parse_model(MODELS["LS_COOKIE"])
    options = IstioOptions(namespace="shop", endpoints="meshxl",
                           xds_address="meshxl-xds.meshxl-system.svc:18000",
                           xds_tls=XdsClientTls())
    service = {"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "cart", "namespace": "shop"},
               "spec": {"ports": [{"name": "http", "port": 9090}]}}

    def pod(name: str, annotations: dict[str, str], **labels: str) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": name, "namespace": "shop", "labels": labels,
            "annotations": annotations}}
    ready = XdsClientTls().pod_annotations()
    no_ca = {**ready, "sidecar.istio.io/userVolumeMount":
             '[{"name":"istio-output-certs","mountPath":"/etc/istio-output-certs"}]'}
    no_output = {k: v for k, v in ready.items() if k != "proxy.istio.io/config"}
    objects = [*render_model(model, options).objects, service, pod("web-1", ready),
               pod("web-2", no_ca), pod("web-3", no_output),
               pod("batch", {}, **{"sidecar.istio.io/inject": "false"})]
    findings = check(model, objects, options, istio_version=(1, 27))
    assert [(f.level, f.object) for f in findings] == [
        ("error", "EnvoyFilter shop/meshxl-shop-cart")]
    message = findings[0].message
    assert "pod web-2, web-3 lacks" in message and "web-1" not in message
    assert "mounts nothing at /etc/meshxl-xds-ca" in message
    # Every pod ready, or the EnvoyFilter without TLS files: nothing to say.
    objects = [*render_model(model, options).objects, service, pod("web-1", ready)]
    assert check(model, objects, options, istio_version=(1, 27)) == []
    plain = IstioOptions(namespace="shop", endpoints="meshxl",
                         xds_address="meshxl-xds.meshxl-system.svc:18000")
    objects = [*render_model(model, plain).objects, service, pod("web-2", {})]
    assert check(model, objects, plain, istio_version=(1, 27)) == []
