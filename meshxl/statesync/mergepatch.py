"""JSON merge patch (RFC 7386) on a stored session, its untouched values kept as written.

A session's JSON is stored as the application sent it. Decoding it into Python values
and encoding the result would rewrite every number the patch never named (``1E2``
becomes ``100.0``, ``-0`` becomes ``0``, ``1.10`` becomes ``1.1``), so numbers are
read as their literal text and written back as that text; strings and names are
written as UTF-8 (``ensure_ascii=False``), the compact form bulk saves store. A
stored document that is not JSON (``NaN``, a number out of range) cannot be patched;
a patch's numbers must be finite (:func:`meshxl.httpbase.loads` refuses the others).
"""

from __future__ import annotations

import json
import math
from typing import Any

import json_merge_patch

from meshxl.httpbase import refuse_constant

__all__ = ["Literal", "merge", "parse"]


class Literal(str):
    """A number as its JSON text."""

    __slots__ = ()


def _literal_float(text: str) -> Literal:
    if not math.isfinite(float(text)):
        raise ValueError(f"the number {text[:40]} is out of range")
    return Literal(text)


def parse(document: bytes | str) -> Any:
    """The document's value, its numbers :class:`Literal` (ValueError: not JSON)."""
    return json.loads(document, parse_float=_literal_float, parse_int=Literal,
                      parse_constant=refuse_constant)


def merge(document: bytes | str, patch: Any) -> bytes:
    """``patch`` (a decoded merge patch) applied to ``document`` (stored JSON text):
    compact UTF-8 JSON, the values the patch does not touch as they were written.
    ValueError when the document is not JSON."""
    merged = json_merge_patch.merge(parse(document), patch)
    out: list[str] = []
    _emit(merged, out)
    return "".join(out).encode()


_CONSTANTS = {True: "true", False: "false"}


def _emit(value: Any, out: list[str]) -> None:
    kind = type(value)
    if kind is Literal:
        out.append(str.__str__(value))
    elif kind is str:
        out.append(json.dumps(value, ensure_ascii=False))
    elif kind is dict:
        out.append("{")
        first = True
        for key, item in value.items():
            if not first:
                out.append(",")
            first = False
            out.append(json.dumps(key, ensure_ascii=False))
            out.append(":")
            _emit(item, out)
        out.append("}")
    elif kind is list:
        out.append("[")
        for index, item in enumerate(value):
            if index:
                out.append(",")
            _emit(item, out)
        out.append("]")
    elif value is None:
        out.append("null")
    elif kind is bool:
        out.append(_CONSTANTS[value])
    else:  # a number from the patch (finite: the patch was parsed strictly)
        out.append(json.dumps(value, allow_nan=False))
