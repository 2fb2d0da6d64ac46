#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager and kubectl v1.20.2 from Debian bookworm's source package and caches them
# outside the checkout, keyed by version:
#
#   $TESTBED_CACHE/kubernetes-v1.20.2/bin/{kube-apiserver,kube-controller-manager,kubectl}
#
# `build-kube.sh --node` also builds what a real node runs, for the bed's real-node mode: kubelet, kube-proxy and
# kube-scheduler, into the same directory (about 6 minutes more on 2 cores), and `pause`, the pod sandbox's process,
# from the same tree's build/pause/linux/pause.c (gcc, static; no registry serves the pause image here).
#
# A second run finds them and does nothing; `build-kube.sh --check [--node]` only says whether they are there (exit
# status 0 or 1, no output). Needs root for apt (golang-1.19-go, rsync, the patched reflect2, etcd).
# The source is fetched with a private apt configuration under $TESTBED_CACHE/apt (its own sources list with a
# deb-src entry, its own package lists); the machine's apt sources are never changed.
#
# Why a source build: there is no Docker, kind, k3s or envtest here, but Debian carries the full Kubernetes tree
# (with vendor/) as the orig tarball of `kubernetes 1.20.5+really1.20.2-1.1+deb12u1`. Two fixes make it build:
# vendor/github.com/modern-go/reflect2 1.0.1 crashes on Go >= 1.18 and is replaced by Debian's patched copy, and
# `make WHAT=...` is used instead of `go build` because it generates pkg/generated/openapi first.
set -euo pipefail

VERSION=v1.20.2
DEB_VERSION=1.20.5+really1.20.2-1.1+deb12u1
TESTBED_CACHE=${TESTBED_CACHE:-/var/cache/distcache/testbed}
OUT=$TESTBED_CACHE/kubernetes-$VERSION
BIN=$OUT/bin
WANT=(kube-apiserver kube-controller-manager kubectl)
CHECK=false
for arg in "$@"; do
  case $arg in
    --check) CHECK=true ;;
    --node) WANT+=(kubelet kube-proxy kube-scheduler pause) ;;
    *) printf 'usage: %s [--check] [--node]\n' "$0" >&2 && exit 2 ;;
  esac
done

log() { printf '==> [%s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

have_all() {
  local b
  for b in "${WANT[@]}"; do
    [[ -x $BIN/$b ]] || return 1
  done
}

if $CHECK; then
  have_all
  exit
fi
if have_all; then
  log "kubernetes $VERSION binaries cached in $BIN"
  exit 0
fi

APT_PACKAGES=(golang-1.19-go rsync golang-github-modern-go-reflect2-dev etcd-server dpkg-dev openssl curl gcc libc6-dev)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  [[ $(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true) == "install ok installed" ]] || missing+=("$pkg")
done
if ((${#missing[@]})); then
  [[ $(id -u) -eq 0 ]] || die "missing packages (${missing[*]}) and not root; install them first"
  log "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null ||
    { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null; }
fi

# Private apt configuration: a deb-src entry for bookworm, lists and archives in the cache.
APT=$TESTBED_CACHE/apt
mkdir -p "$APT/lists/partial" "$APT/archives/partial" "$APT/src"
cat >"$APT/sources.list" <<SRC
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bookworm-security main
SRC
APT_OPTS=(-o "Dir::Etc::SourceList=$APT/sources.list" -o "Dir::Etc::SourceParts=-" -o "Dir::State::Lists=$APT/lists"
  -o "Dir::Cache::Archives=$APT/archives" -o "APT::Sandbox::User=root")
orig_tarball() { find "$APT/src" -maxdepth 1 -name 'kubernetes_*.orig.tar.*' -print -quit; }
ORIG=$(orig_tarball)
if [[ -z $ORIG ]]; then
  log "downloading the source package kubernetes=$DEB_VERSION (private apt configuration in $APT)"
  apt-get "${APT_OPTS[@]}" update >/dev/null
  (cd "$APT/src" && apt-get "${APT_OPTS[@]}" source --download-only "kubernetes=$DEB_VERSION" >/dev/null)
  ORIG=$(orig_tarball)
  [[ -n $ORIG ]] || die "apt-get source downloaded no kubernetes_*.orig.tar.* into $APT/src"
fi

WORK=$OUT/src
if [[ ! -d $WORK/cmd/kube-apiserver ]]; then
  log "unpacking $(basename "$ORIG")"
  rm -rf "$WORK" "$OUT/unpack"
  mkdir -p "$OUT/unpack"
  tar -xf "$ORIG" -C "$OUT/unpack"
  top=$(find "$OUT/unpack" -mindepth 1 -maxdepth 1 -type d | head -n1)
  mv "$top" "$WORK"
  rmdir "$OUT/unpack"
  rm -rf "$WORK/vendor/github.com/modern-go/reflect2"
  cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$WORK/vendor/github.com/modern-go/reflect2"
fi

mkdir -p "$BIN"
for b in "${WANT[@]}"; do
  [[ -x $BIN/$b ]] && continue
  if [[ $b == pause ]]; then
    log "building pause (gcc -static)"
    gcc -Os -static -DVERSION="$VERSION" -o "$BIN/pause.tmp" "$WORK/build/pause/linux/pause.c"
    mv "$BIN/pause.tmp" "$BIN/pause"
    continue
  fi
  log "building $b $VERSION (several minutes on 2 cores)"
  (
    cd "$WORK"
    PATH=/usr/lib/go-1.19/bin:$PATH GOFLAGS='' GOPROXY=off CGO_ENABLED=0 GOCACHE=$OUT/gocache \
      make WHAT="cmd/$b" KUBE_GIT_VERSION=$VERSION KUBE_GIT_TREE_STATE=clean >"$OUT/build-$b.log" 2>&1
  ) || die "building $b failed; see $OUT/build-$b.log"
  cp "$WORK/_output/local/bin/linux/amd64/$b" "$BIN/$b.tmp"
  mv "$BIN/$b.tmp" "$BIN/$b"
done
have_all || die "binaries missing after the build"
# The source tree and Go's build cache are only needed to build: about 3 GB.
rm -rf "$WORK" "$OUT/gocache"
log "kubernetes $VERSION binaries cached in $BIN"
