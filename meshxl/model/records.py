"""The runtime records read from etcd: registrations, operator actions, health judgements,
a pool's stored placement (:mod:`.sticky` keeps it; here so that reading it loads no
placement code).

Each is built from the JSON stored under ``mesh/`` (:mod:`meshxl.etcd.mesh`) and checked
field by field: the records are read, not trusted. :mod:`.runtime` combines them with
the spec.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .basics import check_member_address
from .decode import as_integer
from .limits import MEMBER_WEIGHT, PORT, SYNC_DELAY, Bound

if TYPE_CHECKING:
    from .placement import PoolMember, VirtualRoles

__all__ = ["DEGRADED_KIND", "HANDBACK_KIND", "HEALTH_KINDS", "HELD_KIND", "PROBE_KIND",
           "MAX_PRIORITY_LIST", "AdminAction", "Health", "IstioEndpoint", "PriorityList",
           "Registration", "StoredPlacement"]


@dataclass(frozen=True)
class IstioEndpoint:
    """What istiod would put on a pod's endpoint, as the member's sidecar read it from
    its pod (``meshxl serve statesync --istio-workload``, ``--istio-tls-mode``).

    ``tls_mode``: the pod's ``security.istio.io/tlsMode`` label (``istio`` when Istio
    injected its proxy; empty or ``disabled``: no proxy, plain text). ``workload``:
    ``NAME;NAMESPACE;CANONICAL_NAME;CANONICAL_REVISION``, istiod's telemetry metadata
    without the cluster id (the control plane adds its own)."""

    tls_mode: str
    workload: str

    @classmethod
    def from_dict(cls, data: Any) -> IstioEndpoint:
        """Raises ValueError naming a bad field."""
        if not isinstance(data, Mapping):
            raise ValueError("registration istio must be an object")
        tls_mode, workload = data.get("tls_mode", ""), data.get("workload")
        if not isinstance(tls_mode, str) or not _LABEL_VALUE.fullmatch(tls_mode):
            raise ValueError(f"registration istio.tls_mode is not a label value: "
                             f"{str(tls_mode)[:80]!r}")
        if not isinstance(workload, str) or len(workload) > 1024 \
                or workload.count(";") != 3 or not workload.split(";", 1)[0] \
                or any(c in workload for c in "\n\r\0"):
            raise ValueError("registration istio.workload must be NAME;NAMESPACE;"
                             f"CANONICAL_NAME;CANONICAL_REVISION, got {str(workload)[:80]!r}")
        return cls(tls_mode=tls_mode, workload=workload)


#: A Kubernetes label value: empty, or up to 63 of [A-Za-z0-9._-], alphanumeric at both ends.
_LABEL_VALUE = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?")


@dataclass(frozen=True)
class Registration:
    """A member's live registration (written by its sidecar under an etcd lease)."""

    address: str
    port: int
    site: str | None = None
    weight: int | None = None
    ready: bool = True
    problems: tuple[str, ...] = ()
    overloaded: bool = False
    """The application says it is overloaded: it keeps its pinned sessions, new sessions
    go to the other ready members of its tier (EDS ``DEGRADED``)."""
    returning: str | None = None
    """Since when (its sidecar's clock, ISO 8601) the member is back after a problem, a
    lost sync or a restart after a failover, and held behind the members that took
    over from it (``behind``) until failback (None: not held). Its sidecar sets and
    clears it (``statesync/failback.py``)."""
    behind: tuple[str, ...] = ()
    """The members that served when it came back: it stays behind them while one of
    them serves."""
    istio: IstioEndpoint | None = None
    """Its pod's Istio endpoint metadata, when its sidecar runs under Istio."""
    sync_delay: float = 0.0
    """Its sidecar's ``sync_delay`` when above 0 (``--sync-delay`` or the model's): a
    planned move away from it waits for its acknowledgement (:mod:`.moves`) even when
    the model's cluster has none."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Registration:
        """Build from the JSON stored in etcd; raises ValueError naming a bad field."""
        if "address" not in data or "port" not in data:
            raise ValueError("registration needs address and port")
        address = str(data["address"])
        port = _whole(data["port"], PORT, "port")
        try:
            check_member_address(address)
        except ValueError as exc:
            raise ValueError(f"registration address {address[:80]!r}: {exc}") from None
        weight = data.get("weight")
        if weight is not None:
            weight = _whole(weight, MEMBER_WEIGHT, "weight")
        site = data.get("site") or None
        if site is not None and not isinstance(site, str):
            raise ValueError(f"registration site is not a name: {str(site)[:40]!r}")
        problems = data.get("problems", ()) or ()
        if not isinstance(problems, list | tuple):
            raise ValueError(f"registration problems is not a list: {str(problems)[:40]!r}")
        return cls(
            address=address,
            port=port,
            site=site,
            weight=weight,
            ready=bool(data.get("ready", True)),
            problems=tuple(sorted(str(p) for p in problems)),
            overloaded=data.get("overload") is not None,
            returning=_since(data.get("returning")),
            behind=_names(data.get("returning")),
            sync_delay=_delay(data.get("sync_delay")),
            istio=IstioEndpoint.from_dict(data["istio"]) if data.get("istio") is not None
            else None,
        )


def _whole(value: Any, bound: Bound, what: str) -> int:
    """A registration's whole number (as the model reads one, :func:`.decode.as_integer`:
    ``8080``, ``8080.0``, ``"8080"``; not a bool) within ``bound``; ValueError naming it
    otherwise. Written by whoever may write the key, so never trusted to be finite:
    ``1e400`` reads as infinity."""
    try:
        number = as_integer(value) if not isinstance(value, bool) else value
    except ValueError:  # more digits than int() reads
        raise ValueError(f"registration {what} out of range: expected {bound.describe()}, "
                         f"got {str(value)[:40]!r}") from None
    try:
        bound.check(number)
    except ValueError as exc:
        raise ValueError(f"registration {what} out of range: {exc}") from None
    return number


def _since(value: Any) -> str | None:
    """The ``since`` of a ``{"since": ...}`` record, None when absent (read, not trusted)."""
    if not isinstance(value, Mapping):
        return None
    since = value.get("since")
    return str(since)[:64] if since else "unknown"


MAX_SYNC_DELAY = SYNC_DELAY.high
"""The longest ``sync_delay`` a registration is believed for (a day, the longest the
model and ``--sync-delay`` take): beyond it, or not a number, it counts as 0, so that
no record holds planned moves back for longer."""


def _delay(value: Any) -> float:
    """A registration's ``sync_delay`` (0.0 when absent, not a number or out of range)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    return float(value) if 0 < value <= MAX_SYNC_DELAY else 0.0


def _names(value: Any) -> tuple[str, ...]:
    """The ``behind`` names of a ``returning`` record (at most 64 of them, as text)."""
    names = value.get("behind") if isinstance(value, Mapping) else None
    if not isinstance(names, list):
        return ()
    return tuple(str(n)[:253] for n in names[:64])


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


MAX_PRIORITY_LIST = 256
"""The most members a VS's priority list names (a pool holds fewer: the bound keeps a
hand-written record from costing the placement more than a pool would)."""


@dataclass(frozen=True)
class PriorityList(AdminAction):
    """A virtual system's members in the operator's order (``meshxl vs priority``; ``vs
    move`` stores the one-member list): the first live one is its active, the next its
    standby, then backups, the pool's other members following in the placement's order.
    Stored under the key of its first member, one a VS."""

    order: tuple[str, ...] = ()

    @classmethod
    def from_record(cls, data: Mapping[str, Any], member: str) -> PriorityList:
        """Build from the JSON stored under ``.../preferred/MEMBER``; a record without
        ``order`` (written by ``vs move`` before lists) is the one-member list. Raises
        ValueError naming a bad field."""
        raw = data.get("order", [member])
        if not isinstance(raw, list) or not raw or not all(isinstance(m, str) and m
                                                           for m in raw):
            raise ValueError("priority order must be a non-empty list of member names")
        if len(raw) > MAX_PRIORITY_LIST:
            raise ValueError(f"priority order names more than {MAX_PRIORITY_LIST} members")
        if len(set(raw)) != len(raw):
            raise ValueError("priority order names a member twice")
        if raw[0] != member:
            raise ValueError(f"priority order starts with {raw[0][:80]!r}, not its key's "
                             f"member {member[:80]!r}")
        action = AdminAction.from_dict(data)
        return cls(reason=action.reason, by=action.by, at=action.at, order=tuple(raw))


DEGRADED_KIND = "degraded"
"""A member judged sick: slower, or failing more, than its peers (docs/faults.md)."""
PROBE_KIND = "probe"
"""A high-availability member sent a small share of the active's sessions so the two
can be compared before (or after) a predictive failover."""
HELD_KIND = "held"
"""High availability, manual failback: a member well again after a predictive failover,
held behind the active that took over (shown ``returning``)."""
HANDBACK_KIND = "handback"
"""High availability with pinned sessions: a standby whose probe moved nothing, handing
the sessions the probe gave it back to the active (its pins let go; it keeps its tier)."""
HEALTH_KINDS = (DEGRADED_KIND, PROBE_KIND, HELD_KIND, HANDBACK_KIND)


@dataclass(frozen=True)
class Health:
    """The control plane's judgement of a member that is not an outright failure
    (written by the replica that judged it, under its lease: ``meshxl.xds.health``)."""

    kind: str
    """One of :data:`HEALTH_KINDS`."""
    reason: str = ""
    since: float = 0.0
    """When the judgement was made (Unix seconds, the judging replica's clock): a
    degraded member's share steps down from there."""
    by: str = ""
    """The control-plane replica that judged it."""
    moves: bool = True
    """False: shown and counted only (``degradation.action: report``)."""
    behind: str = ""
    """High availability: the member that took the active role from it (a held member
    is held only while that one serves); for a probe, the active it is probed beside."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Health:
        """Build from the JSON stored in etcd; raises ValueError naming a bad field."""
        kind = data.get("kind")
        if kind not in HEALTH_KINDS:
            raise ValueError(f"health kind must be one of {', '.join(HEALTH_KINDS)}: "
                             f"{str(kind)[:40]!r}")
        try:
            since = float(data.get("since", 0.0))
        except (TypeError, ValueError):
            raise ValueError(f"health since is not a number: {data.get('since')!r}") from None
        if not math.isfinite(since):
            raise ValueError("health since is not a finite number")
        return cls(kind=str(kind), reason=str(data.get("reason", ""))[:512], since=since,
                   by=str(data.get("by", ""))[:253], moves=data.get("moves", True) is not False,
                   behind=str(data.get("behind", ""))[:253])

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "reason": self.reason, "since": self.since, "by": self.by,
                "moves": self.moves, "behind": self.behind}


@dataclass(frozen=True)
class StoredPlacement:
    """A pool's base placement as stored (:func:`sticky_placement` reads it back)."""

    members: tuple[str, ...]
    """The pool's members when it was stored, in order."""
    roles: Mapping[str, tuple[str, str | None, int]]
    """VS -> (active, standby, the VS's weight when stored)."""

    def to_record(self) -> dict[str, Any]:
        """The JSON form stored in etcd."""
        return {"members": list(self.members),
                "roles": {vs: list(roles) for vs, roles in sorted(self.roles.items())}}

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> StoredPlacement:
        """The stored form back (:meth:`to_record`); ValueError on another shape."""
        members = data.get("members")
        roles = data.get("roles")
        if not isinstance(members, list) or not all(isinstance(m, str) and m
                                                    for m in members):
            raise ValueError("a stored placement's members must be a list of names")
        if not isinstance(roles, dict):
            raise ValueError("a stored placement's roles must be an object")
        out: dict[str, tuple[str, str | None, int]] = {}
        for vs, entry in roles.items():
            if not (isinstance(entry, list) and len(entry) == 3
                    and isinstance(entry[0], str) and entry[0]
                    and (entry[1] is None or isinstance(entry[1], str))
                    and isinstance(entry[2], int) and not isinstance(entry[2], bool)
                    and entry[2] > 0):
                raise ValueError(f"a stored placement's roles of {vs!r} must be "
                                 "[active, standby or null, weight above 0]")
            out[str(vs)] = (entry[0], entry[1], entry[2])
        return cls(tuple(members), out)

    @classmethod
    def of(cls, placed: Mapping[str, VirtualRoles], members: Sequence[PoolMember],
           systems: Sequence[tuple[str, int, int]]) -> StoredPlacement:
        weight = {name: w for name, w, _ in systems}
        return cls(tuple(m.name for m in members),
                   {vs: (r.active, r.standby, weight[vs]) for vs, r in sorted(placed.items())
                    if r.active is not None and vs in weight})
