"""A model's text as plain data: YAML (or JSON), bounded in size, nesting and expansion,
every failure a :class:`~.basics.ModelError`. Plain data: :mod:`.load` reads it into the
model's declaration (:mod:`.decode`).

**The stored JSON form.** ``meshxl apply`` stores the model as the operator wrote it and,
in the same etcd transaction, its data as JSON (:func:`json_form`, key ``mesh/model.json``):
a reader that finds both written together (one ``mod_revision``) reads the JSON
(:class:`ModelForm`) and needs no YAML parser, which a statesync sidecar in every pod would
otherwise load for this alone (about 0.9 MiB of its memory). PyYAML is imported only to read
YAML text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from meshxl.bounded import check_depth, measure
from meshxl.errors import InputError

from .basics import ModelError, Problem

__all__ = ["EMPTY_MODEL", "MAX_DEPTH", "MAX_MODEL_BYTES", "MAX_VALUES", "ModelForm",
           "json_form", "model_data", "read_form"]

MAX_MODEL_BYTES = 4 * 1024 * 1024
"""Largest model text (a model stored in etcd must stay under etcd's 1.5 MiB anyway)."""
MAX_DEPTH = 64
"""Deepest nesting of mappings and lists (the model itself needs about six levels)."""
MAX_VALUES = 1_000_000
"""Most values a model may expand to, YAML aliases counted at every use (a "billion
laughs" document is a few lines of text that expand to more than memory holds)."""
_MODEL = "the model"
EMPTY_MODEL = ("the model is empty (an empty file or input, or a file caught mid-write): "
               "serving it would withdraw every listener from every Envoy")


@dataclass(frozen=True)
class ModelForm:
    """A model's data as stored beside its text (:func:`read_form`): what
    :func:`model_data` returns for it, checked as for text."""

    data: dict[Any, Any]


def json_form(data: Any) -> bytes | None:
    """The JSON form of a model's data, to store beside its text; None when JSON cannot
    hold it exactly (YAML's dates, binary, sets, keys that are not strings: readers
    then read the text)."""
    try:
        text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError):
        return None
    if json.loads(text) != data:
        return None
    return text.encode()


def read_form(value: bytes) -> ModelForm | None:
    """A stored JSON form (:func:`json_form`), or None when it is not one."""
    if len(value) > 2 * MAX_MODEL_BYTES:
        return None
    try:
        data = json.loads(value)
    except (ValueError, RecursionError):
        return None
    return ModelForm(data) if isinstance(data, dict) else None


def _load_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load``, with libyaml when PyYAML has it: several times faster, which
    every model change pays on every control-plane replica (docs/performance.md); its
    syntax errors as a ModelError naming the line and column. PyYAML is imported here
    only: a reader of the stored JSON form never loads it.

    libyaml's composer recurses in C and crashes the process on deep nesting, so its
    (iterative) parser first checks the nesting depth from the event stream.
    """
    import yaml

    try:
        loader = getattr(yaml, "CSafeLoader", None)
        if loader is None:
            return yaml.safe_load(text)
        check_depth(text, max_depth=MAX_DEPTH, name=_MODEL, loader=loader)
        return yaml.load(text, Loader=loader)  # noqa: S506 - CSafeLoader is the safe loader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        reason = getattr(exc, "problem", None) or str(exc)
        raise ModelError([Problem(where, f"YAML syntax error: {reason}")]) from None


def model_data(text: str | ModelForm, source: str = "<model>") -> dict[Any, Any]:
    """The mapping a model's YAML (or JSON) text holds, or ModelError: too large,
    not YAML, nested too deep, expanding to too many values, empty, or not a mapping.
    A :class:`ModelForm` is checked the same way, without parsing."""
    if isinstance(text, ModelForm):
        return _checked(text.data, source)
    if len(text) > MAX_MODEL_BYTES:
        raise ModelError([Problem(source, f"the model is larger than {MAX_MODEL_BYTES} "
                                          "characters")])
    try:
        data = _load_yaml(text, source)
    except ModelError:
        raise
    except InputError as exc:
        raise ModelError([Problem(source, str(exc))]) from None
    except RecursionError:
        raise ModelError([Problem(source, "YAML nested too deep")]) from None
    except Exception as exc:
        # PyYAML's constructors let other errors through for values they cannot build
        # (an impossible date, an empty !!timestamp): still bad input, nothing else.
        raise ModelError([Problem(source, f"YAML value error: {type(exc).__name__}: "
                                          f"{str(exc)[:200]}")]) from None
    return _checked(data, source)


def _checked(data: Any, source: str) -> dict[Any, Any]:
    try:
        measure(data, max_depth=MAX_DEPTH, max_values=MAX_VALUES, name=_MODEL)
    except InputError as exc:
        raise ModelError([Problem(source, str(exc))]) from None
    if data is None or (isinstance(data, str) and not data.strip()):
        raise ModelError([Problem(source, EMPTY_MODEL)])
    if not isinstance(data, dict):
        raise ModelError([Problem("", "the model must be a mapping with a 'clusters' list",
                                  type(data).__name__)])
    return data
