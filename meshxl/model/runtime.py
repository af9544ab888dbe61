"""Runtime state on top of the spec: who is registered and ready, what is admin-down.

The spec says what a cluster should look like; the runtime state says what is true now
(member registrations from sidecars, operator actions). :func:`cluster_view` combines
the two into the members Envoy should know about, each with its tier (EDS priority),
its weight and its role. It is pure so the xDS compiler and the operator commands
agree on every decision.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

from .basics import DEFAULT_SITE
from .records import (
    DEGRADED_KIND,
    HANDBACK_KIND,
    HELD_KIND,
    PROBE_KIND,
    AdminAction,
    Health,
    Registration,
    StoredPlacement,
)


@dataclass(frozen=True)
class RuntimeState:
    """Everything besides the spec that decides what Envoy is told."""

    registrations: Mapping[tuple[str, str], Registration] = field(default_factory=dict)
    members_down: Mapping[tuple[str, str], AdminAction] = field(default_factory=dict)
    sites_offline: Mapping[str, AdminAction] = field(default_factory=dict)
    health: Mapping[tuple[str, str], Health] = field(default_factory=dict)
    """Members judged sick (degraded) or probed, by the control plane."""
    preferred: Mapping[tuple[str, str], AdminAction] = field(default_factory=dict)
    """(virtual system, first member): its priority list set by the operator (``meshxl
    vs priority``, ``vs move``), a :class:`~.records.PriorityList` (a bare AdminAction:
    the one-member list)."""
    flushed: Mapping[tuple[str, str], Mapping[str, float]] = field(default_factory=dict)
    """(cluster, member): the planned moves away from it (:mod:`.moves`) for which its
    sidecar replicated every young session, each with when (the sidecar's clock)."""
    unleased: frozenset[tuple[str, str]] = frozenset()
    """(cluster, member) of the registrations etcd holds under no lease: no sidecar
    wrote them (a sidecar always registers under its own lease, which ends with it), so
    they keep no pool member live (:func:`.pool_roles.lost_members`)."""

    pool_live: frozenset[tuple[str, str]] = frozenset()
    """(pool, member) of the pool-level liveness keys etcd holds under a lease: written by
    the member's own sidecar with the pool's credential, which no tenant holds."""
    pool_keyed: frozenset[tuple[str, str]] = frozenset()
    """(pool, member) of the members that prove their liveness with a pool-level key
    (its sidecar marked it so once): their VS registrations prove nothing."""

    placements: Mapping[str, StoredPlacement] = field(default_factory=dict)
    """Pool -> its stored base placement (``pools/POOL/placement``, written by the
    control plane): the next placement keeps it (:func:`.placement.sticky_placement`)."""

    pools_by_key: frozenset[str] = frozenset()
    """Pools every member of which proves its liveness with its pool-level key (the
    upgrade to them is over): no VS registration proves any member live there."""

    def pool_live_of(self, pool: str) -> frozenset[str]:
        """The members of ``pool`` whose pool-level liveness key is under a live lease."""
        return frozenset(m for p, m in self.pool_live if p == pool)

    def pool_keyed_of(self, pool: str) -> frozenset[str]:
        """The members of ``pool`` live only by their pool-level key (marked, or holding
        one now)."""
        return frozenset(m for p, m in self.pool_keyed | self.pool_live if p == pool)

    def leased_registrations_of(self, cluster: str) -> frozenset[str]:
        """The members of ``cluster`` registered under a live lease: what a member's own
        sidecar proves (a key exists under a lease only while the lease lives)."""
        found = self.registrations_of(cluster)
        if not self.unleased:
            return frozenset(found)
        return frozenset(m for m in found if (cluster, m) not in self.unleased)

    def registrations_of(self, cluster: str) -> Mapping[str, Registration]:
        """One cluster's registrations by member (indexed once per state)."""
        return _index(self, "_registrations_by_cluster", self.registrations).get(
            cluster, _EMPTY)

    def members_down_of(self, cluster: str) -> Mapping[str, AdminAction]:
        """One cluster's admin-down members (indexed once per state)."""
        return _index(self, "_down_by_cluster", self.members_down).get(cluster, _EMPTY)

    def health_of(self, cluster: str) -> Mapping[str, Health]:
        """One cluster's health judgements (indexed once per state)."""
        if not self.health:
            return _EMPTY
        return _index(self, "_health_by_cluster", self.health).get(cluster, _EMPTY)


def _index(state: RuntimeState, attr: str,
           items: Mapping[tuple[str, str], Any]) -> dict[str, dict[str, Any]]:
    """Group ``{(cluster, member): x}`` by cluster, cached on the (immutable) state."""
    index: dict[str, dict[str, Any]] | None = state.__dict__.get(attr)
    if index is None:
        index = {}
        for (cluster, member), value in items.items():
            index.setdefault(cluster, {})[member] = value
        object.__setattr__(state, attr, index)
    return index


_EMPTY: Mapping[str, Any] = MappingProxyType({})


class MemberState(StrEnum):
    READY = "ready"
    SYNCING = "syncing"          # registered, not ready yet (cache catching up)
    PROBLEM = "problem"          # the app reported a critical problem
    OVERLOADED = "overloaded"    # serving its sessions, placed no new ones (DEGRADED)
    ATTENTION = "active-attention"  # reported a problem or overload, serves all the
    #                               same: no other member can (ClusterXL Active Attention)
    RETURNING = "returning"      # back after trouble, held behind the serving members
    DEGRADED = "degraded"        # sick (slower or failing more than its peers): a
    #                              smaller share, or (high availability) behind the standby
    ADMIN_DOWN = "admin-down"    # meshxl member down
    SITE_OFFLINE = "site-offline"  # meshxl site offline
    LOST = "lost"                # registered membership, no live registration


# Enum members bound once: class attribute access on an Enum is a descriptor call, and
# cluster_view runs once per member of the whole mesh on every compile.
_READY, _SYNCING, _PROBLEM = MemberState.READY, MemberState.SYNCING, MemberState.PROBLEM
_OVERLOADED, _ATTENTION = MemberState.OVERLOADED, MemberState.ATTENTION
_RETURNING, _SICK = MemberState.RETURNING, MemberState.DEGRADED
_ADMIN_DOWN, _SITE_OFFLINE, _LOST = (MemberState.ADMIN_DOWN, MemberState.SITE_OFFLINE,
                                     MemberState.LOST)

#: States in which a member is sent to Envoy; DRAINING ones are sent marked DRAINING,
#: DEGRADED ones marked DEGRADED (they serve the sessions pinned to them, and the load
#: balancer gives them new ones only when no member of their priority is healthy).
ADVERTISED = frozenset({MemberState.READY, MemberState.OVERLOADED, MemberState.ATTENTION,
                        MemberState.RETURNING, MemberState.DEGRADED, MemberState.ADMIN_DOWN,
                        MemberState.SITE_OFFLINE})
DRAINING = frozenset({MemberState.ADMIN_DOWN, MemberState.SITE_OFFLINE})
DEGRADED = frozenset({MemberState.OVERLOADED})
#: States that serve: they have a role and a share of their site's weight.
SERVING = frozenset({MemberState.READY, MemberState.OVERLOADED, MemberState.ATTENTION,
                     MemberState.RETURNING, MemberState.DEGRADED})
#: Serving states sent to Envoy as healthy: the hash places new sessions on them.
PLACES_NEW = frozenset({MemberState.READY, MemberState.ATTENTION, MemberState.RETURNING,
                        MemberState.DEGRADED})
"""A degraded member keeps taking new sessions at its (stepped-down) share: the control
plane scales its EDS weight (``meshxl.xds.health``)."""



class Role(StrEnum):
    ACTIVE = "active"
    STANDBY = "standby"
    BACKUP = "backup"
    LOAD_SHARING = "load-sharing"
    NONE = "none"


_NO_ROLE = Role.NONE


class MemberView(NamedTuple):
    """One member as Envoy should see it (a tuple: built 16,000 times per compile)."""

    name: str
    address: str
    port: int
    site: str
    weight: int
    state: MemberState
    priority: int = 0
    """EDS priority (dense: 0 is the active tier)."""
    lb_weight: int = 1
    """EDS load_balancing_weight: member weight scaled by its site's share."""
    role: Role = Role.NONE
    problems: tuple[str, ...] = ()

    @property
    def advertised(self) -> bool:
        """Sent to Envoy at all (drained members are sent, marked DRAINING)."""
        return self.state in ADVERTISED

    @property
    def draining(self) -> bool:
        return self.state in DRAINING


class SiteShape(Protocol):
    """What :func:`cluster_view` reads of a site."""

    @property
    def name(self) -> str: ...
    @property
    def weight(self) -> int: ...
    @property
    def failover_rank(self) -> int | None: ...


class MemberShape(Protocol):
    """What :func:`cluster_view` reads of a listed member."""

    @property
    def name(self) -> str: ...
    @property
    def address(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def site(self) -> str | None: ...
    @property
    def weight(self) -> int: ...
    @property
    def priority(self) -> int | None: ...


class FailoverShape(Protocol):
    @property
    def all_withdrawn(self) -> str: ...
    @property
    def failback(self) -> str: ...


class ClusterShape(Protocol):
    """What :func:`cluster_view` (and :mod:`.checks`) reads of a cluster (the model's
    :class:`~.spec.ClusterSpec`, which this module does not import)."""

    @property
    def name(self) -> str: ...
    @property
    def sites(self) -> Sequence[SiteShape]: ...
    @property
    def members(self) -> Sequence[MemberShape]: ...
    @property
    def site_affinity(self) -> str: ...
    @property
    def failover(self) -> FailoverShape: ...
    @property
    def high_availability(self) -> bool: ...
    @property
    def registered(self) -> bool: ...


Spec = TypeVar("Spec", bound=ClusterShape)


@dataclass(frozen=True)
class ClusterView(Generic[Spec]):
    spec: Spec
    members: tuple[MemberView, ...]

    @property
    def name(self) -> str:
        return self.spec.name

    def member(self, name: str) -> MemberView | None:
        return next((m for m in self.members if m.name == name), None)


_WEIGHT_SCALE = 1000


# MemberView's own __new__ is a Python function; the tuple constructor is not, and this
# runs once per member of the whole mesh on every full compile.
_new_view = tuple.__new__


def cluster_view(spec: Spec, state: RuntimeState,
                 local_site: str | None = None) -> ClusterView[Spec]:
    """Decide every member's state, tier, weight and role for one cluster.

    ``local_site``: the view of an Envoy in that site when the cluster's
    ``site_affinity`` is ``local``: the site's members take the first tiers, the other
    sites' follow in their usual order (roles are then relative to that site)."""
    if spec.sites:
        site_rank: dict[str, int] = {}
        site_weight: dict[str, int] = {}
        for i, s in enumerate(spec.sites):
            site_rank[s.name] = s.failover_rank if s.failover_rank is not None else i
            site_weight[s.name] = s.weight
        default_site = spec.sites[0].name
    else:
        site_rank, site_weight, default_site = {DEFAULT_SITE: 0}, {DEFAULT_SITE: 100}, DEFAULT_SITE
    unknown_site_rank = max(site_rank.values()) + 1
    high_availability = spec.high_availability
    registered = state.registrations_of(spec.name)
    down = state.members_down_of(spec.name)
    offline = state.sites_offline
    absent = _LOST if spec.registered else _READY
    health = state.health_of(spec.name)
    prefer = local_site if spec.site_affinity == "local" else None

    # (tier key, name, address, port, site, weight, state, problems); the tier key is
    # (site rank, tier), or (not the local site, site rank, tier) in a site's own view,
    # sorted: one EDS priority per distinct key.
    drafts: list[_Draft] = []
    held: list[int] = []  # drafts of returning members
    judged: list[int] = []  # high availability: drafts of degraded or probed members
    trouble: list[bool] = []  # one entry once a member is in trouble (problem, overload)
    index_in_site: dict[str, int] = {}

    def draft(member: MemberShape | None, name: str, reg: Registration | None) -> None:
        if reg is not None:
            site = reg.site or (member.site if member else None) or default_site
            address, port, problems = reg.address, reg.port, reg.problems
            weight = reg.weight or (member.weight if member else 100)
        else:
            assert member is not None
            site = member.site or default_site
            address, port, problems, weight = member.address, member.port, (), member.weight
        position = index_in_site.get(site, 0)
        index_in_site[site] = position + 1
        explicit = member.priority if member else None
        tier = explicit if explicit is not None else (position if high_availability else 0)
        rank = site_rank.get(site, unknown_site_rank)
        key = (rank, tier) if prefer is None else (site != prefer, rank, tier)
        if down and name in down:
            member_state = _ADMIN_DOWN
        elif offline and site in offline:
            member_state = _SITE_OFFLINE
        elif reg is None:
            member_state = absent
        elif reg.problems:
            member_state = _PROBLEM
            if not trouble:
                trouble.append(True)
        elif not reg.ready:
            member_state = _SYNCING
        else:
            member_state = _OVERLOADED if reg.overloaded else _READY
            if reg.overloaded and not trouble:
                trouble.append(True)
            if reg.returning is not None:
                held.append(len(drafts))
                if member_state is _READY:
                    member_state = _RETURNING
        if health and member_state is _READY and name in health:
            kind = health[name].kind
            if kind == DEGRADED_KIND:
                member_state = _SICK
            elif kind == HELD_KIND:
                member_state = _RETURNING
            if high_availability and health[name].moves and kind != HANDBACK_KIND:
                judged.append(len(drafts))
        drafts.append((key, name, address, port, site, weight, member_state, problems))

    # Spec members first (their order is the operator's preference), then members
    # that registered without being listed, by name.
    if registered:
        listed = {m.name for m in spec.members}
        for m in spec.members:
            draft(m, m.name, registered.get(m.name))
        for name in sorted(registered):
            if name not in listed:
                draft(None, name, registered[name])
    else:
        for m in spec.members:
            draft(m, m.name, None)

    if held:
        _hold(drafts, held, registered)
    if judged:
        _judge(drafts, judged, health)
    if trouble:
        _fall_back(spec, drafts, registered)

    # Dense priorities over advertised members: an empty tier never leaves a gap.
    serving = SERVING
    priority_of = {key: i for i, key in
                   enumerate(sorted({d[0] for d in drafts if d[6] in ADVERTISED}))}
    # Roles follow the tiers that actually serve (draining members serve nothing).
    role_of = {key: _role(spec, rank) for rank, key in
               enumerate(sorted({d[0] for d in drafts if d[6] in serving}))}
    # Site share inside a tier: the sum of serving member weights per (tier, site), so
    # a drained member's share goes to its site's other members, not to other sites.
    totals: dict[tuple[tuple[int, ...], str], int] = {}
    for d in drafts:
        if d[6] in serving:
            totals[(d[0], d[4])] = totals.get((d[0], d[4]), 0) + d[5]
    factor = {(key, site): site_weight.get(site, 100) * _WEIGHT_SCALE / total
              for (key, site), total in totals.items()}

    probed = {drafts[i][1] for i in judged if health[drafts[i][1]].kind == PROBE_KIND}
    if probed:
        # The probed member left its tier for the active's; the tiers behind keep their
        # roles (a backup does not become the standby for a probe).
        role_of = {key: role if rank == 0 else _role(spec, rank + 1)
                   for rank, (key, role) in enumerate(sorted(role_of.items()))}
    members: list[MemberView] = []
    append = members.append
    for key, name, address, port, site, weight, member_state, problems in drafts:
        if member_state not in ADVERTISED:
            append(_new_view(MemberView, (name, address, port, site, weight, member_state, 0,
                                          1, _NO_ROLE, problems)))
            continue
        scale = factor.get((key, site))
        if scale is None:
            scale = site_weight.get(site, 100) * _WEIGHT_SCALE / weight
        role = role_of[key] if member_state in serving else _NO_ROLE
        if probed and name in probed:
            role = Role.STANDBY
        append(_new_view(MemberView, (
            name, address, port, site, weight, member_state, priority_of[key],
            max(1, round(weight * scale)), role, problems)))
    return ClusterView(spec=spec, members=tuple(members))


_Draft = tuple[tuple[int, ...], str, str, int, str, int, MemberState, tuple[str, ...]]


def _hold(drafts: list[_Draft], held: list[int],
          registered: Mapping[str, Registration]) -> None:
    """Returning members go right after the members that took over from them (their
    registration's ``behind``), while one of those serves (in place, on ``drafts``):
    they take no traffic from it, and they are next in line when it fails, ahead of
    the other standbys (ClusterXL's Active Up makes a member that comes back a
    standby). Among themselves they keep their order. When none of those serves any
    more, the member takes its own place again."""
    marked = set(held)
    serving = {d[1]: d[0] for i, d in enumerate(drafts) if d[6] in SERVING and i not in marked}
    for i in held:
        d = drafts[i]
        ahead = [serving[name] for name in registered[d[1]].behind if name in serving]
        if ahead:
            drafts[i] = ((*min(ahead), 1, *d[0]), *d[1:])
        elif d[6] is _RETURNING:
            drafts[i] = (*d[:6], _READY, d[7])


def _judge(drafts: list[_Draft], judged: list[int], health: Mapping[str, Health]) -> None:
    """High availability (in place, on ``drafts``): a degraded (or held) member goes
    right behind the best member that serves and is not judged (a predictive failover:
    its role goes to that member; with nobody else serving it keeps its place), and a
    probed member joins the best serving tier, where the control plane gives it a small
    share (``degradation.probe_share``) so the two can be compared."""
    marked = set(judged)
    serving = {d[1]: d[0] for i, d in enumerate(drafts) if d[6] in SERVING and i not in marked}
    if not serving:
        return
    best = min(serving.values())
    for i in judged:
        d = drafts[i]
        record = health[d[1]]
        if record.kind == PROBE_KIND:
            drafts[i] = (best, *d[1:])
        elif record.behind in serving:
            drafts[i] = ((*serving[record.behind], 1, *d[0]), *d[1:])
        elif record.kind == DEGRADED_KIND:
            drafts[i] = ((*best, 1, *d[0]), *d[1:])
        elif d[6] is _RETURNING:
            drafts[i] = (*d[:6], _READY, d[7])  # held behind a member that left: its place


def _fall_back(spec: ClusterShape, drafts: list[_Draft],
               registered: Mapping[str, Registration]) -> None:
    """``failover.all_withdrawn``: members that reported trouble serve all the same
    (``active-attention``) where nobody else would (in place, on ``drafts``).

    * A tier (EDS priority) whose serving members are all overloaded: Envoy's hash load
      balancers build their table from healthy hosts only, so a tier of ``DEGRADED``
      hosts takes no new session at all (503 when no other tier has a healthy host).
      Its overloaded members are sent healthy instead: overload steers new sessions
      inside a tier, it never fails them over to another tier.
    * No member serves and some reported problems (and are caught up): the best of them
      (``keep-best``: fewest problems, then tier, then place in the list) or all of them
      (``keep-all``) serve.
    """
    policy = spec.failover.all_withdrawn
    if policy == "withdraw":
        return
    placing = {d[0] for d in drafts if d[6] in PLACES_NEW}
    for i, d in enumerate(drafts):
        if d[6] is _OVERLOADED and d[0] not in placing:
            drafts[i] = (*d[:6], _ATTENTION, d[7])
    if any(d[6] in SERVING for d in drafts):
        return
    candidates = [i for i, d in enumerate(drafts) if d[6] is _PROBLEM
                  and (reg := registered.get(d[1])) is not None and reg.ready]
    if not candidates:
        return
    if policy == "keep-best":
        candidates = [min(candidates, key=lambda i: (len(drafts[i][7]), drafts[i][0], i))]
    for i in candidates:
        d = drafts[i]
        drafts[i] = (*d[:6], _ATTENTION, d[7])


def _role(spec: ClusterShape, rank: int) -> Role:
    if not spec.high_availability:
        return Role.LOAD_SHARING if rank == 0 else Role.BACKUP
    return (Role.ACTIVE, Role.STANDBY)[rank] if rank < 2 else Role.BACKUP
