#!/usr/bin/env bash
# Prepares this machine for `make test`; the first step of `make test` (also `make setup`). Idempotent: on a fresh
# Debian 12 machine with rustup, run as root, it installs what is missing; when everything is there it only checks
# (a few seconds) and prints one line per phase.
#
#   system packages  Debian packages the build, the tests and the test bed use (apt-get, as root; not root: it says
#                    which packages to install and stops)
#   Rust toolchain   the channel, components and targets named in rust-toolchain.toml (rustup)
#   cargo-nextest    `cargo install cargo-nextest --locked`, only when `cargo nextest` is missing
#   test bed         kube-apiserver, kube-controller-manager and kubectl v1.20.2 and apiextensions-apiserver 1.36.4
#                    (built from Debian source packages: about 20 minutes cold on 2 cores) and helm 3.17.2, cached
#                    in $TESTBED_CACHE (/var/cache/distcache/testbed) by tests/testbed/build-kube.sh,
#                    build-apiextensions.sh and install-helm.sh
#   RESP clients     redis-py 5 (a Python venv, from PyPI) and ioredis 5 (an npm prefix), which the RESP client tests
#                    (tests/tests/resp_clients.rs) run, in $DISTCACHE_CLIENTS_DIR (/var/cache/distcache/clients), by
#                    tests/clients/install.sh (seconds)
#
# It leaves no service running: the nats-server and etcd-server packages register system services, which are stopped
# and disabled right after this script installs them (the tests start their own servers on free ports).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

START=$SECONDS
TESTBED_CACHE=${TESTBED_CACHE:-/var/cache/distcache/testbed}
export TESTBED_CACHE

phase() { printf '==> setup: %s\n' "$*"; }
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}
is_root() { [[ $(id -u) -eq 0 ]]; }

# --- system packages -----------------------------------------------------------------------------------------------
# PACKAGE or PACKAGE:COMMAND; the latter also counts as present when COMMAND is on PATH without the package (a
# python3 from pyenv, an npm from nvm).
#   gcc, libc6-dev, pkg-config  the linker rustc uses, and build scripts
#   make, git, shellcheck       `make test` itself, and its shellcheck step (git ls-files finds the scripts)
#   nats-server                 the NATS discovery tests start their own servers on free 127.0.0.1 ports
#   etcd-server, openssl, curl, python3  the test bed (tests/testbed/testbed.sh): etcd, its PKI, readiness polls, free
#                               ports
#   redis-tools                 redis-cli and redis-benchmark, which the RESP client tests run against the nodes
#   npm                         ioredis for those tests (tests/clients/install.sh), and helm (install-helm.sh fetches
#                               it with `npm pack`); an npm that came with Node.js (nodesource, nvm) counts
#   python3-venv                ensurepip, without which Debian's python3 makes no venv (for redis-py); only when
#                               python3 lacks it (a pyenv python has it)
#   containerd, runc, containernetworking-plugins, iptables, iproute2  the bed's real node (make e2e-real):
#                               its container runtime, pod network and kube-proxy's rules, in a network namespace
#   buildah, debootstrap        the project's images for it, built offline (tests/testbed/images.sh)
# redis-server, which only `make bench` uses, is not installed here: the package registers a system service that
# could outlive this run. redis-tools has no service.
APT_PACKAGES=(ca-certificates curl make gcc libc6-dev pkg-config git shellcheck nats-server etcd-server openssl
  python3:python3 redis-tools npm:npm containerd runc containernetworking-plugins iptables iproute2 buildah
  debootstrap)
if ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
  APT_PACKAGES+=(python3-venv)
fi

missing=()
for entry in "${APT_PACKAGES[@]}"; do
  pkg=${entry%%:*}
  cmd=${entry#*:}
  [[ $(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true) == "install ok installed" ]] && continue
  [[ $entry == *:* ]] && command -v "$cmd" >/dev/null 2>&1 && continue
  missing+=("$pkg")
done
if ((${#missing[@]} == 0)); then
  phase "system packages: all present (${APT_PACKAGES[*]%%:*})"
else
  is_root || die "missing Debian packages: ${missing[*]}; install them as root:" \
    "apt-get install --no-install-recommends ${missing[*]} (or run \`make test\` once as root)"
  phase "system packages: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
  # Debian's nats-server, etcd-server and containerd packages enable and start a system service (on machines that
  # run systemd or SysV init). This run installed them, so it stops them: nothing may outlive the tests, which need
  # no shared server (the real-node bed runs its own containerd).
  for pair in nats-server:nats-server etcd-server:etcd containerd:containerd; do
    pkg=${pair%%:*}
    service=${pair#*:}
    [[ " ${missing[*]} " == *" $pkg "* ]] || continue
    if command -v systemctl >/dev/null 2>&1 && systemctl cat "$service.service" >/dev/null 2>&1; then
      systemctl disable --now "$service.service" >/dev/null 2>&1 || true
    fi
    if command -v service >/dev/null 2>&1 && [[ -e /etc/init.d/$service ]]; then
      service "$service" stop >/dev/null 2>&1 || true
    fi
  done
fi

# --- Rust toolchain ------------------------------------------------------------------------------------------------
if ! command -v rustup >/dev/null 2>&1 && [[ -f $HOME/.cargo/env ]]; then
  # shellcheck source=/dev/null
  source "$HOME/.cargo/env"
fi
command -v rustup >/dev/null 2>&1 ||
  die "rustup not found on PATH (expected in ~/.cargo/bin): install it from https://rustup.rs and open a new shell"

# toml_list KEY: the values of `KEY = "x"` or `KEY = ["x", "y"]` in rust-toolchain.toml, separated by spaces.
toml_list() { sed -n "s/^$1[[:space:]]*=[[:space:]]*//p" rust-toolchain.toml | tr -d '[]",'; }
channel=$(toml_list channel)
read -ra components <<<"$(toml_list components)"
read -ra targets <<<"$(toml_list targets)"
[[ -n $channel ]] || die "no channel in rust-toolchain.toml"

installed=()
if rustup toolchain list | grep -q "^$channel-"; then
  # Component names end in the host triple (rustfmt-x86_64-unknown-linux-gnu), except a few (rust-src).
  have_components=$(rustup component list --installed --toolchain "$channel")
  have_targets=$(rustup target list --installed --toolchain "$channel")
  for c in "${components[@]}"; do
    grep -Eq "^$c(-|$)" <<<"$have_components" && continue
    timeout 600 rustup component add --toolchain "$channel" "$c" || die "could not add the component $c to Rust $channel"
    installed+=("$c")
  done
  for t in "${targets[@]}"; do
    grep -qx "$t" <<<"$have_targets" && continue
    timeout 600 rustup target add --toolchain "$channel" "$t" ||
      die "could not add the target $t to Rust $channel (the WebAssembly hooks are built for it)"
    installed+=("$t")
  done
else
  args=()
  for c in "${components[@]}"; do args+=(--component "$c"); done
  for t in "${targets[@]}"; do args+=(--target "$t"); done
  rustup toolchain install "$channel" --profile minimal "${args[@]}" || die "could not install Rust $channel"
  installed+=("$channel")
fi
what="Rust $channel with ${components[*]}, targets ${targets[*]}"
if ((${#installed[@]})); then
  phase "Rust toolchain: $what (installed ${installed[*]})"
else
  phase "Rust toolchain: $what present"
fi

# --- cargo-nextest -------------------------------------------------------------------------------------------------
if ! nextest=$(cargo nextest --version 2>/dev/null | head -n1); then
  phase "cargo-nextest: installing (cargo install cargo-nextest --locked)"
  cargo install cargo-nextest --locked
  nextest=$(cargo nextest --version 2>/dev/null | head -n1) || die "cargo nextest does not run after installing it"
fi
phase "cargo-nextest: $nextest"

# --- the test bed's binaries ---------------------------------------------------------------------------------------
testbed_missing=()
# build-kube.sh --node: also the kubelet, kube-proxy and kube-scheduler of the real node (make e2e-real).
for script in build-kube build-apiextensions install-helm; do
  args=()
  [[ $script == build-kube ]] && args=(--node)
  bash "tests/testbed/$script.sh" --check "${args[@]}" || testbed_missing+=("$script")
done
if ((${#testbed_missing[@]} == 0)); then
  phase "test bed: kube v1.20.2 (with the real node's), apiextensions-apiserver 1.36.4, helm 3.17.2 cached in $TESTBED_CACHE"
else
  if ! is_root && ! { mkdir -p "$TESTBED_CACHE" 2>/dev/null && [[ -w $TESTBED_CACHE ]]; }; then
    die "the test bed's binaries (${testbed_missing[*]}) are missing and $TESTBED_CACHE is not writable:" \
      "run \`make test\` (or bash scripts/setup.sh) once as root"
  fi
  phase "test bed: building or fetching ${testbed_missing[*]} into $TESTBED_CACHE (about 20 minutes cold on 2 cores)"
  for script in "${testbed_missing[@]}"; do
    args=()
    [[ $script == build-kube ]] && args=(--node)
    bash "tests/testbed/$script.sh" "${args[@]}"
  done
fi

# --- RESP client libraries ---------------------------------------------------------------------------------------
CLIENTS_DIR=${DISTCACHE_CLIENTS_DIR:-/var/cache/distcache/clients}
if bash tests/clients/install.sh --check; then
  phase "RESP clients: redis-py 5 and ioredis 5 in $CLIENTS_DIR"
else
  if ! is_root && ! { mkdir -p "$CLIENTS_DIR" 2>/dev/null && [[ -w $CLIENTS_DIR ]]; }; then
    die "the RESP test clients (redis-py, ioredis) are missing and $CLIENTS_DIR is not writable:" \
      "run \`make test\` (or bash scripts/setup.sh) once as root"
  fi
  phase "RESP clients: installing redis-py 5 (PyPI) and ioredis 5 (npm) into $CLIENTS_DIR"
  bash tests/clients/install.sh
fi

phase "done in $((SECONDS - START))s"
