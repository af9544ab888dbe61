"""docs/design.md's table of the house stays equal to the import contract.

The table (``## The house``) has one row per package of the contract's layers
(pyproject.toml, ``[tool.importlinter]``), the shared leaves as one row, in the layers'
order and numbered by them. A row's "may import" names exactly what the contract lets
the package import: every layer below its own (the shared leaves also one another),
less what a forbidden contract on the package takes away; its "Never:" names exactly
those taken away (the layers below only) and the outside libraries forbidden to it.
A row for part of a package (the operator's actions) names no more than that.

Pure: it reads pyproject.toml and docs/design.md, and starts nothing.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
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
