# `make run` and `make test` work on a fresh machine: each creates .venv and installs
# what it needs the first time, and again whenever pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint unit deploy protos bench bench-tools test-tools clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=25.1"
	$(BIN)/python -m pip install --quiet -e . --group dev
	touch $(STAMP)

## run: the demo - a real Envoy, the server and failing upstreams, then stay up
run: $(STAMP)
	$(BIN)/extproc demo

## test: lint, types, and every test tier (unit, in-process gRPC, real Envoy)
test: lint $(STAMP) test-tools
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## unit: the fast tiers only
unit: $(STAMP) test-tools
	$(BIN)/pytest -m "not envoy and not install"

## deploy: re-render deploy/ (Istio, Cilium, Envoy, Kubernetes) from extproc/render
deploy: $(STAMP)
	rm -rf deploy
	$(BIN)/extproc render all --output-dir deploy

## protos: rebuild protos/extproc.protoset (ext_proc, health, reflection) from the installed descriptors
protos: $(STAMP)
	$(BIN)/python protos/build_protoset.py

## bench: every configuration through a real Envoy, side by side (wrk, h2load); BENCH_ARGS=--help
bench: $(STAMP) bench-tools
	BENCH_COMMAND="make bench $(BENCH_ARGS)" $(BIN)/python -m bench $(BENCH_ARGS)

# wrk and h2load (Debian package nghttp2-client), installed with apt-get when missing.
bench-tools:
	@if ! command -v wrk >/dev/null || ! command -v h2load >/dev/null; then \
	  if ! command -v apt-get >/dev/null; then \
	    echo "make bench: wrk and h2load are missing and there is no apt-get;" \
	      "install wrk and h2load (nghttp2) with your package manager" >&2; \
	    exit 1; \
	  fi; \
	  sudo=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	  $$sudo apt-get update -qq && $$sudo apt-get install -y -qq wrk nghttp2-client; \
	fi

# promtool and the Prometheus server (Debian package prometheus) for tests/monitoring,
# installed with apt-get when missing.
test-tools:
	@if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then \
	  if ! command -v apt-get >/dev/null; then \
	    echo "make test: promtool and prometheus are missing and there is no apt-get;" \
	      "install Prometheus (server and promtool) with your package manager" >&2; \
	    exit 1; \
	  fi; \
	  sudo=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	  $$sudo apt-get update -qq && \
	    $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; \
	fi

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
