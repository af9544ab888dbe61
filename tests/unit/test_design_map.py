"""The map of the house stays true (docs/design.md, "The house").

* Every module under ``meshxl/`` is named in the package map, in its own package's
  entry: a module nobody can find on the map is a module a newcomer never reads.
* No docstring, comment or doc names a module that does not exist: a path
  ``meshxl/.../x.py`` must be a file, and a dotted name ``meshxl.x.y`` must import
  (a module, or an attribute of one), unless it is a name the code sends rather than
  one it is made of (a span attribute such as ``meshxl.session.id``, the label domain
  ``meshxl.io``, the demo's gRPC service ``meshxl.demo.v1.Counter``): those are the
  string constants of the code itself, and are taken from it.
"""

from __future__ import annotations

import ast
import functools
import importlib
import io
import re
import tokenize
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "meshxl"
DESIGN = ROOT / "docs" / "design.md"

# ``meshxl.x.y``, not inside a path or a longer name (``deploy/grafana/meshxl.json``).
DOTTED = re.compile(r"(?<![\w./-])meshxl(?:\.[A-Za-z_]\w*)+")
# ``meshxl/x/y.py``, not inside a longer path; or ``x/y.py`` with ``x`` a package of
# meshxl (``etcd/keys.py``), as the docs write them.
MODULE_PATH = re.compile(r"(?<![\w/.-])meshxl/[\w/]+\.py\b")
SUBPACKAGES = sorted(path.name for path in PACKAGE.iterdir()
                     if (path / "__init__.py").is_file())
PACKAGE_PATH = re.compile(rf"(?<![\w/.-])(?:{'|'.join(SUBPACKAGES)})/[\w/]+\.py\b")
FILE_SUFFIXES = (".json", ".yaml", ".yml", ".md", ".py", ".txt", ".proto")


def _map_entries() -> dict[str, str]:
    """The package map's entries: ``"model/"`` (or ``"shared leaves"``) -> its text."""
    text = DESIGN.read_text()
    house = text.split("## The house", 1)[1]
    block = house.split("```", 2)[1]
    entries: dict[str, str] = {}
    current = None
    for line in block.splitlines():
        head = re.match(r"^  (shared leaves|[a-z_]+/)\s", line)
        if head:
            current = head.group(1)
            entries[current] = line[head.end():]
        elif current is not None:
            entries[current] += "\n" + line
    return entries


def _named(name: str, text: str) -> bool:
    return re.search(rf"(?<![\w.]){re.escape(name)}(?![\w])", text) is not None


def test_the_package_map_names_every_module() -> None:
    entries = _map_entries()
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).parts
        if len(parts) == 1:
            # A shared leaf (or the package's own __init__/__main__) is named as a file.
            if path.name != "__init__.py" and not _named(path.name, entries["shared leaves"]):
                missing.append(str(path.relative_to(ROOT)))
            continue
        entry = entries.get(parts[0] + "/")
        if entry is None:
            missing.append(f"{parts[0]}/ (no entry at all)")
            continue
        # A sub-package (statesync/http/, operator/views/) is named in its parent's entry.
        for folder in parts[1:-1]:
            if not _named(folder + "/", entry):
                missing.append(str(path.parent.relative_to(ROOT)) + "/")
        if path.name != "__init__.py" and not _named(path.stem, entry):
            missing.append(str(path.relative_to(ROOT)))
    assert not sorted(set(missing)), (
        "modules missing from docs/design.md's package map (name each in its "
        f"package's entry): {sorted(set(missing))}")


def test_the_map_has_no_entry_for_a_package_that_is_gone() -> None:
    gone = [entry for entry in _map_entries() if entry != "shared leaves"
            and not (PACKAGE / entry).is_dir()]
    assert not gone, f"docs/design.md maps packages that do not exist: {gone}"


def _docstrings(tree: ast.AST) -> Iterator[ast.Constant]:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                             ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)):
                yield first.value


@functools.cache
def _prose(path: Path) -> tuple[tuple[int, str], ...]:
    """What a reader reads of ``path``: a doc whole; a module's docstrings and comments
    (read once: three checks go through every file)."""
    return tuple(_read_prose(path))


def _read_prose(path: Path) -> Iterator[tuple[int, str]]:
    source = path.read_text()
    if path.suffix == ".md":
        for number, line in enumerate(source.splitlines(), 1):
            yield number, line
        return
    for doc in _docstrings(ast.parse(source, str(path))):
        for offset, line in enumerate(str(doc.value).splitlines()):
            yield doc.lineno + offset, line
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            yield token.start[0], token.string


@functools.cache
def _sent_names() -> frozenset[str]:
    """The ``meshxl.``-names the code sends (span attributes, labels, loggers, gRPC
    services): its string constants that are not docstrings."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        docs = {id(doc) for doc in _docstrings(tree)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                    and id(node) not in docs):
                names.update(match.group().rstrip(".") for match in DOTTED.finditer(node.value))
    return frozenset(names)


@functools.cache
def _imports(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            if not hasattr(found, attribute):
                return False
            found = getattr(found, attribute)
        return True
    return False


def _readable_files() -> list[Path]:
    return [*sorted(PACKAGE.rglob("*.py")), *sorted((ROOT / "docs").rglob("*.md")),
            ROOT / "README.md"]


def test_no_docstring_or_doc_names_a_module_path_that_does_not_exist() -> None:
    wrong = [f"{path.relative_to(ROOT)}:{number}: {match.group()}"
             for path in _readable_files() for number, line in _prose(path)
             for match in [*MODULE_PATH.finditer(line), *PACKAGE_PATH.finditer(line)]
             if not (ROOT / match.group()).is_file()
             and not (PACKAGE / match.group()).is_file()]
    assert not wrong, f"paths to modules that do not exist: {wrong}"


def test_no_docstring_or_doc_names_a_dotted_module_that_does_not_exist() -> None:
    sent = {name for name in _sent_names() if not _imports(name)}
    wrong = []
    for path in _readable_files():
        for number, line in _prose(path):
            for match in DOTTED.finditer(line):
                name = match.group().rstrip(".")
                if name.endswith(FILE_SUFFIXES) or name in sent:
                    continue
                if any(name.startswith(s + ".") or s.startswith(name + ".") for s in sent):
                    continue
                if not _imports(name):
                    wrong.append(f"{path.relative_to(ROOT)}:{number}: {name}")
    assert not wrong, f"dotted names of modules or attributes that do not exist: {wrong}"


def test_the_checks_see_what_they_should() -> None:
    """The checks can fail: a stale path and a stale dotted name are caught."""
    assert MODULE_PATH.search("see meshxl/etcd.py for the keys")
    assert PACKAGE_PATH.search("the layout (`etcd/keys.py`)")
    assert not PACKAGE_PATH.search("deploy/kube/hook.py or tests/unit/test_x.py")
    assert not (ROOT / "meshxl/etcd.py").is_file()
    assert not _imports("meshxl.istio.render.role_labels")
    assert _imports("meshxl.istio.labels.role_labels")
    assert _imports("meshxl.client.Conflict")
    assert "meshxl.session.id" in _sent_names()
    assert not _named("shard", "shards (the map)")
    assert _named("shards", "etcd/: keys, shards (the map)")
