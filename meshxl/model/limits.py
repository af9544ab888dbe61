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
weight and port, a session's size, the sync delay) they read the same bound. Like the
rest of the model's vocabulary it imports neither click nor pydantic.
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
    "seconds", "size",
]

Kind = Literal["duration", "size", "count"]
_UNITS: dict[Kind, str] = {"duration": " seconds", "size": " bytes", "count": ""}


@dataclass(frozen=True, slots=True)
class Bound:
    """One kind of number (``kind``) from ``low`` to ``high``, both included and finite."""

    kind: Kind
    low: float
    high: float
    unit: str = ""
    """What the number counts, where not its kind's own (seconds, bytes)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high)
                and self.low <= self.high):
            raise ValueError(f"a bound is finite and low <= high, got {self}")

    @property
    def integer(self) -> bool:
        """A size or a count is a whole number; a duration any finite number."""
        return self.kind != "duration"

    @property
    def whole(self) -> tuple[int, int]:
        """(low, high) of a size or a count, as whole numbers."""
        if not self.integer:
            raise TypeError(f"a {self.kind} is not a whole number")
        return int(self.low), int(self.high)

    def describe(self) -> str:
        """What it takes, in words (``a duration from 1 to 86400 seconds``)."""
        article = {"duration": "a duration", "size": "a size", "count": "a whole number"}
        unit = f" {self.unit}" if self.unit else _UNITS[self.kind]
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
            return math.isfinite(value) and self.low <= value <= self.high
        except OverflowError:  # an int beyond any float
            return False

    def _refusal(self, shown: str, name: str | None) -> ValueError:
        shown = shown if len(shown) <= 42 else shown[:39] + "..."
        prefix = f"{name}: " if name else ""
        return ValueError(f"{prefix}expected {self.describe()}, got {shown}")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def seconds(low: float, high: float = MAX_DURATION) -> Bound:
    """A duration in seconds (at most a year unless said otherwise)."""
    return Bound("duration", low, high)


def size(low: int, high: int) -> Bound:
    """A size in bytes."""
    return Bound("size", low, high)


def count(low: int, high: int) -> Bound:
    """A number of things."""
    return Bound("count", low, high)


# -- the sidecar (``meshxl serve statesync``) ---------------------------------------------

SESSION_TTL = seconds(1)
"""``--session-ttl``: sessions expire this long after their last write."""
SYNC_DELAY = seconds(0, 86_400)
"""``--sync-delay`` and the model's ``sessions.sync_delay``: at most a day, the longest a
registration's ``sync_delay`` is believed for (:data:`meshxl.model.records.MAX_SYNC_DELAY`):
beyond it the control plane would move sessions the member still keeps alone."""
SESSION_BYTES = size(1, 1_048_576)
"""``--max-session-bytes``: etcd refuses requests over 1.5 MiB."""
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
"""``--weight``, as the model's member weights."""
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
"""A TCP port (a member's registered port)."""
ADMIN_PORT = PORT
DAPR_PORT = count(0, 65_535)
"""Dapr's HTTP and gRPC ports on the sidecar (0: any free port, for tests)."""
"""``meshxl bootstrap --admin-port``: a TCP port."""
