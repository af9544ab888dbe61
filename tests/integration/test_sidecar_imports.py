"""What the statesync sidecar's entry loads: ``meshxl serve statesync`` runs in every pod,
so nothing it does not use may come with it (``docs/performance.md``, "Sidecar
footprint"). A fresh interpreter goes the sidecar's way (the ``meshxl`` command's entry
reading the options, the sidecar's modules, its metrics, its model reader, tracing set
up without anywhere to send spans) and lists what it imported. The running process is
checked the same way in ``tests/integration/test_sidecar_footprint.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from meshxl.statesync.http.server import http_date

# Never on the sidecar's path: the other HTTP stack, the CLI's parser and tables,
# pydantic, the metrics and tracing libraries (tracing off), and other parts. The model
# (meshxl.model.spec, .load) is the one declaration every part reads: on msgspec.
FORBIDDEN = (
    "aiohttp", "multidict", "yarl", "click", "rich", "pydantic", "pydantic_core", "jsonpatch",
    "prometheus_client", "opentelemetry", "email", "importlib.metadata", "hmac",
    "importlib.resources", "hashlib", "encodings.idna", "random", "statistics", "yaml",
    "meshxl.model.schema", "meshxl.xds", "meshxl.kube", "meshxl.istio",
    "meshxl.operator", "meshxl.local", "meshxl.demo", "meshxl.ui", "meshxl.client",
    "meshxl.proxy", "meshxl.web", "meshxl.telemetry.http", "meshxl.telemetry.spans",
    "meshxl.cli.kube", "meshxl.cli.views", "meshxl.cli.model", "meshxl.cli.root",
    "meshxl.cli.options", "meshxl.cli.serve", "meshxl.statesync.resharding",
    # Features, loaded when used (tests/unit/test_sidecar_lean_imports.py reads the source).
    "meshxl.statesync.hosting", "meshxl.statesync.pool_liveness", "meshxl.statesync.shards",
    "meshxl.etcd.moving", "meshxl.model.vsls", "meshxl.model.placement",
    "meshxl.model.sticky", "meshxl.model.pool_roles", "meshxl.statesync.transactions",
    "meshxl.statesync.mergepatch", "json_merge_patch", "meshxl.statesync.planned",
    "meshxl.etcd.auth", "meshxl.etcd.balanced", "meshxl.etcd.roles", "shlex",
    "meshxl.statesync.dapr",
)

ENTRY = """
import json, sys
from meshxl.cli import entry, serving
values = entry.statesync_values(["--cluster", "c", "--member", "a", "--app", "h:1"], {})
assert values is not None
serving.etcd_security_from(values["etcd_security"])
from meshxl.loops import loop_factory
from meshxl.model.load import parse_unexpanded
from meshxl.model.text import ModelForm
from meshxl.statesync import app
from meshxl.statesync.metrics import StatesyncMetrics
from meshxl.statesync.starting import Waiting
from meshxl.telemetry.tracing import enabled, setup_tracing

loop_factory()
assert setup_tracing("statesync") is None and not enabled()
metrics = StatesyncMetrics()
Waiting("http://127.0.0.1:2379", metrics).router()
metrics.render()
parse_unexpanded(ModelForm({"clusters": [{"name": "c", "membership": "registered"}]}))
print(json.dumps(sorted(sys.modules)))
"""


def loaded(script: str) -> set[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, check=True, env=env)
    return set(json.loads(out.stdout.splitlines()[-1]))


def forbidden_in(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN))


def test_the_sidecars_entry_imports_nothing_it_does_not_use() -> None:
    modules = loaded(ENTRY)
    assert "meshxl.statesync.app" in modules and "meshxl.cli.entry" in modules
    assert "meshxl.model.spec" in modules and "msgspec" in modules
    assert forbidden_in(modules) == []


def test_the_check_sees_an_import_coming_back() -> None:
    """The same check on an entry that imports the control plane's compiler fails."""
    modules = loaded(ENTRY.replace("print(", "import meshxl.xds.compiler\nprint("))
    assert "meshxl.xds.compiler" in forbidden_in(modules)


def test_the_date_header_is_imf_fixdate() -> None:
    from email.utils import formatdate

    now = time.time()
    for t in (0.0, 784111777.0, 951782400.0, 4102444799.0, now, now + 86400 * 45.5):
        assert http_date(t) == formatdate(t, usegmt=True).encode()
