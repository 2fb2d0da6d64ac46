#!/usr/bin/env bash
# Installs the Redis client libraries that tests/tests/resp_clients.rs drives against the nodes' RESP front end,
# outside the checkout, in $DISTCACHE_CLIENTS_DIR (default /var/cache/distcache/clients):
#
#   python/  a virtual environment (python3 -m venv) with redis-py 5 from PyPI: python/bin/python
#   node/    an npm prefix with ioredis 5 from the npm registry: node/node_modules/ioredis
#
# Each counts as installed only when it loads (redis-py imports in the venv's interpreter, ioredis is required by
# node); one that does not, such as what an interrupted run left or a venv whose interpreter went away, is made
# again from scratch. A second run does nothing; `install.sh --check` only says whether both are there and work
# (exit status 0 or 1, no output). Called by scripts/setup.sh (`make setup`).
set -euo pipefail

CLIENTS_DIR=${DISTCACHE_CLIENTS_DIR:-/var/cache/distcache/clients}
REDIS_PY_SPEC='redis>=5,<6'
IOREDIS_SPEC='ioredis@5'

log() { printf '==> [%s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

# The installed versions, or nothing (and a non-zero status) when the environment is missing or does not load.
redis_py_version() {
  "$CLIENTS_DIR/python/bin/python" -c 'import redis; assert redis.__version__.startswith("5."); print(redis.__version__)' \
    2>/dev/null
}
ioredis_version() {
  command -v node >/dev/null 2>&1 || return 1
  NODE_PATH="$CLIENTS_DIR/node/node_modules" node -e '
    require("ioredis");
    const v = require("ioredis/package.json").version;
    if (!v.startsWith("5.")) process.exit(1);
    console.log(v);' 2>/dev/null
}

if [[ ${1:-} == --check ]]; then
  redis_py_version >/dev/null && ioredis_version >/dev/null
  exit
fi

mkdir -p "$CLIENTS_DIR"

if version=$(redis_py_version); then
  log "redis-py $version in $CLIENTS_DIR/python"
else
  command -v python3 >/dev/null 2>&1 || die "python3 not found: apt-get install python3 python3-venv"
  python3 -c 'import ensurepip' 2>/dev/null ||
    die "python3 has no ensurepip, so it cannot make a virtual environment: apt-get install python3-venv"
  log "making a Python virtual environment with $REDIS_PY_SPEC in $CLIENTS_DIR/python"
  rm -rf "$CLIENTS_DIR/python"
  python3 -m venv "$CLIENTS_DIR/python"
  "$CLIENTS_DIR/python/bin/python" -m pip install --quiet --disable-pip-version-check "$REDIS_PY_SPEC"
  version=$(redis_py_version) || die "redis-py does not import from $CLIENTS_DIR/python after installing it"
  log "redis-py $version installed in $CLIENTS_DIR/python"
fi

if version=$(ioredis_version); then
  log "ioredis $version in $CLIENTS_DIR/node"
else
  command -v npm >/dev/null 2>&1 || die "npm not found: apt-get install npm"
  log "installing $IOREDIS_SPEC into $CLIENTS_DIR/node (npm)"
  rm -rf "$CLIENTS_DIR/node"
  mkdir -p "$CLIENTS_DIR/node"
  npm install --prefix "$CLIENTS_DIR/node" --no-audit --no-fund --loglevel=error "$IOREDIS_SPEC" >/dev/null
  version=$(ioredis_version) || die "ioredis does not load from $CLIENTS_DIR/node after installing it"
  log "ioredis $version installed in $CLIENTS_DIR/node"
fi
