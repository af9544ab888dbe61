"""Virtual systems under Istio and Kubernetes: a pool as StatefulSets, a Service per VS,
failover on per-VS role labels kept from the placement, and the checks of a mapping that
breaks the placement (docs/vsls.md, "Istio and Kubernetes")."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner

from meshxl.cli import main
from meshxl.istio import IstioOptions, IstioRenderError, render_model
from meshxl.istio.check import check
from meshxl.istio.labeler import changes, desired_labels
from meshxl.istio.labels import istio_priority, vs_failover_priority
from meshxl.istio.pools import statefulsets
from meshxl.kube import InjectConfig, inject_yaml
from meshxl.model import RuntimeState, cluster_view, load_model, parse_model
from meshxl.model.runtime import AdminAction, Health, Registration
from meshxl.model.vsls import placed, placement_of
from tests.unit.test_istio import check_crd

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "examples"
MODEL = load_model(EXAMPLES / "vsls.yaml")
POOL_MANIFEST = (EXAMPLES / "vsls-pool.yaml").read_text()
OPTIONS = IstioOptions(namespace="shop")
VSS = ["t01", "t02", "t03", "t04", "t05", "t06", "t07", "t08", "big", "shared"]
HA = [v for v in VSS if v != "shared"]


def _by(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


def _pods(state: RuntimeState | None = None, model: Any = MODEL) -> list[dict[str, Any]]:
    """The pool's pods as the StatefulSets make them, labelled as meshxl istio label
    labels them for ``state``."""
    want = desired_labels(model, state or RuntimeState())["web"]
    pool = model.pool("web")
    sites = {m.name: m.site for m in pool.members}
    return [{"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": name, "namespace": "shop",
                          "ownerReferences": [{"kind": "StatefulSet",
                                               "name": name.rsplit("-", 1)[0]}],
                          "labels": {"meshxl.io/cluster": "web", "meshxl.io/site": sites[name],
                                     "meshxl.io/installation": "meshxl",
                                     **{k: v for k, v in labels.items() if v is not None}}}}
            for name, labels in want.members.items()]


def _namespace() -> list[dict[str, Any]]:
    return [*render_model(MODEL, OPTIONS).objects, *yaml.safe_load_all(POOL_MANIFEST),
            *_pods()]


def _findings(objects: list[dict[str, Any]], model: Any = MODEL) -> list[tuple[str, str, str]]:
    return [(f.level, f.object, f.message)
            for f in check(model, objects, OPTIONS, istio_version=(1, 27))]


# -- render --------------------------------------------------------------------------------


def test_every_virtual_system_is_a_service_over_the_pool_with_its_own_failover() -> None:
    rendered = render_model(MODEL, OPTIONS)
    objects = rendered.objects
    assert rendered.warnings == []
    pool = _by(objects, "Service", "web")
    assert pool["spec"] == {"clusterIP": "None", "publishNotReadyAddresses": True,
                            "selector": {"meshxl.io/cluster": "web"}}
    assert [o["metadata"]["name"] for o in objects if o["kind"] == "Service"] == ["web", *VSS]
    for vs in VSS:
        service = _by(objects, "Service", vs)
        assert service["spec"] == {"selector": {"meshxl.io/cluster": "web"}, "ports": [
            {"name": "http", "port": 10000, "targetPort": 8080}]}
        dr = _by(objects, "DestinationRule", f"meshxl-{vs}")
        assert dr["spec"]["host"] == f"{vs}.shop.svc.cluster.local"
        locality = dr["spec"]["trafficPolicy"]["loadBalancer"]["localityLbSetting"]
        if vs == "shared":  # load sharing: one tier, its degraded members behind it
            assert locality == {"enabled": True,
                                "failoverPriority": ["serving.vs.meshxl.io/shared=true"]}
        else:
            assert locality == {"enabled": True, "failoverPriority": [
                f"serving.vs.meshxl.io/{vs}=true", f"preferred.vs.meshxl.io/{vs}=true",
                f"vs.meshxl.io/{vs}=active"]}
            assert "outlierDetection" in dr["spec"]["trafficPolicy"]
        ef = _by(objects, "EnvoyFilter", f"meshxl-shop-{vs}")
        cluster = next(p for p in ef["spec"]["configPatches"] if p["applyTo"] == "CLUSTER")
        assert cluster["match"]["cluster"] == {"service": f"{vs}.shop.svc.cluster.local",
                                               "portNumber": 10000}
    for obj in objects:
        if obj["kind"] == "Service":
            for version in ("1.29", kubernetes_validate.latest_version()):
                kubernetes_validate.validate(obj, version, strict=True)
        else:
            check_crd(obj)


@pytest.mark.parametrize("state", [
    RuntimeState(),
    RuntimeState(members_down={("web", "web-dc1-0"): AdminAction()}),
    RuntimeState(sites_offline=frozenset({"dc2"})),
    RuntimeState(members_down={("t03", "web-dc2-1"): AdminAction(),
                               ("t05", "web-dc1-1"): AdminAction()}),
], ids=["all-up", "member-down", "site-offline", "drained-in-one-vs"])
def test_istio_priorities_from_the_labels_are_the_placements(state: RuntimeState) -> None:
    """Per VS, the priority istiod computes for each pod from its labels orders the pool
    as meshxl's own xDS does: active 0, standby 1, backups 2, the rest (and the members
    meshxl's xDS leaves out) 3."""
    pods = {p["metadata"]["name"]: p["metadata"]["labels"] for p in _pods(state)}
    model = placed(MODEL, state)
    roles = placement_of(model, model.pool("web"), state).roles
    for vs in HA:
        istio = {name: istio_priority(labels, vs_failover_priority(vs))
                 for name, labels in pods.items()}
        view = {m.name: m for m in cluster_view(model.cluster(vs), state).members}
        serving = [m for m in view.values() if m.role.value in ("active", "standby", "backup")]
        for name, priority in istio.items():
            member = view.get(name)
            if member is None or member.role.value not in ("active", "standby", "backup"):
                assert priority == 3, (vs, name)
            elif member.role.value == "active":
                assert priority == 0, (vs, name)
            elif member.role.value == "standby":
                assert priority == 1, (vs, name)
            else:
                placed_backups = roles[vs].order[2:2 + roles[vs].backups]
                assert priority == (2 if name in placed_backups else 3), (vs, name)
        assert sum(p == 0 for p in istio.values()) == 1 and len(serving) >= 2
        active = min(view.values(), key=lambda m: m.priority if m.role.value != "none" else 99)
        assert istio[active.name] == 0


def test_a_pool_kubernetes_cannot_hold_is_refused_naming_it() -> None:
    base = (EXAMPLES / "vsls.yaml").read_text()
    cluster = ("clusters:\n  - {name: web, listener: {port: 80},\n"
               "     members: [{name: a, address: 10.0.0.1, port: 1}]}\n")
    cases = {
        base + cluster: "pool web: a cluster has its name",
        base.replace("names: [t01,", "names: [t_1,"): "virtual system t_1: 't_1' is not",
        base.replace("web-dc2-1.web.shop.svc.cluster.local, port: 8080",
                     "web-dc2-1.web.shop.svc.cluster.local, port: 8081"):
            "members listen on ports 8080, 8081",
    }
    for text, message in cases.items():
        with pytest.raises(IstioRenderError, match=message):
            render_model(parse_model(text), OPTIONS)


def test_members_no_statefulset_can_name_and_domains_are_warned_about() -> None:
    text = (EXAMPLES / "vsls.yaml").read_text().replace("web-dc2-1", "w4").replace(
        "{name: big, pool: web,", "{name: big, pool: web, domains: [big.example.com],")
    warnings = render_model(parse_model(text), OPTIONS).warnings
    assert any("member w4 is not named NAME-ORDINAL" in w for w in warnings), warnings
    assert any("virtual system big: domains big.example.com" in w for w in warnings)
    mixed = (EXAMPLES / "vsls.yaml").read_text().replace("web-dc2-", "web-dc1-9")
    assert statefulsets(parse_model(mixed).pool("web"))[1]  # web-dc1-90, ... not 0..n


# -- Kubernetes ----------------------------------------------------------------------------


def test_the_pool_statefulsets_are_valid_injected_and_their_pods_are_the_members() -> None:
    docs = list(yaml.safe_load_all(POOL_MANIFEST))
    for doc in docs:
        kubernetes_validate.validate(doc, "1.29", strict=True)
    expected, problems = statefulsets(MODEL.pool("web"))
    assert problems == []
    assert {d["metadata"]["name"]: (d["spec"]["template"]["metadata"]["labels"]
                                    ["meshxl.io/site"], d["spec"]["replicas"])
            for d in docs} == expected
    assert {d["spec"]["serviceName"] for d in docs} == {"web"}
    out, reports = inject_yaml(POOL_MANIFEST, InjectConfig(proxy="none",
                                                           site_topology_key="example/site"))
    assert [r.injected for r in reports] == [True, True]
    for doc in yaml.safe_load_all(out):
        kubernetes_validate.validate(doc, "1.29", strict=True)
        pod = doc["spec"]["template"]
        assert pod["metadata"]["labels"]["meshxl.io/cluster"] == "web"
        names = [c["name"] for c in pod["spec"]["initContainers"]]
        assert names == ["meshxl-statesync"]
        site = pod["metadata"]["labels"]["meshxl.io/site"]
        terms = pod["spec"]["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        assert {"key": "example/site", "operator": "In", "values": [site]} in \
            terms[0]["matchExpressions"]


# -- check ---------------------------------------------------------------------------------


def test_the_example_namespace_has_no_findings() -> None:
    assert _findings(_namespace()) == []


def _broken(change: Any) -> list[tuple[str, str, str]]:
    objects = copy.deepcopy(_namespace())
    change(objects)
    return _findings(objects)


def _pod(objects: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return _by(objects, "Pod", name)


def test_a_deployment_pool_is_an_error_its_generated_names_are_no_members() -> None:
    def deployment(objects: list[dict[str, Any]]) -> None:
        sts = [o for o in objects if o["kind"] in ("StatefulSet", "Pod")]
        for o in sts:
            objects.remove(o)
        dep = copy.deepcopy(sts[0])
        dep.update(kind="Deployment", metadata={"name": "web", "namespace": "shop"})
        del dep["spec"]["serviceName"], dep["spec"]["podManagementPolicy"]
        objects.append(dep)
        objects.append({"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": "web-7d9f8-x2k4q", "namespace": "shop",
            "ownerReferences": [{"kind": "ReplicaSet", "name": "web-7d9f8"}],
            "labels": {"meshxl.io/cluster": "web"}}})

    found = _broken(deployment)
    assert [(lv, obj) for lv, obj, _ in found] == [
        ("error", "Deployment shop/web"), ("error", "Pod shop/web-7d9f8-x2k4q")], found
    assert "generated names" in found[0][2] and "StatefulSet per site" in found[0][2]
    assert "not a member of pool web" in found[1][2]


@pytest.mark.parametrize(("change", "level", "obj", "message"), [
    (lambda o: _by(o, "StatefulSet", "web-dc2")["metadata"].update(name="web-b"),
     "error", "StatefulSet shop/web-b", "are not members of pool web"),
    (lambda o: o.append({**copy.deepcopy(_pod(o, "web-dc1-1")),
                         "metadata": {**_pod(o, "web-dc1-1")["metadata"], "name": "web-dc1-2"}}),
     "error", "Pod shop/web-dc1-2", "not a member of pool web"),
    (lambda o: o.remove(_pod(o, "web-dc2-1")),
     "warning", "Pod shop/web-dc2-1", "has no pod"),
    (lambda o: _pod(o, "web-dc1-0")["metadata"]["labels"].update({"meshxl.io/site": "dc2"}),
     "error", "Pod shop/web-dc1-0", "on site dc1 in the model"),
    (lambda o: _by(o, "StatefulSet", "web-dc2")["spec"]["template"]["metadata"][
        "labels"].update({"meshxl.io/site": "dc1"}),
     "error", "StatefulSet shop/web-dc2", "members on site dc2 in the model"),
    (lambda o: _by(o, "StatefulSet", "web-dc2")["spec"].update(serviceName="other"),
     "warning", "StatefulSet shop/web-dc2", "serviceName is not web"),
    (lambda o: _by(o, "Service", "web")["spec"].update(selector={"app": "legacy"}),
     "error", "Service shop/web", "the Service of pool web selects other pods"),
    (lambda o: _by(o, "Service", "t03")["spec"].update(selector={"app": "legacy"}),
     "error", "Service shop/t03", "selects other pods"),
    (lambda o: o.append({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
                         "metadata": {"name": "x", "namespace": "shop"},
                         "spec": {"hosts": ["t04.shop.svc.cluster.local"]}}),
     "error", "ServiceEntry shop/x", "two services"),
    (lambda o: _by(o, "DestinationRule", "meshxl-t05")["spec"]["trafficPolicy"][
        "loadBalancer"]["localityLbSetting"].update(failoverPriority=[
            "meshxl.io/serving=true", "meshxl.io/preferred=true", "meshxl.io/role=active"]),
     "error", "DestinationRule shop/meshxl-t05", "does not follow virtual system t05"),
    (lambda o: _by(o, "DestinationRule", "meshxl-shared")["spec"]["trafficPolicy"][
        "loadBalancer"].update(localityLbSetting={"enabled": False}),
     "warning", "DestinationRule shop/meshxl-shared", "a degraded member of load-sharing"),
])
def test_each_broken_mapping_is_reported(change: Any, level: str, obj: str,
                                         message: str) -> None:
    found = _broken(change)
    assert any(f[0] == level and f[1] == obj and message in f[2] for f in found), found
    assert level == "warning" or any(f[0] == "error" for f in found)


def test_role_labels_that_disagree_with_the_placement_are_reported() -> None:
    roles = placement_of(MODEL, MODEL.pool("web")).roles["t06"]

    def unlabelled(objects: list[dict[str, Any]]) -> None:
        for pod in objects:
            if pod["kind"] == "Pod":
                pod["metadata"]["labels"].pop("vs.meshxl.io/t06", None)

    def two(objects: list[dict[str, Any]]) -> None:
        _pod(objects, roles.standby)["metadata"]["labels"]["vs.meshxl.io/t06"] = "active"

    def elsewhere(objects: list[dict[str, Any]]) -> None:
        _pod(objects, roles.active)["metadata"]["labels"]["vs.meshxl.io/t06"] = "standby"
        _pod(objects, roles.standby)["metadata"]["labels"]["vs.meshxl.io/t06"] = "active"

    assert [f[0] for f in _broken(unlabelled)] == ["error"]
    assert "is meshxl istio label running" in _broken(unlabelled)[0][2]
    assert [f[0] for f in _broken(two)] == ["error"]
    assert "are all labelled vs.meshxl.io/t06=active" in _broken(two)[0][2]
    assert [(f[0], f[1]) for f in _broken(elsewhere)] == [
        ("warning", f"Pod shop/{roles.standby}")]


def test_check_and_render_from_the_command_line(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["istio", "render", "-f", str(EXAMPLES / "vsls.yaml"),
                                  "-n", "shop"])
    assert result.exit_code == 0, result.output
    objects = _namespace()
    _pod(objects, "web-dc1-0")["metadata"]["labels"]["meshxl.io/site"] = "dc2"
    path = tmp_path / "shop.yaml"
    path.write_text(yaml.safe_dump_all(objects))
    result = runner.invoke(main, ["istio", "check", "-f", str(EXAMPLES / "vsls.yaml"),
                                  "-n", "shop", "--istio-version", "1.27", str(path)])
    assert result.exit_code == 1
    assert "Pod shop/web-dc1-0" in result.output and "on site dc1" in result.output


# -- meshxl istio label --------------------------------------------------------------------


def test_the_labeler_demotes_before_it_promotes_and_clears_labels_of_gone_vss() -> None:
    state = RuntimeState(members_down={("web", "web-dc1-0"): AdminAction()})
    pods = _pods()  # labelled for every member up
    for pod in pods:
        pod["metadata"]["labels"]["vs.meshxl.io/retired"] = "active"
    todo = changes("shop", desired_labels(MODEL, state), pods)
    assert all("vs.meshxl.io/retired" in c.labels for c in todo
               if any(v is None for v in c.labels.values()))
    promotions = [c for c in todo if "active" in c.labels.values()]
    assert promotions and all(set(c.labels.values()) == {"active"} for c in promotions)
    old = placement_of(MODEL, MODEL.pool("web")).roles
    moved = {vs for vs, r in old.items() if r.active == "web-dc1-0"}
    assert {k.removeprefix("vs.meshxl.io/") for c in promotions for k in c.labels} == moved
    # Applied in order (the labeler sorts promotions last), never two actives for a VS.
    by_name = {p["metadata"]["name"]: p["metadata"]["labels"] for p in pods}
    for change in sorted(todo, key=lambda c: "active" in c.labels.values()):
        for key, value in change.labels.items():
            if value is None:
                by_name[change.pod].pop(key, None)
            else:
                by_name[change.pod][key] = value
        for vs in HA:
            assert sum(labels.get(f"vs.meshxl.io/{vs}") == "active"
                       for labels in by_name.values()) <= 1
    assert changes("shop", desired_labels(MODEL, state), [
        {"metadata": {"name": n, "labels": labels}} for n, labels in by_name.items()]) == []


def test_a_pool_with_pinned_sessions_marks_its_drained_members_draining() -> None:
    text = (EXAMPLES / "vsls.yaml").read_text().replace(
        "{name: big, pool: web, weight: 3, backups: 1, stickiness: {header: x-session-id}}",
        "{name: big, pool: web, weight: 3, backups: 1,\n"
        "     stickiness: {header: x-session-id, pin: {}}}")
    model = parse_model(text)
    state = RuntimeState(members_down={("web", "web-dc2-1"): AdminAction(),
                                       ("big", "web-dc1-0"): AdminAction()})
    want = desired_labels(model, state)["web"]
    assert {n: labels["istio.io/draining"] for n, labels in want.members.items()} == {
        "web-dc1-0": None, "web-dc2-0": None, "web-dc1-1": None, "web-dc2-1": "meshxl"}
    assert "istio.io/draining" not in desired_labels(MODEL, state)["web"].members["web-dc2-1"]


def test_a_sidecar_registered_under_a_vs_name_is_no_pool_member() -> None:
    state = RuntimeState(registrations={("t01", "stray"): Registration("10.9.9.9", 8080)})
    assert sorted(desired_labels(MODEL, state)["web"].members) == sorted(
        m.name for m in MODEL.pool("web").members)


def test_a_degraded_member_of_a_load_sharing_vs_goes_behind_in_that_vs_only() -> None:
    """Per VS: its serving label leaves the degraded member's pod; the pod keeps its
    roles in the other virtual systems."""
    sick = RuntimeState(health={("shared", "web-dc1-0"): Health("degraded", "slow", 1.0)})
    well, judged = (desired_labels(MODEL, s)["web"].members for s in (RuntimeState(), sick))
    key = "serving.vs.meshxl.io/shared"
    assert {n: labels[key] for n, labels in judged.items()} == {
        "web-dc1-0": None, "web-dc1-1": "true", "web-dc2-0": "true", "web-dc2-1": "true"}
    assert all(labels[key] == "true" for labels in well.values())
    assert {n: {k: v for k, v in labels.items() if k != key} for n, labels in judged.items()} \
        == {n: {k: v for k, v in labels.items() if k != key} for n, labels in well.items()}
    chain = render_model(MODEL, OPTIONS).objects
    dr = _by(chain, "DestinationRule", "meshxl-shared")
    priority = dr["spec"]["trafficPolicy"]["loadBalancer"]["localityLbSetting"][
        "failoverPriority"]
    assert {n: istio_priority({k: v for k, v in labels.items() if v}, priority)
            for n, labels in judged.items()} == {"web-dc1-0": 1, "web-dc1-1": 0,
                                                "web-dc2-0": 0, "web-dc2-1": 0}
