"""Bounded reading of the files operators hand to commands (``meshxl inject``,
``meshxl slo review``): a size limit read before anything is parsed, and YAML checked
for nesting depth (from the parser's event stream, before anything recursive runs) and
for the number of values it expands to (aliases counted at every use, the "billion
laughs" document). A file past a limit is one line naming the file and the limit, never
a hang, a traceback or a crash."""

from __future__ import annotations

import sys
from typing import Any

from meshxl.errors import InputError

__all__ = ["InputError", "check_depth", "load_yaml_all", "measure", "read_text"]


def read_text(path: str, limit: int, what: str = "input") -> str:
    """The UTF-8 text of ``path`` (``-``: standard input), at most ``limit`` bytes."""
    name = "<stdin>" if path == "-" else path
    try:
        if path == "-":
            data = sys.stdin.buffer.read(limit + 1)
        else:
            with open(path, "rb") as file:
                data = file.read(limit + 1)
    except OSError as exc:
        raise InputError(f"cannot read {name}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise InputError(f"{name}: {what} larger than {limit:,} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{name}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _loader() -> Any:
    """libyaml's safe loader when PyYAML has it (imported here, when YAML is read: a
    statesync sidecar reading its model's stored JSON form never loads PyYAML)."""
    import yaml

    return getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def measure(data: Any, *, max_depth: int, max_values: int, name: str) -> int:
    """Values ``data`` expands to, shared (aliased) nodes counted at every use; raises
    InputError naming ``name`` when it nests deeper than ``max_depth``, expands to more
    than ``max_values`` or contains itself (YAML aliases make a graph of shared nodes:
    it is measured as the tree it means)."""
    seen: dict[int, tuple[int, int]] = {}  # id -> (values, height)
    active: set[int] = set()

    def walk(node: Any, depth: int) -> tuple[int, int]:
        if not isinstance(node, dict | list):
            return 1, 0
        key = id(node)
        if key in active:
            raise InputError(f"{name}: a YAML alias inside its own anchor")
        if key not in seen:
            if depth > max_depth:
                raise InputError(f"{name}: nested deeper than {max_depth} levels")
            active.add(key)
            values, height = 1, 0
            for child in ([*node.keys(), *node.values()] if isinstance(node, dict) else node):
                count, below = walk(child, depth + 1)
                values, height = values + count, max(height, below + 1)
                if values > max_values:
                    raise InputError(f"{name}: expands to more than {max_values:,} values "
                                     "(YAML aliases are counted at every use)")
            active.discard(key)
            seen[key] = (values, height)
        values, height = seen[key]
        if depth + height > max_depth:
            raise InputError(f"{name}: nested deeper than {max_depth} levels")
        return values, height

    return walk(data, 0)[0]


def check_depth(text: str, *, max_depth: int, name: str, loader: Any = None) -> None:
    """Refuse YAML nested deeper than ``max_depth``, from the parser's event stream
    (iterative): libyaml's composer recurses in C and crashes the process on deep
    nesting, so this runs before anything builds the document."""
    import yaml

    depth = 0
    for event in yaml.parse(text, Loader=loader or _loader()):
        if isinstance(event, yaml.MappingStartEvent | yaml.SequenceStartEvent):
            depth += 1
            if depth > max_depth:
                raise InputError(f"{name}: nested deeper than {max_depth} levels")
        elif isinstance(event, yaml.MappingEndEvent | yaml.SequenceEndEvent):
            depth -= 1


def load_yaml_all(text: str, name: str, *, max_depth: int, max_values: int) -> list[Any]:
    """Every document of a YAML stream (``None`` for empty ones), within the bounds."""
    import yaml

    try:
        check_depth(text, max_depth=max_depth, name=name)
        documents = list(yaml.load_all(text, Loader=_loader()))  # noqa: S506 - a safe loader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else name
        reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InputError(f"{where}: invalid YAML: {reason}") from None
    except (RecursionError, MemoryError):
        raise InputError(f"{name}: nested too deep") from None
    except InputError:
        raise
    except Exception as exc:  # constructors that cannot build a value (dates...)
        raise InputError(f"{name}: invalid YAML value: {type(exc).__name__}: "
                         f"{str(exc)[:200]}") from None
    total = 0
    for document in documents:
        total += measure(document, max_depth=max_depth, max_values=max_values, name=name)
        if total > max_values:
            raise InputError(f"{name}: expands to more than {max_values:,} values "
                             "(YAML aliases are counted at every use)")
    return documents
