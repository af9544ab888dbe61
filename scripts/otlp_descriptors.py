#!/usr/bin/env python3
"""Regenerate meshxl/telemetry/otlp_trace.binpb: the OTLP trace descriptors meshxl owns.

The OTLP receiver decodes Envoy's spans with these descriptors, in a private descriptor
pool, so it does not depend on which copy of ``opentelemetry/proto/...`` is installed
(xds-protos ships an older copy at the same paths as opentelemetry-proto). The files are
taken from an opentelemetry-proto wheel downloaded from the package index (not from
the environment, which may hold the older copy):

    python scripts/otlp_descriptors.py [VERSION]
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from google.protobuf import descriptor_pb2

DEFAULT_VERSION = "1.45.1"
# In dependency order: each file imports only the ones before it.
MODULES = (
    "opentelemetry/proto/common/v1/common_pb2.py",
    "opentelemetry/proto/resource/v1/resource_pb2.py",
    "opentelemetry/proto/trace/v1/trace_pb2.py",
    "opentelemetry/proto/collector/trace/v1/trace_service_pb2.py",
)
OUTPUT = Path(__file__).resolve().parent.parent / "meshxl" / "telemetry" / "otlp_trace.binpb"
_SERIALIZED = re.compile(r"AddSerializedFile\((b'(?:[^'\\]|\\.)*')\)")


def serialized_file(source: str) -> bytes:
    """The FileDescriptorProto bytes a generated ``_pb2.py`` registers."""
    match = _SERIALIZED.search(source)
    if match is None:
        raise SystemExit("no AddSerializedFile(...) in a generated module")
    value = ast.literal_eval(match.group(1))
    assert isinstance(value, bytes)
    return value


def main(version: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "--only-binary=:all:", "-d", tmp, f"opentelemetry-proto=={version}"],
                       check=True)
        wheel = next(Path(tmp).glob("opentelemetry_proto-*.whl"))
        files = descriptor_pb2.FileDescriptorSet()
        with zipfile.ZipFile(wheel) as archive:
            for module in MODULES:
                proto = files.file.add()
                proto.ParseFromString(serialized_file(archive.read(module).decode()))
    OUTPUT.write_bytes(files.SerializeToString(deterministic=True))
    print(f"{OUTPUT}: {', '.join(f.name for f in files.file)} "
          f"(opentelemetry-proto {version})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_VERSION)
