# DistCache developer entry points.
#
#   make test        everything CI checks: fmt check, clippy (-D warnings), debug build of the binaries (the
#                    integration tests spawn them from the same target dir), nextest (profile `ci`), doc tests
#   make build       release binaries distcache-node and distcache in ${CARGO_TARGET_DIR:-target}/release
#   make demo        build, then start a 3-node local cluster (examples/local-cluster), run a scripted CLI session,
#                    keep it up until Ctrl-C (DEMO_ARGS=--no-wait: stop right after the session)
#   make bench       build, then benchmark a 1-node DistCache against Redis side by side (needs redis-server and
#                    redis-tools; BENCH_SECONDS=10); raw numbers in ${CARGO_TARGET_DIR:-target}/bench/results.json
#   make fmt         format the workspace
#   make fmt-check   check formatting only
#   make clippy      lint the workspace, warnings are errors
#   make clean-demo  remove demo/bench temp dirs (and stop processes a SIGKILLed demo left behind, by recorded PID)
#   make help        this text
#
# CI runs .ci/run, which installs the prerequisites and then runs `make test`.

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

CARGO ?= cargo
# nextest profile for `make test`; see .config/nextest.toml.
NEXTEST_PROFILE ?= ci
# Extra arguments for cargo nextest run, e.g. NEXTEST_ARGS='-E test(ring)'.
NEXTEST_ARGS ?=
# Arguments for scripts/demo.sh, e.g. DEMO_ARGS=--no-wait.
DEMO_ARGS ?=
RELEASE_PACKAGES := -p distcache-node -p distcache-client

.PHONY: help test fmt fmt-check clippy build-debug nextest doctest build demo bench clean-demo

help:
	@sed -n '/^# DistCache/,/^# CI runs/{s/^# \{0,1\}//;p}' $(firstword $(MAKEFILE_LIST))

# One step after the other, in this order, even under `make -j`.
test:
	$(MAKE) fmt-check
	$(MAKE) clippy
	$(MAKE) build-debug
	$(MAKE) nextest
	$(MAKE) doctest

fmt:
	$(CARGO) fmt --all

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# The integration tests run the real binaries, so build them (debug, same target dir) before the tests.
build-debug:
	$(CARGO) build --workspace --bins

nextest:
	$(CARGO) nextest run --workspace --no-fail-fast --profile $(NEXTEST_PROFILE) $(NEXTEST_ARGS)

doctest:
	$(CARGO) test --workspace --doc

build:
	$(CARGO) build --release $(RELEASE_PACKAGES)

demo: build
	bash scripts/demo.sh $(DEMO_ARGS)

bench: build
	bash scripts/bench.sh

clean-demo:
	bash scripts/clean-demo.sh
