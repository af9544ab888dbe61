"""The model's ``overrides``: raw Envoy JSON merged over a generated resource (the
expert escape hatch), refused when the result is not a valid message or holds a value
no Envoy field accepts.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

from meshxl.errors import InputError

__all__ = ["OverrideError", "merge_override"]

_Resource = TypeVar("_Resource", bound=Message)

_MAX_PROTO_SECONDS = 315_576_000_000  # google.protobuf.Duration's range (10,000 years)


class OverrideError(InputError):
    """An override that does not give a resource Envoy accepts."""


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def merge_override(message: _Resource, override: Mapping[str, Any]) -> _Resource:
    """Overlay raw Envoy JSON (proto3 JSON names) on a generated resource (a message of
    the same type); a result Envoy would refuse raises :class:`OverrideError`."""
    merged = _deep_merge(json_format.MessageToDict(message), override)
    try:
        result: _Resource = json_format.ParseDict(merged, type(message)())
    except json_format.ParseError as exc:
        raise OverrideError(f"not valid {type(message).DESCRIPTOR.full_name}: {exc}") from None
    problem = _out_of_range(result)
    if problem is not None:
        raise OverrideError(problem)
    return result


def _out_of_range(message: Message, where: str = "") -> str | None:
    """The first value of ``message`` no Envoy field accepts: a negative or oversized
    duration, a percentage outside 0..100 (what an override can get wrong that the
    protobuf types let through)."""
    name = message.DESCRIPTOR.full_name
    if name == "google.protobuf.Duration":
        seconds, nanos = message.seconds, message.nanos
        if seconds < 0 or nanos < 0:
            return f"{where or 'duration'}: a duration must not be negative"
        if seconds > _MAX_PROTO_SECONDS:
            return f"{where or 'duration'}: duration out of range"
        return None
    if name == "envoy.type.v3.Percent":
        value = message.value
        if not 0 <= value <= 100:
            return f"{where or 'percent'}: a percentage must be within 0..100, got {value}"
        return None
    for descriptor, value in message.ListFields():
        if descriptor.message_type is None:
            continue
        label = f"{where}.{descriptor.json_name}" if where else descriptor.json_name
        if descriptor.message_type.GetOptions().map_entry:
            items = [v for v in value.values() if isinstance(v, Message)]
        elif descriptor.is_repeated:
            items = list(value)
        else:
            items = [value]
        for item in items:
            found = _out_of_range(item, label)
            if found is not None:
                return found
    return None
