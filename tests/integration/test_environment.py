"""meshxl works whichever copy of opentelemetry/proto the installer left on disk.

xds-protos carries an older copy of the OpenTelemetry protos at the same paths as
opentelemetry-proto. meshxl's OTLP receiver and exporters use descriptors of their own
(meshxl/telemetry/otlp.py) and never import those modules; Envoy's generated modules
import them and must work with either copy. tests/integration/test_wheel.py checks a
plain pip install of the wheel end to end.
"""

from __future__ import annotations

import subprocess
import sys


def test_meshxl_telemetry_never_imports_the_contested_opentelemetry_modules() -> None:
    code = (
        "import sys\n"
        "import meshxl.cli, meshxl.telemetry.receiver, meshxl.telemetry.export\n"
        "import meshxl.telemetry.tracing, meshxl.telemetry.slo, meshxl.stats\n"
        "import meshxl.local.traffic, meshxl.local.report, meshxl.local.plot\n"
        "import meshxl.demo.failover  # the `meshxl demo` flow\n"
        "print(sorted(m for m in sys.modules if m.startswith(('opentelemetry.proto.trace',"
        " 'opentelemetry.proto.collector', 'opentelemetry.exporter.otlp.proto'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stdout


def test_envoy_protos_import_with_the_installed_opentelemetry_protos() -> None:
    from envoy.config.trace.v3 import opentelemetry_pb2
    from envoy.extensions.access_loggers.open_telemetry.v3 import logs_service_pb2

    assert opentelemetry_pb2.OpenTelemetryConfig.DESCRIPTOR.full_name
    assert logs_service_pb2.OpenTelemetryAccessLogConfig.DESCRIPTOR.fields_by_name["body"]
