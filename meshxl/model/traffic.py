"""How a cluster treats its members' traffic: Envoy's active health checks, outlier
detection, retries, and the sick-member judgement (docs/faults.md). Re-exported by
:mod:`.spec`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta, field

from .basics import DegradeAction, HealthCheckType
from .fields import (
    Count,
    Duration,
    Port,
    PositiveDuration,
    ProbeTime,
    SpecModel,
    read_as,
    within,
)
from .limits import (
    ERROR_MARGIN,
    HOST_SELECTION,
    HTTP_STATUS,
    LATENCY_FACTOR,
    MIN_SHARE,
    PERCENT,
    PROBE_SHARE,
    RETRY_ATTEMPTS,
    RETRY_BUDGET,
    THRESHOLD,
)

_PATH = Annotated[str, Meta(pattern=r"^/[\x21-\x7e]*$", max_length=1024)]


class HealthCheck(SpecModel, frozen=True, kw_only=True):
    """Envoy active health checking; defaults detect a dead member in < 1 s."""

    enabled: bool = True
    type: HealthCheckType | None = None
    """``http`` (GET ``path``), ``grpc`` (grpc.health.v1.Health/Check) or ``tcp``
    (connect only); by default what the cluster's protocol speaks: grpc for gRPC, tcp
    for TCP, http otherwise."""
    grpc_service: Annotated[str, Meta(pattern=r"^[\x21-\x7e]*$", max_length=1024)] = ""
    """The service name a gRPC health check asks about ("": the server as a whole)."""
    port: Port | None = None
    """Check every member on this port instead of its serving port (a side port, e.g.
    an HTTP health endpoint beside a TCP service)."""
    path: _PATH = "/healthz"
    interval: PositiveDuration = 0.25
    timeout: PositiveDuration = 1.0
    """How long a check waits for its answer. A dead member's checks fail at once
    (refused) whatever this is: it bounds only a member that answers nothing (hung,
    frozen). Long enough that a member merely busy (a loaded node, a GC pause) is not
    taken for dead, its sessions moved to the standby and back."""
    healthy_threshold: Annotated[int, within(THRESHOLD)] = 1
    unhealthy_threshold: Annotated[int, within(THRESHOLD)] = 2
    no_traffic_interval: PositiveDuration = 0.5
    """Envoy's default is 60 s: a member without traffic would be checked once a minute."""
    unhealthy_interval: PositiveDuration = 0.5
    unhealthy_edge_interval: PositiveDuration = 0.1
    healthy_edge_interval: PositiveDuration = 0.1
    expected_statuses: list[Annotated[int, within(HTTP_STATUS)]] = field(
        default_factory=lambda: [200])


class OutlierDetection(SpecModel, frozen=True, kw_only=True):
    """Passive ejection, faster than health checks: one failed connect ejects (a
    cluster's WebSockets go to an Envoy cluster of their own that counts local-origin
    failures without ejecting on them: every WebSocket's end is one; docs/model.md,
    "WebSocket")."""

    enabled: bool = True
    consecutive_local_origin_failure: Count = 1
    consecutive_5xx: Count = 5
    consecutive_gateway_failure: Count = 3
    interval: PositiveDuration = 1.0
    base_ejection_time: PositiveDuration = 5.0
    max_ejection_percent: Annotated[int, within(PERCENT)] = 50
    """Outlier detection finds one bad member; when most fail at once (their shared
    state store is down, say) the cause is not the members, and ejecting them all would
    turn a write outage into a total one. Envoy always allows one ejection; dead members
    beyond the bound are still removed by active health checks."""


def _off(value: Any) -> Any:
    """YAML 1.1 reads an unquoted ``off`` as false: take it as the word it was."""
    return "off" if value is False else value


class Degradation(SpecModel, frozen=True, kw_only=True):
    """A sick member: slower, or failing more, than its peers while its health check
    passes (docs/faults.md). The control plane compares each member's requests, as
    the Envoys see them, with its peers'; a member worse by the margins below for
    ``detect`` is DEGRADED, until it has been within them for ``recover``."""

    action: Annotated[DegradeAction, read_as(_off)] = "move"
    """``move``: a degraded load-sharing member's share of new sessions is halved every
    ``step`` down to ``min_share``; a degraded active hands its role to the standby
    (predictive failover) once a probe shows the standby serves better. ``report``:
    shown and counted, nothing moves. ``off``: not measured (no access log)."""
    latency_factor: Annotated[float, within(LATENCY_FACTOR)] = 3.0
    """Slower: its p90 latency at least this many times its peers' (their median)."""
    latency_margin: Duration = 0.025
    """and at least this much slower, so fast services are not judged on microseconds."""
    error_margin: Annotated[float, within(ERROR_MARGIN)] = 0.05
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
    min_share: Annotated[float, within(MIN_SHARE)] = 0.0
    """The lowest fraction of its weight a degraded load-sharing member keeps (0, the
    default: none, it serves only the sessions pinned to it; every new or hashed
    session goes to its peers, so their p99 is theirs)."""
    step: PositiveDuration = 1.0
    """Time between two weight steps of a degraded member (each moves at most half of
    the sessions it still has)."""
    probe_share: Annotated[float, within(PROBE_SHARE)] = 0.05
    """High availability: the share of the active's sessions sent to the standby to
    compare the two before a predictive failover (their state is replicated there)."""
    probe_time: ProbeTime = 1.0
    """High availability: how long a probe runs before the active and the standby are
    compared (up to three times this while the standby has seen too few requests),
    from when its share moved (with delayed sync, once both have replicated their young
    sessions). A longer probe judges on more requests, and moves the probe's sessions
    for longer."""


GRPC_RETRY_CONDITIONS = (
    "cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable",
)
"""Envoy's retry conditions on a gRPC status (the ``grpc-status`` of the answer)."""
RETRY_CONDITIONS = (
    "5xx", "gateway-error", "reset", "reset-before-request", "connect-failure",
    "envoy-ratelimited", "retriable-4xx", "refused-stream", "retriable-status-codes",
    "retriable-headers", "http3-post-connect-failure", *GRPC_RETRY_CONDITIONS,
)
RETRY_ON = ("connect-failure", "refused-stream", "reset", "gateway-error")
"""The default ``retries.retry_on``: what never reached the member, and a gateway error."""
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


RetryCondition = Literal[RETRY_CONDITIONS]  # type: ignore[valid-type]


class Retries(SpecModel, frozen=True, kw_only=True):
    """Retry a failed request on a different member and, if needed, priority."""

    attempts: Annotated[int, within(RETRY_ATTEMPTS)] = 3
    """A TCP cluster's default is 6 (its connect retries: :data:`TCP_CONNECT_RETRIES`)."""
    retry_on: list[RetryCondition] = field(default_factory=lambda: list(RETRY_ON))
    """A gRPC cluster's default is :data:`GRPC_RETRY_ON`."""
    per_try_timeout: Duration = 2.0
    previous_hosts: bool = True
    host_selection_max_attempts: Annotated[int, within(HOST_SELECTION)] = 100
    """How many times Envoy may re-pick a retry's member when ``previous_hosts`` rejects
    the pick. On a consistent hash the re-picks are fixed by the session's hash (maglev
    flips the hash's low bits, ring hash walks to the next ring entries), so a session
    whose re-picks all fall on a dead member fails every retry until the member is
    removed: with 5 re-picks, 0.4 % of the sessions of a dead member of three equal
    ones, and 24 % of those of a member holding 75 % of the weight
    (``tests/integration/test_envoy_routing.py``). A re-pick is one table lookup.
    Maglev's re-picks are neighbouring slots of its table, so a few sessions of a heavy
    member may have no way out at any count: at 6:1:1 and a 4,099-slot table, about one
    member set in 200 leaves a run of slots to the heavy member alone, holding up to 3
    sessions in 4,000 (``tests/harness/maglev.py``); ejection or the health check
    removes the member for them."""
    previous_priorities: bool | None = None
    """Move a retry to the next priority; default: on in high-availability mode."""
    backoff_base: PositiveDuration = 0.005
    backoff_max: PositiveDuration = 0.05
    budget_percent: Annotated[float, within(RETRY_BUDGET)] = 100.0
    """Outstanding retries as a share of the requests in flight (Envoy's retry budget;
    without one Envoy allows 3 outstanding retries per cluster)."""
    min_retry_concurrency: Count = 1024
    """Outstanding retries allowed whatever the share. A failover needs a retry for
    every request in flight on the member that died, all at once (in high availability
    every request in flight was on it), and the requests a dead connection took with it
    no longer count as in flight: the share alone allows few. 1024 is Envoy's default
    cap on a cluster's requests in flight, so each of those may be retried once (with
    64, 100 gRPC calls in flight at a kill -9 lost 16 to 24 of them)."""
