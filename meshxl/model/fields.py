"""The model's field types and base class: durations, counts, addresses, names and
weights as pydantic reads them, and :class:`SpecModel`, every model class's base
(frozen, unknown fields refused). Re-exported by :mod:`.spec`."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from .basics import NAME_PATTERN, check_duration, check_member_address, is_ip_literal, read_duration
from .limits import MEMBER_WEIGHT, PORT

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
Weight = Annotated[int, Field(ge=MEMBER_WEIGHT.whole[0], le=MEMBER_WEIGHT.whole[1])]
Port = Annotated[int, Field(ge=PORT.whole[0], le=PORT.whole[1])]


class SpecModel(BaseModel):
    """The base of every model class: frozen, unknown fields refused, and no number NaN
    or infinite, whatever range a field declares (a range alone lets NaN through)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
Domain = Annotated[str, Field(pattern=_DOMAIN, max_length=253)]
"""A route's host name (see :attr:`Route.domains`)."""
