# `make run` and `make test` work on a fresh machine: each creates .venv and installs
# what it needs the first time, and again whenever pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint unit docs dist deploy protos bench bench-tools test-tools clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=25.1"
	$(BIN)/python -m pip install --quiet -e . --group dev
	touch $(STAMP)

## run: the demo - a real Envoy, the server and failing upstreams, then stay up
run: $(STAMP)
	$(BIN)/extproc demo

## test: lint, types, and every test tier (unit, the docs site --strict, in-process gRPC, real Envoy)
test: lint $(STAMP) test-tools
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## unit: the fast tiers only
unit: $(STAMP) test-tools
	$(BIN)/pytest -m "not envoy and not install"

## docs: the documentation site (mkdocs.yml, docs/) into site/; --strict: a broken link or
#  a missing page fails (tests/docs/ runs the same build in `make test`)
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

## dist: the sdist and the wheel into dist/, as PyPA's build makes them
dist: $(STAMP)
	rm -rf dist
	$(BIN)/python -m build --outdir dist

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

# $(call apt_tools,WHO,COMMANDS,PACKAGES): install the Debian PACKAGES with apt-get when one
# of COMMANDS is missing (with sudo when not root); without apt-get, say what to install.
define apt_tools
	@missing=; for c in $(2); do command -v $$c >/dev/null || missing=1; done; \
	if [ -n "$$missing" ]; then \
	  if ! command -v apt-get >/dev/null; then \
	    echo "make $(1): one of $(2) is missing and there is no apt-get;" \
	      "install $(3) with your package manager" >&2; \
	    exit 1; \
	  fi; \
	  sudo=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	  $$sudo apt-get update -qq && \
	    $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(3); \
	fi
endef

# wrk and h2load (Debian package nghttp2-client) for `make bench`.
bench-tools:
	$(call apt_tools,bench,wrk h2load,wrk nghttp2-client)

# promtool and the Prometheus server (Debian package prometheus) for tests/monitoring;
# Debian's chromium for the live page's browser tests (tests/page/test_browser.py).
test-tools:
	$(call apt_tools,test,promtool prometheus,prometheus)
	$(call apt_tools,test,chromium,chromium)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis site dist
