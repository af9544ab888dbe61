"""The range of every number an operator gives meshxl, defined once.

A number from the command line, the environment or a server's configuration object is
one of three kinds: a duration in seconds, a size in bytes or a count. Whatever its
range, it is finite: NaN and the infinities are refused (``nan < 1`` is false, so a
bare range check lets NaN through, and ``inf`` passes every lower bound). Each input's
range is a :class:`Bound` here; the click options (:func:`meshxl.cli.options.bounded`),
the sidecar's own reader of its command line (:mod:`meshxl.cli.entry`) and the
configuration objects (:class:`~meshxl.statesync.config.StatesyncConfig`,
:class:`~meshxl.xds.config.ControlPlaneConfig`, the sidecar's membership and problem
reports) all check through :meth:`Bound.parse` and :meth:`Bound.check`, so they cannot
disagree. Where the model and the registrations in etcd take the same number (a member's
weight and port, a session's size, the sync delay) they read the same bound, and every
number field of the model takes its range from a bound here (``meshxl.model.fields.within``
turns one into the declaration's constraint, which its JSON Schema publishes), so
``tests/unit/test_input_ranges.py`` can hold each to it. Like the rest of the model's
vocabulary it imports neither click nor msgspec.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from .basics import MAX_DURATION

__all__ = [
    "ACK_TIMEOUT", "ADMIN_PORT", "BATCH_MAX_BYTES", "BATCH_MAX_OPS", "CONVERGE_TIMEOUT",
    "CREDENTIALS_REFRESH", "DAPR_PORT", "DEBOUNCE", "DEMO_DURATION", "DEMO_SESSIONS",
    "DNS_INTERVAL",
    "DRILL_DURATION", "LEASE_TTL", "MAX_CONNECTIONS", "MAX_DELAY", "MAX_INFLIGHT",
    "MAX_NODES", "MAX_WRITES", "MEMBER_WEIGHT", "PORT", "PROBE_TIMEOUT", "PROBLEM_TTL",
    "PUBLISH_INTERVAL", "RESYNC", "SESSION_BYTES", "SESSION_TTL", "SETTLE",
    "STATUS_INTERVAL", "STATUS_TTL", "SYNC_DELAY", "WAIT", "Bound", "Kind", "count",
    "number", "seconds", "size",
    # the model's
    "BACKUPS", "BALANCE_FACTOR", "DURATION", "ENVOY_COUNT", "ERROR_MARGIN", "HOST_SELECTION",
    "HTTP_STATUS", "LATENCY_FACTOR", "MAGLEV_TABLE", "MIN_SHARE", "PERCENT",
    "POSITIVE_DURATION", "PRIORITY", "PROBE_SHARE", "PROBE_TIME", "QUOTA_BURST", "QUOTA_BYTES",
    "QUOTA_RATE", "QUOTA_SESSIONS", "RETRY_ATTEMPTS", "RETRY_BUDGET", "RING_SIZE",
    "SHARE_PERCENT", "THRESHOLD", "WARMUP",
]

Kind = Literal["duration", "size", "count", "number"]
_UNITS: dict[Kind, str] = {"duration": " seconds", "size": " bytes", "count": "", "number": ""}


@dataclass(frozen=True, slots=True)
class Bound:
    """One kind of number (``kind``) from ``low`` to ``high``, both included and finite."""

    kind: Kind
    low: float
    high: float
    unit: str = ""
    """What the number counts, where not its kind's own (seconds, bytes)."""
    above: bool = False
    """``low`` itself is excluded: the number is greater than it (a rate, a share)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high)
                and self.low <= self.high):
            raise ValueError(f"a bound is finite and low <= high, got {self}")

    @property
    def integer(self) -> bool:
        """A size or a count is a whole number; a duration or a number any finite one."""
        return self.kind in ("size", "count")

    @property
    def whole(self) -> tuple[int, int]:
        """(low, high) of a size or a count, as whole numbers."""
        if not self.integer:
            raise TypeError(f"a {self.kind} is not a whole number")
        return int(self.low), int(self.high)

    def describe(self) -> str:
        """What it takes, in words (``a duration from 1 to 86400 seconds``)."""
        article = {"duration": "a duration", "size": "a size", "count": "a whole number",
                   "number": "a number"}
        unit = f" {self.unit}" if self.unit else _UNITS[self.kind]
        if self.above:
            return (f"{article[self.kind]} greater than {_number(self.low)}, at most "
                    f"{_number(self.high)}{unit}")
        return f"{article[self.kind]} from {_number(self.low)} to {_number(self.high)}{unit}"

    def check(self, value: object, name: str | None = None) -> float:
        """``value`` if it is a number of this kind within range, else a ValueError
        naming ``name`` (an option or a field) and saying what it takes."""
        if not self.fits(value):
            text = str(value) if isinstance(value, int) else repr(value)
            raise self._refusal(text, name)
        return value if self.integer else float(value)  # type: ignore[arg-type,return-value]

    def parse(self, text: str | float, name: str | None = None) -> float:
        """``text`` read as click reads a number (``int()`` for a size or a count,
        ``float()`` for a duration), then checked; a number is checked as it is. The
        ValueError shows the text as given."""
        if not isinstance(text, str):
            if not self.integer and isinstance(text, int) and not isinstance(text, bool) \
                    and abs(text) < 2**53:
                text = float(text)
            return self.check(text, name)
        try:
            value: float = int(text) if self.integer else float(text)
        except ValueError:
            raise self._refusal(repr(text), name) from None
        if not self.fits(value):
            raise self._refusal(repr(text), name)
        return value

    def fits(self, value: object) -> bool:
        """``value`` is a number of this kind within range (never NaN or infinite)."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.integer and not isinstance(value, int):
            return False
        try:
            low = self.low < value if self.above else self.low <= value
            return math.isfinite(value) and low and value <= self.high
        except OverflowError:  # an int beyond any float
            return False

    def _refusal(self, shown: str, name: str | None) -> ValueError:
        shown = shown if len(shown) <= 42 else shown[:39] + "..."
        prefix = f"{name}: " if name else ""
        return ValueError(f"{prefix}expected {self.describe()}, got {shown}")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def seconds(low: float, high: float = MAX_DURATION, *, above: bool = False) -> Bound:
    """A duration in seconds (at most a year unless said otherwise)."""
    return Bound("duration", low, high, above=above)


def size(low: int, high: int) -> Bound:
    """A size in bytes."""
    return Bound("size", low, high)


def count(low: int, high: int) -> Bound:
    """A number of things."""
    return Bound("count", low, high)


def number(low: float, high: float, *, above: bool = False) -> Bound:
    """A number that is neither a duration nor whole (a factor, a share, a rate)."""
    return Bound("number", low, high, above=above)


# -- the sidecar (``meshxl serve statesync``) ---------------------------------------------

SESSION_TTL = seconds(1)
"""``--session-ttl``: sessions expire this long after their last write."""
SYNC_DELAY = seconds(0, 86_400)
"""``--sync-delay`` and the model's ``sessions.sync_delay``: at most a day, the longest a
registration's ``sync_delay`` is believed for (:data:`meshxl.model.records.MAX_SYNC_DELAY`):
beyond it the control plane would move sessions the member still keeps alone."""
SESSION_BYTES = size(1, 1_048_576)
"""``--max-session-bytes`` and the model's ``sessions.max_bytes`` (its default is the
largest): etcd refuses requests over 1.5 MiB."""
LEASE_TTL = seconds(1, 3_600)
"""``--lease-ttl``: at least 1 s (etcd's shortest useful lease), at most an hour (a dead
sidecar stays in Envoy this long)."""
BATCH_MAX_OPS = count(1, 128)
"""``--batch-max-ops``: etcd takes 128 operations per transaction level."""
BATCH_MAX_BYTES = size(1, 1_500_000)
"""A batch's bytes: etcd's request limit is 1.5 MiB."""
MAX_INFLIGHT = count(1, 256)
"""``--max-inflight``: etcd transactions in flight at once."""
MAX_CONNECTIONS = count(16, 1_000_000)
"""``--max-connections`` (``MESHXL_STATESYNC_MAX_CONNECTIONS``)."""
MEMBER_WEIGHT = count(1, 10_000)
"""``--weight``, the model's member, site and virtual system weights, a registration's
weight and the ``meshxl.io/weight`` annotation."""
PUBLISH_INTERVAL = seconds(0.1, 3_600)
"""Seconds between publications of a sidecar's statistics."""
PROBLEM_TTL = seconds(1, 86_400)
"""A problem report's ``ttl`` (the session API): faster heartbeats than a second are a
busy loop; beyond a day, report it without one."""

# -- the control plane (``meshxl serve xds``) ---------------------------------------------

DEBOUNCE = seconds(0, 5)
"""``--debounce``: the quiet period that ends a burst of changes."""
MAX_DELAY = seconds(0, 30)
"""``--max-delay``: the longest delay from a change to its push."""
DNS_INTERVAL = seconds(0.1, 3_600)
"""``--dns-interval``: seconds between resolutions of member host names."""
MAX_NODES = count(1, 1_000_000)
"""``--max-nodes`` and ``--max-nodes-per-credential``."""
STATUS_TTL = count(1, 3_600)
"""The lease (whole seconds) of a replica's node-status keys."""

# -- operator commands --------------------------------------------------------------------

WAIT = seconds(0, 3_600)
"""``--wait``: how long a change waits for every Envoy's acknowledgement."""
SETTLE = seconds(0, 3_600)
"""``meshxl verify --settle``."""
STATUS_INTERVAL = seconds(0.1, 3_600)
"""``meshxl status --watch --interval``."""
ACK_TIMEOUT = seconds(1, 3_600)
"""``meshxl shards set --ack-timeout``."""
PROBE_TIMEOUT = seconds(0.1, 600)
"""``meshxl shards set --probe-timeout``."""
MAX_WRITES = count(1, 1_000_000_000)
"""``meshxl restore bump --max-writes``."""
DRILL_DURATION = seconds(0, 86_400)
"""``meshxl drill --duration``."""
CONVERGE_TIMEOUT = seconds(1, 3_600)
"""``meshxl drill --converge-timeout``."""
RESYNC = seconds(0.5, 3_600)
"""``meshxl istio label --resync``."""
CREDENTIALS_REFRESH = Bound("duration", 0, 8_760, unit="hours")
"""``meshxl istio label --credentials-refresh``, in hours (0: never; at most a year)."""
DEMO_SESSIONS = count(1, 2_000)
"""``meshxl demo --sessions``."""
DEMO_DURATION = seconds(3, 600)
"""``meshxl demo --duration``."""
PORT = count(1, 65_535)
"""A TCP port (a member's port in the model and in its registration, a listener's)."""
ADMIN_PORT = PORT
DAPR_PORT = count(0, 65_535)
"""Dapr's HTTP and gRPC ports on the sidecar (0: any free port, for tests)."""
"""``meshxl bootstrap --admin-port``: a TCP port."""

# -- the model's other numbers (each field of meshxl.model.spec, .traffic, .document) ------

DURATION = seconds(0)
"""A duration of the model (0 or at least 1 ms: :func:`~.basics.check_duration`)."""
POSITIVE_DURATION = seconds(0, above=True)
"""A duration of the model that must not be 0 (an interval, a timeout)."""
WARMUP = seconds(0, 600)
"""A cluster's ``warmup``: at most 10 minutes."""
PRIORITY = count(0, 100)
"""A member's ``priority`` and a site's ``failover_rank``."""
ENVOY_COUNT = count(1, 2**32 - 1)
"""A count Envoy keeps in a uint32 (outlier detection's, a retry concurrency)."""
PERCENT = count(0, 100)
"""A whole percentage (``max_ejection_percent``)."""
SHARE_PERCENT = number(0, 100)
"""A percentage that need not be whole (``telemetry.sampling_percent``)."""
RETRY_BUDGET = number(0, 100, above=True)
"""``retries.budget_percent``: a share of the requests in flight, never none."""
THRESHOLD = count(1, 100)
"""A health check's ``healthy_threshold`` and ``unhealthy_threshold``."""
HTTP_STATUS = count(100, 599)
"""An HTTP status (``health_check.expected_statuses``)."""
RETRY_ATTEMPTS = count(0, 20)
"""``retries.attempts``."""
HOST_SELECTION = count(1, 1_000)
"""``retries.host_selection_max_attempts``."""
MAGLEV_TABLE = count(2, 5_000_011)
"""``stickiness.maglev_table_size`` (a prime, checked apart)."""
RING_SIZE = count(1, 8_388_608)
"""``stickiness.ring_minimum_size`` and ``ring_maximum_size`` (Envoy's largest ring)."""
BALANCE_FACTOR = number(1, 10)
"""``stickiness.balance_factor`` (Envoy's ``hash_balance_factor`` / 100)."""
LATENCY_FACTOR = number(1.2, 100)
"""``degradation.latency_factor``."""
ERROR_MARGIN = number(0, 1, above=True)
"""``degradation.error_margin``: a share of requests."""
MIN_SHARE = number(0, 1)
"""``degradation.min_share``: a share of a member's weight."""
PROBE_SHARE = number(0, 0.5, above=True)
"""``degradation.probe_share``: a share of the active's sessions."""
PROBE_TIME = seconds(1, 600)
"""``degradation.probe_time``: two of the judge's half-second windows at least (the first
is passed over, the probe's moves), at most 10 minutes."""
BACKUPS = count(0, 20)
"""A virtual system's ``backups``."""
QUOTA_SESSIONS = count(1, 1_000_000_000)
"""``sessions.quota.sessions``."""
QUOTA_BYTES = size(1, 1 << 50)
"""``sessions.quota.bytes``."""
QUOTA_RATE = number(0, 1_000_000, above=True)
"""``sessions.quota.writes_per_second`` (per sidecar)."""
QUOTA_BURST = count(1, 1_000_000)
"""``sessions.quota.writes_burst``."""
