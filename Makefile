# `make run` and `make test` work on a fresh machine: each creates .venv and installs
# what it needs the first time, and again whenever pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint unit deploy clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=25.1"
	$(BIN)/python -m pip install --quiet -e . --group dev
	touch $(STAMP)

## run: the demo - a real Envoy, the server and failing upstreams, then stay up
run: $(STAMP)
	$(BIN)/extproc demo

## test: lint, types, and every test tier (unit, in-process gRPC, real Envoy)
test: lint $(STAMP)
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## unit: the fast tiers only
unit: $(STAMP)
	$(BIN)/pytest -m "not envoy and not install"

## deploy: re-render deploy/ (Istio, Cilium, Envoy, Kubernetes) from extproc/render
deploy: $(STAMP)
	rm -rf deploy
	$(BIN)/extproc render all --output-dir deploy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
