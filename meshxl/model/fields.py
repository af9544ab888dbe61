"""The model's field types and base class: durations, counts, addresses, names and
weights as the model declares them (msgspec constraints, their ranges from
:mod:`.limits`), and :class:`SpecModel`, every model class's base (frozen, unknown fields
refused). Re-exported by :mod:`.spec`.

A field type is ``Annotated[T, Meta(...), ...]``: the constraints msgspec checks and
publishes in the JSON Schema, and, in ``Meta.extra``, what :mod:`.decode` does before
them: ``read`` (a value as written, e.g. ``"250ms"``, to its type) and ``check`` (a rule
no constraint says, with its own message).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from msgspec import Meta, Struct

from .basics import NAME_PATTERN, check_duration, check_member_address, is_ip_literal, read_duration
from .limits import (
    DURATION,
    ENVOY_COUNT,
    MEMBER_WEIGHT,
    PORT,
    POSITIVE_DURATION,
    PROBE_TIME,
    SYNC_DELAY,
    WARMUP,
    Bound,
)

__all__ = ["DURATION_SCHEMA", "HEADER_PATTERN", "MAX_WARMUP", "UINT32_MAX", "Count", "Domain",
           "Duration", "ListenAddress", "MemberAddress", "Name", "Port", "PositiveDuration",
           "ProbeTime", "SpecModel", "SyncDelay", "WarmUp", "Weight", "checked", "read_as",
           "within"]

HEADER_PATTERN = r"^[a-z0-9!#$%&'*+.^_`|~-]+$"
_DOMAIN_CHARS = r"[A-Za-z0-9._\-\[\]:]"
_DOMAIN = (rf"^(\*|\*{_DOMAIN_CHARS}+|{_DOMAIN_CHARS}+\*|{_DOMAIN_CHARS}+)$")
UINT32_MAX = int(ENVOY_COUNT.high)
DURATION_SCHEMA = r"^\s*\d+(\.\d+)?\s*(ms|s|m|h)?\s*$"
"""A duration written as text (``250ms``, ``1.5s``, ``2m``, ``1h``, ``30``), as
:func:`~.basics.read_duration` reads it: what the JSON Schema lets a duration be beside
a number."""


def within(bound: Bound) -> Meta:
    """The constraint of a field whose range is ``bound`` (one of :mod:`.limits`)."""
    if bound.integer:
        low, high = bound.whole
        return Meta(gt=low, le=high) if bound.above else Meta(ge=low, le=high)
    return Meta(gt=bound.low, le=bound.high) if bound.above else Meta(ge=bound.low,
                                                                      le=bound.high)


def read_as(read: Callable[[Any], Any]) -> Meta:
    """A field whose value as written is first read by ``read`` (ValueError: refused)."""
    return Meta(extra={"read": read})


def checked(check: Callable[[Any], Any]) -> Meta:
    """A field whose value, once of its type, must pass ``check`` (ValueError: refused
    with its message)."""
    return Meta(extra={"check": check})


def _check_listen_address(address: str) -> str:
    if not is_ip_literal(address):
        raise ValueError("Envoy listens on an IP address (e.g. 0.0.0.0, 127.0.0.1 or ::), "
                         "not a host name")
    return address


_DURATION_TEXT = Meta(extra={"read": read_duration, "check": check_duration},
                      extra_json_schema={"x-duration": True})
Duration = Annotated[float, within(DURATION), _DURATION_TEXT]
PositiveDuration = Annotated[float, within(POSITIVE_DURATION), _DURATION_TEXT]
ProbeTime = Annotated[float, within(PROBE_TIME), _DURATION_TEXT]
SyncDelay = Annotated[float, within(SYNC_DELAY), _DURATION_TEXT]
MAX_WARMUP = WARMUP.high
"""The longest warm-up window (10 minutes)."""


def _check_warmup(value: float) -> float:
    check_duration(value)
    if value > MAX_WARMUP:
        raise ValueError(f"warm-up window at most {MAX_WARMUP:g}s (10 minutes): a longer "
                         "ramp keeps a member that came back below its share for longer "
                         "than a failback should take; 0 turns warm-up off")
    return value


WarmUp = Annotated[float, within(WARMUP),
                   Meta(extra={"read": read_duration, "check": _check_warmup},
                        extra_json_schema={"x-duration": True})]
Count = Annotated[int, within(ENVOY_COUNT)]
MemberAddress = Annotated[str, Meta(min_length=1, max_length=253),
                          checked(check_member_address)]
ListenAddress = Annotated[str, checked(_check_listen_address)]
Name = Annotated[str, Meta(pattern=NAME_PATTERN)]
Weight = Annotated[int, within(MEMBER_WEIGHT)]
Port = Annotated[int, within(PORT)]
Domain = Annotated[str, Meta(pattern=_DOMAIN, max_length=253)]
"""A route's host name (see :attr:`~.spec.Route.domains`)."""


class SpecModel(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The base of every model class: frozen, unknown fields refused. Read from data
    with :func:`.decode.decode` (which also refuses NaN and infinities in any number
    field, whatever range it declares); constructed in Python, a class takes its values
    as given (already valid ones: the virtual systems' clusters, tests)."""
