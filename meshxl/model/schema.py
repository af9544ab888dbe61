"""The model's JSON Schema, generated from its one declaration.

``msgspec.json.schema`` gives the types, ranges, patterns, enumerations, defaults and
the classes' docstrings; here each field gets its own docstring as its description (the
text under it in :mod:`.spec`, :mod:`.traffic` and :mod:`.document`), and a duration
may be a number of seconds or text such as ``250ms`` (:func:`~.basics.read_duration`).
``meshxl schema`` prints it; ``docs/model.schema.json`` is it, committed, and a test
keeps the two equal. Editors (yaml-language-server) and any JSON Schema validator check
a model file with it before ``meshxl validate`` does the rest: what no schema says (a
member on a declared site, names used once, a prime Maglev table, what a protocol
refuses) and the lax forms the model also reads (``port: "8080"``, docs/model.md).
"""

from __future__ import annotations

import ast
import inspect
import json
import re
import textwrap
from typing import Any

import msgspec

from .document import ModelSpec
from .fields import DURATION_SCHEMA

__all__ = ["SCHEMA_ID", "model_schema", "schema_text"]

SCHEMA_ID = "urn:meshxl:model"
"""The schema's ``$id``: a name, not a place to fetch it from (docs/model.md says how an
editor finds the file)."""
_ROLE = re.compile(r":(?:class|data|func|attr|meth|mod):`~?\.?(?:[\w.]*\.)?(\w+)`")


def model_schema() -> dict[str, Any]:
    """The JSON Schema (2020-12) of a model file."""
    found = msgspec.json.schema(ModelSpec)
    classes = _classes(ModelSpec)
    for name, definition in found["$defs"].items():
        cls = classes.get(name)
        if "description" in definition:
            definition["description"] = _plain(definition["description"])
        documented = _field_docs(cls) if cls is not None else {}
        for field, schema in definition.get("properties", {}).items():
            if field in documented:
                schema["description"] = documented[field]
            if schema.pop("x-duration", False):
                definition["properties"][field] = _duration(schema)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID,
            "title": "meshxl cluster model", **found}


def schema_text() -> str:
    """:func:`model_schema` as the committed file holds it."""
    return json.dumps(model_schema(), indent=2, ensure_ascii=False, sort_keys=False) + "\n"


def _duration(schema: dict[str, Any]) -> dict[str, Any]:
    """A number of seconds, or its text with a unit."""
    number = {k: schema.pop(k) for k in ("type", "minimum", "exclusiveMinimum", "maximum")
              if k in schema}
    text = {"type": "string", "pattern": DURATION_SCHEMA}
    return {"anyOf": [number, text], **schema}


def _classes(root: type[msgspec.Struct]) -> dict[str, type[msgspec.Struct]]:
    out: dict[str, type[msgspec.Struct]] = {}

    def walk(tp: Any) -> None:
        if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
            if tp.__name__ in out:
                return
            out[tp.__name__] = tp
            for field in msgspec.structs.fields(tp):
                walk(field.type)
        for arg in getattr(tp, "__args__", ()) or ():
            walk(arg)
        for arg in getattr(tp, "__metadata__", ()) or ():
            walk(arg)
        origin = getattr(tp, "__origin__", None)
        if origin is not None and origin is not tp:
            walk(origin)

    walk(root)
    return out


def _field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string under it) in ``cls`` and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not (isinstance(klass, type) and issubclass(klass, msgspec.Struct)) \
                or klass is msgspec.Struct:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:], strict=False):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) \
                    and isinstance(after.value.value, str):
                docs[node.target.id] = _plain(after.value.value)
    return docs


def _plain(text: str) -> str:
    """A docstring as one paragraph of plain text (reST roles and literals dropped)."""
    text = _ROLE.sub(r"\1", inspect.cleandoc(text))
    text = text.replace("``", "`")
    return " ".join(text.split())
