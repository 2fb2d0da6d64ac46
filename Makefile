# DistCache developer entry points. On a fresh Debian 12 machine with rustup: `make demo`, then `make test` (as root
# the first time, so that `make setup` can install what is missing).
#
#   make test        everything CI checks, one step after the other: make setup, make shellcheck, fmt check, clippy
#                    (-D warnings), debug build of the binaries (the integration tests spawn them from the same target
#                    dir), CRD drift check, helm lint/template, the WebAssembly hooks (hooks/, for wasm32-wasip2) and
#                    their unit tests, nextest (profile `ci`, with the Kubernetes test bed up), doc tests, and last the
#                    operator end to end on the bed's real node (make e2e-real)
#   make setup       scripts/setup.sh, idempotent (seconds when all is there): Debian packages (apt-get as root; else
#                    it says what to install), the Rust toolchain's components and target (rust-toolchain.toml),
#                    cargo-nextest, the test bed's binaries and helm (built or fetched once, about 20 minutes on 2
#                    cores, cached in /var/cache/distcache/testbed), the RESP test clients redis-py and ioredis
#                    (/var/cache/distcache/clients)
#   make shellcheck  shellcheck every shell script git knows (*.sh, .ci/run; scripts/shellcheck.sh)
#   make testbed-up  start the Kubernetes test bed (etcd, kube-apiserver and kube-controller-manager v1.20.2, the test
#                    kubelet; binaries built once and cached in /var/cache/distcache/testbed), write
#                    target/testbed/kubeconfig; make testbed-down stops it (tests/testbed/README.md)
#   make testbed-crd-up  also an apiextensions-apiserver 1.36.4 (CEL validation) beside the bed; kubeconfig-crd
#   make testbed-up KUBELET=real  the bed with a real node instead: containerd, kubelet, kube-scheduler and
#                    kube-proxy v1.20.2 and a cluster DNS, in the network namespace distcache-bed
#   make e2e-real    the operator end to end on that real node with the project's images (tests/tests/real_node.rs):
#                    images with the workspace's binaries copied in (E2E_IMAGES=dockerfiles: built by the
#                    Dockerfiles instead), bed up, helm install ... uninstall, bed down (root: a network namespace)
#   make images      buildah bud of docker/*.Dockerfile as they are, offline bases built from Debian packages
#                    (tests/testbed/images.sh; IMAGE_TAG=dev), each build timed
#   make testbed-real-check  that bed up, a scheduled pod as 65532 on a read-only root, the kubernetes Service's
#                    ClusterIP from the host, down, the host left unchanged
#   make hooks       build the hooks workspace (SDK, example and test hooks) into
#                    ${CARGO_TARGET_DIR:-target}/hooks/wasm32-wasip2/release/*.wasm
#   make build       release binaries distcache-node and distcache in ${CARGO_TARGET_DIR:-target}/release
#   make demo        build (binaries and hooks), then start an origin (examples/data) and a 3-node local cluster
#                    (examples/local-cluster), run a scripted CLI session (read-through, then cache-aside), keep it up
#                    until Ctrl-C (DEMO_ARGS=--no-wait: stop right after the session)
#   make bench       build (binaries and hooks), then benchmark a 1-node DistCache against Redis side by side: hits
#                    (Get/GetMany vs GET), the miss path (hook loads vs SET), the RESP front end (one redis-benchmark
#                    against both) and memory per cached entry (needs redis-server and redis-tools;
#                    BENCH_SECONDS=10); raw numbers in ${CARGO_TARGET_DIR:-target}/bench/results.json; then the cost a
#                    hook adds to one fetch, pooled vs fresh instance (cargo bench -p distcache-node --bench hooks)
#   make generate    regenerate crds/distcache.yaml and the chart's copy from the Rust types (make verify: check only)
#   make chart-check helm lint --strict and helm template of charts/distcache
#   make fmt         format the workspace
#   make fmt-check   check formatting only
#   make clippy      lint the workspace, warnings are errors
#   make clean-demo  remove demo/bench temp dirs (and stop processes a SIGKILLed demo left behind, by recorded PID)
#   make help        this text
#
# CI runs .ci/run: `make test` with the target dir in /var/cache/distcache/target (a warm cache between runs).

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
RELEASE_PACKAGES := -p distcache-node -p distcache-client -p distcache-tests
# The hooks workspace (hooks/Cargo.toml) builds into its own target dir; the tests find the .wasm files there.
HOOKS_TARGET := $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)/hooks
# As an environment variable: it must override a CARGO_TARGET_DIR of the caller (CI sets one), which `--config` does not.
HOOKS_CARGO := CARGO_TARGET_DIR=$(HOOKS_TARGET) $(CARGO)
HOOKS_MANIFEST := --manifest-path hooks/Cargo.toml

.PHONY: help test setup shellcheck fmt fmt-check clippy build-debug hooks wasm-target hooks-test nextest doctest build \
	demo bench clean-demo generate verify chart-check \
	testbed-up testbed-down testbed-crd-up testbed-crd-down testbed-real-check e2e-real images

help:
	@sed -n '/^# DistCache/,/^# CI runs/{s/^# \{0,1\}//;p}' $(firstword $(MAKEFILE_LIST))

# One step after the other, in this order, even under `make -j`.
test:
	$(MAKE) setup
	$(MAKE) shellcheck
	$(MAKE) fmt-check
	$(MAKE) clippy
	$(MAKE) build-debug
	$(MAKE) verify
	$(MAKE) chart-check
	$(MAKE) hooks
	$(MAKE) hooks-test
	$(MAKE) nextest
	$(MAKE) doctest
	$(MAKE) e2e-real

# Installs or checks what `make test` needs (scripts/setup.sh says what, phase by phase).
setup:
	bash scripts/setup.sh

shellcheck:
	bash scripts/shellcheck.sh

fmt:
	$(CARGO) fmt --all
	$(CARGO) fmt --all $(HOOKS_MANIFEST)

fmt-check:
	$(CARGO) fmt --all -- --check
	$(CARGO) fmt --all $(HOOKS_MANIFEST) -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(HOOKS_CARGO) clippy --release --target wasm32-wasip2 $(HOOKS_MANIFEST) -- -D warnings

# Guest code, compiled to WebAssembly components from source (the tests never use checked-in binaries).
hooks: wasm-target
	$(HOOKS_CARGO) build --release --target wasm32-wasip2 $(HOOKS_MANIFEST)

# rustup adds the targets of rust-toolchain.toml when it installs the toolchain, not to a toolchain that was
# there before: add wasm32-wasip2 when it is missing, so `make demo` works as a first command (nothing to do, and
# no network, when it is present; without rustup, cargo reports what is missing).
wasm-target:
	@if command -v rustup >/dev/null 2>&1 && ! rustup target list --installed | grep -x wasm32-wasip2 >/dev/null; then \
	  rustup target add wasm32-wasip2; fi

# Unit tests of the SDK and the example hook's pure logic, on the host.
hooks-test:
	$(HOOKS_CARGO) test $(HOOKS_MANIFEST)

# The integration tests run the real binaries, so build them (debug, same target dir) before the tests.
build-debug:
	$(CARGO) build --workspace --bins

# The tests run with the Kubernetes test bed up; it is stopped afterwards whatever the outcome.
nextest:
	bash tests/testbed/testbed.sh up
	status=0; $(CARGO) nextest run --workspace --no-fail-fast --profile $(NEXTEST_PROFILE) $(NEXTEST_ARGS) || status=$$?; \
	bash tests/testbed/testbed.sh down; exit $$status

testbed-up:
	$(CARGO) build -p distcache-node -p distcache-operator -p distcache-tests --bins
	bash tests/testbed/testbed.sh up

testbed-down:
	bash tests/testbed/testbed.sh down

# The apiextensions-apiserver 1.36.4 (CEL rules) beside a running bed; `testbed-up` starts it too.
# The bed with a real node (containerd, kubelet) in its own network namespace: up, a pod, down, host unchanged.
testbed-real-check:
	bash tests/testbed/real-node-check.sh

# The operator end to end on the real node. The images: the runtime stage of docker/*.Dockerfile with the debug
# binaries just built copied in (prebuilt), or E2E_IMAGES=dockerfiles for the Dockerfiles' own cargo build. The
# bed is taken down afterwards whatever the outcome, also when it failed to come up half-way.
E2E_IMAGES ?= prebuilt
E2E_IMAGE_TAG ?= e2e
TARGET_DIR := $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)
e2e-real: build-debug hooks
	@if [[ "$(E2E_IMAGES)" == dockerfiles ]]; then bash tests/testbed/images.sh dockerfiles $(E2E_IMAGE_TAG); \
	else bash tests/testbed/images.sh prebuilt $(E2E_IMAGE_TAG) $(TARGET_DIR)/debug; fi
	status=0; KUBELET=real bash tests/testbed/testbed.sh up && bash tests/testbed/images.sh import $(E2E_IMAGE_TAG) && \
	  DISTCACHE_E2E_IMAGE_TAG=$(E2E_IMAGE_TAG) $(CARGO) nextest run --profile $(NEXTEST_PROFILE) -p distcache-tests \
	  --test real_node --run-ignored only --no-capture || status=$$?; \
	bash tests/testbed/testbed.sh down; exit $$status

IMAGE_TAG ?= dev
images:
	bash tests/testbed/images.sh dockerfiles $(IMAGE_TAG)

testbed-crd-up:
	bash tests/testbed/build-apiextensions.sh
	bash tests/testbed/testbed.sh crd-up

testbed-crd-down:
	bash tests/testbed/testbed.sh crd-down

# Generated files: the CRD (from the Rust types, `distcache-operator crd`) and its copy in the Helm chart.
# `make generate` rewrites them; `make verify` (part of `make test`) fails when they differ from the types.
# Each: file, then the `distcache-operator crd` arguments (without CEL rules: for Kubernetes before 1.25).
CRD_FILES := crds/distcache.yaml: charts/distcache/files/crd.yaml: \
	crds/distcache-without-cel.yaml:--without-cel-rules charts/distcache/files/crd-without-cel.yaml:--without-cel-rules
GENERATED := $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)/crd.generated.yaml
OPERATOR_BIN := $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)/debug/distcache-operator
HELM ?= $(or $(wildcard /var/cache/distcache/testbed/helm-v3.17.2/helm),helm)

generate:
	$(CARGO) build -p distcache-operator --bin distcache-operator
	for spec in $(CRD_FILES); do $(OPERATOR_BIN) crd $${spec#*:} > $${spec%%:*}; done

verify:
	$(CARGO) build -p distcache-operator --bin distcache-operator
	for spec in $(CRD_FILES); do f=$${spec%%:*}; $(OPERATOR_BIN) crd $${spec#*:} > $(GENERATED); \
	  diff -u $$f $(GENERATED) >/dev/null || { diff -u $$f $(GENERATED) | head -40; \
	    echo "$$f is out of date with the Rust types: run make generate and commit it" >&2; exit 1; }; \
	done

# The Helm chart: lint (strict) and render with the defaults and with the test bed's values.
chart-check:
	$(HELM) lint --strict charts/distcache
	$(HELM) template distcache charts/distcache >/dev/null
	$(HELM) template distcache charts/distcache --namespace distcache-system \
	  --set operator.image.repository=example.invalid/distcache-operator,operator.image.tag=test \
	  --set node.image.repository=example.invalid/distcache-node,node.image.tag=test,watchNamespace=apps \
	  --set tracing.otlpEndpoint=http://otel-collector.monitoring:4317,tracing.sampleRatio=0.5 >/dev/null
	$(HELM) template distcache charts/distcache --api-versions monitoring.coreos.com/v1 \
	  --set monitoring.podMonitor.enabled=true,monitoring.serviceMonitor.enabled=true \
	  --set monitoring.prometheusRule.enabled=true >/dev/null

doctest:
	$(CARGO) test --workspace --doc

build:
	$(CARGO) build --release $(RELEASE_PACKAGES)

demo: build hooks
	bash scripts/demo.sh $(DEMO_ARGS)

bench: build hooks
	bash scripts/bench.sh
	$(CARGO) bench -p distcache-node --bench hooks

clean-demo:
	bash scripts/clean-demo.sh
