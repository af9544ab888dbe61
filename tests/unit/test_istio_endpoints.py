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
from meshxl.istio.endpoints import INITIAL_FETCH_TIMEOUT, STAT_PREFIX
from meshxl.model import load_model, parse_model
from tests.unit.test_istio import MODELS, check_crd

REPO = Path(__file__).resolve().parents[2]
OPTIONS = IstioOptions(namespace="shop", endpoints="meshxl",
                       xds_address="meshxl-xds.meshxl-system.svc.cluster.local:18000")
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
    # Member weights reach the client sidecars: no warning that they are dropped.
    assert rendered.warnings == []
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
    assert result.stderr == ""
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    eds = _cluster_patch(docs)["patch"]["value"]["eds_cluster_config"]
    assert eds["eds_config"]["api_config_source"]["grpc_services"][0]["google_grpc"][
        "target_uri"] == "[fd00::9]:18000"


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
