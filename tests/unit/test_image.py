"""The container image: what `make image` builds is what the overlays run.

Pure reading of the Makefile, the Dockerfile and deploy/: `make -n image` itself is
run in tests/integration/test_image.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from meshxl import __version__
from meshxl.kube.config import DEFAULT_IMAGE

ROOT = Path(__file__).resolve().parents[2]


def test_the_manifests_run_the_image_make_image_builds() -> None:
    name, _, tag = DEFAULT_IMAGE.partition(":")
    assert tag == __version__
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^IMAGE \?= meshxl/meshxl:\$\(VERSION\)$", makefile, re.M), \
        "make image's default tag is not the package's version"
    assert re.search(r"^image:\n\t\$\(DOCKER\) build -t \$\(IMAGE\) \.$", makefile, re.M)
    refs = 0
    for path in sorted((ROOT / "deploy").rglob("*.yaml")):
        for image in re.findall(r"\bimage: (meshxl/meshxl\S*)", path.read_text()):
            refs += 1
            assert image == DEFAULT_IMAGE, f"{path.relative_to(ROOT)}: {image}"
    assert refs >= 3
    for kustomization in sorted((ROOT / "deploy" / "kubernetes" / "overlays")
                                .glob("*/kustomization.yaml")):
        for entry in yaml.safe_load(kustomization.read_text()).get("images") or []:
            if entry["name"] == name:
                assert str(entry["newTag"]) == __version__, kustomization


def test_the_dockerfile_copies_files_that_exist() -> None:
    """A COPY of a missing path fails the build only where Docker runs; catch it here."""
    copies = 0
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if not line.startswith("COPY ") or "--from=" in line:
            continue
        *sources, _target = line.split()[1:]
        for source in sources:
            copies += 1
            assert (ROOT / source).exists(), f"Dockerfile: COPY {source}: no such path"
    assert copies >= 3
