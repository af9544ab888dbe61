"""`meshxl istio render`: DestinationRule and EnvoyFilter per model shape, field by field.

Every object is validated against Istio's own CRD schemas (fixtures/istio, copied from
../shared/schemas with its header), made strict: unknown fields are errors (the API
server prunes or rejects them), and the CRDs' duration rules (CEL) are checked. The
EnvoyFilter patch values are parsed as the Envoy protos Istio merges them into.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from click.testing import CliRunner
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import health_check_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.http.stateful_session.v3 import stateful_session_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.http.stateful_session.cookie.v3 import cookie_pb2  # noqa: F401
from envoy.extensions.http.stateful_session.header.v3 import header_pb2  # noqa: F401
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2  # noqa: F401
from envoy.extensions.retry.priority.previous_priorities.v3 import (  # noqa: F401
    previous_priorities_config_pb2,
)
from google.protobuf import json_format

from meshxl.cli import main
from meshxl.istio import IstioOptions, IstioRenderError, render_model
from meshxl.istio.labels import HA_FAILOVER_PRIORITY, istio_priority, role_labels
from meshxl.model import RuntimeState, cluster_view, load_model, parse_model
from meshxl.model.runtime import AdminAction, Health, Registration

CRDS = Path(__file__).parent / "fixtures" / "istio" / "istio-networking-crds.yaml"
REPO = Path(__file__).resolve().parents[2]
OPTIONS = IstioOptions(namespace="shop")
_GO_DURATION = re.compile(r"^(\d+(\.\d+)?(h|m|s|ms|us|ns))+$")


# -- strict CRD validation ---------------------------------------------------------------------


def _strict(schema: Any) -> Any:
    """Close every object schema the CRD does not leave open, as the API server does."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if out.get("type") == "object" and "properties" in out \
            and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def _duration_rule(validator: Any, rules: Any, instance: Any, schema: Any) -> Any:
    """The CEL rules of these CRDs that meshxl's output meets: durations >= 1 ms."""
    for rule in rules:
        if rule["rule"] == "duration(self) >= duration('1ms')":
            if not isinstance(instance, str) or not _GO_DURATION.match(instance):
                yield jsonschema.ValidationError(f"{instance!r} is not a duration")
            elif _seconds(instance) < 0.001:
                yield jsonschema.ValidationError(f"{instance!r}: {rule['message']}")


def _seconds(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
    return sum(float(n) * units[u] for n, _, u in re.findall(r"(\d+(\.\d+)?)(h|ms|m|s|us|ns)",
                                                             text))


def _validators() -> dict[tuple[str, str], Any]:
    checker = jsonschema.validators.extend(
        jsonschema.Draft7Validator, {"x-kubernetes-validations": _duration_rule})
    out = {}
    for crd in yaml.safe_load_all(CRDS.read_text()):
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = _strict(version["schema"]["openAPIV3Schema"])
            schema["properties"].update({"apiVersion": {"const": f"{group}/{version['name']}"},
                                         "kind": {"const": kind},
                                         "metadata": {"type": "object"}})
            schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
            out[(f"{group}/{version['name']}", kind)] = checker(schema)
    return out


VALIDATORS = _validators()


def check_crd(obj: dict[str, Any]) -> None:
    validator = VALIDATORS[(obj["apiVersion"], obj["kind"])]
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)
    if obj["kind"] == "EnvoyFilter":
        for patch in obj["spec"]["configPatches"]:
            message = {"HTTP_ROUTE": route_components_pb2.Route,
                       "CLUSTER": cluster_pb2.Cluster,
                       "HTTP_FILTER": hcm_pb2.HttpFilter}[patch["applyTo"]]()
            # Strict proto JSON: a misspelled Envoy field or bad duration fails here.
            json_format.ParseDict(patch["patch"]["value"], message)


def test_the_crd_check_is_strict() -> None:
    dr = render("LS_COOKIE").objects[0]
    dr["spec"]["trafficPolicy"]["loadBalancer"]["consistentHash"]["httpHeader"] = "x"
    with pytest.raises(AssertionError, match="Additional properties"):
        check_crd(dr)
    dr = render("LS_COOKIE").objects[0]
    dr["spec"]["trafficPolicy"]["connectionPool"]["tcp"]["connectTimeout"] = "0s"
    with pytest.raises(AssertionError, match="greater than 1ms"):
        check_crd(dr)
    rendered = render("LS_COOKIE")
    patches(rendered)["CLUSTER"]["patch"]["value"]["health_checks"][0]["timeout"] = "200ms"
    with pytest.raises(json_format.ParseError):
        check_crd(rendered.objects[1])


# -- model shapes ------------------------------------------------------------------------------

MODELS = {
    # ClusterXL HA in one site: one active, a standby and a backup.
    "HA_ONE_SITE": """
clusters:
  - name: orders
    stickiness: {header: x-session-id}
    members:
      - {name: orders-0, address: 10.0.0.1, port: 8080}
      - {name: orders-1, address: 10.0.0.2, port: 8080}
      - {name: orders-2, address: 10.0.0.3, port: 8080}
    listener: {port: 8080}
""",
    # Maestro dual site in HA mode: active and standby in dc1, backup in dc2.
    "HA_TWO_SITES": """
clusters:
  - name: orders
    mode: high-availability
    stickiness: {algorithm: maglev, header: x-session-id, maglev_table_size: 131}
    sites: [{name: dc1}, {name: dc2}]
    members:
      - {name: orders-0, address: 10.0.0.1, port: 8080, site: dc1}
      - {name: orders-1, address: 10.0.0.2, port: 8080, site: dc1}
      - {name: orders-2, address: 10.1.0.1, port: 8080, site: dc2}
    listener: {port: 8080}
""",
    # Load sharing, sticky by cookie on a hash ring.
    "LS_COOKIE": """
clusters:
  - name: cart
    mode: load-sharing
    stickiness:
      algorithm: ring_hash
      cookie: {name: cart-session, ttl: 90m, path: /cart}
      ring_minimum_size: 2048
      ring_maximum_size: 65536
    members:
      - {name: cart-0, address: 10.0.0.1, port: 9090}
      - {name: cart-1, address: 10.0.0.2, port: 9090, weight: 200}
    listener: {port: 9090}
""",
    # Load sharing over two sites: dc1 active-active, dc2 takes over when dc1 is down.
    "LS_TWO_SITES_SOURCE_IP": """
clusters:
  - name: api
    mode: load-sharing
    membership: registered
    stickiness: {source_ip: true}
    sites: [{name: dc1}, {name: dc2}]
    outlier_detection: {consecutive_5xx: 7, interval: 2s, base_ejection_time: 30s,
                        max_ejection_percent: 50}
    retries: {attempts: 2, previous_hosts: false, per_try_timeout: 500ms}
    health_check: {enabled: false}
    connect_timeout: 100ms
""",
    # Active-active sites, no stickiness.
    "LS_SHARED_RANK": """
clusters:
  - name: search
    mode: load-sharing
    sites: [{name: dc1, failover_rank: 0}, {name: dc2, failover_rank: 0}]
    members:
      - {name: search-0, address: 10.0.0.1, port: 80, site: dc1}
      - {name: search-1, address: 10.1.0.1, port: 80, site: dc2}
    retries: {attempts: 0}
    listener: {port: 80}
""",
    # Load sharing with pinned sessions: a cookie pin (TTL, path, strict) over the hash.
    "LS_PINNED_COOKIE": """
clusters:
  - name: web
    mode: load-sharing
    stickiness:
      header: x-session-id
      pin: {cookie: {name: web-pin, ttl: 90m, path: /app}, strict: true}
    members:
      - {name: web-0, address: 10.0.0.1, port: 8080}
      - {name: web-1, address: 10.0.0.2, port: 8080}
    listener: {port: 8080}
""",
    # High availability, the pin in a header, no retries.
    "HA_PINNED_HEADER": """
clusters:
  - name: orders
    stickiness: {header: x-session-id, pin: {header: x-orders-pin}}
    retries: {attempts: 0}
    members:
      - {name: orders-0, address: 10.0.0.1, port: 8080}
      - {name: orders-1, address: 10.0.0.2, port: 8080}
    listener: {port: 8080}
""",
    "THREE_SITES": """
clusters:
  - name: ledger
    mode: load-sharing
    stickiness: {header: x-account}
    sites: [{name: dc1}, {name: dc2}, {name: dc3}]
    members:
      - {name: ledger-0, address: 10.0.0.1, port: 7000, site: dc1}
      - {name: ledger-1, address: 10.1.0.1, port: 7000, site: dc2}
      - {name: ledger-2, address: 10.2.0.1, port: 7000, site: dc3}
    listener: {port: 7000}
""",
}


#: Shapes whose members register themselves need the Service port.
OPTIONS_FOR = {"LS_TWO_SITES_SOURCE_IP": IstioOptions(namespace="shop", ports={"api": 443})}


def render(name: str, options: IstioOptions | None = None) -> Any:
    options = options or OPTIONS_FOR.get(name, OPTIONS)
    rendered = render_model(parse_model(MODELS[name]), options)
    for obj in rendered.objects:
        check_crd(obj)
    return rendered


def traffic_policy(rendered: Any) -> dict[str, Any]:
    return rendered.objects[0]["spec"]["trafficPolicy"]  # type: ignore[no-any-return]


def patches(rendered: Any) -> dict[str, dict[str, Any]]:
    return {p["applyTo"]: p for p in rendered.objects[1]["spec"]["configPatches"]}


def istio_priorities(labels: dict[str, dict[str, str]], failover_priority: list[str]
                     ) -> dict[str, int]:
    """Istio's applyFailoverPriorityPerLocality for key=value entries (then made dense)."""
    raw = {}
    for name, pod in labels.items():
        priority = 0
        for j, entry in enumerate(failover_priority):
            key, value = entry.split("=", 1)
            if pod.get(key) != value:
                priority = len(failover_priority) - j
                break
        raw[name] = priority
    dense = {p: i for i, p in enumerate(sorted(set(raw.values())))}
    return {name: dense[p] for name, p in raw.items()}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_shape_validates_and_names_objects(name: str) -> None:
    rendered = render(name)
    model = parse_model(MODELS[name])
    assert len(rendered.objects) == 2 * len(model.clusters)
    dr, ef = rendered.objects
    cluster = model.clusters[0].name
    assert (dr["apiVersion"], dr["kind"]) == ("networking.istio.io/v1", "DestinationRule")
    assert dr["metadata"]["name"] == f"meshxl-{cluster}"
    assert dr["metadata"]["namespace"] == "shop"
    assert dr["spec"]["host"] == f"{cluster}.shop.svc.cluster.local"
    assert (ef["apiVersion"], ef["kind"]) == ("networking.istio.io/v1alpha3", "EnvoyFilter")
    assert ef["metadata"]["namespace"] == "shop", "the Service's namespace, not mesh-wide"
    assert "workloadSelector" not in ef["spec"]
    for patch in ef["spec"]["configPatches"]:
        assert patch["match"]["context"] == "SIDECAR_OUTBOUND"
        assert patch["patch"]["operation"] == (
            "INSERT_BEFORE" if patch["applyTo"] == "HTTP_FILTER" else "MERGE")


def test_ha_one_site_active_member_then_the_rest() -> None:
    rendered = render("HA_ONE_SITE")
    lb = traffic_policy(rendered)["loadBalancer"]
    assert lb["consistentHash"] == {"httpHeaderName": "x-session-id",
                                    "maglev": {"tableSize": 4099}}
    assert lb["localityLbSetting"] == {
        "enabled": True,
        "failoverPriority": ["meshxl.io/serving=true", "meshxl.io/preferred=true",
                             "meshxl.io/role=active"]}
    assert rendered.warnings == []
    outlier = traffic_policy(rendered)["outlierDetection"]
    assert outlier == {"splitExternalLocalOriginErrors": True,
                       "consecutiveLocalOriginFailures": 1, "consecutive5xxErrors": 5,
                       "consecutiveGatewayErrors": 3, "interval": "1s",
                       "baseEjectionTime": "5s", "maxEjectionPercent": 50,
                       "minHealthPercent": 0}
    assert traffic_policy(rendered)["retryBudget"] == {"percent": 100.0,
                                                       "minRetryConcurrency": 1024}
    assert traffic_policy(rendered)["connectionPool"] == {"tcp": {"connectTimeout": "250ms"}}
    route = patches(rendered)["HTTP_ROUTE"]
    assert route["match"]["routeConfiguration"] == {
        "vhost": {"name": "orders.shop.svc.cluster.local:8080",
                  "route": {"action": "ROUTE"}}}
    retry = route["patch"]["value"]["route"]["retry_policy"]
    assert retry == {
        "retry_on": "connect-failure,refused-stream,reset,gateway-error",
        "num_retries": 3,
        "retry_back_off": {"base_interval": "0.005s", "max_interval": "0.05s"},
        "per_try_timeout": "2s",
        "host_selection_retry_max_attempts": 100,
        "retry_priority": {
            "name": "envoy.retry_priorities.previous_priorities",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.priority."
                                      "previous_priorities.v3.PreviousPrioritiesConfig",
                             "update_frequency": 1}},
    }
    cluster = patches(rendered)["CLUSTER"]
    assert cluster["match"]["cluster"] == {"service": "orders.shop.svc.cluster.local",
                                           "portNumber": 8080}
    value = cluster["patch"]["value"]
    assert value["ignore_health_on_host_removal"] is True
    assert value["common_lb_config"] == {"healthy_panic_threshold": {"value": 0},
                                         "update_merge_window": "0s"}
    check = value["health_checks"][0]
    assert (check["interval"], check["timeout"], check["no_traffic_interval"]) == \
        ("0.25s", "1s", "0.5s")
    assert check["http_health_check"] == {"path": "/healthz",
                                          "expected_statuses": [{"start": 200, "end": 201}]}
    assert "ring_hash_lb_config" not in value


def _pod_priorities(spec: Any, runtime: RuntimeState, chain: list[str]) -> dict[str, int]:
    """The priorities istiod gives the member pods labelled by ``meshxl istio label``."""
    labels = {name: {k: v for k, v in pod.items() if v is not None}
              for name, pod in role_labels(cluster_view(spec, runtime)).items()}
    return {name: istio_priority(pod, chain) for name, pod in labels.items()}


def test_ha_two_sites_istio_priorities_equal_meshxl_tiers() -> None:
    rendered = render("HA_TWO_SITES")
    lb = traffic_policy(rendered)["loadBalancer"]
    assert lb["consistentHash"]["maglev"] == {"tableSize": 131}
    chain = lb["localityLbSetting"]["failoverPriority"]
    assert chain == list(HA_FAILOVER_PRIORITY)
    assert rendered.warnings == []
    spec = parse_model(MODELS["HA_TWO_SITES"]).clusters[0]
    view = cluster_view(spec, RuntimeState())
    assert _pod_priorities(spec, RuntimeState(), chain) == \
        {m.name: m.priority for m in view.members} == \
        {"orders-0": 0, "orders-1": 1, "orders-2": 2}
    # A probe (predictive failover): the standby joins the active's tier, in Istio too
    # (istiod cannot give it a small share: both at priority 0, the hash splits).
    probing = RuntimeState(health={("orders", "orders-1"): Health(
        "probe", "p90 400 ms", time.time(), "t", behind="orders-0")})
    probed = cluster_view(spec, probing)
    assert {m.name: m.priority for m in probed.members}["orders-1"] == 0
    got = _pod_priorities(spec, probing, chain)
    assert (got["orders-0"], got["orders-1"]) == (0, 0) and got["orders-2"] > 0
    assert _pod_priorities(spec, RuntimeState(), chain)["orders-1"] == 1  # probe over


def _registered(*members: tuple[str, str, bool]) -> dict[tuple[str, str], Registration]:
    return {("orders", name): Registration(address="10.0.0.1", port=8080, site=site,
                                           ready=ready) for name, site, ready in members}


def test_registered_members_get_active_standby_from_role_labels() -> None:
    """The repo's Kubernetes model: members register, none is listed. The role labels
    give one active, one standby, and follow member down, readiness and lost members."""
    model = load_model(REPO / "deploy" / "kubernetes" / "base" / "model.yaml")
    spec = model.clusters[0]
    assert (spec.mode, spec.membership, spec.members) == ("high-availability",
                                                         "registered", [])
    rendered = render_model(model, OPTIONS)
    for obj in rendered.objects:
        check_crd(obj)
    chain = rendered.objects[0]["spec"]["trafficPolicy"]["loadBalancer"][
        "localityLbSetting"]["failoverPriority"]
    regs = _registered(("orders-0", "dc1", True), ("orders-1", "dc1", True),
                       ("orders-2", "dc2", True))
    runtime = RuntimeState(registrations=regs)
    assert _pod_priorities(spec, runtime, chain) == {"orders-0": 0, "orders-1": 1,
                                                     "orders-2": 2}
    down = RuntimeState(registrations=regs,
                        members_down={("orders", "orders-0"): AdminAction("drain")})
    assert _pod_priorities(spec, down, chain) == {"orders-0": 3, "orders-1": 0,
                                                  "orders-2": 1}
    syncing = RuntimeState(registrations=_registered(
        ("orders-0", "dc1", False), ("orders-1", "dc1", True), ("orders-2", "dc2", True)))
    assert _pod_priorities(spec, syncing, chain) == {"orders-0": 3, "orders-1": 0,
                                                     "orders-2": 1}
    offline = RuntimeState(registrations=regs, sites_offline={"dc1": AdminAction("dr")})
    assert _pod_priorities(spec, offline, chain) == {"orders-0": 3, "orders-1": 3,
                                                     "orders-2": 0}


def test_load_sharing_cookie_ring_hash_one_tier() -> None:
    rendered = render("LS_COOKIE")
    lb = traffic_policy(rendered)["loadBalancer"]
    assert lb["consistentHash"] == {
        "httpCookie": {"name": "cart-session", "path": "/cart", "ttl": "5400s"},
        "ringHash": {"minimumRingSize": 2048}}
    # One tier: only the serving label (degraded members behind their peers), so every
    # proxy hashes a session to the same member (no per-client locality preference).
    assert lb["localityLbSetting"] == {"enabled": True,
                                       "failoverPriority": ["meshxl.io/serving=true"]}
    retry = patches(rendered)["HTTP_ROUTE"]["patch"]["value"]["route"]["retry_policy"]
    assert "retry_priority" not in retry, "load sharing: no move to a lower tier"
    assert "retry_host_predicate" not in retry, "Istio's default route has it already"
    value = patches(rendered)["CLUSTER"]["patch"]["value"]
    assert value["ring_hash_lb_config"] == {"maximum_ring_size": 65536}
    assert patches(rendered)["CLUSTER"]["match"]["cluster"]["portNumber"] == 9090
    assert "consistent_hashing_lb_config" not in value["common_lb_config"]


@pytest.mark.parametrize("degradation", ["{action: off}", "{action: report}"])
def test_without_moves_load_sharing_renders_as_before(degradation: str) -> None:
    """Only degraded members that move need the serving label first."""
    for name, before in [("LS_COOKIE", {"enabled": False}),
                         ("LS_TWO_SITES_SOURCE_IP", {"enabled": True, "failoverPriority":
                                                     ["meshxl.io/site=dc1"]})]:
        text = MODELS[name].replace("mode: load-sharing",
                                    f"mode: load-sharing\n    degradation: {degradation}")
        rendered = render_model(parse_model(text), OPTIONS_FOR.get(name, OPTIONS))
        assert traffic_policy(rendered)["loadBalancer"]["localityLbSetting"] == before


def test_without_outlier_detection_degraded_members_are_not_put_behind() -> None:
    text = MODELS["LS_SHARED_RANK"].replace("retries: {attempts: 0}", "retries: {attempts: 0}\n"
                                            "    outlier_detection: {enabled: false}")
    rendered = render_model(parse_model(text), OPTIONS)
    assert traffic_policy(rendered)["loadBalancer"]["localityLbSetting"] == {"enabled": False}
    assert any("a degraded member is not put behind its peers" in w
               for w in rendered.warnings)


def test_load_sharing_two_sites_source_ip() -> None:
    rendered = render("LS_TWO_SITES_SOURCE_IP")
    policy = traffic_policy(rendered)
    lb = policy["loadBalancer"]
    assert lb["consistentHash"] == {"useSourceIp": True, "maglev": {"tableSize": 4099}}
    assert lb["localityLbSetting"] == {
        "enabled": True, "failoverPriority": ["meshxl.io/serving=true", "meshxl.io/site=dc1"]}
    assert policy["outlierDetection"]["consecutive5xxErrors"] == 7
    assert policy["outlierDetection"]["interval"] == "2s"
    assert policy["outlierDetection"]["baseEjectionTime"] == "30s"
    assert policy["outlierDetection"]["maxEjectionPercent"] == 50
    assert policy["connectionPool"]["tcp"]["connectTimeout"] == "100ms"
    retry = patches(rendered)["HTTP_ROUTE"]["patch"]["value"]["route"]["retry_policy"]
    assert "retry_host_predicate" not in retry
    assert any("previous_hosts: false holds only on VirtualService routes" in w
               for w in rendered.warnings)
    assert (retry["num_retries"], retry["per_try_timeout"]) == (2, "0.5s")
    assert patches(rendered)["HTTP_ROUTE"]["match"]["routeConfiguration"]["vhost"]["name"] \
        == "api.shop.svc.cluster.local:443"
    assert "health_checks" not in patches(rendered)["CLUSTER"]["patch"]["value"]
    assert "ignore_health_on_host_removal" not in patches(rendered)["CLUSTER"]["patch"]["value"]


def test_local_site_affinity_prefers_the_clients_own_site() -> None:
    text = MODELS["LS_SHARED_RANK"].replace("mode: load-sharing", "mode: load-sharing\n"
                                            "    site_affinity: local")
    rendered = render_model(parse_model(text), OPTIONS)
    for obj in rendered.objects:
        check_crd(obj)
    lb = traffic_policy(rendered)["loadBalancer"]
    # A label without a value: each client proxy matches its own site label.
    assert lb["localityLbSetting"] == {
        "enabled": True, "failoverPriority": ["meshxl.io/serving=true", "meshxl.io/site"]}
    ha = text.replace("mode: load-sharing", "mode: high-availability")
    with pytest.raises(IstioRenderError, match="site_affinity local in high-availability"):
        render_model(parse_model(ha), OPTIONS)


def test_shared_rank_sites_without_stickiness_or_retries() -> None:
    rendered = render("LS_SHARED_RANK")
    policy = traffic_policy(rendered)
    # Without stickiness the warm-up is Envoy's slow start, which Istio configures.
    assert policy["loadBalancer"] == {"simple": "LEAST_REQUEST",
                                      "localityLbSetting": {
                                          "enabled": True,
                                          "failoverPriority": ["meshxl.io/serving=true"]},
                                      "warmup": {"duration": "5s", "minimumPercent": 10}}
    assert "retryBudget" not in policy
    assert list(patches(rendered)) == ["CLUSTER"]


def test_three_sites_merge_the_later_ones_with_a_warning() -> None:
    rendered = render("THREE_SITES")
    lb = traffic_policy(rendered)["loadBalancer"]
    assert lb["localityLbSetting"]["failoverPriority"] == ["meshxl.io/serving=true",
                                                           "meshxl.io/site=dc1"]
    assert rendered.warnings == ["cluster ledger: sites dc2, dc3 share Istio priority 1 "
                                 "(a failoverPriority chain puts every site after the "
                                 "first in one tier)"]


def test_region_failover_is_offered_with_its_hashing_caveat() -> None:
    rendered = render("HA_TWO_SITES", IstioOptions(namespace="shop", site_failover="region"))
    # The member tier stays: Istio orders by failoverPriority first (priority x 5 plus
    # the client-relative locality priority).
    assert traffic_policy(rendered)["loadBalancer"]["localityLbSetting"] == {
        "enabled": True,
        "failoverPriority": ["meshxl.io/serving=true", "meshxl.io/preferred=true",
                             "meshxl.io/role=active"],
        "failover": [{"from": "dc1", "to": "dc2"}, {"from": "dc2", "to": "dc1"}]}
    assert "relative to each client's region" in rendered.warnings[0]
    ls = render("LS_TWO_SITES_SOURCE_IP", IstioOptions(namespace="shop", ports={"*": 443},
                                                       site_failover="region"))
    assert traffic_policy(ls)["loadBalancer"]["localityLbSetting"] == {
        "enabled": True, "failover": [{"from": "dc1", "to": "dc2"},
                                      {"from": "dc2", "to": "dc1"}],
        "failoverPriority": ["meshxl.io/serving=true"]}


def test_options_change_hosts_labels_and_namespaces() -> None:
    options = IstioOptions(namespace="prod", cluster_domain="corp.local",
                           root_namespace="mesh-root", site_label="topology.example/site",
                           filter_namespace="mesh-root", client_selector={"app": "web"},
                           ports={"*": 80})
    rendered = render("THREE_SITES", options)
    dr, ef = rendered.objects
    assert dr["spec"]["host"] == "ledger.prod.svc.corp.local"
    assert ef["metadata"]["namespace"] == "mesh-root"
    assert ef["spec"]["workloadSelector"] == {"labels": {"app": "web"}}
    assert traffic_policy(rendered)["loadBalancer"]["localityLbSetting"]["failoverPriority"][-1] \
        == "topology.example/site=dc1"
    assert patches(rendered)["CLUSTER"]["match"]["cluster"]["portNumber"] == 80
    mesh_wide = render_model(parse_model(MODELS["THREE_SITES"]),
                             IstioOptions(filter_namespace="istio-system"))
    assert "patch every sidecar of the mesh" in mesh_wide.warnings[0]


@pytest.mark.parametrize(("model", "options", "message"), [
    ("""
clusters:
  - name: a
    mode: load-sharing
    sites: [{name: dc1, failover_rank: 0}, {name: dc2, failover_rank: 0}, {name: dc3}]
    members: [{name: a-0, address: 10.0.0.1, port: 80, site: dc1}]
    listener: {port: 80}
""", {}, "cluster a: sites dc1, dc2 share the first failover rank"),
    ("""
clusters:
  - name: a
    sites: [{name: dc1}, {name: dc2}]
    outlier_detection: {enabled: false}
    members: [{name: a-0, address: 10.0.0.1, port: 80, site: dc1}]
    listener: {port: 80}
""", {}, "cluster a: Istio fails over between sites or members only with outlier"),
    ("""
clusters:
  - name: a
    membership: registered
""", {}, "cluster a: no listener port in the model; give its Service port (--port a=PORT)"),
    ("clusters: [{name: a, members: [{name: a-0, address: 10.0.0.1, port: 80}]}]",
     {"ports": {"b": 80}}, "--port names clusters not in the model: b"),
])
def test_what_istio_cannot_express_is_an_error(model: str, options: dict[str, Any],
                                               message: str) -> None:
    with pytest.raises(IstioRenderError, match=re.escape(message)):
        render_model(parse_model(model), IstioOptions(**options))


# -- the command ------------------------------------------------------------------------------


def test_render_command(tmp_path: Path) -> None:
    path = tmp_path / "model.yaml"
    path.write_text(MODELS["HA_ONE_SITE"] + MODELS["LS_COOKIE"].replace("clusters:\n", ""))
    result = CliRunner().invoke(main, ["istio", "render", "-f", str(path), "-n", "shop"])
    assert result.exit_code == 0, result.output
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert [(d["kind"], d["metadata"]["name"]) for d in docs] == [
        ("DestinationRule", "meshxl-orders"), ("EnvoyFilter", "meshxl-shop-orders"),
        ("DestinationRule", "meshxl-cart"), ("EnvoyFilter", "meshxl-shop-cart")]
    for doc in docs:
        check_crd(doc)
    assert result.stderr == ("meshxl: warning: cluster cart: member weights (cart-1) are "
                             "not rendered: Istio weighs endpoints itself\n")


@pytest.mark.parametrize(("model", "args", "message"), [
    ("clusters: [{name: a, mode: hot}]", [], "clusters[0].mode:"),
    ("clusters: [{name: a, membership: registered}]", [],
     "meshxl: cluster a: no listener port in the model"),
    ("clusters: [{name: a, membership: registered}]", ["--port", "a=http"],
     "meshxl: bad --port 'a=http'"),
])
def test_render_command_errors(tmp_path: Path, model: str, args: list[str],
                               message: str) -> None:
    path = tmp_path / "model.yaml"
    path.write_text(model)
    result = CliRunner().invoke(main, ["istio", "render", "-f", str(path), *args])
    assert result.exit_code == 1
    assert result.stderr.startswith(message)
    assert result.stdout == ""


def test_render_command_with_a_port_for_registered_members(tmp_path: Path) -> None:
    path = tmp_path / "model.yaml"
    path.write_text(MODELS["LS_TWO_SITES_SOURCE_IP"])
    result = CliRunner().invoke(main, ["istio", "render", "-f", str(path), "--port", "8443"])
    assert result.exit_code == 0, result.output
    ef = list(yaml.safe_load_all(result.stdout))[1]
    assert ef["spec"]["configPatches"][0]["match"]["routeConfiguration"]["vhost"]["name"] \
        == "api.default.svc.cluster.local:8443"


def test_balance_factor_becomes_an_envoy_filter_cluster_patch() -> None:
    text = MODELS["LS_COOKIE"].replace("      algorithm: ring_hash\n",
                                       "      algorithm: ring_hash\n      balance_factor: 1.5\n")
    assert "balance_factor: 1.5" in text
    rendered = render_model(parse_model(text), OPTIONS)
    for obj in rendered.objects:
        check_crd(obj)  # also parses the patch as an Envoy Cluster: the field name is real
    value = patches(rendered)["CLUSTER"]["patch"]["value"]
    assert value["common_lb_config"]["consistent_hashing_lb_config"] == {
        "hash_balance_factor": 150}


# -- ports, repo models, merge semantics ----------------------------------------------------


def _service(name: str, *ports: tuple[int, int]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"ports": [{"port": p, "targetPort": t} for p, t in ports]}}


def test_the_port_is_the_service_port_not_the_target_port() -> None:
    model = parse_model(MODELS["HA_ONE_SITE"])  # members and listener on 8080
    options = IstioOptions(namespace="shop", services={"orders": _service("orders", (80, 8080))})
    rendered = render_model(model, options)
    assert patches(rendered)["CLUSTER"]["match"]["cluster"]["portNumber"] == 80
    assert patches(rendered)["HTTP_ROUTE"]["match"]["routeConfiguration"]["vhost"]["name"] \
        == "orders.shop.svc.cluster.local:80"
    with pytest.raises(IstioRenderError, match=re.escape(
            "cluster orders: Service orders has no port 8080 (its ports: 80); the "
            "EnvoyFilter would match nothing")):
        render_model(model, IstioOptions(namespace="shop", ports={"orders": 8080},
                                          services=options.services))
    with pytest.raises(IstioRenderError, match="has ports 80, 443; choose one"):
        render_model(model, IstioOptions(namespace="shop", services={
            "orders": _service("orders", (80, 8080), (443, 8443))}))


@pytest.mark.parametrize("path", ["deploy/kubernetes/base/model.yaml",
                                  "deploy/examples/quickstart.yaml"])
def test_the_repo_models_render_without_a_port(path: str) -> None:
    result = CliRunner().invoke(main, ["istio", "render", "-f", str(REPO / path)])
    assert result.exit_code == 0, result.output
    for doc in yaml.safe_load_all(result.stdout):
        if doc:
            check_crd(doc)


def test_render_command_reads_services(tmp_path: Path) -> None:
    path = tmp_path / "model.yaml"
    path.write_text(MODELS["HA_ONE_SITE"])
    services = tmp_path / "svc.yaml"
    services.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": [
        _service("orders", (80, 8080))]}))
    result = CliRunner().invoke(main, ["istio", "render", "-f", str(path), "-n", "shop",
                                       "--services", str(services)])
    assert result.exit_code == 0, result.output
    ef = list(yaml.safe_load_all(result.stdout))[1]
    assert ef["spec"]["configPatches"][1]["match"]["cluster"]["portNumber"] == 80
    result = CliRunner().invoke(main, ["istio", "render", "-f", str(path), "-n", "shop",
                                       "--services", str(services), "--port", "8080"])
    assert result.exit_code == 1
    assert result.stderr.startswith("meshxl: cluster orders: Service orders has no port 8080")


def _istio_default_route(cluster: str) -> route_components_pb2.Route:
    """The route Istio builds for a Service without a VirtualService
    (BuildDefaultHTTPOutboundRoute: the non-hashing default retry policy)."""
    return json_format.ParseDict({
        "name": "default", "match": {"prefix": "/"},
        "route": {"cluster": cluster, "timeout": "0s",
                  "retry_policy": {
                      "retry_on": "connect-failure,refused-stream,unavailable,cancelled,"
                                  "retriable-status-codes",
                      "num_retries": 2, "host_selection_retry_max_attempts": 5,
                      "retry_host_predicate": [{
                          "name": "envoy.retry_host_predicates.previous_hosts",
                          "typed_config": {"@type": "type.googleapis.com/envoy.extensions."
                                                    "retry.host.previous_hosts.v3."
                                                    "PreviousHostsPredicate"}}]},
                  "hash_policy": [{"header": {"header_name": "x-session-id"}}]}},
        route_components_pb2.Route())


def test_route_patch_merged_like_istio_keeps_one_previous_hosts() -> None:
    rendered = render("HA_ONE_SITE")
    route = _istio_default_route("outbound|8080||orders.shop.svc.cluster.local")
    patch = json_format.ParseDict(patches(rendered)["HTTP_ROUTE"]["patch"]["value"],
                                  route_components_pb2.Route())
    route.MergeFrom(patch)  # Istio's MERGE: proto merge, lists appended
    policy = route.route.retry_policy
    assert [p.name for p in policy.retry_host_predicate] == [
        "envoy.retry_host_predicates.previous_hosts"]
    assert policy.num_retries.value == 3
    assert policy.retry_priority.name == "envoy.retry_priorities.previous_priorities"
    assert route.route.cluster == "outbound|8080||orders.shop.svc.cluster.local"
    assert route.route.hash_policy[0].header.header_name == "x-session-id"
    # Only routes whose action is a route: never a redirect or direct response, where
    # a merged `route` would leave a route action without a cluster.
    assert patches(rendered)["HTTP_ROUTE"]["match"]["routeConfiguration"]["vhost"][
        "route"] == {"action": "ROUTE"}


def test_istio_mode_warns_about_weights() -> None:
    rendered = render("LS_COOKIE")
    assert rendered.warnings == ["cluster cart: member weights (cart-1) are not rendered: "
                                 "Istio weighs endpoints itself"]


# -- pinned sessions (stickiness.pin) ----------------------------------------------------------


@pytest.mark.parametrize("name", ["LS_PINNED_COOKIE", "HA_PINNED_HEADER"])
def test_a_pin_renders_what_meshxls_own_xds_sends(name: str) -> None:
    """The EnvoyFilter gives Istio's sidecars the stateful session filter, its per-route
    configuration and the cluster's override statuses exactly as meshxl's xDS sends
    them: compared as Envoy protos with the xDS compiler's own output."""
    from meshxl.xds.resources import build_cluster, pin_config

    rendered = render(name)
    spec = parse_model(MODELS[name]).clusters[0]
    assert spec.stickiness is not None and spec.stickiness.pin is not None
    by_kind = patches(rendered)
    filter_name = f"meshxl.pin.shop.{spec.name}"

    route = json_format.ParseDict(by_kind["HTTP_ROUTE"]["patch"]["value"],
                                  route_components_pb2.Route())
    assert list(route.typed_per_filter_config) == [filter_name]
    per_route = stateful_session_pb2.StatefulSessionPerRoute()
    assert route.typed_per_filter_config[filter_name].Unpack(per_route)
    assert per_route == pin_config(spec.stickiness.pin)

    cluster = json_format.ParseDict(by_kind["CLUSTER"]["patch"]["value"],
                                    cluster_pb2.Cluster())
    # Istio's targets are meshxl's own plus HEALTHY: istiod sends its ready endpoints
    # HEALTHY, where meshxl sends them without a status (HEALTHY marks a member whose
    # pins are let go, meshxl.xds.stepdown).
    assert list(cluster.common_lb_config.override_host_status.statuses) == [
        health_check_pb2.HEALTHY,
        *build_cluster(spec).common_lb_config.override_host_status.statuses]

    insert = by_kind["HTTP_FILTER"]
    assert insert["patch"]["operation"] == "INSERT_BEFORE"
    assert insert["match"]["listener"] == {
        "portNumber": 8080, "filterChain": {"filter": {
            "name": "envoy.filters.network.http_connection_manager",
            "subFilter": {"name": "envoy.filters.http.router"}}}}
    http_filter = json_format.ParseDict(insert["patch"]["value"], hcm_pb2.HttpFilter())
    assert http_filter.name == filter_name, "not Envoy's default name: istiod's own filter"
    session = stateful_session_pb2.StatefulSession()
    assert http_filter.typed_config.Unpack(session)
    assert session == stateful_session_pb2.StatefulSession(), "inert outside pinned routes"


def test_pin_details_istio_labels_cannot_carry_are_rendered() -> None:
    value = patches(render("LS_PINNED_COOKIE"))["HTTP_ROUTE"]["patch"]["value"]
    config = value["typed_per_filter_config"]["meshxl.pin.shop.web"]["stateful_session"]
    assert config["strict"] is True
    assert config["session_state"]["typed_config"]["cookie"] == {
        "name": "web-pin", "path": "/app", "ttl": "5400s"}
    assert value["route"]["retry_policy"]["num_retries"] == 3  # one patch, both settings
    # No retries: the route patch carries the pin alone.
    value = patches(render("HA_PINNED_HEADER"))["HTTP_ROUTE"]["patch"]["value"]
    assert set(value) == {"typed_per_filter_config"}
    state = value["typed_per_filter_config"]["meshxl.pin.shop.orders"]["stateful_session"]
    assert state["session_state"]["typed_config"]["name"] == "x-orders-pin"


@pytest.mark.parametrize("name", ["HA_ONE_SITE", "LS_COOKIE", "LS_SHARED_RANK"])
def test_without_a_pin_no_session_filter(name: str) -> None:
    by_kind = patches(render(name))
    assert "HTTP_FILTER" not in by_kind
    assert "typed_per_filter_config" not in by_kind.get("HTTP_ROUTE", {}).get(
        "patch", {}).get("value", {})
    assert "override_host_status" not in by_kind["CLUSTER"]["patch"]["value"][
        "common_lb_config"]


def test_pinned_clusters_on_one_port_each_configure_their_own_filter() -> None:
    """Services on one port share the client's HTTP connection manager: each pinned
    cluster inserts its own filter there and configures it on its own routes only, so
    no route runs two pins."""
    model = parse_model(MODELS["LS_PINNED_COOKIE"] + """
  - name: cart
    mode: load-sharing
    stickiness: {cookie: {name: cart}, pin: {}}
    members: [{name: cart-0, address: 10.0.1.1, port: 8080}]
    listener: {port: 8080}
    route: {domains: [cart]}
""")
    rendered = render_model(model, OPTIONS)
    names = []
    for ef in rendered.objects[1::2]:
        for obj in ef["spec"]["configPatches"]:
            if obj["applyTo"] == "HTTP_FILTER":
                names.append(obj["patch"]["value"]["name"])
            if obj["applyTo"] == "HTTP_ROUTE":
                host = obj["match"]["routeConfiguration"]["vhost"]["name"].split(".")[0]
                assert list(obj["patch"]["value"]["typed_per_filter_config"]) == [
                    f"meshxl.pin.shop.{host}"]
    assert names == ["meshxl.pin.shop.web", "meshxl.pin.shop.cart"]


def test_istio_persistent_session_labels_on_the_service_are_warned_about() -> None:
    labelled = _service("web", (8080, 8080))
    labelled["metadata"]["labels"] = {"istio.io/persistent-session": "web-pin"}
    rendered = render_model(parse_model(MODELS["LS_PINNED_COOKIE"]),
                            IstioOptions(namespace="shop", services={"web": labelled}))
    assert len(rendered.warnings) == 1
    assert rendered.warnings[0].startswith(
        "cluster web: Service web has Istio's persistent-session label "
        "(istio.io/persistent-session=web-pin): istiod then keeps DRAINING members")
    # On a cluster without a pin, Istio would pin what the model does not.
    labelled = _service("orders", (8080, 8080))
    labelled["metadata"]["labels"] = {"istio.io/persistent-session-header": "x-pin"}
    rendered = render_model(parse_model(MODELS["HA_ONE_SITE"]),
                            IstioOptions(namespace="shop", services={"orders": labelled}))
    assert any("but the model has no stickiness.pin" in w for w in rendered.warnings)


# -- the Istio version the objects are for ------------------------------------------------------


def test_render_for_an_istio_without_retry_budget_caps_retries_instead() -> None:
    """trafficPolicy.retryBudget is Istio 1.27's: for an older Istio the render leaves
    it out (the API server would reject the DestinationRule) and bounds retries with
    what that Istio has, connectionPool.http.maxRetries, at the budget's floor."""
    newest = render("HA_ONE_SITE")
    assert newest.warnings == []
    assert "retryBudget" in traffic_policy(newest)
    for version in ((1, 22), (1, 26)):
        rendered = render("HA_ONE_SITE", IstioOptions(namespace="shop", istio_version=version))
        policy = traffic_policy(rendered)
        assert "retryBudget" not in policy
        assert policy["connectionPool"] == {"tcp": {"connectTimeout": "250ms"},
                                            "http": {"maxRetries": 1024}}
        assert rendered.objects[1:] == newest.objects[1:]  # the EnvoyFilter is the same
        [warning] = rendered.warnings
        assert f"Istio 1.{version[1]}" in warning and "retryBudget" in warning \
            and "1.27" in warning and "orders" in warning and "maxRetries" in warning
    later = render("HA_ONE_SITE", IstioOptions(namespace="shop", istio_version=(1, 30)))
    assert later.objects == newest.objects and later.warnings == []


def test_render_refuses_an_istio_older_than_the_destination_rule_api() -> None:
    with pytest.raises(IstioRenderError, match=r"Istio 1\.21 .*networking\.istio\.io/v1.*1\.22"):
        render_model(parse_model(MODELS["HA_ONE_SITE"]),
                     IstioOptions(namespace="shop", istio_version=(1, 21)))


def test_render_command_takes_the_istio_version(tmp_path: Path) -> None:
    path = tmp_path / "model.yaml"
    path.write_text(MODELS["HA_ONE_SITE"])
    result = CliRunner().invoke(main, ["istio", "render", "-f", str(path), "-n", "shop",
                                       "--istio-version", "1.26"])
    assert result.exit_code == 0, result.output
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    for doc in docs:
        check_crd(doc)
    assert "retryBudget" not in docs[0]["spec"]["trafficPolicy"]
    assert "Istio 1.26" in result.stdout.splitlines()[0]  # the header says what it is for
    assert result.stderr.startswith("meshxl: warning: Istio 1.26 has no") \
        and len(result.stderr.splitlines()) == 1, result.stderr
    for bad in ("1", "one.two", "1.26.x.y"):
        bad_run = CliRunner().invoke(main, ["istio", "render", "-f", str(path),
                                            "--istio-version", bad])
        assert bad_run.exit_code == 1 and bad_run.stdout == ""
        assert bad_run.stderr == f"meshxl: bad --istio-version {bad!r}: expected X.Y\n"
