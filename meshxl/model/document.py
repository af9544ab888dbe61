"""The model file as a whole: clusters, pools of members shared by virtual systems
(VSX VSLS, docs/vsls.md), and telemetry. Pure data, as :mod:`.spec`."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from msgspec import Meta
from msgspec.structs import force_setattr

from .basics import Membership
from .fields import within
from .limits import BACKUPS, SHARE_PERCENT
from .spec import (
    ClusterSpec,
    Degradation,
    Domain,
    HealthCheck,
    Listener,
    Member,
    Mode,
    Name,
    SessionSync,
    Site,
    SpecModel,
    Stickiness,
    Weight,
)

__all__ = ["ModelSpec", "Pool", "Telemetry", "VirtualSystem"]


class Pool(SpecModel, frozen=True, kw_only=True):
    """Members shared by many virtual systems (VSX VSLS): each VS gets its active,
    standby and backup roles on them (docs/vsls.md)."""

    name: Name
    members: Annotated[list[Member], Meta(min_length=1)]
    """As a cluster's; ``weight`` is the member's capacity: its share of active roles."""
    sites: list[Site] = []
    listener: Listener | None = None
    """The one listener of the pool's virtual systems: each VS's ``domains`` are a route
    of it."""
    membership: Membership = "static"
    """``static``: every listed member is in the placement unless admin down on the pool
    or its site offline; ``registered``: a listed member is in it only while its sidecar
    holds a registration in at least one VS of the pool (docs/vsls.md, "Live members")."""
    health_check: HealthCheck = HealthCheck()
    """Envoy's active health check of the pool's members, as a cluster's: each virtual
    system's cluster checks every member of the pool with it (docs/vsls.md, "What it
    costs": a longer ``interval`` for many VSs)."""


class VirtualSystem(SpecModel, frozen=True, kw_only=True):
    """One tenant on a pool, or many with the same settings (``names``): each becomes a
    cluster of its own, named after it, whose members are the pool's with EDS
    priorities from the placement (docs/vsls.md)."""

    name: Name | None = None
    names: list[Name] = []
    """Many virtual systems with these settings (instead of ``name``)."""
    pool: Name
    weight: Weight = 1
    """Its share of active roles, relative to the other virtual systems of the pool."""
    mode: Mode = "high-availability"
    """``high-availability``: active, standby and backups placed over the pool;
    ``load-sharing``: every member of the pool serves it, by capacity."""
    backups: Annotated[int, within(BACKUPS)] = 0
    """Backup roles after the standby (EDS priorities 2, 3, ...)."""
    domains: list[Domain] | None = None
    """Host names routed to it on the pool's listener; default: its name, alone
    (``t01``), with any port (``t01:*``) or as the first label of a domain (``t01.*``)."""
    stickiness: Stickiness | None = None
    sessions: SessionSync = SessionSync()
    degradation: Degradation = Degradation()

    def __post_init__(self) -> None:
        if (self.name is None) == (not self.names):
            raise ValueError("set name (one virtual system) or names (many), not both"
                             if self.name is not None else "set name or names")
        if self.domains is not None and len(self.all_names) > 1:
            raise ValueError("domains name one virtual system's hosts: with names, leave "
                             "them out (each gets its own name as its host)")

    @property
    def all_names(self) -> list[str]:
        return [self.name] if self.name is not None else list(self.names)

    def domains_of(self, name: str) -> list[str]:
        return list(self.domains) if self.domains is not None else [
            name, f"{name}:*", f"{name}.*"]


class Telemetry(SpecModel, frozen=True, kw_only=True):
    """Envoy's request tracing (OpenTelemetry, W3C trace context)."""

    tracing: bool = False
    collector_cluster: Annotated[str, Meta(pattern=r"^[A-Za-z0-9._-]+$", max_length=253)] = (
        "meshxl_otlp")
    """The bootstrap cluster of the OTLP/gRPC collector (``meshxl bootstrap --otlp``)."""
    service_name: Annotated[str, Meta(pattern=r"^[\x20-\x7e]+$", max_length=256)] = "envoy"
    sampling_percent: Annotated[float, within(SHARE_PERCENT)] = 1.0
    """Of the traces Envoy starts itself (a request without ``traceparent``), the share
    it records; a caller's decision, sampled or not, is kept (docs/telemetry.md)."""


MAX_VIRTUAL_SYSTEMS = 5_000
"""The most virtual systems a model may have: each is a cluster of its own."""
MAX_VIRTUAL_ENDPOINTS = 200_000
"""The most (virtual system, pool member) pairs: each is an endpoint in every Envoy.
A short model (``names:`` times a big pool) could otherwise ask for millions."""


class ModelSpec(SpecModel, frozen=True, kw_only=True, dict=True):
    """A meshxl model file: clusters, pools of members shared by virtual systems, and
    Envoy's tracing (docs/model.md)."""

    clusters: list[ClusterSpec] = []
    pools: list[Pool] = []
    """Members shared by virtual systems (docs/vsls.md)."""
    virtual_systems: list[VirtualSystem] = []
    """Tenants placed over a pool; each is compiled as a cluster of its own."""
    telemetry: Telemetry = Telemetry()
    # Not a field (no model file writes it): set on each model when it is made, what its
    # virtual systems expanded to (their names, the base placement, placed copies: vsls.py).
    _vsls: ClassVar[dict[str, Any]]
    allow_empty: bool = False
    """A model without clusters withdraws every listener and cluster from every Envoy.
    It is refused (an empty file or input, a file caught mid-write) unless it says
    ``allow_empty: true``: the one way to serve nothing on purpose."""

    def __post_init__(self) -> None:
        """At most :data:`MAX_VIRTUAL_SYSTEMS` virtual systems and
        :data:`MAX_VIRTUAL_ENDPOINTS` of their members, before they are expanded."""
        force_setattr(self, "_vsls", {})
        count = sum(len(vs.all_names) for vs in self.virtual_systems)
        if count > MAX_VIRTUAL_SYSTEMS:
            raise ValueError(f"virtual_systems: at most {MAX_VIRTUAL_SYSTEMS} virtual systems "
                             f"(got {count})")
        size = {p.name: len(p.members) for p in self.pools}
        pairs = sum(len(vs.all_names) * size.get(vs.pool, 0) for vs in self.virtual_systems)
        if pairs > MAX_VIRTUAL_ENDPOINTS:
            raise ValueError(f"virtual_systems: at most {MAX_VIRTUAL_ENDPOINTS} virtual system "
                             "members (virtual systems x their pool's members; got "
                             f"{pairs})")

    def cluster(self, name: str) -> ClusterSpec | None:
        return next((c for c in self.clusters if c.name == name), None)

    def pool(self, name: str) -> Pool | None:
        return next((p for p in self.pools if p.name == name), None)

    @property
    def virtual_names(self) -> frozenset[str]:
        """The clusters that are virtual systems."""
        names: frozenset[str] = self._vsls.get("names", frozenset())
        return names
