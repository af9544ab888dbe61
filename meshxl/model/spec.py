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

from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    model_validator,
)

# The vocabulary (enumerations, dispatch, names, durations, addresses) lives in
# .basics, which imports no pydantic; it is re-exported here for the model's users.
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

HEADER_PATTERN = r"^[a-z0-9!#$%&'*+.^_`|~-]+$"
_DOMAIN_CHARS = r"[A-Za-z0-9._\-\[\]:]"
_DOMAIN = (rf"^(\*|\*{_DOMAIN_CHARS}+|{_DOMAIN_CHARS}+\*|{_DOMAIN_CHARS}+)$")
UINT32_MAX = 2**32 - 1


def _check_listen_address(address: str) -> str:
    if not is_ip_literal(address):
        raise ValueError("Envoy listens on an IP address (e.g. 0.0.0.0, 127.0.0.1 or ::), "
                         "not a host name")
    return address


Duration = Annotated[float, BeforeValidator(read_duration), Field(ge=0),
                     AfterValidator(check_duration)]
PositiveDuration = Annotated[float, BeforeValidator(read_duration), Field(gt=0),
                             AfterValidator(check_duration)]
MAX_WARMUP = 600.0
"""The longest warm-up window (10 minutes)."""


def _check_warmup(value: float) -> float:
    if value > MAX_WARMUP:
        raise ValueError(f"warm-up window at most {MAX_WARMUP:g}s (10 minutes): a longer "
                         "ramp keeps a member that came back below its share for longer "
                         "than a failback should take; 0 turns warm-up off")
    return value


WarmUp = Annotated[float, BeforeValidator(read_duration), Field(ge=0),
                   AfterValidator(check_duration), AfterValidator(_check_warmup)]
Count = Annotated[int, Field(ge=1, le=UINT32_MAX)]
MemberAddress = Annotated[str, Field(min_length=1, max_length=253),
                          AfterValidator(check_member_address)]
ListenAddress = Annotated[str, AfterValidator(_check_listen_address)]
Name = Annotated[str, Field(pattern=NAME_PATTERN)]
Weight = Annotated[int, Field(ge=1, le=10_000)]
Port = Annotated[int, Field(ge=1, le=65_535)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


SpecModel = _Spec
"""The base of every model class: frozen, unknown fields refused."""
Domain = Annotated[str, Field(pattern=_DOMAIN, max_length=253)]
"""A route's host name (see :attr:`Route.domains`)."""


class Site(_Spec):
    """A failure domain (a data center, zone or Maestro site)."""

    name: Name
    weight: Weight = 100
    """Share of the tier's traffic when several sites share a failover rank."""
    failover_rank: int | None = Field(default=None, ge=0, le=100)
    """Lower ranks take traffic first; by default the order in the list."""


class Member(_Spec):
    """One service instance of a cluster."""

    name: Name
    address: MemberAddress
    """An IP address, or a host name the control plane resolves (docs/model.md)."""
    port: Port
    site: Name | None = None
    weight: Weight = 100
    priority: int | None = Field(default=None, ge=0, le=100)
    """Explicit tier inside the member's site: equal priorities share traffic."""


class Cookie(_Spec):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$",
                               max_length=256)] = "meshxl-session"
    ttl: Duration = 3600.0
    """Envoy sets the cookie when a request has none; 0 makes it a session cookie."""
    path: str = Field(default="/", pattern=r"^/[\x21-\x7e]*$", max_length=1024)


class PinCookie(Cookie):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$",
                               max_length=256)] = "meshxl-pin"
    ttl: Duration = 3600.0
    """How long the pin holds without a request; 0 keeps it for the browser session.
    Envoy writes the expiry into the cookie's value and ignores an expired pin."""


class Pin(_Spec):
    """Pinned sessions (Envoy's stateful session filter, on top of the hash).

    Envoy remembers in a cookie (or a response header the client sends back) the member
    that served the session, and routes the session there while that member is in the
    cluster and healthy (or degraded), whatever members join or leave. The hash places
    new sessions and sessions whose member is gone, drained or failing; the answer then
    carries the new pin. docs/stickiness.md says what a client can do with a pin."""

    cookie: PinCookie | None = None
    header: Annotated[str, Field(pattern=HEADER_PATTERN, max_length=256)] | None = None
    strict: bool = False
    """Envoy's strict mode: a request whose pinned member is not available fails with
    503 instead of moving to the hash's choice (for state that cannot move; meshxl's
    statesync moves it, so the default lets the session move)."""

    @model_validator(mode="after")
    def _one_carrier(self) -> Pin:
        if self.cookie is not None and self.header is not None:
            raise ValueError("a pin travels in a cookie or in a header, not both")
        if self.cookie is None and self.header is None:
            object.__setattr__(self, "cookie", PinCookie())
        return self

    @property
    def carrier(self) -> PinCarrier:
        return "header" if self.header is not None else "cookie"


class Stickiness(_Spec):
    """Session affinity: consistent hashing on one request property."""

    algorithm: Algorithm = "maglev"
    header: Annotated[str, Field(pattern=HEADER_PATTERN, max_length=256)] | None = None
    cookie: Cookie | None = None
    source_ip: bool = False
    maglev_table_size: int = Field(default=4099, ge=2, le=5_000_011)
    """Prime. Every Envoy rebuilds a cluster's table before it ACKs a change of its
    members, so the size is paid on every failover: 4,099 (a sixteenth of Envoy's
    65,537) keeps Maglev's guidance of 100 entries per member up to 40 members."""
    ring_minimum_size: int = Field(default=1024, ge=1, le=8_388_608)
    ring_maximum_size: int = Field(default=8_388_608, ge=1, le=8_388_608)
    balance_factor: float | None = Field(default=None, ge=1.0, le=10.0)
    """Bounded loads: no member takes more than this times the mean number of requests
    in flight; beyond it, requests of its sessions go to the next member of the ring
    (they lose stickiness, not service). Envoy's ``hash_balance_factor`` / 100."""
    pin: Pin | None = None
    """Keep each session on the member that served it while that member lives
    (the hash places new sessions); see :class:`Pin`."""

    @model_validator(mode="after")
    def _one_key(self) -> Stickiness:
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
        return self

    @property
    def key(self) -> HashKey:
        return "header" if self.header else "cookie" if self.cookie else "source_ip"


class HealthCheck(_Spec):
    """Envoy active health checking; defaults detect a dead member in < 1 s."""

    enabled: bool = True
    type: HealthCheckType | None = None
    """``http`` (GET ``path``), ``grpc`` (grpc.health.v1.Health/Check) or ``tcp``
    (connect only); by default what the cluster's protocol speaks: grpc for gRPC, tcp
    for TCP, http otherwise."""
    grpc_service: str = Field(default="", pattern=r"^[\x21-\x7e]*$", max_length=1024)
    """The service name a gRPC health check asks about ("": the server as a whole)."""
    port: Port | None = None
    """Check every member on this port instead of its serving port (a side port, e.g.
    an HTTP health endpoint beside a TCP service)."""
    path: str = Field(default="/healthz", pattern=r"^/[\x21-\x7e]*$", max_length=1024)
    interval: PositiveDuration = 0.25
    timeout: PositiveDuration = 0.2
    healthy_threshold: int = Field(default=1, ge=1, le=100)
    unhealthy_threshold: int = Field(default=2, ge=1, le=100)
    no_traffic_interval: PositiveDuration = 0.5
    """Envoy's default is 60 s: a member without traffic would be checked once a minute."""
    unhealthy_interval: PositiveDuration = 0.5
    unhealthy_edge_interval: PositiveDuration = 0.1
    healthy_edge_interval: PositiveDuration = 0.1
    expected_statuses: list[Annotated[int, Field(ge=100, le=599)]] = [200]


class OutlierDetection(_Spec):
    """Passive ejection, faster than health checks: one failed connect ejects (where
    WebSockets pass, local-origin failures are counted, not ejected on: every
    WebSocket's end is one; docs/model.md, "WebSocket")."""

    enabled: bool = True
    consecutive_local_origin_failure: Count = 1
    consecutive_5xx: Count = 5
    consecutive_gateway_failure: Count = 3
    interval: PositiveDuration = 1.0
    base_ejection_time: PositiveDuration = 5.0
    max_ejection_percent: int = Field(default=50, ge=0, le=100)
    """Outlier detection finds one bad member; when most fail at once (their shared
    state store is down, say) the cause is not the members, and ejecting them all would
    turn a write outage into a total one. Envoy always allows one ejection; dead members
    beyond the bound are still removed by active health checks."""


def _off(value: Any) -> Any:
    """YAML 1.1 reads an unquoted ``off`` as false: take it as the word it was."""
    return "off" if value is False else value


class Degradation(_Spec):
    """A sick member: slower, or failing more, than its peers while its health check
    passes (docs/faults.md). The control plane compares each member's requests, as
    the Envoys see them, with its peers'; a member worse by the margins below for
    ``detect`` is DEGRADED, until it has been within them for ``recover``."""

    action: Annotated[DegradeAction, BeforeValidator(_off)] = "move"
    """``move``: a degraded load-sharing member's share of new sessions is halved every
    ``step`` down to ``min_share``; a degraded active hands its role to the standby
    (predictive failover) once a probe shows the standby serves better. ``report``:
    shown and counted, nothing moves. ``off``: not measured (no access log)."""
    latency_factor: float = Field(default=3.0, ge=1.2, le=100.0)
    """Slower: its p90 latency at least this many times its peers' (their median)."""
    latency_margin: Duration = 0.025
    """and at least this much slower, so fast services are not judged on microseconds."""
    error_margin: float = Field(default=0.05, gt=0.0, le=1.0)
    """Failing more: its share of failed requests above its peers' by at least this."""
    detect: PositiveDuration = 1.5
    """How long a member must be worse before it is degraded (a GC pause, a burst or
    one slow request never lasts this long at every sample)."""
    recover: PositiveDuration = 30.0
    """How long a degraded member must be within the margins before it gets its share
    back (over the cluster's ``warmup`` ramp)."""
    min_requests: Count = 20
    """The fewest requests a member (and its peers) must have served over ``detect``
    to be judged at all."""
    min_share: float = Field(default=0.0, ge=0.0, le=1.0)
    """The lowest fraction of its weight a degraded load-sharing member keeps (0, the
    default: none, it serves only the sessions pinned to it; every new or hashed
    session goes to its peers, so their p99 is theirs)."""
    step: PositiveDuration = 1.0
    """Time between two weight steps of a degraded member (each moves at most half of
    the sessions it still has)."""
    probe_share: float = Field(default=0.05, gt=0.0, le=0.5)
    """High availability: the share of the active's sessions sent to the standby to
    compare the two before a predictive failover (their state is replicated there)."""


GRPC_RETRY_CONDITIONS = (
    "cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable",
)
"""Envoy's retry conditions on a gRPC status (the ``grpc-status`` of the answer)."""
RETRY_CONDITIONS = (
    "5xx", "gateway-error", "reset", "reset-before-request", "connect-failure",
    "envoy-ratelimited", "retriable-4xx", "refused-stream", "retriable-status-codes",
    "retriable-headers", "http3-post-connect-failure", *GRPC_RETRY_CONDITIONS,
)
GRPC_RETRY_ON = ("connect-failure", "refused-stream", "reset", "unavailable")
"""A gRPC cluster's default: what never ran (no connection, a refused or reset stream)
and UNAVAILABLE, the status that says another member may serve the call. Not
DEADLINE_EXCEEDED, INTERNAL or CANCELLED: the call may have run."""
TCP_CONNECT_RETRIES = 6
"""A TCP cluster's default ``retries.attempts`` (its connect retries). Envoy's TCP proxy
places every attempt by the consistent hash again, on the dead member until the
member's ejection has reached Envoy's workers (2-20 ms here, under load). At the
jittered backoff (5 ms doubling to 50 ms) six retries span less than 40 ms once in
3,000 connections; three span less than 20 ms in 3 of 10."""


class Retries(_Spec):
    """Retry a failed request on a different member and, if needed, priority."""

    attempts: int = Field(default=3, ge=0, le=20)
    retry_on: list[Literal[RETRY_CONDITIONS]] = [  # type: ignore[valid-type]
        "connect-failure", "refused-stream", "reset", "gateway-error",
    ]
    per_try_timeout: Duration = 2.0
    previous_hosts: bool = True
    host_selection_max_attempts: int = Field(default=5, ge=1, le=100)
    previous_priorities: bool | None = None
    """Move a retry to the next priority; default: on in high-availability mode."""
    backoff_base: PositiveDuration = 0.005
    backoff_max: PositiveDuration = 0.05
    budget_percent: float = Field(default=100.0, gt=0, le=100)
    """Outstanding retries as a share of the requests in flight (Envoy's retry budget;
    without one Envoy allows 3 outstanding retries per cluster)."""
    min_retry_concurrency: Count = 1024
    """Outstanding retries allowed whatever the share. A failover needs a retry for
    every request in flight on the member that died, all at once (in high availability
    every request in flight was on it), and the requests a dead connection took with it
    no longer count as in flight: the share alone allows few. 1024 is Envoy's default
    cap on a cluster's requests in flight, so each of those may be retried once (with
    64, 100 gRPC calls in flight at a kill -9 lost 16 to 24 of them)."""


class Listener(_Spec):
    """Where Envoy exposes the cluster."""

    address: ListenAddress = "0.0.0.0"
    port: Port


class Route(_Spec):
    domains: list[Annotated[str, Field(pattern=_DOMAIN, max_length=253)]] = Field(
        default_factory=lambda: ["*"], min_length=1)
    """Host names (optionally ``:port``) with at most one wildcard, leading (``*.a.com``,
    ``*-b.a.com``) or trailing (``a.*``), or ``*`` alone: what Envoy accepts."""
    prefix: str = Field(default="/", pattern=r"^/[\x21-\x7e]*$", max_length=1024)
    timeout: Duration = 15.0
    """The whole request's time (0: none). A gRPC cluster's default is 0: a call is
    bounded by its own deadline (``grpc-timeout``), so a stream is never cut at 15 s."""


class SessionQuota(_Spec):
    """Limits on one cluster's sessions, enforced by its statesync sidecars: a write
    beyond one is answered 429 (docs/statesync.md, "Quotas"). Each is off (None) unless
    set."""

    sessions: int | None = Field(default=None, ge=1, le=1_000_000_000)
    """Sessions the cluster may hold: a write that would create one more is refused."""
    bytes: int | None = Field(default=None, ge=1, le=1 << 50)
    """Bytes of session state the cluster may hold (the states' sizes added up)."""
    writes_per_second: float | None = Field(default=None, gt=0, le=1_000_000)
    """Session writes per second per sidecar (a token bucket holding ``writes_burst``);
    a bulk save or transaction counts each session it writes."""
    writes_burst: int | None = Field(default=None, ge=1, le=1_000_000)
    """Writes a sidecar admits at once beyond the rate (the bucket's size); None: one
    second's worth of ``writes_per_second`` (at least 1)."""
    hold_refused: bool = True
    """A PUT or PATCH refused from its head for ``writes_per_second`` is answered when
    the bucket would hold a token for it after those held before it (at most 1 s
    later), unless another request follows it on its connection; False: at once."""

    @model_validator(mode="after")
    def _burst_of_a_rate(self) -> SessionQuota:
        if self.writes_burst is not None and self.writes_per_second is None:
            raise ValueError("writes_burst is the size of the writes_per_second bucket: "
                             "set writes_per_second too")
        return self


class SessionSync(_Spec):
    """How the cluster's statesync sidecars keep and replicate session state (the
    cluster's ``sessions:`` settings)."""

    ttl: PositiveDuration = 1800.0
    """A session expires this long after its last write (shared etcd leases)."""
    sync_delay: Duration = 0.0
    """Sessions younger than this stay on their member only (ClusterXL delayed sync):
    less etcd traffic for short sessions, but they are lost if their member dies."""
    max_bytes: int = Field(default=1_048_576, ge=1, le=1_048_576)
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


class Failover(_Spec):
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


class Overrides(_Spec):
    """Raw Envoy JSON merged over the generated resources (expert escape hatch)."""

    cluster: dict[str, Any] | None = None
    route: dict[str, Any] | None = None


#: Protocol -> the health check it gets unless the model names one.
_HEALTH_CHECK_OF: dict[Protocol, HealthCheckType] = {
    "http": "http", "http2": "http", "grpc": "grpc", "tcp": "tcp"}

_M = TypeVar("_M", bound=BaseModel)


def _replaced(model: _M, **values: Any) -> _M:
    """A copy with ``values``, keeping which fields the model file wrote."""
    copy = model.model_copy(update=values)
    object.__setattr__(copy, "__pydantic_fields_set__", set(model.model_fields_set))
    return copy


class ClusterSpec(_Spec):
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
    sites: list[Site] = []
    site_affinity: SiteAffinity = "global"
    """``global``: every Envoy gets the same endpoints in the same order, so a session
    hashes to the same member from any site. ``local``: an Envoy whose node locality
    zone names one of the sites gets that site's members first and the other sites'
    behind them, as further tiers (docs/sites.md)."""
    members: list[Member] = []
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

    @model_validator(mode="after")
    def _protocol_defaults(self) -> ClusterSpec:
        """Fill what depends on the protocol and was not written: the health check's
        type, a gRPC cluster's retry conditions and its route timeout, a TCP cluster's
        connect retries."""
        hc = self.health_check
        if hc.type is None:
            kind = choose(_HEALTH_CHECK_OF, self.protocol, "protocol")
            object.__setattr__(self, "health_check", _replaced(hc, type=kind))
        if self.protocol == "grpc":
            if "retry_on" not in self.retries.model_fields_set:
                object.__setattr__(self, "retries", _replaced(
                    self.retries, retry_on=list(GRPC_RETRY_ON)))
            if "timeout" not in self.route.model_fields_set:
                object.__setattr__(self, "route", _replaced(self.route, timeout=0.0))
        if self.protocol == "tcp" and "attempts" not in self.retries.model_fields_set:
            object.__setattr__(self, "retries", _replaced(
                self.retries, attempts=TCP_CONNECT_RETRIES))
        return self

    @model_validator(mode="after")
    def _local_sites(self) -> ClusterSpec:
        """``site_affinity: local`` needs sites to prefer, and a pin wherever a session
        can enter at either site: without one, site A's Envoy and site B's would hash
        the same session to two members."""
        if self.site_affinity != "local":
            return self
        if len(self.sites) < 2:
            raise ValueError("site_affinity: local needs at least two sites under `sites`")
        sticky = self.stickiness
        if sticky is not None and sticky.pin is None and self.protocol != "tcp":
            raise ValueError(
                "site_affinity: local needs stickiness.pin: each site's Envoy hashes over "
                "its own members first, so only a pin keeps a session on one member when "
                "it enters at both sites (docs/sites.md)")
        return self

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
