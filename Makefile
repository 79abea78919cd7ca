# flatcar-overlaybd. `make` builds the sysext image; `make test` runs every test tier.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: all deps venv protos test test-fast lint bench smoke clean bundle sysext sysext-level butane

all: sysext

# The sysext: target Flatcar release (lockstep: the image merges only on this VERSION_ID; current Stable
# per shared/spec/flatcar.md) and architecture of this host. build.sh itself requires the version.
FLATCAR_VERSION ?= 4593.2.5
SYSEXT_ARCH ?= $(subst x86_64,x86-64,$(subst aarch64,arm64,$(shell uname -m)))
SYSEXT_FORMAT ?= erofs
BUILD_ARGS ?=
# RSA private key (PEM) that signs the update payload; empty: build.sh makes a throwaway dev key in out/
# (out/dev-payload-key.pem, reused by later builds) and says so.
PAYLOAD_KEY ?=
# The sysupdate route (make sysext-level): image version and the base URL the images are published at.
SYSEXT_VERSION ?=
SYSUPDATE_URL ?=

# Frozen onedir bundle only (= the /usr/local/overlaybd tree) -> out/bundle/.
bundle: deps venv
	./build.sh --bundle-only

# The lockstep image and its release artifacts -> out/flatcar-overlaybd.raw (+ .sha256), the signed update
# payload out/flatcar_test_update-flatcar-overlaybd.gz (+ out/update-payload-key.pub.pem) and the listings
# out/flatcar-overlaybd_{contents,contents_wtd,disk_usage}.txt.
sysext: deps venv
	./build.sh --flatcar-version $(FLATCAR_VERSION) --arch $(SYSEXT_ARCH) --format $(SYSEXT_FORMAT) \
		$(if $(PAYLOAD_KEY),--payload-key $(PAYLOAD_KEY)) $(BUILD_ARGS)

# The sysupdate route: ID=flatcar + SYSEXT_LEVEL=1.0 image out/overlaybd_<version>_<arch>.raw, out/SHA256SUMS,
# out/overlaybd.transfer. FLATCAR_VERSION is the oldest release it must run on (glibc check).
sysext-level: deps venv
	./build.sh --sysext-level --flatcar-version $(FLATCAR_VERSION) --arch $(SYSEXT_ARCH) --format $(SYSEXT_FORMAT) \
		$(if $(SYSEXT_VERSION),--sysext-version $(SYSEXT_VERSION)) $(if $(SYSUPDATE_URL),--sysupdate-url $(SYSUPDATE_URL)) \
		$(BUILD_ARGS)

# Example Butane config (variant flatcar) -> out/overlaybd.bu; set variables with BUTANE_VARS="--var k=v ...".
BUTANE_VARS ?=
butane: venv
	mkdir -p out && $(VENV)/bin/overlaybd-butane $(BUTANE_VARS) -o out/overlaybd.bu && echo "out/overlaybd.bu"

# The Python tools only: no Debian packages are installed (test-fast and lint need no more).
venv: $(VENV)/.installed protos

# Debian packages the build and tests need (.ci/apt-packages.txt); installs only what is missing.
deps:
	.ci/install-deps

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

# Every tier; installs the Debian packages the tiers start (registry, containerd, qemu, ...). One tier:
# make test PYTEST_ARGS="-m registry" (or a path: PYTEST_ARGS=tests/format).
test: deps venv
	$(VPY) -m pytest $(PYTEST_ARGS)

# The tiers that start nothing and need neither root nor Debian packages (unit tests of every package).
FAST_MARKERS := not (registry or containerd or sysext or vm or flatcar or slow or root)
test-fast: venv
	$(VPY) -m pytest -m "$(FAST_MARKERS)" $(PYTEST_ARGS)

LINT_PATHS := python tests bench sysext
lint: venv
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/mypy --config-file python/pyproject.toml python/overlaybd

bench: deps venv
	$(VPY) bench/format.py
	$(VPY) bench/registry.py

clean:
	rm -rf $(VENV) build out
