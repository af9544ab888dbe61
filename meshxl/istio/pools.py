"""Virtual systems under Istio and Kubernetes (pure): how a pool and its VSs map.

* **The pool** is one StatefulSet per site (one when the pool has no sites): its pods are
  the pool's members, named ``NAME-0``, ``NAME-1``..., so the member names of the model
  are the pod names and stay the same across restarts and rescheduling. Its pods carry
  ``meshxl.io/cluster: POOL`` (the injector's cluster label: the statesync sidecar and
  the anti-affinity of members work as for a cluster) and their site label. The pool has
  one headless Service named after it, the StatefulSets' ``serviceName`` (stable DNS
  names ``NAME-0.POOL.NAMESPACE.svc``); it has no ports: traffic goes through the VSs'
  Services.
* **Each virtual system** is a Service named after it selecting the pool's pods (so its
  host ``VS.NAMESPACE.svc.cluster.local`` and its short name are the VS's default
  domains), with the DestinationRule and EnvoyFilter of an ordinary cluster, whose
  ``failoverPriority`` follows the VS's own role labels
  (:func:`~.labels.vs_failover_priority`), which ``meshxl istio label`` keeps on the
  pool's pods from the placement.

A Deployment cannot hold a pool: its pods get generated names (``web-7d9f8-x2k4q``), new
ones on every restart, never the model's member names, so the labeler finds no member
pod to label and every VS is served by every pod alike. ``meshxl istio check`` reports it.
"""

from __future__ import annotations

import re
from typing import Any

from meshxl.model import ClusterSpec, ModelSpec
from meshxl.model.basics import DEFAULT_SITE
from meshxl.model.document import Pool
from meshxl.model.vsls import virtual_systems

__all__ = ["POOL_LABEL", "pool_problems", "pool_service", "pool_sites", "pools_with_systems",
           "service_name_problem", "statefulsets", "target_port_problem", "vs_service"]

#: The pod label naming a pool member's pool (the injector's cluster label).
POOL_LABEL = "meshxl.io/cluster"
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_ORDINAL = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?)-(0|[1-9][0-9]*)$")


def _meta(name: str, options: Any, **labels: str) -> dict[str, Any]:
    return {"name": name, "namespace": options.namespace,
            "labels": {"app.kubernetes.io/managed-by": "meshxl", **labels}}


def service_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a Service's name (a DNS-1035 label), or None."""
    if _DNS_1035.match(name):
        return None
    return (f"{name!r} is not a Kubernetes Service name (lowercase letters, digits and "
            "'-', starting with a letter, at most 63)")


def pool_sites(pool: Pool) -> dict[str, str]:
    """member -> its site (the pool's first site, or the default site, when unset)."""
    default = pool.sites[0].name if pool.sites else DEFAULT_SITE
    return {m.name: m.site or default for m in pool.members}


def statefulsets(pool: Pool) -> tuple[dict[str, tuple[str, int]], list[str]]:
    """The StatefulSets whose pods are the pool's members: name -> (site, replicas), and
    the problems of members that no StatefulSet can name (each a sentence)."""
    sites = pool_sites(pool)
    ordinals: dict[str, dict[int, str]] = {}
    problems = []
    for member in pool.members:
        match = _ORDINAL.match(member.name)
        if match is None or len(match[1]) > 52:
            problems.append(f"member {member.name} is not named NAME-ORDINAL as a "
                            "StatefulSet's pod is")
            continue
        ordinals.setdefault(match[1], {})[int(match[3])] = member.name
    out: dict[str, tuple[str, int]] = {}
    for name, members in ordinals.items():
        missing = sorted(set(range(len(members))) - set(members))
        if missing:
            problems.append(f"members {', '.join(sorted(members.values()))} are not "
                            f"{name}-0 to {name}-{len(members) - 1}: StatefulSet {name} "
                            "would create pods that are not members")
        spread = sorted({sites[m] for m in members.values()})
        if len(spread) > 1:
            problems.append(f"members of StatefulSet {name} are on sites {', '.join(spread)}: "
                            "its pods share one template, so one site label (one "
                            "StatefulSet per site)")
        out[name] = (sites[next(iter(members.values()))], len(members))
    return out, problems


def pool_service(pool: Pool, options: Any) -> dict[str, Any]:
    """The pool's headless Service: the StatefulSets' ``serviceName`` (pod DNS names)."""
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": _meta(pool.name, options, **{"meshxl.io/pool": pool.name}),
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                     "selector": {POOL_LABEL: pool.name}}}


def target_port_problem(pool: Pool) -> str | None:
    """Why the pool's VS Services cannot have one target port, or None."""
    targets = sorted({m.port for m in pool.members})
    if len(targets) == 1:
        return None
    return (f"pool {pool.name}: members listen on ports {', '.join(map(str, targets))}; "
            "a virtual system's Service has one target port (the pool's pods share one "
            "template)")


def vs_service(name: str, pool: Pool, port: int, protocol: str,
               options: Any) -> dict[str, Any]:
    """A virtual system's Service: its host, over the pool's pods."""
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": _meta(name, options, **{"meshxl.io/cluster": name,
                                                "meshxl.io/pool": pool.name}),
            "spec": {"selector": {POOL_LABEL: pool.name},
                     "ports": [{"name": protocol, "port": port,
                                "targetPort": pool.members[0].port}]}}


def pools_with_systems(model: ModelSpec) -> list[tuple[Pool, list[ClusterSpec]]]:
    """Each pool with virtual systems, and their clusters in model order."""
    out: dict[str, list[ClusterSpec]] = {}
    for name, _, pool in virtual_systems(model):
        spec = model.cluster(name)
        if spec is not None:
            out.setdefault(pool.name, []).append(spec)
    return [(p, out[p.name]) for p in model.pools if p.name in out]


def pool_problems(model: ModelSpec, pool: Pool, specs: list[ClusterSpec]
                  ) -> tuple[list[str], list[str]]:
    """What cannot be rendered for the pool (errors) and what renders with a caveat
    (warnings), each a sentence naming the pool or the virtual system."""
    errors, notes = [], []
    if any(c.name == pool.name for c in model.clusters):
        errors.append(f"pool {pool.name}: a cluster has its name, and under Kubernetes the "
                      f"pool's pods are labelled {POOL_LABEL}={pool.name} and its headless "
                      "Service has that name; rename the pool")
    for name in (pool.name, *(s.name for s in specs)):
        problem = service_name_problem(name)
        if problem is not None:
            what = "pool" if name == pool.name else "virtual system"
            errors.append(f"{what} {name}: {problem}")
    problem = target_port_problem(pool)
    if problem is not None:
        errors.append(problem)
    _, naming = statefulsets(pool)
    notes += [f"pool {pool.name}: {n}; meshxl istio label finds members by pod name, so "
              "run the pool as one StatefulSet per site whose pods are its members"
              for n in naming]
    entries = {name: vs for name, vs, p in virtual_systems(model) if p is pool}
    for spec in specs:
        vs = entries[spec.name]
        if vs.domains is not None:
            notes.append(f"virtual system {spec.name}: domains {', '.join(vs.domains)} route "
                         "on the pool's listener (meshxl's Envoy); under Istio its host is "
                         f"its Service {spec.name}: route other names to it at your gateway")
        if spec.high_availability and vs.backups > 1:
            notes.append(f"virtual system {spec.name}: its {vs.backups} backups share Istio "
                         "priority 2")
    return errors, notes
