"""``meshxl status``: clusters with their members (and those that left in the last
minutes), the Envoy nodes and the recent failovers; and the live view's report.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from meshxl.model import MemberState, cluster_view
from meshxl.model.runtime import PLACES_NEW, MemberView
from meshxl.operator.views.failovers import failover_report
from meshxl.operator.views.read import (
    MeshRead,
    clusters_of,
    count,
    epoch,
    model_warnings,
    warming_of,
)
from meshxl.operator.views.sync import sync_report
from meshxl.operator.views.vsls import operator_priority
from meshxl.xds.health import shares as degraded_shares
from meshxl.xds.history import reason
from meshxl.xds.types import short_type
from meshxl.xds.warmup import warmed_view

__all__ = ["DEPARTED_SECONDS", "live_report", "status_report"]


DEPARTED_SECONDS = 300.0
"""How long a member whose registration ended stays listed as lost (``departed``)."""


def _departed(read: MeshRead, cluster: str, present: set[str], now: float) -> list[dict[str, Any]]:
    """Members that left ``cluster`` within :data:`DEPARTED_SECONDS`: their registration
    ended (a crash, a partition, a scale-in), so the cluster's view no longer lists
    them; the member history says when and why."""
    out = []
    for (c, member), history in sorted(read.states.items()):
        if c != cluster or member in present or history.get("state") != str(MemberState.LOST):
            continue
        at = epoch(history.get("at"))
        if at is None or now - at > DEPARTED_SECONDS:
            continue
        out.append({"name": member, "state": str(MemberState.LOST),
                    "last_change": {"state": history.get("state"),
                                    "reason": history.get("reason"), "at": history.get("at")},
                    "failovers": count(history.get("failovers")),
                    "last_failover": history.get("last_failover")})
    return out


def status_report(read: MeshRead, cluster: str | None = None,
                  now: float | None = None) -> dict[str, Any]:
    """``meshxl status``: clusters with their members (and those that left in the last
    minutes), the Envoy nodes and the recent failovers."""
    now = time.time() if now is None else now
    clusters = []
    sick = degraded_shares(read.model, read.runtime, now)[0] if read.model else {}
    for spec in clusters_of(read, cluster):
        view = cluster_view(spec, read.runtime)
        warming = warming_of(read, now).get(spec.name, {})
        judged = read.runtime.health_of(spec.name)
        fractions = {name: w["fraction"] for name, w in warming.items()}
        for name, part in sick.get(spec.name, {}).items():
            fractions[name] = fractions.get(name, 1.0) * part
        shares = _shares(warmed_view(view, fractions).members)
        members = []
        for m in view.members:
            key = (spec.name, m.name)
            history = read.states.get(key, {})
            registration = read.registrations.get(key, {})
            admin = read.runtime.members_down_of(spec.name).get(m.name)
            site_admin = read.runtime.sites_offline.get(m.site)
            last = ({"state": history.get("state"), "reason": history.get("reason"),
                     "at": history.get("at")} if history.get("state") == str(m.state)
                    else {"state": str(m.state), "reason": reason(m, spec.name, read.runtime),
                          "at": registration.get("since") or None})
            members.append({
                "name": m.name, "site": m.site, "address": f"{m.address}:{m.port}",
                "priority": m.priority if m.advertised else None,
                "role": str(m.role), "share": round(shares.get(m.name, 0.0), 4),
                "weight": m.weight, "state": str(m.state), "problems": list(m.problems),
                "warmup": None if m.name not in warming else {
                    **warming[m.name], "fraction": round(warming[m.name]["fraction"], 4)},
                "degraded": None if m.name not in judged else {
                    **judged[m.name].to_dict(),
                    "share": sick.get(spec.name, {}).get(m.name)},
                "problem_details": registration.get("problem_details", {}),
                "admin": None if admin is None else vars(admin),
                "site_admin": None if site_admin is None else vars(site_admin),
                "last_change": last,
                "failovers": int(history.get("failovers", 0) or 0),
                "last_failover": history.get("last_failover"),
                "sidecar": registration.get("sidecar"),
            })
        clusters.append({
            "name": spec.name, "mode": spec.mode, "membership": spec.membership,
            "stickiness": _stickiness(spec), "sites": spec.site_names(),
            "members": members, "moved": moved_by_operator(read, spec.name, members),
            "priority": operator_priority(read, spec.name, next(
                (m["name"] for m in members if m["role"] == "active"), None)),
            "departed": _departed(read, spec.name, {m["name"] for m in members}, now),
        })
    nodes = []
    for node_id in sorted(read.nodes):
        n = read.nodes[node_id]
        nack = n.get("last_nack")
        nack = nack if isinstance(nack, dict) else None
        types = n.get("types")
        types = types if isinstance(types, dict) else {}
        nodes.append({
            "node": node_id, "cluster": n.get("cluster"), "replica": n.get("replica"),
            "streams": n.get("streams", 0), "connected_at": n.get("connected_at"),
            "acked": {short_type(str(t)): s.get("acked_version")
                      for t, s in sorted(types.items()) if isinstance(s, dict)},
            "nacks": n.get("nacks", 0),
            "last_nack": None if not nack else {
                **nack, "type": short_type(str(nack.get("type_url")))},
        })
    offline = {site: vars(action) for site, action in read.runtime.sites_offline.items()}
    return {"revision": read.revision, "model": read.model_source,
            "model_found": read.model is not None or read.model_error is not None,
            "model_error": read.model_error, "clusters": clusters,
            "sites_offline": offline, "nodes": nodes,
            "failovers": failover_report(read, cluster), "warnings": model_warnings(read)}


def moved_by_operator(read: MeshRead, vs: str,
                      members: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """A virtual system's active chosen by the operator (``meshxl vs move``): the
    member, who, why, when, and whether it is the active now (not while it is lost)."""
    chosen = sorted(m for v, m in read.runtime.preferred if v == vs)
    if not chosen:
        return None
    action = read.runtime.preferred[(vs, chosen[0])]
    active = [m["name"] for m in members if m["role"] == "active"]
    return {"member": chosen[0], **vars(action), "applied": chosen[0] in active}


def live_report(read: MeshRead, now: float | None = None) -> dict[str, Any]:
    """What the control plane's live view shows: ``meshxl status``, ``meshxl sync``
    and ``meshxl vs list`` of one read."""
    from meshxl.operator.views.vsls import vs_report

    now = time.time() if now is None else now
    return {"status": status_report(read, now=now), "sync": sync_report(read, now=now),
            "virtual": vs_report(read)}


def _shares(members: Iterable[MemberView]) -> dict[str, float]:
    """Fraction of new sessions each member gets now: the lowest tier with a member
    Envoy sees healthy takes them, split by EDS weight. Overloaded members (DEGRADED)
    take none: Envoy's hash load balancers place nothing on a degraded host, and the
    control plane sends a tier's overloaded members healthy (``active-attention``) when
    no other member of the tier is ready."""
    members = list(members)
    ready = [m for m in members if m.state in PLACES_NEW]
    if not ready:
        return {}
    tier = min(m.priority for m in ready)
    serving = [m for m in ready if m.priority == tier]
    total = sum(m.lb_weight for m in serving) or 1
    return {m.name: m.lb_weight / total for m in serving}


def _stickiness(spec: Any) -> dict[str, Any] | None:
    s = spec.stickiness
    if s is None:
        return None
    on = s.header if s.header else s.cookie.name if s.cookie else "source address"
    return {"algorithm": s.algorithm, "key": s.key, "on": on}
