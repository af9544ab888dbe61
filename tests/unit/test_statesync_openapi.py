"""The statesync API's OpenAPI document: it describes exactly the routes the app serves
(so the two cannot drift), is a valid OpenAPI 3.1 document, ships in the package, and
the copy in docs/ is the same."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import schemathesis

from meshxl.statesync.api import SessionRoutes, openapi_document
from meshxl.statesync.cluster_routes import add_cluster_routes, hosted_router

ROOT = Path(__file__).resolve().parents[2]
METHODS = {"get", "put", "patch", "delete", "post", "head", "options"}


def test_document_routes_are_the_app_routes() -> None:
    """A single-cluster sidecar's routes (its cluster's under /v1/clusters/{cluster}
    too), which are the paths a sidecar hosting several clusters serves."""
    own = SessionRoutes(sidecar=None)
    router = own.router(max_bytes=1024)
    add_cluster_routes(router, lambda name: own, lambda: ["shop"])
    served = {(route.method.lower(), route.pattern) for route in router.routes()}
    hosted = hosted_router(None, lambda name: None)
    assert {(r.method.lower(), r.pattern) for r in hosted.routes()} == served
    document = openapi_document()
    described = {(method, path) for path, item in document["paths"].items()
                 for method in item if method in METHODS}
    assert described == served


def test_document_is_valid_openapi_3_1() -> None:
    document = openapi_document()
    assert document["openapi"].startswith("3.1")
    schema = schemathesis.openapi.from_dict(document)
    operations = [op for op in schema.get_all_operations()]
    assert len(operations) == sum(1 for item in document["paths"].values()
                                  for method in item if method in METHODS)
    for result in operations:
        result.ok()  # raises if an operation cannot be built from the document


def test_document_ships_in_the_package_and_in_docs() -> None:
    shipped = ROOT / "meshxl" / "statesync" / "openapi.json"
    assert json.loads((ROOT / "docs" / "statesync-openapi.json").read_text()) == \
        json.loads(shipped.read_text())
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "openapi.json" in pyproject["tool"]["setuptools"]["package-data"]["meshxl.statesync"]
