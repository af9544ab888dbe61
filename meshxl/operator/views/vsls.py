"""``meshxl vs``: where each virtual system's roles are, and each member's share of
the active roles (pure, over one :func:`~meshxl.operator.views.read.read_mesh`)."""

from __future__ import annotations

from typing import Any

from meshxl.model import cluster_view
from meshxl.model.placement import site_rule_broken
from meshxl.model.vsls import placement_of, priority_lists, site_rule_warnings, virtual_systems
from meshxl.operator.views.read import MeshRead

__all__ = ["operator_priority", "vs_report"]


def vs_report(read: MeshRead, name: str | None = None) -> dict[str, Any]:
    """Per pool, its members (live or lost, active and standby roles held, the active
    weight held as a multiple of its fair share) and its virtual systems (active,
    standby, backups, spares, each member's state in the VS's cluster)."""
    model = read.model
    out: dict[str, Any] = {"revision": read.revision, "model_error": read.model_error,
                           "pools": [], "virtual_systems": [], "warnings": []}
    if model is None:
        return out
    chosen = {n for n, _, _ in virtual_systems(model)}
    if name is not None and name not in chosen:
        return out
    for pool in model.pools:
        placement = placement_of(model, pool, read.runtime)
        live = [m for m in placement.members if m.name not in placement.lost]
        capacity = sum(m.capacity for m in live) or 1
        total = sum(placement.weights[vs] for vs, r in placement.roles.items()
                    if r.active is not None)
        members = []
        for m in placement.members:
            held = [vs for vs, r in placement.roles.items() if r.active == m.name]
            weight = sum(placement.weights[vs] for vs in held)
            fair = total * m.capacity / capacity if m.name not in placement.lost else 0
            members.append({
                "name": m.name, "site": m.site, "capacity": m.capacity,
                "lost": m.name in placement.lost, "why": placement.why.get(m.name),
                "active": len(held),
                "active_weight": weight,
                "standby": sum(1 for r in placement.roles.values() if r.standby == m.name),
                "fair_share": round(fair, 3),
                "share_ratio": round(weight / fair, 3) if fair else None,
            })
        if name is None or any(n == name for n, _, p in virtual_systems(model) if p is pool):
            out["pools"].append({"name": pool.name, "members": members,
                                 "listener": (f"{pool.listener.address}:{pool.listener.port}"
                                              if pool.listener else None)})
        for vs_name, vs, p in virtual_systems(model):
            if p is not pool or (name is not None and vs_name != name):
                continue
            roles = placement.roles.get(vs_name)
            spec = model.cluster(vs_name)
            states = ({m.name: str(m.state) for m in cluster_view(spec, read.runtime).members}
                      if spec is not None else {})
            out["virtual_systems"].append({
                "name": vs_name, "pool": pool.name, "mode": vs.mode, "weight": vs.weight,
                "domains": vs.domains_of(vs_name),
                "active": roles.active if roles else None,
                "standby": roles.standby if roles else None,
                "backups": list(roles.backup) if roles else [],
                "spares": list(roles.spare) if roles else sorted(states),
                "states": states,
                "moved": _moved(read, vs_name, placement.preferred.get(vs_name)),
                "priority": operator_priority(
                    read, vs_name, roles.active if roles else None,
                    site_rule_broken(roles, live) if roles else False),
            })
    out["warnings"] = [w for w in site_rule_warnings(model, read.runtime)
                       if name is None or w.startswith(f"virtual system {name}:")]
    return out


def operator_priority(read: MeshRead, vs: str, active: str | None,
                      standby_on_its_site: bool = False) -> dict[str, Any] | None:
    """The VS's priority list set by the operator (``meshxl vs priority``; ``vs move``:
    one member), if any: the list, who, why, when; ``applied``: a listed member is its
    active now (else none of them is live: the placement's order serves);
    ``standby_on_its_site``: the list puts the standby on the active's site while
    another site has a live member."""
    order = priority_lists(read.runtime).get(vs)
    if order is None:
        return None
    action = read.runtime.preferred[(vs, order[0])]  # a list is stored under its head
    return {"order": list(order), "reason": action.reason, "by": action.by, "at": action.at,
            "applied": active in order, "standby_on_its_site": standby_on_its_site}


def _moved(read: MeshRead, vs: str, applied: str | None) -> dict[str, Any] | None:
    """The active the operator chose for ``vs`` (``meshxl vs move``), if any: who,
    why, when, and whether it applies now (its member live in the pool)."""
    chosen = sorted(m for v, m in read.runtime.preferred if v == vs)
    if not chosen:
        return None
    return {"member": chosen[0], **vars(read.runtime.preferred[(vs, chosen[0])]),
            "applied": applied == chosen[0]}
