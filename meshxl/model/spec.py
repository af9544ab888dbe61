"""The declarative cluster model, in ClusterXL terms.

A model file lists clusters. Each cluster is a set of members (service instances)
spread over sites, served in one of two modes:

* ``high-availability``: one active member, the others standby then backup
  (Envoy EDS priorities 0, 1, 2+);
* ``load-sharing``: every member of the first site tier is active, by weight.

Traffic is sticky: a consistent-hash load balancer (maglev or ring_hash) keyed on a
header, a cookie or the source IP keeps a session on one member while it lives.

These classes only describe and validate; they do no I/O. Durations are written as
``250ms``, ``1.5s``, ``2m``, ``1h`` or a number of seconds, and stored as seconds.
"""

from __future__ import annotations

from typing import Annotated, Any

from msgspec import Meta, field
from msgspec.structs import force_setattr, replace

# The vocabulary (enumerations, dispatch, names, durations, addresses) lives in
# .basics, which imports no msgspec; it is re-exported here for the model's users.
from .basics import ALGORITHMS as ALGORITHMS
from .basics import ALL_WITHDRAWN as ALL_WITHDRAWN
from .basics import DEFAULT_SITE as DEFAULT_SITE
from .basics import FAILBACKS as FAILBACKS
from .basics import HASH_KEYS as HASH_KEYS
from .basics import HEALTH_CHECK_TYPES as HEALTH_CHECK_TYPES
from .basics import HIGH_AVAILABILITY, REGISTERED
from .basics import MAX_DURATION as MAX_DURATION
from .basics import MEMBERSHIPS as MEMBERSHIPS
from .basics import MIN_DURATION as MIN_DURATION
from .basics import MODES as MODES
from .basics import NAME_PATTERN as NAME_PATTERN
from .basics import PIN_CARRIERS as PIN_CARRIERS
from .basics import PROTOCOLS as PROTOCOLS
from .basics import REPLICATIONS as REPLICATIONS
from .basics import SITE_AFFINITIES as SITE_AFFINITIES
from .basics import Algorithm as Algorithm
from .basics import AllWithdrawn as AllWithdrawn
from .basics import DegradeAction as DegradeAction
from .basics import Failback as Failback
from .basics import HashKey as HashKey
from .basics import HealthCheckType as HealthCheckType
from .basics import Membership as Membership
from .basics import Mode as Mode
from .basics import PinCarrier as PinCarrier
from .basics import Protocol as Protocol
from .basics import Replication as Replication
from .basics import Shares as Shares
from .basics import SiteAffinity as SiteAffinity
from .basics import UnknownChoice as UnknownChoice
from .basics import check_duration as check_duration
from .basics import check_member_address as check_member_address
from .basics import choose as choose
from .basics import is_ip_literal as is_ip_literal
from .basics import parse_duration as parse_duration
from .basics import read_duration as read_duration
from .fields import HEADER_PATTERN as HEADER_PATTERN
from .fields import MAX_WARMUP as MAX_WARMUP
from .fields import UINT32_MAX as UINT32_MAX
from .fields import Count as Count
from .fields import Domain as Domain
from .fields import Duration as Duration
from .fields import ListenAddress as ListenAddress
from .fields import MemberAddress as MemberAddress
from .fields import Name as Name
from .fields import Port as Port
from .fields import PositiveDuration as PositiveDuration
from .fields import SpecModel as SpecModel
from .fields import SyncDelay, within
from .fields import WarmUp as WarmUp
from .fields import Weight as Weight
from .limits import (
    BALANCE_FACTOR,
    MAGLEV_TABLE,
    PRIORITY,
    QUOTA_BURST,
    QUOTA_BYTES,
    QUOTA_RATE,
    QUOTA_SESSIONS,
    RING_SIZE,
    SESSION_BYTES,
)
from .traffic import GRPC_RETRY_CONDITIONS as GRPC_RETRY_CONDITIONS
from .traffic import GRPC_RETRY_ON as GRPC_RETRY_ON
from .traffic import RETRY_CONDITIONS as RETRY_CONDITIONS
from .traffic import TCP_CONNECT_RETRIES as TCP_CONNECT_RETRIES
from .traffic import Degradation as Degradation
from .traffic import HealthCheck as HealthCheck
from .traffic import OutlierDetection as OutlierDetection
from .traffic import Retries as Retries
from .traffic import RetryCondition as RetryCondition


class Site(SpecModel, frozen=True, kw_only=True):
    """A failure domain (a data center, zone or Maestro site)."""

    name: Name
    weight: Weight = 100
    """Share of the tier's traffic when several sites share a failover rank."""
    failover_rank: Annotated[int, within(PRIORITY)] | None = None
    """Lower ranks take traffic first; by default the order in the list."""


class Member(SpecModel, frozen=True, kw_only=True):
    """One service instance of a cluster."""

    name: Name
    address: MemberAddress
    """An IP address, or a host name the control plane resolves (docs/model.md)."""
    port: Port
    site: Name | None = None
    weight: Weight = 100
    priority: Annotated[int, within(PRIORITY)] | None = None
    """Explicit tier inside the member's site: equal priorities share traffic."""


CookieName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$", max_length=256)]
Path = Annotated[str, Meta(pattern=r"^/[\x21-\x7e]*$", max_length=1024)]
"""A URL path: ``/`` and printable ASCII."""
HeaderName = Annotated[str, Meta(pattern=HEADER_PATTERN, max_length=256)]


class Cookie(SpecModel, frozen=True, kw_only=True):
    name: CookieName = "meshxl-session"
    ttl: Duration = 3600.0
    """Envoy sets the cookie when a request has none; 0 makes it a session cookie."""
    path: Path = "/"


class PinCookie(Cookie, frozen=True, kw_only=True):
    name: CookieName = "meshxl-pin"
    ttl: Duration = 3600.0
    """How long the pin holds without a request; 0 keeps it for the browser session.
    Envoy writes the expiry into the cookie's value and ignores an expired pin."""


class Pin(SpecModel, frozen=True, kw_only=True):
    """Pinned sessions (Envoy's stateful session filter, on top of the hash).

    Envoy remembers in a cookie (or a response header the client sends back) the member
    that served the session, and routes the session there while that member is in the
    cluster and healthy (or degraded), whatever members join or leave. The hash places
    new sessions and sessions whose member is gone, drained or failing; the answer then
    carries the new pin. docs/stickiness.md says what a client can do with a pin."""

    cookie: PinCookie | None = None
    header: HeaderName | None = None
    strict: bool = False
    """Envoy's strict mode: a request whose pinned member is not available fails with
    503 instead of moving to the hash's choice (for state that cannot move; meshxl's
    statesync moves it, so the default lets the session move)."""

    def __post_init__(self) -> None:
        if self.cookie is not None and self.header is not None:
            raise ValueError("a pin travels in a cookie or in a header, not both")
        if self.cookie is None and self.header is None:
            force_setattr(self, "cookie", PinCookie())

    @property
    def carrier(self) -> PinCarrier:
        return "header" if self.header is not None else "cookie"


class Stickiness(SpecModel, frozen=True, kw_only=True):
    """Session affinity: consistent hashing on one request property."""

    algorithm: Algorithm = "maglev"
    header: HeaderName | None = None
    cookie: Cookie | None = None
    source_ip: bool = False
    maglev_table_size: Annotated[int, within(MAGLEV_TABLE)] = 4099
    """Prime. Every Envoy rebuilds a cluster's table before it ACKs a change of its
    members, so the size is paid on every failover: 4,099 (a sixteenth of Envoy's
    65,537) keeps Maglev's guidance of 100 entries per member up to 40 members."""
    ring_minimum_size: Annotated[int, within(RING_SIZE)] = 1024
    ring_maximum_size: Annotated[int, within(RING_SIZE)] = int(RING_SIZE.high)
    balance_factor: Annotated[float, within(BALANCE_FACTOR)] | None = None
    """Bounded loads: no member takes more than this times the mean number of requests
    in flight; beyond it, requests of its sessions go to the next member of the ring
    (they lose stickiness, not service). Envoy's ``hash_balance_factor`` / 100."""
    pin: Pin | None = None
    """Keep each session on the member that served it while that member lives
    (the hash places new sessions); see :class:`Pin`."""

    def __post_init__(self) -> None:
        keys = [k for k, on in (("header", self.header is not None),
                                ("cookie", self.cookie is not None),
                                ("source_ip", self.source_ip)) if on]
        if len(keys) != 1:
            raise ValueError("set exactly one hash key: header, cookie or source_ip"
                             + (f"; {', '.join(keys)} are set" if keys else "; none is set"))
        pin = self.pin
        if pin is not None:
            if pin.header is not None and pin.header == self.header:
                raise ValueError(f"pin.header {pin.header!r} is the hash header: the pin "
                                 "needs a header of its own")
            if (pin.cookie is not None and self.cookie is not None
                    and pin.cookie.name == self.cookie.name):
                raise ValueError(f"pin.cookie.name {pin.cookie.name!r} is the hash cookie: "
                                 "the pin needs a cookie of its own")

    @property
    def key(self) -> HashKey:
        return "header" if self.header else "cookie" if self.cookie else "source_ip"


class Listener(SpecModel, frozen=True, kw_only=True):
    """Where Envoy exposes the cluster."""

    address: ListenAddress = "0.0.0.0"
    port: Port


class Route(SpecModel, frozen=True, kw_only=True):
    domains: Annotated[list[Domain], Meta(min_length=1)] = field(default_factory=lambda: ["*"])
    """Host names (optionally ``:port``) with at most one wildcard, leading (``*.a.com``,
    ``*-b.a.com``) or trailing (``a.*``), or ``*`` alone: what Envoy accepts."""
    prefix: Path = "/"
    timeout: Duration = 15.0
    """The whole request's time (0: none). A gRPC cluster's default is 0: a call is
    bounded by its own deadline (``grpc-timeout``), so a stream is never cut at 15 s."""


class SessionQuota(SpecModel, frozen=True, kw_only=True):
    """Limits on one cluster's sessions, enforced by its statesync sidecars: a write
    beyond one is answered 429 (docs/statesync.md, "Quotas"). Each is off (None) unless
    set."""

    sessions: Annotated[int, within(QUOTA_SESSIONS)] | None = None
    """Sessions the cluster may hold: a write that would create one more is refused."""
    bytes: Annotated[int, within(QUOTA_BYTES)] | None = None
    """Bytes of session state the cluster may hold (the states' sizes added up)."""
    writes_per_second: Annotated[float, within(QUOTA_RATE)] | None = None
    """Session writes per second per sidecar (a token bucket holding ``writes_burst``);
    a bulk save or transaction counts each session it writes."""
    writes_burst: Annotated[int, within(QUOTA_BURST)] | None = None
    """Writes a sidecar admits at once beyond the rate (the bucket's size); None: one
    second's worth of ``writes_per_second`` (at least 1)."""
    hold_refused: bool = True
    """A PUT or PATCH refused from its head for ``writes_per_second`` is answered when
    the bucket would hold a token for it after those held before it (at most 1 s
    later), unless another request follows it on its connection; False: at once."""

    def __post_init__(self) -> None:
        if self.writes_burst is not None and self.writes_per_second is None:
            raise ValueError("writes_burst is the size of the writes_per_second bucket: "
                             "set writes_per_second too")


class SessionSync(SpecModel, frozen=True, kw_only=True):
    """How the cluster's statesync sidecars keep and replicate session state (the
    cluster's ``sessions:`` settings)."""

    ttl: PositiveDuration = 1800.0
    """A session expires this long after its last write (shared etcd leases)."""
    sync_delay: SyncDelay = 0.0
    """Sessions younger than this stay on their member only (ClusterXL delayed sync):
    less etcd traffic for short sessions, but they are lost if their member dies. At
    most a day (:data:`~.limits.SYNC_DELAY`): the control plane believes no longer a
    registration's delay when it holds planned moves back."""
    max_bytes: Annotated[int, within(SESSION_BYTES)] = SESSION_BYTES.whole[1]
    """Largest session state; etcd refuses requests above 1.5 MiB."""
    replication: Replication = "all"
    """Which sessions each member keeps a copy of. ``all``: every session of the
    cluster, fed by a watch (etcd sends every write to every member). ``narrow``: the
    sessions the member wrote or read, plus, in high-availability mode, the standby
    keeps everything (it takes the active's sessions over); any other session is read
    from etcd on first use. Read by each sidecar when it starts (docs/scaling.md)."""
    quota: SessionQuota = SessionQuota()
    """Sessions, bytes and writes per second the cluster may use (each unlimited by
    default); read by each sidecar when it starts."""


class Failover(SpecModel, frozen=True, kw_only=True):
    """What the cluster does when its members report trouble, and when one comes back
    (ClusterXL's "Active Attention" and its cluster member recovery setting)."""

    all_withdrawn: AllWithdrawn = "keep-best"
    """When no member can serve because each one reported a problem: ``keep-best``
    keeps the best of them serving (fewest problems, then the operator's order: site
    failover rank, priority, place in the list, name), as ClusterXL keeps one member
    "Active Attention"; ``keep-all`` keeps every one of them serving; ``withdraw``
    serves nothing (every request gets 503). It decides the same for a tier whose
    members are all overloaded: they keep taking new sessions (``keep-*``), or the tier
    is passed over (``withdraw``). A member shown ``active-attention`` serves in spite
    of its report (docs/statesync.md)."""
    failback: Failback = "automatic"
    """A member that comes back after a problem, a lost sync or a restart after a
    failover: ``automatic`` (ClusterXL's Primary Up) gives it back its place once it
    has stayed well for ``failback_delay``; ``manual`` (Active Up, high-availability
    only) keeps it behind the member that took over until that one fails or an
    operator moves the active role (``meshxl member down`` on the active, then
    ``member up``)."""
    failback_delay: Duration = 10.0
    """How long a member that came back must stay well before it takes its place back
    (automatic failback): a member that flaps within this time moves no session back
    until it stops flapping. 0 gives the place back at once."""


class Overrides(SpecModel, frozen=True, kw_only=True):
    """Raw Envoy JSON merged over the generated resources (expert escape hatch)."""

    cluster: dict[str, Any] | None = None
    route: dict[str, Any] | None = None


#: Protocol -> the health check it gets unless the model names one.
_HEALTH_CHECK_OF: dict[Protocol, HealthCheckType] = {
    "http": "http", "http2": "http", "grpc": "grpc", "tcp": "tcp"}

#: Protocol -> what its cluster takes unless the model file writes it (the section, its
#: field, the value): :meth:`ClusterSpec.prepared` fills them in.
_WRITTEN_DEFAULTS: dict[Protocol, tuple[tuple[str, str, Any], ...]] = {
    "http": (), "http2": (),
    "grpc": (("retries", "retry_on", GRPC_RETRY_ON), ("route", "timeout", 0.0)),
    "tcp": (("retries", "attempts", TCP_CONNECT_RETRIES),),
}


class ClusterSpec(SpecModel, frozen=True, kw_only=True):
    name: Name
    protocol: Protocol = "http"
    """What the members speak (``http``: HTTP/1.1, ``http2``, ``grpc``, ``tcp``):
    docs/model.md, "Protocols"."""
    websocket: bool | None = None
    """Allow WebSocket upgrades (on by default for ``http`` clusters, which alone can
    carry them)."""
    drain_window: Duration = 10.0
    """How long long-lived connections (gRPC streams, WebSockets, TCP) may stay after
    their member was drained (member down, site offline); then Envoy closes them and
    their clients reconnect to the new owner (docs/model.md, "Drains")."""
    warmup: WarmUp = 5.0
    """Warm-up (slow start): a member that joins or comes back gets its share over this
    window, from a tenth of its weight up, in at most 10 steps; 0 turns it off. Hashed
    clusters ramp through EDS weights (maglev and ring hash alike, pins stay where they
    are), others use Envoy's slow start (docs/model.md, "Warm-up")."""
    mode: Mode = "high-availability"
    membership: Membership = "static"
    """static: listed members are always advertised (health checks decide);
    registered: only members with a live, ready registration in etcd are."""
    stickiness: Stickiness | None = None
    sites: list[Site] = field(default_factory=list)
    site_affinity: SiteAffinity = "global"
    """``global``: every Envoy gets the same endpoints in the same order, so a session
    hashes to the same member from any site. ``local``: an Envoy whose node locality
    zone names one of the sites gets that site's members first and the other sites'
    behind them, as further tiers (docs/sites.md)."""
    members: list[Member] = field(default_factory=list)
    health_check: HealthCheck = HealthCheck()
    outlier_detection: OutlierDetection = OutlierDetection()
    retries: Retries = Retries()
    listener: Listener | None = None
    route: Route = Route()
    connect_timeout: PositiveDuration = 0.25
    priority_spillover: bool = False
    """False: a lower tier gets traffic only when no member above it is healthy.
    True: Envoy's gradual spill-over (overprovisioning factor 140)."""
    sessions: SessionSync = SessionSync()
    failover: Failover = Failover()
    overrides: Overrides = Overrides()
    degradation: Degradation = Degradation()
    """Sick members: detected relative to their peers, moved from step by step
    (docs/faults.md)."""
    shares: Shares = "static"
    """Load sharing: ``static`` shares follow the weights; ``load`` shares follow the
    members' capacity too (a member whose requests take twice its peers' gets about
    half the share), in bounded steps (docs/faults.md)."""

    @classmethod
    def prepared(cls, data: dict[str, Any]) -> dict[str, Any]:
        """A cluster's data with what its protocol changes of the defaults (a gRPC
        cluster's retry conditions and route timeout, a TCP cluster's connect retries)
        where the model file does not write it (:func:`.decode.decode` calls it: only the
        data says what was written)."""
        protocol = data.get("protocol", "http")
        if protocol not in _WRITTEN_DEFAULTS:
            return data  # refused as a protocol
        out = dict(data)
        for section, name, value in _WRITTEN_DEFAULTS[protocol]:
            written = out.get(section, {})
            if isinstance(written, dict) and name not in written:
                out[section] = {**written, name: list(value) if isinstance(value, tuple)
                                else value}
        return out

    def __post_init__(self) -> None:
        """The health check's type by protocol unless written; ``site_affinity: local``
        needs sites to prefer, and a pin wherever a session can enter at either site:
        without one, site A's Envoy and site B's would hash the same session to two
        members."""
        hc = self.health_check
        if hc.type is None:
            kind = choose(_HEALTH_CHECK_OF, self.protocol, "protocol")
            force_setattr(self, "health_check", replace(hc, type=kind))
        if self.site_affinity != "local":
            return
        if len(self.sites) < 2:
            raise ValueError("site_affinity: local needs at least two sites under `sites`")
        sticky = self.stickiness
        if sticky is not None and sticky.pin is None and self.protocol != "tcp":
            raise ValueError(
                "site_affinity: local needs stickiness.pin: each site's Envoy hashes over "
                "its own members first, so only a pin keeps a session on one member when "
                "it enters at both sites (docs/sites.md)")

    @property
    def websocket_upgrades(self) -> bool:
        """WebSocket upgrades pass (``websocket``, default on for HTTP/1.1 clusters)."""
        return self.websocket if self.websocket is not None else self.protocol == "http"

    @property
    def long_lived(self) -> bool:
        """Its connections outlive requests: streams, WebSockets or TCP."""
        return self.protocol != "http" or self.websocket_upgrades

    @property
    def high_availability(self) -> bool:
        """One active member (True) or load sharing among the first tier (False)."""
        return choose(HIGH_AVAILABILITY, self.mode, "mode")

    @property
    def registered(self) -> bool:
        """Only members with a live registration are advertised (membership registered)."""
        return choose(REGISTERED, self.membership, "membership")

    def site_names(self) -> list[str]:
        return [s.name for s in self.sites] or [DEFAULT_SITE]
