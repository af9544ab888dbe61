"""``meshxl istio check`` for pools and virtual systems: what breaks the placement (pure).

The placement names members; under Kubernetes a member is the pod of that name
(:mod:`.pools`). Reported, per pool with virtual systems:

* pool pods from a Deployment (or any ReplicaSet): generated names, never members;
* a StatefulSet of the pool whose pods are not the pool's members;
* pool pods that are not members (they serve every VS only at its last priority), and
  members without a pod (their VSs run on their standbys);
* a member pod, or a StatefulSet's template, whose site label is not the member's site
  (the standby placed on another site may share the active's); a StatefulSet whose
  ``serviceName`` is not the pool's;
* a VS's host held by something else: a Service of its name (or of the pool's) that
  does not select the pool's pods, a ServiceEntry with its host;
* a VS's DestinationRule whose failover order is not the VS's role labels;
* a VS with no pod labelled active, or several (``meshxl istio label`` not running, or
  running with another model), and an active that is not the placement's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

from meshxl.model import ModelSpec
from meshxl.model.vsls import placement_of

from .labels import sick_entry, vs_failover_priority, vs_label_keys
from .pools import POOL_LABEL, pool_problems, pool_sites, pools_with_systems, statefulsets

__all__ = ["check_pools"]

Add = Callable[[Literal["error", "warning"], str, str, str], None]
"""(level, cluster or pool, object, message)."""
_GENERATED = {"Deployment", "ReplicaSet", "DaemonSet"}


def _map(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _ref(obj: Mapping[str, Any]) -> str:
    meta = obj["metadata"]
    ns = meta.get("namespace")
    return f"{obj['kind']} {f'{ns}/' if ns else ''}{meta['name']}"


def _template_labels(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return _map(_map(_map(_map(obj.get("spec")).get("template")).get("metadata")).get("labels"))


def _list_of(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def check_pools(model: ModelSpec, by_kind: Mapping[str, list[dict[str, Any]]],
                namespace: str, cluster_domain: str, site_label: str, add: Add) -> None:
    """Report (through ``add``) what in the namespace's objects breaks the placement of
    the model's virtual systems."""

    def here(obj: Mapping[str, Any]) -> bool:
        return (obj["metadata"].get("namespace") or namespace) == namespace

    def labels_of(obj: Mapping[str, Any]) -> Mapping[str, Any]:
        return _map(obj["metadata"].get("labels"))

    for pool, specs in pools_with_systems(model):
        name = pool.name
        members = pool_sites(pool)
        errors, notes = pool_problems(model, pool, specs)
        for problem in errors:
            add("error", name, f"Service {namespace}/{name}", problem)
        for note in notes:
            if note.startswith(f"pool {name}: member"):  # StatefulSet naming
                add("warning", name, f"Service {namespace}/{name}", note)
        pods = {p["metadata"]["name"]: p for p in by_kind.get("Pod", [])
                if here(p) and labels_of(p).get(POOL_LABEL) == name}
        expected, _ = statefulsets(pool)
        workloads = [w for kind in (*_GENERATED, "StatefulSet") for w in by_kind.get(kind, [])
                     if here(w) and _template_labels(w).get(POOL_LABEL) == name]
        for w in workloads:
            if w["kind"] in _GENERATED:
                add("error", name, _ref(w),
                    f"runs pods of pool {name}: a {w['kind']}'s pods get generated names, "
                    "new ones on every restart, never the pool's members, so meshxl istio "
                    "label can label none of them and every virtual system is served by "
                    "every pod alike (no active, no standby); run the pool as a "
                    "StatefulSet per site whose pods are its members")
            elif w["metadata"]["name"] not in expected:
                add("error", name, _ref(w),
                    f"its pods ({w['metadata']['name']}-0, ...) are not members of pool "
                    f"{name} (members: {', '.join(members)}): name the members after "
                    "the StatefulSet's pods")
            else:
                site, _ = expected[w["metadata"]["name"]]
                labelled = _template_labels(w).get(site_label)
                if pool.sites and labelled != site:
                    add("error", name, _ref(w),
                        f"its pods are members on site {site} in the model, its template's "
                        f"{site_label} label says {labelled!r}: label them with their site")
                if _map(w.get("spec")).get("serviceName") != name:
                    add("warning", name, _ref(w),
                        f"serviceName is not {name}: its pods' DNS names are not "
                        f"POD.{name}.{namespace}.svc (the addresses meshxl's own xDS "
                        "would use)")
        for svc in by_kind.get("Service", []):
            if svc["metadata"]["name"] == name and here(svc) and \
                    _map(_map(svc.get("spec")).get("selector")).get(POOL_LABEL) != name:
                add("error", name, _ref(svc),
                    f"the Service of pool {name} selects other pods than its members "
                    f"({POOL_LABEL}={name}): the pods' DNS names (serviceName {name}) "
                    "are another workload's; rename one of them")
        owners = {str(_map(o).get("kind")) for p in pods.values()
                  for o in p["metadata"].get("ownerReferences") or []}
        if owners & _GENERATED and not any(w["kind"] in _GENERATED for w in workloads):
            add("error", name, f"Pod {namespace}/{next(iter(pods))}",
                f"pool {name}'s pods are owned by a ReplicaSet (a Deployment): generated "
                "names are never the pool's members; run the pool as a StatefulSet")
        for pod_name, pod in pods.items():
            if pod_name not in members:
                add("error", name, _ref(pod),
                    f"labelled {POOL_LABEL}={name} but not a member of pool {name} "
                    f"(members: {', '.join(members)}): it carries no virtual system's "
                    "label and serves each only at its last priority")
            elif pool.sites and labels_of(pod).get(site_label) != members[pod_name]:
                add("error", name, _ref(pod),
                    f"member {pod_name} is on site {members[pod_name]} in the model, the "
                    f"pod's {site_label} label says {labels_of(pod).get(site_label)!r}: the "
                    "placement puts a VS's standby on another site than its active, which "
                    "this pod may share; label the pod (its StatefulSet) with its site")
        # Pods but none a member (a Deployment): reported above, not once per member or VS.
        pods = {p: pod for p, pod in pods.items() if p in members}
        if pods:
            for member in members:
                if member not in pods:
                    add("warning", name, f"Pod {namespace}/{member}",
                        f"member {member} of pool {name} has no pod: the virtual systems "
                        "it is active for run on their standbys; scale the StatefulSet, "
                        f"or take it out (meshxl member down {name} {member}) so that "
                        "they get new standbys")
        placement = placement_of(model, pool)
        for spec in specs:
            vs = spec.name
            for svc in by_kind.get("Service", []):
                if svc["metadata"]["name"] == vs and here(svc) and \
                        _map(_map(svc.get("spec")).get("selector")).get(POOL_LABEL) != name:
                    add("error", vs, _ref(svc),
                        f"the host of virtual system {vs} selects other pods than pool "
                        f"{name}'s ({POOL_LABEL}={name}): its traffic goes elsewhere; "
                        "rename one of them")
            fqdn = f"{vs}.{namespace}.svc.{cluster_domain}"
            for entry in by_kind.get("ServiceEntry", []):
                hosts = _map(entry.get("spec")).get("hosts")
                if isinstance(hosts, list) and (fqdn in hosts or vs in hosts):
                    add("error", vs, _ref(entry),
                        f"declares host {fqdn if fqdn in hosts else vs}, the host of "
                        f"virtual system {vs}: Istio then has two services for it")
            ha = spec.high_availability
            chain = vs_failover_priority(vs) if ha else sick_entry(spec, vs_label_keys(vs)[0])
            for dr in by_kind.get("DestinationRule", []):
                if not chain or dr["metadata"]["name"] != f"meshxl-{vs}" or not here(dr):
                    continue
                locality = _map(_map(_map(_map(dr.get("spec")).get("trafficPolicy"))
                                     .get("loadBalancer")).get("localityLbSetting"))
                if ha and locality.get("failoverPriority") != chain:
                    add("error", vs, _ref(dr),
                        f"failoverPriority {locality.get('failoverPriority')} does not "
                        f"follow virtual system {vs}'s placement ({', '.join(chain)}): "
                        "apply meshxl istio render's output again")
                elif not ha and _list_of(locality.get("failoverPriority"))[:1] != chain:
                    add("warning", vs, _ref(dr),
                        f"failoverPriority {locality.get('failoverPriority')} is not "
                        f"{chain}: a degraded member of load-sharing virtual system {vs} "
                        "keeps its sessions; apply meshxl istio render's output again")
            if not ha:
                continue
            role = vs_label_keys(vs)[2]
            active = sorted(p for p, pod in pods.items() if labels_of(pod).get(role) == "active")
            roles = placement.roles.get(vs)
            if pods and not active:
                add("error", vs, f"Pod {namespace}/{next(iter(pods))}",
                    f"no pod of pool {name} is labelled {role}=active: is meshxl istio "
                    "label running? Without the labels every member shares one priority "
                    "(no active, no standby)")
            elif len(active) > 1:
                add("error", vs, f"Pod {namespace}/{active[1]}",
                    f"pods {', '.join(active)} are all labelled {role}=active: one active "
                    "per virtual system (is meshxl istio label running twice with "
                    "different models?)")
            elif active and roles is not None and active[0] != roles.active:
                add("warning", vs, f"Pod {namespace}/{active[0]}",
                    f"labelled {role}=active, the placement with every member up has "
                    f"{roles.active}: fine while {roles.active} is down or drained, else "
                    "meshxl istio label runs with another model")
