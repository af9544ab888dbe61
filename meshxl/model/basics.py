"""The model's vocabulary without msgspec: its enumerations and the one way to
dispatch on them, names, durations, member addresses, and its problems and error.

:mod:`.spec` (the model's declaration), the runtime records and the command line's
readers build on it; importing it costs neither msgspec nor YAML.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, get_args

from meshxl.errors import InputError

__all__ = [
    "ALGORITHMS", "ALL_WITHDRAWN", "DEFAULT_SITE", "FAILBACKS", "HASH_KEYS",
    "HEALTH_CHECK_TYPES", "HIGH_AVAILABILITY", "MAX_DURATION", "MEMBERSHIPS",
    "MIN_DURATION", "MODES", "NAME_PATTERN", "PIN_CARRIERS", "PROTOCOLS", "REGISTERED",
    "REPLICATIONS", "SITE_AFFINITIES", "Algorithm", "AllWithdrawn", "DegradeAction",
    "Failback", "HashKey", "HealthCheckType", "Membership", "Mode", "ModelError",
    "PinCarrier", "Problem", "Protocol", "Replication", "Shares", "SiteAffinity",
    "UnknownChoice", "check_duration", "check_member_address", "choose", "is_ip_literal",
    "parse_duration", "read_duration",
]

NAME_PATTERN = r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$"
"""What may name a cluster, member or site."""
DEFAULT_SITE = "default"
"""The site of a cluster that declares none (and of its members)."""

# The enumerations of the model. Code that acts on one dispatches through a table keyed
# by every value and looks values up with :func:`choose`, so a value without an entry
# raises instead of falling into some default branch (tests/unit/test_dispatch.py checks
# every table covers every value).
Algorithm = Literal["maglev", "ring_hash"]
ALGORITHMS: tuple[Algorithm, ...] = get_args(Algorithm)
PinCarrier = Literal["cookie", "header"]
PIN_CARRIERS: tuple[PinCarrier, ...] = get_args(PinCarrier)
HashKey = Literal["header", "cookie", "source_ip"]
HASH_KEYS: tuple[HashKey, ...] = get_args(HashKey)
Mode = Literal["high-availability", "load-sharing"]
MODES: tuple[Mode, ...] = get_args(Mode)
Membership = Literal["static", "registered"]
DegradeAction = Literal["move", "report", "off"]
Shares = Literal["static", "load"]
MEMBERSHIPS: tuple[Membership, ...] = get_args(Membership)
Replication = Literal["all", "narrow"]
REPLICATIONS: tuple[Replication, ...] = get_args(Replication)
AllWithdrawn = Literal["keep-best", "keep-all", "withdraw"]
ALL_WITHDRAWN: tuple[AllWithdrawn, ...] = get_args(AllWithdrawn)
Failback = Literal["automatic", "manual"]
FAILBACKS: tuple[Failback, ...] = get_args(Failback)
Protocol = Literal["http", "http2", "grpc", "tcp"]
"""What a cluster's members speak, named as Istio names Service ports."""
PROTOCOLS: tuple[Protocol, ...] = get_args(Protocol)
#: Which members an Envoy prefers (``site_affinity``): the same everywhere, or its own site's.
SiteAffinity = Literal["global", "local"]
SITE_AFFINITIES: tuple[SiteAffinity, ...] = get_args(SiteAffinity)
HealthCheckType = Literal["http", "grpc", "tcp"]
HEALTH_CHECK_TYPES: tuple[HealthCheckType, ...] = get_args(HealthCheckType)

HIGH_AVAILABILITY: dict[Mode, bool] = {"high-availability": True, "load-sharing": False}
"""Mode -> one active member (True) or load sharing among the first tier (False)."""
REGISTERED: dict[Membership, bool] = {"registered": True, "static": False}
"""Membership -> only members with a live registration are advertised."""

_K = TypeVar("_K")
_V = TypeVar("_V")


class UnknownChoice(InputError):
    """A dispatch met a value its table has no entry for."""


def choose(table: Mapping[_K, _V], value: _K, what: str) -> _V:
    """``table[value]``; :class:`UnknownChoice` naming ``what`` when there is none."""
    try:
        return table[value]
    except KeyError:
        known = ", ".join(map(str, table))
        raise UnknownChoice(f"unknown {what} {value!r} (known: {known})") from None


# -- durations ----------------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
MAX_DURATION = 31_536_000.0
"""Longest duration (365 days). Envoy's own bound is 10,000 years, but its timers work
in milliseconds: a year is far beyond any sensible timeout and far inside every limit."""
MIN_DURATION = 0.001
"""Shortest non-zero duration: Envoy's timers count milliseconds, so anything shorter
would become 0 (which Envoy refuses where it needs a positive value, or reads as
"disabled")."""


def read_duration(value: Any) -> Any:
    """A duration as written (``250ms``, ``30s``, ``2m``, ``1h``, a number of seconds)
    in seconds (a float); anything that is not one of those passed on as it is (for the
    type check that follows); ValueError on a bool or a malformed string."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 250ms, 1s or 2m")
    if isinstance(value, int | float):
        try:
            return float(value)
        except OverflowError:  # an integer beyond any float: beyond any duration too
            raise ValueError(f"at most {MAX_DURATION:g}s (365 days)") from None
    if isinstance(value, str):
        match = _DURATION.match(value)
        if not match:
            raise ValueError("expected a duration such as 250ms, 1s or 2m")
        return float(match.group(1)) * _UNITS[match.group(2)]
    return value


def parse_duration(value: Any) -> float:
    """A duration as the model writes it (``250ms``, ``30s``, ``2m``, or a number of
    seconds) in seconds; ValueError on anything else (the API's inputs use it too)."""
    seconds = read_duration(value)
    if not isinstance(seconds, float):
        raise ValueError("expected a duration such as 250ms, 1s or 2m")
    return seconds


def check_duration(value: float) -> float:
    """``value`` (seconds) if it is a duration Envoy can keep: finite, at most
    :data:`MAX_DURATION`, 0 or at least :data:`MIN_DURATION`; ValueError otherwise."""
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError("expected a finite duration")
    if value > MAX_DURATION:
        raise ValueError(f"at most {MAX_DURATION:g}s (365 days)")
    if 0 < value < MIN_DURATION:
        raise ValueError("0 or at least 1ms (Envoy counts milliseconds)")
    return value


# -- member addresses ---------------------------------------------------------------------

_HOST_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


@functools.lru_cache(maxsize=65_536)
def is_ip_literal(address: str) -> bool:
    """An address Envoy takes as is (IPv4 dotted quad or IPv6, no zone index)."""
    if "%" in address:
        return False
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def check_member_address(address: str) -> str:
    """An IP address, or a DNS host name the control plane resolves (RFC 1123); raises
    ValueError. The one rule for the model's members and for registrations."""
    if is_ip_literal(address):
        return address
    name = address[:-1] if address.endswith(".") else address
    labels = name.split(".")
    if (not name or len(name) > 253 or not all(_HOST_LABEL.match(label) for label in labels)
            or labels[-1].isdigit()):
        raise ValueError("expected an IP address or a DNS host name (letters, digits and "
                         "'-' in dot-separated labels)")
    return address


# -- problems -----------------------------------------------------------------------------


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a model: where (field path), what, and the bad value."""

    path: str
    message: str
    value: Any = None

    def __str__(self) -> str:
        shown = "" if self.value is None else f" (got {_short(self.value)})"
        return f"{self.path or '<model>'}: {self.message}{shown}"


class ModelError(InputError):
    """A model that cannot be served. ``problems`` lists every reason."""

    problems: list[Problem]

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("; ".join(str(p) for p in problems))
