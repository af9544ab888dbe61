"""The labels of meshxl's Istio mode: the role and draining labels ``meshxl istio label``
keeps on member pods (from meshxl's own view of each member), the failover priority
Istio computes from them, and Istio's own persistent-session Service labels, which
``meshxl istio check`` reports.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from meshxl.model import ClusterSpec
from meshxl.model.records import Health
from meshxl.model.runtime import SERVING, ClusterView, MemberState, MemberView, Role

__all__ = [
    "DEFAULT_SITE_LABEL", "DRAINING_LABEL", "DRAINING_VALUE", "HA_FAILOVER_PRIORITY",
    "ISTIO_SESSION_LABELS", "PREFERRED_LABEL", "ROLE_LABEL", "SERVING_LABEL", "VS_PREFIXES",
    "drain_labels", "istio_priority", "istio_session_labels", "role_labels",
    "serving_labels", "session_label_problem", "sick_aside", "sick_entry",
    "vs_failover_priority", "vs_label_keys", "vs_role_labels",
]

DEFAULT_SITE_LABEL = "meshxl.io/site"
#: Role labels ``meshxl istio label`` keeps on high-availability member pods.
ROLE_LABEL = "meshxl.io/role"
"""active, standby, backup, or none (drained, unready, lost)."""
SERVING_LABEL = "meshxl.io/serving"
"""``true`` on every member meshxl sends traffic to (active, standby, backup)."""
PREFERRED_LABEL = "meshxl.io/preferred"
"""``true`` on the active and the standby member."""
#: failoverPriority of a high-availability cluster: each entry an endpoint matches in a
#: row lowers its priority by one, so active 0, standby 1, backup 2, the rest 3.
HA_FAILOVER_PRIORITY = (f"{SERVING_LABEL}=true", f"{PREFERRED_LABEL}=true",
                        f"{ROLE_LABEL}=active")
#: The same three labels per virtual system, on the pods of its pool (one pod holds roles
#: in many VSs): ``serving.vs.meshxl.io/VS``, ``preferred.vs.meshxl.io/VS`` and the role
#: ``vs.meshxl.io/VS`` (active, standby, backup). A pool member with no role in a VS (the
#: rest of the pool, or drained in it) carries none of the VS's labels: the last priority.
VS_PREFIXES = ("serving.vs.meshxl.io/", "preferred.vs.meshxl.io/", "vs.meshxl.io/")
#: istiod's pod label for draining endpoints (its PILOT_DRAINING_LABEL default): a
#: labelled endpoint is sent as DRAINING to Services with Istio's persistent-session
#: cookie label and left out of every other Service's EDS.
DRAINING_LABEL = "istio.io/draining"
DRAINING_VALUE = "meshxl"
"""The value meshxl writes: it removes only its own draining label, never another's."""
#: istiod's Service labels for its own persistent sessions (PILOT_PERSISTENT_SESSION_LABEL
#: and PILOT_PERSISTENT_SESSION_HEADER_LABEL defaults).
ISTIO_SESSION_LABELS = ("istio.io/persistent-session", "istio.io/persistent-session-header")


def istio_session_labels(service: Mapping[str, Any],
                         names: Sequence[str] = ISTIO_SESSION_LABELS) -> dict[str, str]:
    """Istio's own persistent-session labels set (non-empty) on a Service object."""
    meta = service.get("metadata")
    labels = meta.get("labels") if isinstance(meta, Mapping) else None
    if not isinstance(labels, Mapping):
        return {}
    return {k: str(labels[k]) for k in names if k and labels.get(k)}


def session_label_problem(spec: ClusterSpec, labels: Mapping[str, str]) -> str | None:
    """What Istio's own persistent-session labels on the cluster's Service do to the
    model, or None when there are none."""
    if not labels:
        return None
    named = ", ".join(f"{k}={v}" for k, v in labels.items())
    if spec.stickiness is not None and spec.stickiness.pin is not None:
        return (f"Service {spec.name} has Istio's persistent-session label ({named}): "
                "istiod then keeps DRAINING members as pin targets (a drained or "
                "terminating member keeps its pinned sessions, the model moves them) and, "
                "with PILOT_ENABLE_PERSISTENT_SESSION_FILTER, sets a second pin of its own "
                "beside meshxl's; remove the label (meshxl's EnvoyFilter pins the sessions)")
    return (f"Service {spec.name} has Istio's persistent-session label ({named}) but the "
            "model has no stickiness.pin: with PILOT_ENABLE_PERSISTENT_SESSION_FILTER "
            "istiod pins its sessions (they no longer follow the hash, failover order or "
            "drains); remove the label or add stickiness.pin to the model")


def istio_priority(labels: Mapping[str, str], chain: Sequence[str]) -> int:
    """Istio's failoverPriority with ``label=value`` entries: N minus the leading
    entries the endpoint's labels match (pilot's applyFailoverPriorityPerLocality)."""
    for depth, entry in enumerate(chain):
        key, _, value = entry.partition("=")
        if labels.get(key) != value:
            return len(chain) - depth
    return 0


def role_labels(view: ClusterView) -> dict[str, dict[str, str | None]]:
    """The role labels of each member pod of a high-availability cluster (``None``:
    remove the label). Drained, unready and lost members carry role ``none``.

    A standby probed beside a degraded active (docs/faults.md, "Predictive failover")
    shares the active's tier in the view; Istio has no weight to give it a small share,
    so it is labelled ``active`` too while the probe runs: istiod puts both at priority
    0 and the hash splits the sessions between them (about half go to the standby,
    whose sidecar holds their state), so the judge can compare the two. Not in a
    pinned cluster: Istio honours a pin to any healthy endpoint, so the sessions the
    probe pinned to the standby would stay there after it (meshxl's own xDS lets such
    pins go; istiod's draining label would take the standby out of the load balancer)."""
    out: dict[str, dict[str, str | None]] = {}
    spec = view.spec
    pinned = spec.stickiness is not None and spec.stickiness.pin is not None
    first = None if pinned else min(
        (m.priority for m in view.members if m.role is Role.ACTIVE), default=None)
    for m in view.members:
        role = m.role.value if m.role in (Role.ACTIVE, Role.STANDBY, Role.BACKUP) \
            else "none"
        if m.role is Role.STANDBY and m.priority == first:
            role = Role.ACTIVE.value  # probed: in the active's tier
        out[m.name] = {
            ROLE_LABEL: role,
            SERVING_LABEL: "true" if role != "none" else None,
            PREFERRED_LABEL: "true" if role in ("active", "standby") else None,
        }
    return out


def sick_entry(spec: ClusterSpec, key: str = SERVING_LABEL) -> list[str]:
    """The failoverPriority entry that puts a load-sharing cluster's degraded members
    behind their peers (``[key=true]``), or none: high availability (its role labels
    do it), ``degradation.action`` other than ``move``, or no outlier detection
    (Istio then ignores failoverPriority)."""
    if (spec.high_availability or spec.degradation.action != "move"
            or not spec.outlier_detection.enabled):
        return []
    return [f"{key}=true"]


def _sick(m: MemberView, health: Mapping[str, Health]) -> bool:
    """Judged degraded with ``action: move`` (a ``report`` judgement moves nothing)."""
    record = health.get(m.name)
    return m.state is MemberState.DEGRADED and record is not None and record.moves


def serving_labels(view: ClusterView, health: Mapping[str, Health],
                   key: str = SERVING_LABEL) -> dict[str, dict[str, str | None]]:
    """The serving label of each member pod of a load-sharing cluster (``None``: remove
    it), for :func:`sick_entry`: ``true`` on every member meshxl sends new sessions to,
    none on a member judged degraded (``health``), drained, unready or lost, which Istio
    then puts behind its peers at once (it has no weight to step down: every hashed
    session of the member moves at the first EDS push, as in a failover)."""
    return {m.name: {key: "true" if m.state in SERVING and not _sick(m, health) else None}
            for m in view.members}


def sick_aside(view: ClusterView, health: Mapping[str, Health]) -> set[str]:
    """Members judged degraded whose pinned sessions must move (a pin outlives a change
    of priority): load sharing, at once (meshxl's xDS lets them go at the last step);
    high availability, once the active role has left the member. Only while another
    member serves and is not degraded: a sick member beats no member."""
    sick = {m.name for m in view.members if _sick(m, health)}
    if not sick or not any(m.state in SERVING and m.name not in sick for m in view.members):
        return set()
    return {m.name for m in view.members if m.name in sick and m.role is not Role.ACTIVE}


def drain_labels(view: ClusterView, aside: frozenset[str] | set[str] = frozenset()
                 ) -> dict[str, dict[str, str | None]]:
    """The draining label of each member pod of a pinned cluster (``None``: remove it).

    The members meshxl's own xDS sends as EDS DRAINING (``member down``, ``site
    offline``) get istiod's draining label: istiod then leaves them out of the EDS of a
    Service without Istio's persistent-session cookie label, and their pinned sessions
    move. A priority change alone (the role labels) would not move them: a pin
    overrides the load balancer's choice whatever the priority. So do the degraded
    members in ``aside`` (:func:`sick_aside`)."""
    return {m.name: {DRAINING_LABEL: DRAINING_VALUE if m.draining or m.name in aside
                     else None}
            for m in view.members}


def vs_label_keys(vs: str) -> tuple[str, str, str]:
    """The (serving, preferred, role) labels of virtual system ``vs`` on its pool's pods."""
    serving, preferred, role = (f"{prefix}{vs}" for prefix in VS_PREFIXES)
    return serving, preferred, role


def vs_failover_priority(vs: str) -> list[str]:
    """A high-availability VS's failoverPriority: :data:`HA_FAILOVER_PRIORITY` on its own
    labels (active 0, standby 1, backups 2, the rest of the pool 3)."""
    serving, preferred, role = vs_label_keys(vs)
    return [f"{serving}=true", f"{preferred}=true", f"{role}=active"]


def vs_role_labels(view: ClusterView, placed: Sequence[str]) -> dict[str, dict[str, str | None]]:
    """The labels of one high-availability VS on each pool member (``None``: remove).

    ``view`` is the VS's cluster as meshxl's xDS serves it (per-VS drains, degraded
    members) and ``placed`` its active, standby and backups from the placement: the rest
    of the pool, which meshxl's xDS puts behind them (one priority each), carries no
    label of the VS (unless the view made it the active or the standby: every placed
    member is out)."""
    keys = vs_label_keys(view.spec.name)
    out: dict[str, dict[str, str | None]] = {}
    for name, labels in role_labels(view).items():
        role = labels[ROLE_LABEL]
        if role == "none" or (role == "backup" and name not in placed):
            out[name] = dict.fromkeys(keys)
        else:
            out[name] = {keys[0]: labels[SERVING_LABEL], keys[1]: labels[PREFERRED_LABEL],
                         keys[2]: role}
    return out
