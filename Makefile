# flatcar-overlaybd. `make` builds the sysext image; `make test` runs every test tier.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: all venv protos test test-fast lint bench smoke clean

all: smoke

venv: $(VENV)/.installed protos

protos: $(VENV)/.installed
	$(VPY) python/gen_protos.py

$(VENV)/.installed: python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e 'python[dev]'
	touch $@

# Smoke: convert the sample layer to a ZFile and back, and print the image digest.
smoke: venv
	@tmp=$$(mktemp -d) && trap 'rm -rf $$tmp' EXIT && \
	$(VENV)/bin/overlaybd-create $$tmp/d $$tmp/i 64MiB && \
	$(VENV)/bin/overlaybd-commit $$tmp/d $$tmp/i $$tmp/c -z && \
	$(VENV)/bin/overlaybd-info $$tmp/c && echo "smoke OK"

test: venv
	$(VPY) -m pytest $(PYTEST_ARGS)

test-fast: venv
	$(VPY) -m pytest -m "not registry and not containerd and not sysext and not vm and not slow" $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check python tests bench

bench: venv
	$(VPY) bench/format.py

clean:
	rm -rf $(VENV) build out
