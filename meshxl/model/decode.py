"""Reading data into the model's one declaration (msgspec Structs), every problem named
by field path and value.

msgspec checks types, ranges, patterns, lengths, unknown and missing fields, and runs
each class's ``__post_init__`` (its cross-field rules). Before it, one walk over the data
along the declared types does what the declaration says in ``Meta.extra``
(:mod:`.fields`: ``read`` a duration written as text, ``check`` a member's address) and
the model's lax reading of plain values, the same for every field of a type:

* an integer from a whole float (``7.0``), or text of one (``"8080"``, ``" 7 "``,
  ``"1_000"``, ``"+3"``, ``"1.0"``); a bool is 0 or 1;
* a number from text (``"1.5"``, ``"1e3"``) or a bool; never NaN or infinite;
* a bool from ``true/false``, ``yes/no``, ``on/off``, ``y/n``, ``t/f``, ``1/0`` (any
  case), or the numbers 0 and 1 (YAML 1.1 already reads unquoted ``yes``/``off`` as
  bools);
* text from UTF-8 bytes (YAML's ``!!binary``); a pattern matches the whole text (Python's
  ``$`` would also match before a final newline).

``msgspec.convert`` then runs in its strict mode (its own lax mode takes other forms:
``"1e3"`` for an integer, ``"nan"`` for a number, no ``yes``), so which forms a value
may be written in is said here alone. These are the forms the model took when it was
declared with pydantic (its lax mode), kept so that no model that loaded before stops
loading; ``tests/unit/test_model_lax.py`` holds each. A class may also prepare its data
before the walk goes into it (``prepared``, a classmethod:
:meth:`~.spec.ClusterSpec.prepared` fills the defaults that depend on a cluster's
protocol).

A valid model costs one walk and one ``msgspec.convert``; an invalid one is then read
field by field, so that every problem is named, not only the first.
"""

from __future__ import annotations

import re
import types
from collections.abc import Callable, Iterable
from functools import cache
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import msgspec
from msgspec import NODEFAULT, Meta, Struct

from .basics import ModelError, Problem

__all__ = ["as_bool", "as_integer", "as_number", "as_text", "decode", "problems_of"]

_T = TypeVar("_T")
_INT_TEXT = re.compile(r"[+-]?[0-9]+(?:_[0-9]+)*(?:\.0+)?")
_NUMBER_TEXT = re.compile(r"[+-]?(?:[0-9]+(?:_[0-9]+)*(?:\.[0-9]*)?|\.[0-9]+)"
                          r"(?:[eE][+-]?[0-9]+)?|[+-]?(?:inf|infinity|nan)", re.IGNORECASE)
_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})


def decode(data: Any, cls: type[_T]) -> _T:
    """``data`` (YAML's or JSON's plain values) as ``cls``, or ModelError naming every
    problem (field path, what is wrong, the value)."""
    problems: list[Problem] = []
    ready = _read(data, cls, "", problems)
    if not problems:
        try:
            return msgspec.convert(ready, cls)
        except msgspec.ValidationError:
            pass
    _collect(ready, cls, "", problems, {p.path for p in problems})
    raise ModelError(problems or [Problem("", "not a valid model")])


def problems_of(data: Any, cls: type[Any]) -> list[Problem]:
    """What :func:`decode` would refuse in ``data`` (empty: nothing)."""
    try:
        decode(data, cls)
    except ModelError as exc:
        return exc.problems
    return []


# -- the lax reading of plain values --------------------------------------------------------

def as_text(value: Any) -> Any:
    """Text, or UTF-8 bytes as text; anything else as it is."""
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode()
        except UnicodeDecodeError:
            return value
    return value


def as_integer(value: Any) -> Any:
    """An int from a bool, a whole float or the text of a whole number; anything else
    as it is (the type check that follows names it)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    value = as_text(value)
    if isinstance(value, str):
        text = value.strip()
        if _INT_TEXT.fullmatch(text):
            return int(text.split(".", 1)[0])
    return value


def as_number(value: Any) -> Any:
    """A float from an int, a bool or the text of a number; anything else as it is."""
    if isinstance(value, bool):
        return float(value)
    value = as_text(value)
    if isinstance(value, str) and _NUMBER_TEXT.fullmatch(value.strip()):
        return float(value.strip())
    return value


def as_bool(value: Any) -> Any:
    """A bool from the words and numbers a bool is written with; anything else as is."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value in (0, 1):
        return bool(value)
    value = as_text(value)
    if isinstance(value, str):
        word = value.lower()
        if word in _TRUE or word in _FALSE:
            return word in _TRUE
    return value


_PLAIN: dict[type, Callable[[Any], Any]] = {int: as_integer, float: as_number, bool: as_bool,
                                            str: as_text}


# -- the declared types ---------------------------------------------------------------------

@cache
def _unwrapped(tp: Any) -> tuple[Any, tuple[Callable[[Any], Any], ...],
                                 tuple[Callable[[Any], Any], ...]]:
    """(the type under ``Annotated``, its ``read`` hooks, its ``check`` hooks)."""
    reads: list[Callable[[Any], Any]] = []
    checks: list[Callable[[Any], Any]] = []
    while get_origin(tp) is Annotated:
        tp, *metas = get_args(tp)
        for meta in metas:
            extra = meta.extra if isinstance(meta, Meta) and meta.extra else {}
            if "read" in extra:
                reads.append(extra["read"])
            if "check" in extra:
                checks.append(extra["check"])
            if isinstance(meta, Meta) and meta.pattern is not None:
                checks.append(_whole_match(meta.pattern))
    return tp, tuple(reads), tuple(checks)


def _whole_match(pattern: str) -> Callable[[Any], Any]:
    """A pattern matched by the whole text: msgspec searches with Python's ``re``, whose
    ``$`` also matches before a final newline (``"b\n"`` would be a name)."""
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if not compiled.fullmatch(value):
            raise ValueError(f"expected a string matching regex {pattern!r}")
        return value
    return check


@cache
def _fields(cls: type[Struct]) -> dict[str, msgspec.structs.FieldInfo]:
    return {f.encode_name: f for f in msgspec.structs.fields(cls)}


def _options(tp: Any) -> tuple[Any, ...] | None:
    """The members of a union (None: not one)."""
    if get_origin(tp) in (Union, types.UnionType):
        return get_args(tp)
    return None


def _struct(tp: Any) -> type[Struct] | None:
    return tp if isinstance(tp, type) and issubclass(tp, Struct) else None


def _join(path: str, key: Any) -> str:
    return f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else str(key)


Path = tuple[Any, Any] | None
"""Where a value is, as (parent path, key): made into text only for a problem."""
Reader = Callable[[Any, Path, list[Problem]], Any]
"""(value, where, problems) -> the value as its declared type takes it."""


def _text(path: Path) -> str:
    keys = []
    while path is not None:
        path, key = path
        keys.append(key)
    out = ""
    for key in reversed(keys):
        out = _join(out, key)
    return out


def _read(value: Any, tp: Any, path: str, problems: list[Problem]) -> Any:
    """``value`` read as the declared type ``tp`` takes it (problems of the hooks added)."""
    return _reader(tp)(value, (None, path) if path else None, problems)


@cache
def _reader(tp: Any) -> Reader:
    """The reader of one declared type, built once: the walk costs about a microsecond a
    value (a model change reads every one of them; docs/performance.md)."""
    base, reads, checks = _unwrapped(tp)
    options = _options(base)
    if options is not None:
        rest = [t for t in options if t is not type(None)]
        inner = _reader(rest[0]) if len(rest) == 1 else _as_is
        none = type(None) in options

        def union(value: Any, path: Path, problems: list[Problem]) -> Any:
            return None if value is None and none else inner(value, path, problems)
        return _hooked(union, reads)
    if get_origin(base) in (list, tuple):
        item = _reader(get_args(base)[0])

        def items(value: Any, path: Path, problems: list[Problem]) -> Any:
            if not isinstance(value, list | tuple):
                return value
            return [item(v, (path, i), problems) for i, v in enumerate(value)]
        return _hooked(items, reads)
    cls = _struct(base)
    if cls is not None:
        return _hooked(_struct_reader(cls), reads)
    plain = _PLAIN.get(base)
    if plain is None:
        return _hooked(_as_is, reads)
    return _hooked(_plain_reader(base, plain, checks), reads)


def _as_is(value: Any, path: Path, problems: list[Problem]) -> Any:
    return value


def _hooked(read: Reader, hooks: tuple[Callable[[Any], Any], ...]) -> Reader:
    """``read`` after the field's ``read`` hooks (a ValueError: its problem)."""
    if not hooks:
        return read

    def hooked(value: Any, path: Path, problems: list[Problem]) -> Any:
        for hook in hooks:
            try:
                value = hook(value)
            except ValueError as exc:
                problems.append(Problem(_text(path), str(exc), value))
                return value
        return read(value, path, problems)
    return hooked


def _plain_reader(tp: type, plain: Callable[[Any], Any],
                  checks: tuple[Callable[[Any], Any], ...]) -> Reader:
    def read(value: Any, path: Path, problems: list[Problem]) -> Any:
        if type(value) is not tp:
            value = plain(value)
            if tp is float and isinstance(value, int) and not isinstance(value, bool):
                return value  # msgspec takes an int for a float
        if tp is float and isinstance(value, float) and value - value != 0:
            problems.append(Problem(_text(path), "expected a finite number", value))
            return value
        if checks and type(value) is tp:
            for check in checks:
                try:
                    check(value)
                except ValueError as exc:
                    problems.append(Problem(_text(path), str(exc), value))
                    break
        return value
    return read


def _struct_reader(cls: type[Struct]) -> Reader:
    fields: dict[str, Reader] = {}
    prepared = getattr(cls, "prepared", None)

    def read(value: Any, path: Path, problems: list[Problem]) -> Any:
        if type(value) is not dict:
            return value
        if not fields:  # built on first use: a class may refer to itself
            fields.update((name, _reader(f.type)) for name, f in _fields(cls).items())
        if prepared is not None:
            value = prepared(value)
        out = {}
        for key, item in value.items():
            field = fields.get(key)
            out[key] = item if field is None else field(item, (path, key), problems)
        return out
    return read


# -- every problem, field by field ----------------------------------------------------------

_TYPE_WORDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "a boolean",
               "object": "a mapping", "array": "a list", "null": "null", "bytes": "bytes"}
_WHERE = re.compile(r" - at `\$(.*)`$")


def _words(text: str) -> str:
    """msgspec's message in the model's words (``Expected `int` >= 1`` -> ``expected an
    integer >= 1``)."""
    text = re.sub(r"`(\w+)`", lambda m: _TYPE_WORDS.get(m.group(1), m.group(1)), text)
    return text[:1].lower() + text[1:]


def _problem(exc: msgspec.ValidationError, path: str, value: Any, tp: Any) -> Problem:
    """A problem from msgspec's message, at ``path`` plus where it says it is."""
    text = str(exc)
    found = _WHERE.search(text)
    if found:
        text = text[:found.start()]
        path = path + found.group(1) if path else found.group(1).lstrip(".")
    unknown = re.fullmatch(r"Object contains unknown field `(.*)`", text)
    if unknown:
        return Problem(_join(path, unknown.group(1)), "unknown field")
    missing = re.fullmatch(r"Object missing required field `(.*)`", text)
    if missing:
        return Problem(_join(path, missing.group(1)), "field required")
    rule = re.match(r"(\w+): ", text)
    if not found and rule and rule.group(1) in _fields_of(tp):
        return Problem(_join(path, rule.group(1)), text[rule.end():], None)
    if text.startswith("Invalid enum value"):
        allowed = _literal(tp)
        if allowed:
            return Problem(path, "expected one of " + ", ".join(map(str, allowed)), value)
    if found or text.startswith("Expected") or text.startswith("Invalid"):
        return Problem(path, _words(text), value)
    # A class's own rule (its __post_init__); "FIELD: why" names one of its fields.
    return Problem(path, text, value)


def _fields_of(tp: Any) -> dict[str, Any]:
    cls = _struct(_unwrapped(tp)[0])
    return _fields(cls) if cls is not None else {}


def _literal(tp: Any) -> tuple[Any, ...]:
    tp = _unwrapped(tp)[0]
    if get_origin(tp) is Literal:
        return get_args(tp)
    for option in _options(tp) or ():
        found = _literal(option)
        if found:
            return found
    return ()


def _collect(value: Any, declared: Any, path: str, problems: list[Problem],
             seen: set[str]) -> bool:
    """Add every problem of ``value`` as ``declared``; True when there is none. ``seen``:
    paths the walk already named (not named twice)."""
    if path in seen:
        return False
    tp = _unwrapped(declared)[0]
    options = _options(tp)
    if options is not None:
        if value is None and type(None) in options:
            return True
        rest = [t for t in options if t is not type(None)]
        if len(rest) == 1 and (_struct(_unwrapped(rest[0])[0]) or get_origin(
                _unwrapped(rest[0])[0]) in (list, tuple)):
            return _collect(value, rest[0], path, problems, seen)
    cls = _struct(tp)
    if cls is not None and isinstance(value, dict):
        fine = _collect_fields(value, cls, path, problems, seen)
    elif get_origin(tp) in (list, tuple) and isinstance(value, list):
        item = get_args(tp)[0]
        fine = all([_collect(v, item, _join(path, i), problems, seen)
                    for i, v in enumerate(value)])
    else:
        fine = True
    if not fine:
        return False
    try:
        msgspec.convert(value, declared)
    except msgspec.ValidationError as exc:
        problems.append(_problem(exc, path, value, declared))
        return False
    return True


def _collect_fields(value: dict[Any, Any], cls: type[Struct], path: str,
                    problems: list[Problem], seen: set[str]) -> bool:
    fields = _fields(cls)
    fine = True
    for key in value:
        if key not in fields:
            problems.append(Problem(_join(path, key), "unknown field"))
            fine = False
    for key, field in fields.items():
        if key not in value and field.default is NODEFAULT \
                and field.default_factory is NODEFAULT:
            problems.append(Problem(_join(path, key), "field required"))
            fine = False
    results: Iterable[bool] = [_collect(item, fields[key].type, _join(path, key), problems, seen)
                               for key, item in value.items() if key in fields]
    return all(results) and fine
