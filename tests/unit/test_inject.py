"""Sidecar injection: the pure patch builder and `meshxl inject`, on fixture pods."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import jsonpatch
import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshxl.cli import main
from meshxl.kube import (
    ANNOTATION_ANTI_AFFINITY,
    ANNOTATION_STATUS,
    ENVOY_CONTAINER,
    ENVOY_VOLUME,
    HOSTNAME_KEY,
    STATESYNC_CONTAINER,
    ZONE_KEY,
    InjectConfig,
    InjectError,
    decide,
    inject_yaml,
    mutate_pod,
    pod_patch,
)
from meshxl.kube.webhook import ReviewError, admission_response

FIXTURES = Path(__file__).parent / "fixtures" / "kube"
CONFIG = InjectConfig(image="registry.example.com/meshxl:1.0",
                      etcd="http://etcd-a:2379,http://etcd-b:2379",
                      xds=("cp-1.meshxl-system.svc:18000", "cp-2.meshxl-system.svc:18000"))


def load(name: str) -> dict[str, Any]:
    data = yaml.safe_load((FIXTURES / name).read_text())
    assert isinstance(data, dict)
    return data


def template(obj: dict[str, Any]) -> dict[str, Any]:
    return obj if obj["kind"] == "Pod" else obj["spec"]["template"]  # type: ignore[no-any-return]


def containers(pod: dict[str, Any], key: str = "initContainers") -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in pod["spec"].get(key, [])}


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def validate_k8s(obj: dict[str, Any]) -> None:
    for version in ("1.29", kubernetes_validate.latest_version()):
        kubernetes_validate.validate(obj, version, strict=True)


REQUIRED = "requiredDuringSchedulingIgnoredDuringExecution"
PREFERRED = "preferredDuringSchedulingIgnoredDuringExecution"
SITES_ARE_ZONES = InjectConfig(image=CONFIG.image, site_topology_key=ZONE_KEY)


def members_of(cluster: str) -> dict[str, Any]:
    return {"matchLabels": {"meshxl.io/cluster": cluster}}


def zone_spread(cluster: str) -> dict[str, Any]:
    return {"maxSkew": 1, "topologyKey": ZONE_KEY, "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": members_of(cluster)}


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) == {"matchLabels"}
    return bool(selector["matchLabels"].items() <= labels.items())


def scheduling(pod: dict[str, Any]) -> list[str]:
    """What the injector added to the pod's scheduling, from its status annotation."""
    status = json.loads(pod["metadata"]["annotations"][ANNOTATION_STATUS])
    return list(status["scheduling"])


# -- who gets injected -------------------------------------------------------------------


@pytest.mark.parametrize(("pod", "namespace_enabled", "inject", "reason"), [
    ("pod.yaml", True, True, "namespace labelled"),
    ("pod.yaml", False, False, "namespace not labelled"),
    ("opted-out-pod.yaml", True, False, "opted out"),
    ("injected-pod.yaml", True, False, "already injected"),
])
def test_decide(pod: str, namespace_enabled: bool, inject: bool, reason: str) -> None:
    decision = decide(load(pod), namespace_enabled=namespace_enabled)
    assert decision.inject is inject
    assert reason in decision.reason


def test_opt_in_label_outside_labelled_namespaces_and_annotation_opt_out() -> None:
    pod = load("pod.yaml")
    pod["metadata"]["labels"]["meshxl.io/inject"] = "true"
    assert decide(pod, namespace_enabled=False).inject
    # An annotation beats a label of the same name.
    pod["metadata"]["annotations"]["meshxl.io/inject"] = "false"
    assert not decide(pod, namespace_enabled=True).inject


def test_a_statesync_container_alone_counts_as_injected() -> None:
    pod = load("injected-pod.yaml")
    del pod["metadata"]["annotations"][ANNOTATION_STATUS]
    assert decide(pod, namespace_enabled=True).reason == "already injected"


# -- what a pod gets -------------------------------------------------------------------------


def test_pod_gets_statesync_and_envoy() -> None:
    pod = load("pod.yaml")
    original = copy.deepcopy(pod)
    out = mutate_pod(pod, CONFIG)
    assert pod == original, "the input is not modified"
    assert out["spec"]["containers"] == pod["spec"]["containers"], "the app is untouched"
    init = containers(out)
    assert list(init) == [STATESYNC_CONTAINER, ENVOY_CONTAINER]

    sync = init[STATESYNC_CONTAINER]
    assert sync["image"] == CONFIG.image
    assert sync["command"] == ["meshxl"]
    assert sync["restartPolicy"] == "Always", "a native sidecar: up before the app"
    args = sync["args"]
    assert args[:2] == ["serve", "statesync"]
    assert flag(args, "--cluster") == "orders"
    assert flag(args, "--member") == "$(MESHXL_MEMBER)"
    assert flag(args, "--site") == "dc1"          # from the annotation
    assert flag(args, "--weight") is None          # the model decides
    assert flag(args, "--app") == "$(MESHXL_POD_IP):8080"
    assert flag(args, "--listen") == "127.0.0.1:7070"
    assert flag(args, "--etcd") == CONFIG.etcd
    assert flag(args, "--etcd-prefix") == "/meshxl"
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in sync["env"]
           if "valueFrom" in e}
    assert env == {"MESHXL_MEMBER": "metadata.name", "MESHXL_POD_IP": "status.podIP",
                   "MESHXL_NAMESPACE": "metadata.namespace"}
    # Docstrings and asserts dropped, as the image's bytecode is compiled (Dockerfile).
    assert {"name": "PYTHONOPTIMIZE", "value": "2"} in sync["env"]
    assert "127.0.0.1:7070/healthz" in " ".join(sync["startupProbe"]["exec"]["command"])
    assert sync["securityContext"]["runAsNonRoot"] is True
    assert sync["resources"]["requests"] == {"cpu": "50m", "memory": "64Mi"}

    envoy = init[ENVOY_CONTAINER]
    eargs = envoy["args"]
    # POD.NAMESPACE: unique in the cluster, and what a SPIFFE ID of the namespace binds.
    assert eargs[:3] == ["envoy", "--node-id", "$(MESHXL_MEMBER).$(MESHXL_NAMESPACE)"]
    assert "--xds-cert" not in eargs  # plaintext ADS unless told
    assert [eargs[i + 1] for i, a in enumerate(eargs) if a == "--xds"] == list(CONFIG.xds)
    assert flag(eargs, "--node-cluster") == "orders"
    work_dir = flag(eargs, "--work-dir")
    assert envoy["volumeMounts"] == [{"name": ENVOY_VOLUME, "mountPath": work_dir}]
    assert "/ready" in " ".join(envoy["startupProbe"]["exec"]["command"])
    assert out["spec"]["volumes"] == [{"name": ENVOY_VOLUME,
                                       "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}}]

    labels = out["metadata"]["labels"]
    assert labels["meshxl.io/site"] == "dc1", "Istio's failoverPriority matches this label"
    assert labels["meshxl.io/cluster"] == "orders"
    status = json.loads(out["metadata"]["annotations"][ANNOTATION_STATUS])
    assert status["initContainers"] == [STATESYNC_CONTAINER, ENVOY_CONTAINER]
    assert status["volumes"] == [ENVOY_VOLUME]
    validate_k8s(out)


def test_every_variable_in_args_is_defined_in_env() -> None:
    out = mutate_pod(load("pod.yaml"), CONFIG)
    for container in out["spec"]["initContainers"]:
        names = {e["name"] for e in container["env"]}
        used = set(re.findall(r"\$\((\w+)\)", " ".join(container["args"])))
        assert used and used <= names, container["name"]


def _expand(args: list[str]) -> list[str]:
    values = {"MESHXL_MEMBER": "orders-a", "MESHXL_POD_IP": "10.1.2.3",
              "MESHXL_NAMESPACE": "shop"}
    return [re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], a) for a in args]


def test_injected_command_lines_are_accepted_by_the_meshxl_cli() -> None:
    out = mutate_pod(load("deployment.yaml")["spec"]["template"], CONFIG)
    init = containers(out)
    for name in (STATESYNC_CONTAINER, ENVOY_CONTAINER):
        args = _expand(init[name]["args"])
        group: Any = main
        while args and args[0] in getattr(group, "commands", {}):
            group, args = group.commands[args[0]], args[1:]
        # Parses and validates every option without running the command.
        ctx = group.make_context(group.name, list(args))
        assert ctx.params, name
    sync = main.commands["serve"].commands["statesync"]  # type: ignore[attr-defined]
    params = sync.make_context("statesync", _expand(init[STATESYNC_CONTAINER]["args"][2:])).params
    assert (params["member"], params["app_address"], params["weight"]) == \
        ("orders-a", "10.1.2.3:9090", 200)


def test_envoy_gets_its_xds_client_certificate() -> None:
    """With an xDS client Secret the injected Envoy mounts it (and only the Envoy) and
    connects with mutual TLS, as node POD.NAMESPACE; `meshxl envoy` parses the line."""
    config = dataclasses.replace(CONFIG, xds_client_secret="meshxl-envoy-xds")
    out = mutate_pod(load("pod.yaml"), config)
    init = containers(out)
    envoy = init[ENVOY_CONTAINER]
    directory = "/var/run/meshxl/xds-client"
    assert {"name": "meshxl-xds-client", "mountPath": directory, "readOnly": True} in \
        envoy["volumeMounts"]
    assert not any(m["name"] == "meshxl-xds-client"
                   for m in init[STATESYNC_CONTAINER].get("volumeMounts", []))
    args = envoy["args"]
    assert (flag(args, "--xds-ca"), flag(args, "--xds-cert"), flag(args, "--xds-key")) == (
        f"{directory}/ca.crt", f"{directory}/tls.crt", f"{directory}/tls.key")
    (volume,) = [v for v in out["spec"]["volumes"] if v["name"] == "meshxl-xds-client"]
    assert volume["secret"]["secretName"] == "meshxl-envoy-xds"
    assert {i["key"] for i in volume["secret"]["items"]} == {"tls.crt", "tls.key", "ca.crt"}
    status = json.loads(out["metadata"]["annotations"][ANNOTATION_STATUS])
    assert status["volumes"] == [ENVOY_VOLUME, "meshxl-xds-client"]
    validate_k8s(out)
    command = main.commands["envoy"]  # type: ignore[attr-defined]
    params = command.make_context("envoy", _expand(args[1:])).params
    assert params["node_id"] == "orders-a.shop"
    assert str(params["xds_cert"]) == f"{directory}/tls.crt"
    with pytest.raises(ValueError, match="xDS client Secret"):
        dataclasses.replace(CONFIG, xds_client_secret="Not A Name")


def test_patch_applied_to_the_pod_gives_the_injected_pod() -> None:
    pod = load("pod.yaml")
    result = pod_patch(pod, CONFIG)
    assert result.patch is not None and not result.warnings
    assert jsonpatch.apply_patch(pod, result.patch) == mutate_pod(pod, CONFIG)
    assert {op["op"] for op in result.patch} <= {"add", "replace"}
    paths = {op["path"] for op in result.patch}
    assert "/spec/initContainers" in paths and "/spec/volumes" in paths
    assert not any(p.startswith("/spec/containers") for p in paths)


def test_deployment_template_with_init_containers_and_volumes() -> None:
    deployment = load("deployment.yaml")
    pod = template(deployment)
    out = mutate_pod(pod, CONFIG)
    init = out["spec"]["initContainers"]
    # The pod's own init containers run first, then the sidecars start.
    assert [c["name"] for c in init] == ["migrate", STATESYNC_CONTAINER, ENVOY_CONTAINER]
    args = containers(out)[STATESYNC_CONTAINER]["args"]
    assert flag(args, "--cluster") == "cart"      # app.kubernetes.io/name
    assert flag(args, "--site") == "dc2"          # label
    assert flag(args, "--weight") == "200"        # annotation
    assert flag(args, "--app") == "$(MESHXL_POD_IP):9090"  # annotation beats containerPort
    assert [v["name"] for v in out["spec"]["volumes"]] == ["cache", ENVOY_VOLUME]
    patch = pod_patch(pod, CONFIG).patch
    assert patch is not None
    assert jsonpatch.apply_patch(pod, patch) == out
    # Appending to existing lists: the existing items are left where they are.
    assert {"op": "add", "path": "/spec/volumes/1",
            "value": out["spec"]["volumes"][1]} in patch


def test_statefulset_in_istio_mode_gets_statesync_only() -> None:
    pod = template(load("statefulset.yaml"))
    out = mutate_pod(pod, CONFIG)
    assert list(containers(out)) == [STATESYNC_CONTAINER]
    assert "volumes" not in out["spec"]
    assert json.loads(out["metadata"]["annotations"][ANNOTATION_STATUS])["proxy"] == "none"
    none_config = InjectConfig(image=CONFIG.image, proxy="none", xds=())
    assert list(containers(mutate_pod(load("pod.yaml"), none_config))) == [STATESYNC_CONTAINER]


def test_ipv6_pods_register_a_bracketed_address() -> None:
    pod = load("pod.yaml")
    pod["metadata"]["annotations"]["meshxl.io/ip-family"] = "ipv6"
    args = containers(mutate_pod(pod, CONFIG))[STATESYNC_CONTAINER]["args"]
    assert flag(args, "--app") == "[$(MESHXL_POD_IP)]:8080"


def test_injection_is_idempotent() -> None:
    pod = load("pod.yaml")
    once = mutate_pod(pod, CONFIG)
    assert pod_patch(once, CONFIG).patch is None
    assert pod_patch(once, CONFIG).reason == "already injected"
    assert pod_patch(load("injected-pod.yaml"), CONFIG).patch is None
    assert pod_patch(load("opted-out-pod.yaml"), CONFIG).patch is None


# -- where members run ---------------------------------------------------------------------------


def test_members_repel_each_other_across_nodes_and_spread_over_zones() -> None:
    pod = load("pod.yaml")
    out = mutate_pod(pod, CONFIG)
    spec = out["spec"]
    assert list(spec["affinity"]) == ["podAntiAffinity"], "no site pin unless configured"
    (preference,) = spec["affinity"]["podAntiAffinity"][PREFERRED]
    assert list(spec["affinity"]["podAntiAffinity"]) == [PREFERRED]  # the default
    assert preference["weight"] == 100
    term = preference["podAffinityTerm"]
    assert term == {"topologyKey": HOSTNAME_KEY, "labelSelector": members_of("orders")}
    assert spec["topologySpreadConstraints"] == [zone_spread("orders")]
    # The rules select the member itself (and so every member of its cluster): the
    # injector labels it with its cluster.
    assert selects(term["labelSelector"], out["metadata"]["labels"])
    assert scheduling(out) == ["podAntiAffinity", "topologySpreadConstraints"]
    validate_k8s(out)


def test_deployment_members_required_on_different_nodes() -> None:
    config = InjectConfig(image=CONFIG.image, anti_affinity="required")
    rendered, _ = inject_yaml((FIXTURES / "deployment.yaml").read_text(), config)
    deployment = yaml.safe_load(rendered)
    spec = deployment["spec"]["template"]["spec"]
    assert spec["affinity"] == {"podAntiAffinity": {REQUIRED: [
        {"topologyKey": HOSTNAME_KEY, "labelSelector": members_of("cart")}]}}
    # Zones stay a preference whatever the strength: DoNotSchedule would rule out every
    # node without a zone label and keep replacements out of surviving zones.
    assert spec["topologySpreadConstraints"] == [zone_spread("cart")]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(spec["affinity"]["podAntiAffinity"][REQUIRED][0]["labelSelector"], labels)
    assert "&id" not in rendered and "*id" not in rendered, "no YAML anchors"
    validate_k8s(deployment)


def test_site_pins_a_member_to_nodes_of_its_site() -> None:
    out = mutate_pod(load("pod.yaml"), SITES_ARE_ZONES)  # meshxl.io/site: dc1
    assert out["spec"]["affinity"]["nodeAffinity"] == {REQUIRED: {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": ZONE_KEY, "operator": "In", "values": ["dc1"]}]}]}}
    assert scheduling(out) == ["podAntiAffinity", "topologySpreadConstraints", "nodeAffinity"]
    validate_k8s(out)
    # Sites as regions (Istio's region failover): the same pin on the region label.
    regions = InjectConfig(image=CONFIG.image, site_topology_key="topology.kubernetes.io/region")
    term = mutate_pod(load("pod.yaml"), regions)["spec"]["affinity"]["nodeAffinity"][
        REQUIRED]["nodeSelectorTerms"][0]
    assert term["matchExpressions"][0]["key"] == "topology.kubernetes.io/region"
    # A member without a site is not pinned: the model decides its site.
    siteless = load("pod.yaml")
    del siteless["metadata"]["annotations"]["meshxl.io/site"]
    assert "nodeAffinity" not in mutate_pod(siteless, SITES_ARE_ZONES)["spec"]["affinity"]


def test_statefulset_opting_out_of_anti_affinity_keeps_its_site_pin() -> None:
    sts = load("statefulset.yaml")
    template(sts)["metadata"]["annotations"][ANNOTATION_ANTI_AFFINITY] = "none"
    rendered, _ = inject_yaml(yaml.safe_dump(sts), SITES_ARE_ZONES)
    out = yaml.safe_load(rendered)
    spec = template(out)["spec"]
    assert "topologySpreadConstraints" not in spec
    assert spec["affinity"] == {"nodeAffinity": {REQUIRED: {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": ZONE_KEY, "operator": "In", "values": ["dc1"]}]}]}}}
    assert scheduling(template(out)) == ["nodeAffinity"]
    validate_k8s(out)


def test_a_workload_that_places_itself_is_left_alone() -> None:
    deployment = load("placed-deployment.yaml")
    before = copy.deepcopy(template(deployment)["spec"])
    for config in (SITES_ARE_ZONES, InjectConfig(image=CONFIG.image, anti_affinity="required",
                                                 site_topology_key=ZONE_KEY)):
        out = mutate_pod(template(deployment), config)
        for key in ("affinity", "topologySpreadConstraints", "nodeSelector"):
            assert out["spec"][key] == before[key], key
        assert scheduling(out) == []
    patch = pod_patch(template(deployment), SITES_ARE_ZONES).patch
    assert patch is not None
    assert not [op for op in patch if op["path"].startswith(
        ("/spec/affinity", "/spec/topologySpreadConstraints", "/spec/nodeSelector"))]


def test_user_rules_about_other_things_are_kept_and_meshxl_rules_added() -> None:
    sts = load("affinity-statefulset.yaml")
    pod = template(sts)
    mine = copy.deepcopy(pod["spec"])
    out = mutate_pod(pod, SITES_ARE_ZONES)
    spec = out["spec"]
    # Untouched: pod affinity and preferred node affinity.
    assert spec["affinity"]["podAffinity"] == mine["affinity"]["podAffinity"]
    node = spec["affinity"]["nodeAffinity"]
    assert node[PREFERRED] == mine["affinity"]["nodeAffinity"][PREFERRED]
    # The pod's anti-affinity term is about the zone, not about nodes: meshxl's node
    # term is added after it, required as the pod's annotation asks.
    assert spec["affinity"]["podAntiAffinity"][REQUIRED] == [
        *mine["affinity"]["podAntiAffinity"][REQUIRED],
        {"topologyKey": HOSTNAME_KEY, "labelSelector": members_of("ledger")}]
    assert PREFERRED not in spec["affinity"]["podAntiAffinity"]
    # The pod spreads over nodes itself; meshxl adds the zone spread after it.
    assert spec["topologySpreadConstraints"] == [*mine["topologySpreadConstraints"],
                                                 zone_spread("ledger")]
    # The site pin joins every (ORed) node selector term, so it holds whichever matches.
    pin = {"key": ZONE_KEY, "operator": "In", "values": ["eu-west-1b"]}
    terms = node[REQUIRED]["nodeSelectorTerms"]
    theirs = mine["affinity"]["nodeAffinity"][REQUIRED]["nodeSelectorTerms"]
    assert terms == [{"matchExpressions": [*t["matchExpressions"], pin]} for t in theirs]
    assert pod["spec"] == mine, "the input is not modified"
    validate_k8s({**sts, "spec": {**sts["spec"], "template": out}})
    # As an admission patch: additions only, nothing of the pod's replaced or removed.
    patch = pod_patch(pod, SITES_ARE_ZONES).patch
    assert patch is not None
    assert {op["op"] for op in patch} == {"add"}
    assert jsonpatch.apply_patch(pod, patch) == out


def test_meshxl_rules_are_never_added_twice() -> None:
    """Once injected, the rules are the pod's own: a pod stripped of its sidecars and
    status (a copied template, say) gets its sidecars again but no second rule."""
    out = mutate_pod(template(load("affinity-statefulset.yaml")), SITES_ARE_ZONES)
    stripped = copy.deepcopy(out)
    del stripped["metadata"]["annotations"][ANNOTATION_STATUS]
    stripped["spec"]["initContainers"] = []
    stripped["spec"]["volumes"] = []
    again = mutate_pod(stripped, SITES_ARE_ZONES)
    for key in ("affinity", "topologySpreadConstraints"):
        assert again["spec"][key] == out["spec"][key], key
    assert scheduling(again) == []


# -- bad input -----------------------------------------------------------------------------------


def _without(path: list[str], key: str) -> dict[str, Any]:
    pod = load("pod.yaml")
    node = pod
    for part in path:
        node = node[part]
    del node[key]
    return pod


@pytest.mark.parametrize(("change", "message"), [
    (lambda p: p["metadata"]["labels"].clear(), "no meshxl cluster"),
    (lambda p: p["metadata"]["labels"].update({"meshxl.io/cluster": "Orders!"}),
     "not a valid meshxl cluster name"),
    (lambda p: p["metadata"]["annotations"].update({"meshxl.io/site": "DC 1"}),
     "not a valid site name"),
    (lambda p: p["metadata"]["annotations"].update({"meshxl.io/weight": "0"}),
     "meshxl.io/weight must be an integer in 1..10000"),
    (lambda p: p["metadata"]["annotations"].update({"meshxl.io/app-port": "http"}),
     "meshxl.io/app-port must be a port number"),
    (lambda p: p["spec"]["containers"][0].pop("ports"), "no application port"),
    (lambda p: p["metadata"]["annotations"].update({"meshxl.io/proxy": "linkerd"}),
     "meshxl.io/proxy must be 'envoy' or 'none'"),
    (lambda p: p["spec"].update({"volumes": [{"name": ENVOY_VOLUME, "emptyDir": {}}]}),
     "already has a volume named"),
    (lambda p: p["spec"].update({"containers": []}), "no containers"),
    (lambda p: p["spec"].update({"initContainers": {"a": 1}}),
     "spec.initContainers must be a list"),
    (lambda p: p["metadata"]["annotations"].update({ANNOTATION_ANTI_AFFINITY: "strict"}),
     "meshxl.io/anti-affinity must be 'preferred', 'required' or 'none'"),
    (lambda p: p["spec"].update({"affinity": ["x"]}), "spec.affinity is not a mapping"),
    (lambda p: p["spec"].update({"topologySpreadConstraints": {"maxSkew": 1}}),
     "spec.topologySpreadConstraints must be a list of objects"),
    (lambda p: p["spec"].update({"affinity": {"podAntiAffinity": {PREFERRED: ["x"]}}}),
     f"spec.affinity.podAntiAffinity.{PREFERRED} must be a list of objects"),
])
def test_bad_pods_are_named_precisely(change: Any, message: str) -> None:
    pod = load("pod.yaml")
    change(pod)
    with pytest.raises(InjectError, match=re.escape(message)):
        mutate_pod(pod, CONFIG)
    # The webhook does not refuse such a pod: no patch, and a warning kubectl shows.
    result = pod_patch(pod, CONFIG)
    assert result.patch is None
    assert result.warnings and message in result.warnings[0]


def test_bad_inject_value_is_a_warning_not_a_crash() -> None:
    pod = load("pod.yaml")
    pod["metadata"]["labels"]["meshxl.io/inject"] = "maybe"
    result = pod_patch(pod, CONFIG)
    assert result.patch is None
    assert "must be 'true' or 'false'" in result.warnings[0]


@pytest.mark.parametrize(("options", "message"), [
    ({"etcd": "https://etcd:2379"}, "https:// etcd endpoints need the etcd client Secret"),
    ({"etcd_client_secret": "meshxl-statesync-etcd"},
     "an etcd client Secret needs https:// etcd endpoints"),
    ({"etcd": "https://etcd:2379", "etcd_client_secret": "Not_A_Name"},
     "the etcd client Secret must be a Secret name"),
    ({"xds": ("cp:notaport",)}, "port"),
    ({"xds": ()}, "at least one control-plane address"),
    ({"statesync_listen": "0.0.0.0:7070"}, "must listen on loopback"),
    ({"image": ""}, "bad sidecar image"),
    ({"anti_affinity": "strict"}, "anti-affinity must be 'preferred', 'required' or 'none'"),
    ({"site_topology_key": "zone name"}, "the site topology key must be a node label key"),
    ({"site_topology_key": "/zone"}, "the site topology key must be a node label key"),
    ({"site_topology_key": "Example.COM/zone"}, "the site topology key must be a node label"),
    ({"site_topology_key": ""}, "the site topology key must be a node label key"),
])
def test_bad_config(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        InjectConfig(**options)


# -- meshxl inject (offline) ------------------------------------------------------------------


def test_inject_yaml_on_a_multi_document_file() -> None:
    text = (FIXTURES / "workloads.yaml").read_text()
    rendered, reports = inject_yaml(text, CONFIG)
    before = [d for d in yaml.safe_load_all(text) if d]
    after = [d for d in yaml.safe_load_all(rendered) if d]
    assert [(d["kind"], d["metadata"]["name"]) for d in after] == \
        [(d["kind"], d["metadata"]["name"]) for d in before]
    service, statefulset, reports_deployment, pod = after
    assert service == before[0], "other kinds pass through unchanged"
    assert reports_deployment == before[2], "opted-out workloads are unchanged"
    sts_init = containers(statefulset["spec"]["template"])
    assert flag(sts_init[STATESYNC_CONTAINER]["args"], "--cluster") == "orders"  # app label
    assert STATESYNC_CONTAINER in containers(pod)
    assert [(r.kind, r.name, r.injected) for r in reports] == [
        ("StatefulSet", "orders", True), ("Deployment", "reports", False),
        ("Pod", "orders-debug", True)]
    for obj in after:
        validate_k8s(obj)
    again, again_reports = inject_yaml(rendered, CONFIG)
    assert [d for d in yaml.safe_load_all(again) if d] == after, "never injects twice"
    assert not any(r.injected for r in again_reports)


@pytest.mark.parametrize("fixture", ["deployment.yaml", "statefulset.yaml", "pod.yaml"])
def test_injected_workloads_validate_against_kubernetes_schemas(fixture: str) -> None:
    rendered, reports = inject_yaml((FIXTURES / fixture).read_text(), CONFIG)
    assert [r.injected for r in reports] == [True]
    validate_k8s(yaml.safe_load(rendered))


def test_inject_yaml_cronjob_and_list() -> None:
    pod = template(load("deployment.yaml"))
    doc = {"apiVersion": "v1", "kind": "List", "items": [{
        "apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "nightly"},
        "spec": {"schedule": "0 1 * * *", "jobTemplate": {"spec": {"template": pod}}}}]}
    rendered, reports = inject_yaml(yaml.safe_dump(doc), CONFIG)
    cron = yaml.safe_load(rendered)["items"][0]
    assert STATESYNC_CONTAINER in containers(cron["spec"]["jobTemplate"]["spec"]["template"])
    assert reports[0].kind == "CronJob"


@pytest.mark.parametrize(("text", "message"), [
    ("kind: Pod\nmetadata: {name: x\n", "YAML syntax error"),
    ("- just\n- a list\n", "every document must be a Kubernetes object"),
    ("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec: {}\n",
     "Deployment/web: "),
    ("apiVersion: v1\nkind: Pod\nmetadata: {name: web}\n"
     "spec: {containers: [{name: a, image: b, ports: [{containerPort: 80}]}]}\n",
     "Pod/web: no meshxl cluster"),
])
def test_inject_yaml_bad_input(text: str, message: str) -> None:
    with pytest.raises(InjectError, match=re.escape(message)):
        inject_yaml(text, CONFIG, "in.yaml")


def test_inject_command(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["inject", "-f", str(FIXTURES / "workloads.yaml"),
                                  "--image", "registry.example.com/meshxl:2.0"])
    assert result.exit_code == 0, result.output
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    sts = containers(docs[1]["spec"]["template"])
    assert sts[STATESYNC_CONTAINER]["image"] == "registry.example.com/meshxl:2.0"
    assert "meshxl: StatefulSet/orders: injected" in result.stderr

    stdin = runner.invoke(main, ["inject", "-f", "-", "-q", "--proxy", "none"],
                          input=(FIXTURES / "pod.yaml").read_text())
    assert stdin.exit_code == 0 and stdin.stderr == ""
    assert list(containers(yaml.safe_load(stdin.stdout))) == [STATESYNC_CONTAINER]


def test_inject_command_placement_options(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    sts = (FIXTURES / "statefulset.yaml").read_text()
    result = runner.invoke(main, ["inject", "-f", "-", "-q", "--anti-affinity", "required",
                                  "--site-topology-key", ZONE_KEY], input=sts)
    assert result.exit_code == 0, result.output
    spec = template(yaml.safe_load(result.stdout))["spec"]
    assert spec["affinity"]["podAntiAffinity"][REQUIRED][0]["topologyKey"] == HOSTNAME_KEY
    expression = spec["affinity"]["nodeAffinity"][REQUIRED]["nodeSelectorTerms"][0][
        "matchExpressions"][0]
    assert expression == {"key": ZONE_KEY, "operator": "In", "values": ["dc1"]}
    # The webhook's Deployment sets these through the environment.
    monkeypatch.setenv("MESHXL_ANTI_AFFINITY", "none")
    monkeypatch.setenv("MESHXL_SITE_TOPOLOGY_KEY", "topology.kubernetes.io/region")
    env = runner.invoke(main, ["inject", "-f", "-", "-q"], input=sts)
    assert env.exit_code == 0, env.output
    spec = template(yaml.safe_load(env.stdout))["spec"]
    assert "topologySpreadConstraints" not in spec and "podAntiAffinity" not in spec["affinity"]
    assert spec["affinity"]["nodeAffinity"][REQUIRED]["nodeSelectorTerms"][0][
        "matchExpressions"][0]["key"] == "topology.kubernetes.io/region"


@pytest.mark.parametrize(("args", "stdin", "message"), [
    (["-f", "/nonexistent/x.yaml"], None, "meshxl: cannot read /nonexistent/x.yaml"),
    (["-f", "-"], "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: []}\n",
     "meshxl: Pod/p: the pod has no containers"),
    (["-f", "-", "--etcd", "https://etcd:2379"], "",
     "meshxl: https:// etcd endpoints need the etcd client Secret"),
    (["-f", "-", "--site-topology-key", "zone name"], "",
     "meshxl: the site topology key must be a node label key"),
])
def test_inject_command_errors(args: list[str], stdin: str | None, message: str) -> None:
    result = CliRunner().invoke(main, ["inject", *args], input=stdin)
    assert result.exit_code == 1
    assert result.stderr.startswith(message)
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


# -- junk pods and AdmissionReviews (hypothesis) ------------------------------------------

_JUNK = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 70_000) | st.floats(allow_nan=False)
    | st.text(max_size=6) | st.sampled_from(["true", "false", "web", "TCP", "8080", "none",
                                             "envoy", "required", "ipv6", "zone-a"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.text(max_size=4) | st.sampled_from(["name", "ports", "containerPort", "protocol",
                                               "topologyKey", "key", "matchExpressions"]),
        inner, max_size=4),
    max_leaves=10)
_KEYS = st.sampled_from(["meshxl.io/inject", "meshxl.io/cluster", "app", "meshxl.io/site",
                         "meshxl.io/weight", "meshxl.io/app-port", "meshxl.io/proxy",
                         "meshxl.io/anti-affinity", "meshxl.io/ip-family",
                         "meshxl.io/status"])
_VALUES = _JUNK | st.sampled_from(["web", "true", "1", "8080", "zone-a", "envoy", "none"])
_CONTAINER = st.fixed_dictionaries({}, optional={
    "name": _VALUES, "env": _JUNK, "volumeMounts": _JUNK,
    "ports": st.lists(st.fixed_dictionaries({}, optional={"containerPort": _VALUES,
                                                          "protocol": _VALUES}) | _JUNK,
                      max_size=2) | _JUNK})
_AFFINITY = st.dictionaries(
    st.sampled_from(["podAntiAffinity", "nodeAffinity"]),
    st.dictionaries(st.sampled_from([PREFERRED, "requiredDuringSchedulingIgnoredDuringExecution"]),
                    _JUNK | st.lists(st.dictionaries(st.sampled_from(
                        ["topologyKey", "podAffinityTerm", "nodeSelectorTerms"]), _JUNK),
                        max_size=2)))
_SPEC = st.fixed_dictionaries({}, optional={
    "containers": st.lists(_CONTAINER | _JUNK, max_size=2) | _JUNK,
    "initContainers": st.lists(_CONTAINER | _JUNK, max_size=2) | _JUNK,
    "volumes": st.lists(st.dictionaries(st.just("name"), _VALUES) | _JUNK, max_size=2) | _JUNK,
    "affinity": _AFFINITY | _JUNK, "topologySpreadConstraints": _JUNK,
    "nodeSelector": st.dictionaries(st.just("topology.kubernetes.io/zone"), _VALUES) | _JUNK})
_META = st.fixed_dictionaries({}, optional={
    "labels": st.dictionaries(_KEYS, _VALUES, max_size=4) | _JUNK,
    "annotations": st.dictionaries(_KEYS, _VALUES, max_size=4) | _JUNK, "name": _VALUES})
_INJECTABLE = st.builds(
    lambda meta, spec, containers: {
        "metadata": {**meta, "labels": {"meshxl.io/cluster": "web"},
                     "annotations": {"meshxl.io/app-port": "8080", "meshxl.io/site": "a"}},
        "spec": {**spec, "containers": containers}},
    _META, _SPEC, st.lists(_CONTAINER, min_size=1, max_size=2))
JUNK_PODS = st.fixed_dictionaries({}, optional={"metadata": _META | _JUNK,
                                                "spec": _SPEC | _JUNK}) | _INJECTABLE | _JUNK
_CONFIGS = [CONFIG, InjectConfig(image="m:1", proxy="none"),
            InjectConfig(image="m:1", statesync_token_secret="tok",
                         site_topology_key="topology.kubernetes.io/zone")]


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(JUNK_PODS, st.sampled_from(_CONFIGS))
def test_junk_pods_get_a_patch_or_a_warning_never_an_exception(pod: Any,
                                                                 config: InjectConfig) -> None:
    if not isinstance(pod, dict):
        with pytest.raises(InjectError):
            mutate_pod(pod, config)
        return
    result = pod_patch(pod, config)
    if result.patch is not None:
        patched = jsonpatch.apply_patch(pod, result.patch)
        assert patched["metadata"]["labels"]["meshxl.io/cluster"]
        assert pod_patch(patched, config).patch is None  # injected once only


_REVIEWS = st.builds(
    lambda uid, kind, op, obj, extra: {"apiVersion": "admission.k8s.io/v1",
                                       "kind": "AdmissionReview",
                                       "request": {"uid": uid, "kind": kind, "operation": op,
                                                   "object": obj, **extra}},
    st.text(min_size=1, max_size=8) | _JUNK, st.just({"kind": "Pod"}) | _JUNK,
    st.sampled_from(["CREATE", "UPDATE"]) | _JUNK, JUNK_PODS,
    st.dictionaries(st.sampled_from(["namespace", "name", "dryRun"]), _JUNK)) | _JUNK


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(_REVIEWS)
def test_junk_admission_reviews_are_answered_or_refused_cleanly(review: Any) -> None:
    try:
        answer = admission_response(review, CONFIG)
    except ReviewError:
        return
    assert answer["response"]["allowed"] is True
    json.dumps(answer)


def test_every_member_pod_is_labelled_with_its_installation() -> None:
    """The label ``meshxl istio label`` selects its installation's pods by: always the
    injector's own value, never one the pod claims."""
    from meshxl.istio.labeler import DEFAULT_INSTALLATION, INSTALLATION_LABEL
    from meshxl.kube import LABEL_INSTALLATION
    from meshxl.kube.config import DEFAULT_INSTALLATION as KUBE_DEFAULT

    assert (LABEL_INSTALLATION, KUBE_DEFAULT) == (INSTALLATION_LABEL, DEFAULT_INSTALLATION)
    pod = load("pod.yaml")
    assert mutate_pod(pod, CONFIG)["metadata"]["labels"][LABEL_INSTALLATION] == "meshxl"
    pod["metadata"].setdefault("labels", {})[LABEL_INSTALLATION] = "meshxl-system"
    ours = dataclasses.replace(CONFIG, installation="shop-meshxl")
    assert mutate_pod(pod, ours)["metadata"]["labels"][LABEL_INSTALLATION] == "shop-meshxl"


@pytest.mark.parametrize("name", ["", "-x", "a/b", "x" * 64, "a b"])
def test_an_installation_that_is_no_label_value_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match=r"--installation, MESHXL_INSTALLATION"):
        dataclasses.replace(CONFIG, installation=name)
    result = CliRunner().invoke(main, ["inject", "-f", "-", "--installation", name], input="")
    assert result.exit_code == 1 and "--installation" in result.output, result.output


def test_the_dapr_annotation_turns_dapr_s_state_api_on() -> None:
    """``meshxl.io/dapr: "on"``: the sidecar serves Dapr's state API on the pod's
    loopback (the app's SDK finds it on 3500 and 50001 unchanged); off by default; a
    pod daprd is injected into too is refused (both would take those ports)."""
    pod = load("pod.yaml")
    assert "--dapr" not in containers(mutate_pod(pod, CONFIG))[STATESYNC_CONTAINER]["args"]
    pod["metadata"].setdefault("annotations", {})["meshxl.io/dapr"] = "on"
    args = containers(mutate_pod(pod, CONFIG))[STATESYNC_CONTAINER]["args"]
    assert flag(args, "--dapr") == "on"
    assert flag(args, "--listen") == CONFIG.statesync_listen  # loopback: the pod's own
    pod["metadata"]["annotations"]["meshxl.io/dapr"] = "yes"
    with pytest.raises(InjectError, match="meshxl.io/dapr must be 'on' or 'off'"):
        mutate_pod(pod, CONFIG)
    pod["metadata"]["annotations"].update({"meshxl.io/dapr": "on", "dapr.io/enabled": "true"})
    with pytest.raises(InjectError, match="3500 and 50001"):
        mutate_pod(pod, CONFIG)
