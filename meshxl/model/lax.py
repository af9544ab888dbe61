"""pydantic's lax reading of a whole number or a string, for the readers that take a
model without pydantic (:mod:`.light`, :mod:`.light_pools`): the same values pass and
fail as the control plane's validation lets them."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from meshxl.errors import InputError

__all__ = ["Unfit", "as_integer", "as_text", "in_range"]

_INT_TEXT = re.compile(r"[+-]?[0-9]+(?:_[0-9]+)*(?:\.0+)?")


class Unfit(InputError):
    """A value its field cannot take (the message says what it needs)."""


def as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode()
        except UnicodeDecodeError:
            raise Unfit("expected a string (UTF-8)") from None
    raise Unfit("expected a string")


def as_integer(value: Any) -> int:
    if isinstance(value, bool | int):
        return int(value)
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise Unfit("expected an integer")
    if isinstance(value, str | bytes):
        try:
            text = as_text(value).strip()
        except Unfit:
            raise Unfit("expected an integer") from None
        if _INT_TEXT.fullmatch(text):
            return int(text.split(".", 1)[0])
    raise Unfit("expected an integer")


def in_range(low: int, high: int) -> Callable[[Any], int]:
    """A reader of an integer from ``low`` to ``high``."""
    def read(value: Any) -> int:
        number = as_integer(value)
        if not low <= number <= high:
            raise Unfit(f"expected an integer from {low} to {high}")
        return number
    return read
