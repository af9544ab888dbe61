"""`make image` (the container image the Kubernetes overlays run), as make expands it.

No Docker engine is needed: `make -n` prints the command it would run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from meshxl.kube.config import DEFAULT_IMAGE

ROOT = Path(__file__).resolve().parents[2]


def _make_n(*args: str) -> str:
    make = shutil.which("make")
    assert make, "make is not installed"
    # Run by `make test`, this make is a sub-make: without the outer one's variables it
    # prints no "Entering directory" lines and takes no IMAGE or DOCKER from outside.
    env = {k: v for k, v in os.environ.items()
           if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "IMAGE", "DOCKER")}
    done = subprocess.run([make, "--no-print-directory", "-n", "image", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=30, check=False, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_make_image_tags_what_the_overlays_run() -> None:
    assert _make_n() == f"docker build -t {DEFAULT_IMAGE} ."


def test_make_image_takes_another_tag_and_builder() -> None:
    assert _make_n("IMAGE=registry.example.com/meshxl:9.9", "DOCKER=podman") == \
        "podman build -t registry.example.com/meshxl:9.9 ."
