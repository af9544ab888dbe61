"""One definition per error concept, one meaning per name (docs/design.md, "The command
line and errors"): every exception class of the package is walked, its module imported.

* no two public exception classes share a name: a module that speaks of a family member
  re-exports :mod:`meshxl.errors`' class (``meshxl.client.Conflict`` is
  ``meshxl.errors.Conflict``), and a class that adds a context has a name of its own
  (``SidecarConflict``); a private class (``_Bad``) is a module's own control flow,
  caught where it is raised, and no other module may import it
  (tests/unit/test_architecture.py), so its name means something in one module only;
* every public exception class is a member of the family (``MeshxlError``), so each edge
  maps it (an exit code, an HTTP status);
* what the session server raises is the family's: no class of ``meshxl.statesync``
  stands in for a member (a second ``Undecodable`` the HTTP mapping would not know).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from collections import defaultdict
from pathlib import Path
from types import ModuleType

import meshxl
from meshxl import errors

FAMILY = {name: getattr(errors, name) for name in errors.__all__
          if inspect.isclass(getattr(errors, name))}


def _modules() -> list[ModuleType]:
    return [importlib.import_module(info.name)
            for info in pkgutil.walk_packages(meshxl.__path__, "meshxl.")]


def _defined_exceptions(module: ModuleType) -> list[type[BaseException]]:
    """The exception classes ``module`` defines (not those it imports)."""
    return [obj for obj in vars(module).values()
            if inspect.isclass(obj) and issubclass(obj, BaseException)
            and obj.__module__ == module.__name__]


def test_no_two_exception_classes_share_a_name() -> None:
    by_name: dict[str, set[str]] = defaultdict(set)
    for module in _modules():
        for cls in _defined_exceptions(module):
            if cls.__name__.startswith("_"):
                continue
            by_name[cls.__name__].add(f"{cls.__module__}.{cls.__qualname__}")
    shared = {name: sorted(where) for name, where in by_name.items() if len(where) > 1}
    assert not shared, ("exception classes sharing a name (re-export the family's member, "
                        f"or give the new concept its own name): {shared}")
    # The family itself is found (the walk sees every module).
    assert {name for name in FAMILY} <= set(by_name)


def test_every_public_exception_is_a_member_of_the_family() -> None:
    outside = [f"{cls.__module__}.{cls.__qualname__}"
               for module in _modules() for cls in _defined_exceptions(module)
               if not cls.__name__.startswith("_") and not issubclass(cls, errors.MeshxlError)]
    assert not outside, f"exceptions outside meshxl.errors' family: {outside}"


def test_a_member_is_named_only_by_its_class() -> None:
    """Wherever a family member's name is bound in the package, it is the member."""
    wrong = []
    for module in _modules():
        for name, member in FAMILY.items():
            bound = vars(module).get(name)
            if bound is not None and bound is not member:
                wrong.append(f"{module.__name__}.{name}")
    assert not wrong, f"names of family members bound to other classes: {wrong}"


def _made_names(path: Path) -> list[tuple[int, list[str]]]:
    """The dotted names a module raises (``raise X``, ``raise a.X(...)``) or calls
    (``X(...)``, an exception made to be raised or returned as an outcome)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Raise) and node.exc is not None:
            target: ast.expr = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
        elif isinstance(node, ast.Call):
            target = node.func
        else:
            continue
        parts: list[str] = []
        while isinstance(target, ast.Attribute):
            parts.insert(0, target.attr)
            target = target.value
        if isinstance(target, ast.Name):
            found.append((node.lineno, [target.id, *parts]))
    return found


def test_the_session_server_raises_the_familys_errors() -> None:
    """Every exception class of the project that ``meshxl.statesync`` raises or makes is
    a member of the family (itself, or a subclass with a name of its own), so the
    server's HTTP mapping (``meshxl.httpbase.http_status``) answers it with its status.
    A module's private exception (``_Stop``) carries control flow inside it only."""
    import meshxl.statesync

    root = Path(meshxl.statesync.__file__).parent
    checked = 0
    wrong = []
    for info in pkgutil.walk_packages(meshxl.statesync.__path__, "meshxl.statesync."):
        module = importlib.import_module(info.name)
        path = Path(module.__file__ or "")
        assert path.is_relative_to(root)
        for line, dotted in _made_names(path):
            value: object = vars(module).get(dotted[0])
            for attribute in dotted[1:]:
                value = getattr(value, attribute, None)
            if not (inspect.isclass(value) and issubclass(value, BaseException)
                    and value.__module__.startswith("meshxl")):
                continue  # a builtin (a bug's), a function making the error, a variable
            checked += 1
            if value.__name__.startswith("_") and value.__module__ == info.name:
                continue
            if not issubclass(value, errors.MeshxlError):
                wrong.append(f"{info.name}:{line} raises {value.__qualname__}")
            elif value.__name__ in FAMILY and value is not FAMILY[value.__name__]:
                wrong.append(f"{info.name}:{line} makes a second {value.__name__}")
    assert checked > 20  # the walk reaches the modules' raises
    assert not wrong, "\n".join(wrong)
