#!/usr/bin/env bash
# Builds a current apiextensions-apiserver (1.36.4) from Debian sid's source packages and caches it outside the
# checkout: $TESTBED_CACHE/apiextensions-1.36.4/bin/apiextensions-apiserver. A second run does nothing;
# `build-apiextensions.sh --check` only says whether it is there (exit status 0 or 1, no output).
#
# The v1.20 API server of the test bed predates CEL validation rules (x-kubernetes-validations); this server
# checks them. It is built from Debian sid's golang-k8s-apiextensions-apiserver-dev and the golang-*-dev packages
# it depends on, with sid's golang-1.26. The packages are only downloaded and unpacked into the cache, never
# installed: a private apt configuration under $TESTBED_CACHE/apt-sid (its own sources list naming sid, package
# lists, an empty dpkg status so that nothing of the host counts as installed). The machine's apt sources and
# packages are not touched.
set -euo pipefail

VERSION=1.36.4
TESTBED_CACHE=${TESTBED_CACHE:-/var/cache/distcache/testbed}
OUT=$TESTBED_CACHE/apiextensions-$VERSION
BIN=$OUT/bin/apiextensions-apiserver
APT=$TESTBED_CACHE/apt-sid
GO=1.26

log() { printf '==> [%s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

if [[ ${1:-} == --check ]]; then
  [[ -x $BIN ]]
  exit
fi
if [[ -x $BIN ]]; then
  log "apiextensions-apiserver $VERSION cached in $(dirname "$BIN")"
  exit 0
fi
for tool in apt-get apt-cache dpkg-deb; do
  command -v "$tool" >/dev/null || die "$tool not found"
done

mkdir -p "$APT/lists/partial" "$APT/archives/partial" "$APT/debs"
: >"$APT/status"
cat >"$APT/sources.list" <<SRC
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian sid main
SRC
O=(-o "Dir::Etc::SourceList=$APT/sources.list" -o "Dir::Etc::SourceParts=-" -o "Dir::State::Lists=$APT/lists"
  -o "Dir::State::status=$APT/status" -o "Dir::Cache=$APT" -o "Dir::Cache::Archives=$APT/archives"
  -o "APT::Sandbox::User=root" -o "Debug::NoLocking=1")

log "reading sid's package lists (private apt configuration in $APT)"
apt-get "${O[@]}" update >/dev/null
candidate=$(apt-cache "${O[@]}" policy golang-k8s-apiextensions-apiserver-dev | awk '/Candidate:/ {print $2}')
[[ $candidate == 0.${VERSION#1.}-* ]] ||
  die "sid carries golang-k8s-apiextensions-apiserver-dev $candidate, not 0.${VERSION#1.}; update VERSION in $0"

log "downloading golang-k8s-apiextensions-apiserver-dev $candidate, its golang-* dependencies and golang-$GO"
apt-cache "${O[@]}" depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks --no-replaces \
  --no-enhances --no-pre-depends golang-k8s-apiextensions-apiserver-dev "golang-$GO-go" "golang-$GO-src" 2>/dev/null |
  grep -E '^golang-' | sort -u >"$APT/packages.txt"
mapfile -t packages <"$APT/packages.txt"
((${#packages[@]})) || die "no golang-* packages found for golang-k8s-apiextensions-apiserver-dev in sid"
(cd "$APT/debs" && apt-get "${O[@]}" download "${packages[@]}" >/dev/null)

ROOT=$APT/root
log "unpacking ${#packages[@]} packages into $ROOT"
rm -rf "$ROOT"
mkdir -p "$ROOT"
for deb in "$APT"/debs/*.deb; do
  dpkg-deb -x "$deb" "$ROOT"
done

log "building apiextensions-apiserver $VERSION with go $GO (several minutes on 2 cores)"
mkdir -p "$(dirname "$BIN")"
(
  cd /tmp
  env -i PATH="$ROOT/usr/lib/go-$GO/bin:/usr/bin:/bin" HOME=/tmp GOROOT="$ROOT/usr/lib/go-$GO" GO111MODULE=off \
    GOPATH="$ROOT/usr/share/gocode" GOCACHE="$OUT/gocache" GOFLAGS= GOTOOLCHAIN=local CGO_ENABLED=0 \
    go build -o "$BIN.tmp" k8s.io/apiextensions-apiserver >"$OUT/build.log" 2>&1
) || die "the build failed; see $OUT/build.log"
mv "$BIN.tmp" "$BIN"
# The unpacked tree and Go's build cache are only needed to build: about 2 GB.
rm -rf "$ROOT" "$APT/debs" "$OUT/gocache"
log "apiextensions-apiserver $VERSION cached in $(dirname "$BIN")"
