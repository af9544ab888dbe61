"""Runtime state on top of the spec: who is registered and ready, what is admin-down.

The spec says what a cluster should look like; the runtime state says what is true now
(member registrations from sidecars, operator actions). :func:`cluster_view` combines
the two into the members Envoy should know about, each with its tier (EDS priority),
its weight and its role. It is pure so the xDS compiler and the operator commands
agree on every decision.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from .spec import DEFAULT_SITE, ClusterSpec, Member


@dataclass(frozen=True)
class Registration:
    """A member's live registration (written by its sidecar under an etcd lease)."""

    address: str
    port: int
    site: str | None = None
    weight: int | None = None
    ready: bool = True
    problems: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Registration:
        """Build from the JSON stored in etcd; raises ValueError naming a bad field."""
        try:
            address = str(data["address"])
            port = int(data["port"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"registration needs address and port: {exc}") from None
        if not 1 <= port <= 65535:
            raise ValueError(f"registration port out of range: {port}")
        weight = data.get("weight")
        if weight is not None:
            try:
                weight = int(weight)
            except (TypeError, ValueError):
                raise ValueError(f"registration weight is not a number: {weight!r}") from None
            if not 1 <= weight <= 10_000:
                raise ValueError(f"registration weight out of range 1..10000: {weight}")
        return cls(
            address=address,
            port=port,
            site=data.get("site") or None,
            weight=weight,
            ready=bool(data.get("ready", True)),
            problems=tuple(sorted(str(p) for p in data.get("problems", ()) or ())),
        )


@dataclass(frozen=True)
class AdminAction:
    """An operator's decision (member down, site offline): who, why, when."""

    reason: str = ""
    by: str = ""
    at: str = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdminAction:
        return cls(reason=str(data.get("reason", "")), by=str(data.get("by", "")),
                   at=str(data.get("at", "")))


@dataclass(frozen=True)
class RuntimeState:
    """Everything besides the spec that decides what Envoy is told."""

    registrations: Mapping[tuple[str, str], Registration] = field(default_factory=dict)
    members_down: Mapping[tuple[str, str], AdminAction] = field(default_factory=dict)
    sites_offline: Mapping[str, AdminAction] = field(default_factory=dict)


class MemberState(StrEnum):
    READY = "ready"
    SYNCING = "syncing"          # registered, not ready yet (cache catching up)
    PROBLEM = "problem"          # the app reported a critical problem
    ADMIN_DOWN = "admin-down"    # meshxl member down
    SITE_OFFLINE = "site-offline"  # meshxl site offline
    LOST = "lost"                # registered membership, no live registration


class Role(StrEnum):
    ACTIVE = "active"
    STANDBY = "standby"
    BACKUP = "backup"
    LOAD_SHARING = "load-sharing"
    NONE = "none"


@dataclass(frozen=True)
class MemberView:
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
        return self.state in (MemberState.READY, MemberState.ADMIN_DOWN,
                              MemberState.SITE_OFFLINE)

    @property
    def draining(self) -> bool:
        return self.state in (MemberState.ADMIN_DOWN, MemberState.SITE_OFFLINE)


@dataclass(frozen=True)
class ClusterView:
    spec: ClusterSpec
    members: tuple[MemberView, ...]

    @property
    def name(self) -> str:
        return self.spec.name

    def member(self, name: str) -> MemberView | None:
        return next((m for m in self.members if m.name == name), None)


_WEIGHT_SCALE = 1000


def _state(spec: ClusterSpec, name: str, reg: Registration | None, site: str,
           state: RuntimeState) -> MemberState:
    if (spec.name, name) in state.members_down:
        return MemberState.ADMIN_DOWN
    if site in state.sites_offline:
        return MemberState.SITE_OFFLINE
    if reg is None:
        return MemberState.LOST if spec.membership == "registered" else MemberState.READY
    if reg.problems:
        return MemberState.PROBLEM
    return MemberState.READY if reg.ready else MemberState.SYNCING


def cluster_view(spec: ClusterSpec, state: RuntimeState) -> ClusterView:
    """Decide every member's state, tier, weight and role for one cluster."""
    site_rank = {s.name: (s.failover_rank if s.failover_rank is not None else i)
                 for i, s in enumerate(spec.sites)} or {DEFAULT_SITE: 0}
    site_weight = {s.name: s.weight for s in spec.sites} or {DEFAULT_SITE: 100}
    default_site = spec.site_names()[0]

    # Spec members first (their order is the operator's preference), then members
    # that registered without being listed, by name.
    listed = {m.name for m in spec.members}
    entries: list[tuple[Member | None, str, Registration | None]] = [
        (m, m.name, state.registrations.get((spec.name, m.name))) for m in spec.members
    ]
    for (cluster, name), registration in sorted(state.registrations.items()):
        if cluster == spec.name and name not in listed:
            entries.append((None, name, registration))

    drafts: list[tuple[tuple[int, int], MemberView]] = []
    index_in_site: dict[str, int] = {}
    for member, name, reg in entries:
        site = (reg.site if reg and reg.site else None) or (member.site if member else None) \
            or default_site
        if site not in site_rank:  # a registration naming a site the model lacks
            site_rank_value = max(site_rank.values()) + 1
        else:
            site_rank_value = site_rank[site]
        position = index_in_site.get(site, 0)
        index_in_site[site] = position + 1
        explicit = member.priority if member else None
        if spec.mode == "high-availability":
            tier = explicit if explicit is not None else position
        else:
            tier = explicit if explicit is not None else 0
        address = reg.address if reg else member.address  # type: ignore[union-attr]
        port = reg.port if reg else member.port  # type: ignore[union-attr]
        weight = (reg.weight if reg and reg.weight else None) or (member.weight if member else 100)
        view = MemberView(
            name=name, address=address, port=port, site=site, weight=weight,
            state=_state(spec, name, reg, site, state),
            problems=reg.problems if reg else (),
        )
        drafts.append(((site_rank_value, tier), view))

    # Dense priorities over advertised members: an empty tier never leaves a gap.
    keys = sorted({key for key, v in drafts if v.advertised})
    priority_of = {key: i for i, key in enumerate(keys)}
    # Site share inside a tier: the sum of serving member weights per (tier, site), so
    # a drained member's share goes to its site's other members, not to other sites.
    tier_site_total: dict[tuple[tuple[int, int], str], int] = {}
    for key, v in drafts:
        if v.advertised and not v.draining:
            tier_site_total[(key, v.site)] = tier_site_total.get((key, v.site), 0) + v.weight

    # Roles follow the tiers that actually serve (draining members serve nothing).
    serving = sorted({key for key, v in drafts if v.advertised and not v.draining})
    rank_of = {key: i for i, key in enumerate(serving)}

    members = []
    for key, v in drafts:
        if not v.advertised:
            members.append(v)
            continue
        total = tier_site_total.get((key, v.site), v.weight)
        lb_weight = max(1, round(site_weight.get(v.site, 100) * v.weight * _WEIGHT_SCALE / total))
        members.append(replace(v, priority=priority_of[key], lb_weight=lb_weight,
                               role=_role(spec, rank_of.get(key))))
    return ClusterView(spec=spec, members=tuple(members))


def _role(spec: ClusterSpec, rank: int | None) -> Role:
    if rank is None:
        return Role.NONE
    if spec.mode == "load-sharing":
        return Role.LOAD_SHARING if rank == 0 else Role.BACKUP
    return (Role.ACTIVE, Role.STANDBY)[rank] if rank < 2 else Role.BACKUP
