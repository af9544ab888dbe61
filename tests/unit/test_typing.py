"""The sidecar's and the control plane's seams stay typed (docs/design.md, "Layers").

``make lint`` runs mypy with pyproject.toml's strict section for ``meshxl.statesync``
and ``meshxl.xds``; these tests keep that section whole, and keep ``Any`` out of the
signatures a session write and a model change cross, module to module, where mypy's flags would let
one through (a parameter or return annotated ``Any`` is no error to mypy).
"""

from __future__ import annotations

import inspect
import tomllib
import typing
from pathlib import Path
from types import ModuleType
from typing import Any

from meshxl.statesync import api, batches, sessions, shards, store, writes
from meshxl.statesync.http import connection, routing
from meshxl.xds import app, cache, compiler, delta, nodes, overrides, resources, server, sotw
from meshxl.xds import sources as xds_sources

ROOT = Path(__file__).resolve().parents[2]

# What `mypy --strict` turns on that a per-module section can set (mypy's
# `--strict` list less the global-only warn_unused_configs and warn_redundant_casts).
STRICT_FLAGS = {
    "warn_unused_ignores", "disallow_any_generics", "disallow_subclassing_any",
    "disallow_untyped_calls", "disallow_untyped_defs", "disallow_incomplete_defs",
    "check_untyped_defs", "disallow_untyped_decorators", "warn_return_any",
    "no_implicit_reexport", "strict_equality", "extra_checks",
}
STRICT_PACKAGES = {"meshxl.statesync", "meshxl.xds"}


def test_the_sidecar_and_the_control_plane_are_checked_strictly() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    covered: dict[str, set[str]] = {}
    for section in config.get("overrides", []):
        modules = section["module"]
        for module in [modules] if isinstance(modules, str) else modules:
            flags = {flag for flag, value in section.items() if value is True}
            covered.setdefault(module, set()).update(flags)
    for package in STRICT_PACKAGES:
        for module in (package, package + ".*"):
            missing = STRICT_FLAGS - covered.get(module, set())
            assert not missing, f"{module} is not checked with {sorted(missing)}"


# The modules a session PUT crosses, from the parsed request to the etcd transaction,
# and the seam between the API and the sidecar above it; and those a model change
# crosses, from the model's source to the bytes an ADS stream writes.
HOPS: tuple[ModuleType, ...] = (connection, routing, api, writes, sessions, shards, store,
                                batches, xds_sources, app, compiler, resources, overrides,
                                cache, server, nodes, sotw, delta)
def _public_callables(module: ModuleType) -> list[tuple[str, Any]]:
    found = []
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj):
            found.append((f"{module.__name__}.{name}", obj))
        elif inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if attr.startswith("_") and attr != "__init__":
                    continue
                if isinstance(member, property):
                    member = member.fget
                if inspect.isfunction(member):
                    found.append((f"{module.__name__}.{name}.{attr}", member))
    return found


def _hints(function: Any) -> dict[str, Any]:
    overloads = typing.get_overloads(function)
    hints: dict[str, Any] = {}
    for each in (function, *overloads):
        for name, hint in typing.get_type_hints(each).items():
            hints[f"{name}{'' if each is function else ' (overload)'}"] = hint
    return hints


def test_no_hop_of_a_write_or_a_model_change_takes_or_returns_any() -> None:
    loose = [f"{where}: {name}"
             for module in HOPS for where, function in _public_callables(module)
             for name, hint in _hints(function).items() if hint is Any]
    assert not loose, f"Any in the signatures a write or a model change crosses: {loose}"


def test_the_check_finds_an_untyped_hop() -> None:
    def hop(sidecar: Any) -> Any:
        return sidecar

    assert [name for name, hint in _hints(hop).items() if hint is Any] == ["sidecar",
                                                                            "return"]
