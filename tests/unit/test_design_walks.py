"""docs/design.md's table of the house and its main paths stay true.

The table (``## The house``) has one row per package of the contract's layers
(pyproject.toml, ``[tool.importlinter]``), the shared leaves as one row, in the layers'
order and numbered by them. A row's "may import" names exactly what the contract lets
the package import: every layer below its own (the shared leaves also one another),
less what a forbidden contract on the package takes away; its "Never:" names exactly
those taken away (the layers below only) and the outside libraries forbidden to it.
A row for part of a package (the operator's actions) names no more than that.

The walks (``## Main paths``): each step, a numbered item, names the modules it runs
in by path (``meshxl/xds/app.py``, or ``xds/app.py``), each a file, and every dotted
name it gives in backticks (``Class.method``, ``module.function``,
``module.Class.method``) is found with getattr: in a module the step names, in a
sibling module of one (``sources.Debouncer`` beside ``meshxl/xds/app.py``), from
``meshxl`` (``model.vsls.placed``), or in the one module of meshxl of that name
(``runtime.cluster_view``). A step names at least one module or name of meshxl, but
a step that Envoy or etcd does alone.

Pure: it reads pyproject.toml and docs/design.md, imports meshxl's modules, and starts
nothing.
"""

from __future__ import annotations

import importlib
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "meshxl"
DESIGN = ROOT / "docs" / "design.md"
CONTRACTS: list[dict[str, Any]] = tomllib.loads(
    (ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
CODE = re.compile(r"`([^`]+)`")


def _layers() -> list[tuple[list[str], bool]]:
    """The layers contract, top first: each layer's names, and whether they are
    independent (``|``) rather than free to import one another (``:``)."""
    contract = next(c for c in CONTRACTS if c["id"] == "layers")
    return [([name.strip() for name in re.split(r"[|:]", layer)], "|" in layer)
            for layer in contract["layers"]]


LAYERS = _layers()
LEAVES = frozenset(next(names for names, independent in LAYERS
                        if len(names) > 1 and not independent))
TOP = "__main__"


def _layer_of(package: str) -> int:
    return next(i for i, (names, _) in enumerate(LAYERS) if package in names)


def _below(package: str) -> set[str]:
    """What the layers contract lets ``package`` import."""
    index = _layer_of(package)
    names, independent = LAYERS[index]
    allowed = {name for lower, _ in LAYERS[index + 1:] for name in lower}
    if not independent:
        allowed |= set(names) - {package}
    return allowed


def _forbidden(sources: set[str]) -> tuple[set[str], set[str]]:
    """What the forbidden contract on exactly ``sources`` (``meshxl.``-less names)
    forbids: (meshxl's modules, outside libraries); nothing without one."""
    for contract in CONTRACTS:
        if contract["type"] == "forbidden" and {
                name.removeprefix("meshxl.") for name in contract["source_modules"]} == sources:
            modules = contract["forbidden_modules"]
            return ({m.removeprefix("meshxl.") for m in modules if m.startswith("meshxl.")},
                    {m for m in modules if not m.startswith("meshxl.")})
    return set(), set()


@dataclass(frozen=True)
class Row:
    layer: int
    packages: tuple[str, ...]
    may: frozenset[str]
    never: frozenset[str]
    line: str


def _named(cell: str) -> frozenset[str]:
    """The packages a cell names (a contract's id, such as ``model-pure``, is none)."""
    names = set(CODE.findall(cell)) - {contract["id"] for contract in CONTRACTS}
    if "shared leaves" in cell:
        names |= LEAVES
    return frozenset(names)


def _rows() -> list[Row]:
    house = DESIGN.read_text().split("## The house", 1)[1].split("```", 1)[0]
    rows = []
    for line in house.splitlines():
        if not line.startswith("| ") or line.startswith("| layer "):
            continue
        layer, package, _job, may = (cell.strip() for cell in line.strip("| \n").split(" | "))
        allowed, _, never = may.partition("Never:")
        packages = ("leaves",) if "shared leaves" in package else tuple(CODE.findall(package))
        rows.append(Row(int(layer), packages, _named(allowed), _named(never), line))
    return rows


def _top(package: str) -> str:
    return "bounded" if package == "leaves" else package.split(".")[0]


def test_the_table_has_a_row_per_layered_package_in_the_layers_order() -> None:
    rows = _rows()
    assert [row.layer for row in rows] == sorted(row.layer for row in rows)
    for row in rows:
        for package in row.packages:
            assert row.layer == _layer_of(_top(package)), (
                f"docs/design.md gives {package} layer {row.layer}: {row.line}")
    whole = [row.packages[0] for row in rows if "." not in row.packages[0]]
    expected = [name for names, _ in LAYERS for name in names
                if name != TOP and name not in LEAVES] + ["leaves"]
    assert sorted(whole) == sorted(expected), "one row per package of the layers contract"
    leaves = next(row for row in rows if row.packages == ("leaves",))
    assert set(CODE.findall(leaves.line.split(" | ")[1])) == LEAVES, (
        "the shared leaves' row names each leaf of the layers contract")


def test_each_row_may_import_what_the_contract_allows() -> None:
    for row in _rows():
        sources = {"bounded"} if row.packages == ("leaves",) else set(row.packages)
        below = _below(_top(next(iter(sources))))
        forbidden, outside = _forbidden(sources)
        if row.packages == ("leaves",):
            below |= LEAVES  # one row for the layer: the leaves import one another
        taken = forbidden & below
        if any("." in package for package in row.packages):
            # Part of a package: what a forbidden part imports is out of reach too.
            assert row.may <= below - taken, (
                f"{row.packages}: may import {sorted(row.may - (below - taken))}, which "
                "the contract does not allow")
        else:
            assert row.may == below - taken, (
                f"{row.packages}: the contract allows {sorted(below - taken)}, the table "
                f"says {sorted(row.may)}")
        assert row.never == taken | outside, (
            f"{row.packages}: the contract forbids {sorted(taken | outside)} of what is "
            f"below it, the table says {sorted(row.never)}")


def test_the_table_checks_can_fail() -> None:
    """The contract is read as it is meant: the model may not import headers, the
    client may, and the operator's actions never reach the control plane."""
    assert "headers" in _forbidden({"model"})[0] and "grpc" in _forbidden({"model"})[1]
    assert "headers" not in _forbidden({"client"})[0]
    assert "xds" in _forbidden({"operator.actions", "operator.tables", "operator.restore",
                                "operator.shards"})[0]
    assert "statesync" not in _below("xds") and "etcd" in _below("xds")
    assert {"web", "errors"} <= _below("bounded")
    assert _forbidden({"xds"}) == (set(), set())


# -- the walks ----------------------------------------------------------------------------

WALKS = ("A session PUT", "A model change reaching Envoy", "A failover",
         "A degraded member stepping down")
SUBPACKAGES = sorted(path.name for path in PACKAGE.iterdir()
                     if (path / "__init__.py").is_file())
MODULE_PATH = re.compile(
    rf"(?<![\w/.-])(?:meshxl/)?(?:{'|'.join(SUBPACKAGES)})/[\w/]+\.py\b")
DOTTED = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+$")
ALONE = re.compile(r"^\d+\. \*\*(Envoy|etcd)\*\*(?!\s*(?:→|->))")
STEMS: dict[str, list[str]] = {}
for _path in PACKAGE.rglob("*.py"):
    _parts = _path.relative_to(ROOT).with_suffix("").parts
    STEMS.setdefault(_parts[-1], []).append(".".join(_parts))


def _walks() -> dict[str, list[str]]:
    """Each walk's title -> its steps (a numbered item, its lines joined), and the
    paragraphs around them as steps too (what they name must hold as well)."""
    section = DESIGN.read_text().split("## Main paths", 1)[1].split("\n## ", 1)[0]
    walks: dict[str, list[str]] = {}
    for part in section.split("\n### ")[1:]:
        title, _, body = part.partition("\n")
        steps: list[str] = []
        for paragraph in body.split("\n\n"):
            items = re.split(r"\n(?=\d+\. )", paragraph.strip())
            steps.extend(" ".join(line.strip() for line in item.splitlines())
                         for item in items if item)
        walks[title.strip()] = steps
    return walks


def _module_of(path: str) -> str:
    return "meshxl." + path.removeprefix("meshxl/").removesuffix(".py").replace("/", ".")


def _attribute(found: object, names: list[str]) -> bool:
    for name in names:
        if not hasattr(found, name):
            return False
        found = getattr(found, name)
    return True


def _import(dotted: str) -> object | None:
    try:
        return importlib.import_module(dotted)
    except ModuleNotFoundError:
        return None


def _resolves(name: str, modules: list[str]) -> bool:
    """``name`` found from the step's ``modules``, their siblings, meshxl, or the one
    module of meshxl of its first part's name."""
    parts = name.split(".")
    for module in modules:
        found = _import(module)  # a module that is not there: the path test says so
        if found is not None and _attribute(found, parts):
            return True
        sibling = _import(module.rsplit(".", 1)[0] + "." + parts[0])
        if sibling is not None and _attribute(sibling, parts[1:]):
            return True
    for cut in range(len(parts), 0, -1):
        found = _import("meshxl." + ".".join(parts[:cut]))
        if found is not None:
            return _attribute(found, parts[cut:])
    only = STEMS.get(parts[0], [])
    return len(only) == 1 and _attribute(importlib.import_module(only[0]), parts[1:])


def test_the_four_walks_are_there_with_their_steps() -> None:
    walks = _walks()
    assert tuple(walks) == WALKS
    for title, steps in walks.items():
        numbered = [step for step in steps if re.match(r"\d+\. ", step)]
        assert len(numbered) >= 4, f"{title}: {len(numbered)} steps"
        assert [int(step.split(".", 1)[0]) for step in numbered] == list(
            range(1, len(numbered) + 1)), f"{title}: steps numbered 1, 2, ..."


def test_every_module_a_walk_names_is_a_file() -> None:
    wrong = [f"{title}: {match.group()}" for title, steps in _walks().items()
             for step in steps for match in MODULE_PATH.finditer(step)
             if not (ROOT / match.group()).is_file() and not (PACKAGE / match.group()).is_file()]
    assert not wrong, f"docs/design.md's walks name modules that do not exist: {wrong}"


def test_every_name_a_walk_gives_is_found() -> None:
    wrong, bare = [], []
    for title, steps in _walks().items():
        for step in steps:
            modules = [_module_of(match.group()) for match in MODULE_PATH.finditer(step)]
            names = [code.removesuffix("()") for code in CODE.findall(step)
                     if DOTTED.match(code.removesuffix("()"))]
            for name in names:
                if not _resolves(name, modules):
                    wrong.append(f"{title}: {name} (modules named: {modules})")
            if re.match(r"\d+\. ", step) and not modules and not names \
                    and not ALONE.match(step):
                bare.append(f"{title}: {step[:60]}")
    assert not wrong, f"docs/design.md's walks name what is not there: {wrong}"
    assert not bare, f"steps of docs/design.md's walks that name no module: {bare}"


def test_the_walk_checks_can_fail() -> None:
    """A renamed method, a module gone and a name only a sibling has are told apart."""
    app = ["meshxl.xds.app"]
    assert _resolves("ControlPlane.rebuild", app)
    assert not _resolves("ControlPlane.rebuilt", app)
    assert _resolves("sources.Debouncer.poke", app)
    assert not _resolves("Debouncer.poke", ["meshxl.xds.compiler"])
    assert _resolves("model.vsls.placed", [])
    assert _resolves("runtime.cluster_view", [])
    assert not _resolves("cache.Snapshot", [])  # two modules named cache: which?
    assert _resolves("cache.Snapshot", ["meshxl.xds.server"])
    assert MODULE_PATH.search("`meshxl/xds/app.py`") and MODULE_PATH.search("`xds/app.py`")
    assert not MODULE_PATH.search("tests/unit/test_design_walks.py")
    assert ALONE.match("7. **Envoy** applies") and not ALONE.match("2. **etcd → control")
