"""``bench/sidecar_memory.py``'s own process and the page cache: what it maps of an
extension module a sidecar loads before ``footprint.measure`` drops the cached pages
stays cached as it came, and grpcio's, as pip leaves it, showed 2.3 MiB more in every
process measured after it (docs/performance.md, "The page cache"). So importing the
benchmark loads none of them; they load once the pages are dropped."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"

SIDECARS_EXTENSIONS = ("grpc", "google._upb", "httptools", "orjson", "msgspec", "uvloop")
"""The packages whose extension modules a sidecar maps."""

SCRIPT = f"""
import json, sys
sys.path.insert(0, {str(BENCH)!r})
import footprint, sidecar_memory
print(json.dumps(sorted(sys.modules)))
"""


def _sidecars(modules: list[str]) -> list[str]:
    return [m for m in modules
            if any(m == p or m.startswith(p + ".") for p in SIDECARS_EXTENSIONS)]


def test_importing_the_benchmark_maps_no_extension_a_sidecar_maps() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert _sidecars(json.loads(out.splitlines()[-1])) == []


def test_the_check_sees_them() -> None:
    assert _sidecars(["grpc", "grpc._cython.cygrpc", "google._upb._message", "orjson",
                      "grpcio_tools", "json"]) == [
        "grpc", "grpc._cython.cygrpc", "google._upb._message", "orjson"]


def test_held_elsewhere_names_another_process_mapping_an_extension() -> None:
    sys.path.insert(0, str(BENCH))
    import _json

    import footprint

    ext = Path(_json.__file__)
    other = subprocess.Popen([sys.executable, "-c", "import _json, sys; print(1, flush=True);"
                              " sys.stdin.read()"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "1"
        held = footprint.held_elsewhere([ext])
        assert other.pid in held[str(ext).rpartition("site-packages/")[2]]
        assert footprint.mapped([ext]) == {ext}
    finally:
        other.kill()
        other.wait(timeout=10)
