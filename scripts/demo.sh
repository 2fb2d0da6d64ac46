#!/usr/bin/env bash
# Starts the origin (distcache-origin serving examples/data) and the three-node local cluster of
# examples/local-cluster, runs a scripted CLI session against it (read-through of `users` through the http-json hook,
# then cache-aside with `sessions`), then keeps everything up until Ctrl-C. Called by `make demo` (which builds the
# release binaries and the hooks first).
#
# Usage: scripts/demo.sh [--no-wait]
#   --no-wait   stop right after the scripted session (a smoke test; exit 1 if a step or a counter misbehaved)
#
# Every process this script starts is stopped on every exit path (normal end, error, Ctrl-C, SIGTERM). Logs go to a
# fresh temporary directory that is printed and kept; `make clean-demo` removes it.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

WAIT_FOR_CTRL_C=1
case "${1:-}" in
  "") ;;
  --no-wait) WAIT_FOR_CTRL_C=0 ;;
  -h | --help)
    sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
  *) die "unknown argument: $1 (try --help)" ;;
esac

EXAMPLE_DIR="$ROOT/examples/local-cluster"
DATA_DIR="$ROOT/examples/data"
NODES=(node-1 node-2 node-3)
GRPC_PORTS=(7420 7430 7440)
ADMIN_PORTS=(7421 7431 7441)
PEER_PORTS=(7422 7432 7442)
# The origin's address is also in examples/local-cluster/keyspaces.yaml (baseUrl and allowedHosts of `users`).
ORIGIN_PORT=7450
CLI_TIMEOUT=30 # seconds; bounds every CLI call of the scripted session

require_release_bins
ORIGIN_BIN="$BIN_DIR/distcache-origin"
[[ -x $ORIGIN_BIN ]] || die "$ORIGIN_BIN not found; build it first: make build"
# The read-through hook of `users`, built from hooks/examples/http-json by `make hooks`.
HOOK_WASM="$(target_dir)/hooks/wasm32-wasip2/release/http_json.wasm"
[[ -f $HOOK_WASM ]] || die "$HOOK_WASM not found; build it first: make hooks"
for node in "${NODES[@]}"; do
  [[ -f $EXAMPLE_DIR/$node.yaml ]] || die "missing $EXAMPLE_DIR/$node.yaml"
done
[[ -d $DATA_DIR/users ]] || die "missing $DATA_DIR/users (the origin's data)"
require_free_ports "${GRPC_PORTS[@]}" "${PEER_PORTS[@]}" "${ADMIN_PORTS[@]}" "$ORIGIN_PORT"

LOG_DIR=$(mktemp -d "${TMPDIR:-/tmp}/distcache-demo.XXXXXX")
record_owner "$LOG_DIR/pids"

# The nodes run on a copy of examples/local-cluster inside this run's directory, with the built hook placed where
# keyspaces.yaml expects it (module path hooks/http-json.wasm, relative to the keyspaces file). So the checkout
# stays clean (no build output copied into examples/), every run uses the hook that `make hooks` just built, and
# `make clean-demo` removes the copy together with the logs. Paths in the node configs are relative to the config
# file, so the copies behave exactly like the originals.
CLUSTER_DIR="$LOG_DIR/local-cluster"
cp -R "$EXAMPLE_DIR" "$CLUSTER_DIR"
mkdir -p "$CLUSTER_DIR/hooks"
cp "$HOOK_WASM" "$CLUSTER_DIR/hooks/http-json.wasm"

cleanup() {
  local rc=$?
  trap '' INT TERM # a second Ctrl-C must not interrupt the shutdown
  if ((${#STARTED_PIDS[@]})); then
    say ""
    say "stopping the origin and the cluster (PIDs ${STARTED_PIDS[*]}) ..."
    stop_started
    say "stopped; logs kept in $LOG_DIR (make clean-demo removes them)"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

export RUST_LOG=${RUST_LOG:-info}
say "==> starting the origin: distcache-origin serving $DATA_DIR on http://127.0.0.1:$ORIGIN_PORT"
start_bg origin "$LOG_DIR/origin.log" "$ORIGIN_BIN" --listen "127.0.0.1:$ORIGIN_PORT" --dir "$DATA_DIR"
ORIGIN_PID=$LAST_PID
wait_http_ready "$ORIGIN_PID" 127.0.0.1 "$ORIGIN_PORT" /_stats 30
say "    origin: pid $ORIGIN_PID, log $LOG_DIR/origin.log; GET /users/<id> answers examples/data/users/<id>.json"

say "==> starting 3 nodes (binaries from $BIN_DIR, config copied to $CLUSTER_DIR, logs in $LOG_DIR)"
declare -A NODE_PID=()
for i in "${!NODES[@]}"; do
  node=${NODES[$i]}
  start_bg "$node" "$LOG_DIR/$node.log" \
    "$NODE_BIN" --config "$CLUSTER_DIR/$node.yaml"
  NODE_PID[$node]=$LAST_PID
  say "    $node: pid $LAST_PID, gRPC 127.0.0.1:${GRPC_PORTS[$i]}, admin 127.0.0.1:${ADMIN_PORTS[$i]}, log $LOG_DIR/$node.log"
done

say "==> waiting for /readyz on every node (30 s deadline)"
for i in "${!NODES[@]}"; do
  node=${NODES[$i]}
  wait_http_ready "${NODE_PID[$node]}" 127.0.0.1 "${ADMIN_PORTS[$i]}" /readyz 30
  say "    $node ready"
done

EP1=http://127.0.0.1:7420
EP2=http://127.0.0.1:7430
EP3=http://127.0.0.1:7440
UNEXPECTED=()

# step WANT_RC ENDPOINT ARGS...: echoes the CLI command, runs it (bounded by CLI_TIMEOUT), prints its output
# indented, and records a failure if the exit code is not WANT_RC.
step() {
  local want=$1 endpoint=$2
  shift 2
  local shown out rc=0
  shown=$(display_cmd distcache --endpoint "$endpoint" "$@")
  printf '\n$ %s\n' "$shown"
  out=$(timeout --foreground "$CLI_TIMEOUT" "$CLI_BIN" --endpoint "$endpoint" "$@" 2>&1) || rc=$?
  [[ -z $out ]] || printf '%s\n' "$out" | sed 's/^/  /'
  case $rc in
    0) ;;
    3) say "  → exit code 3 (not found)" ;;
    124) say "  → timed out after ${CLI_TIMEOUT}s" ;;
    *) say "  → exit code $rc" ;;
  esac
  if ((rc != want)); then
    say "  !! expected exit code $want"
    UNEXPECTED+=("$shown  (exit code $rc, expected $want)")
  fi
}

note() { printf '\n# %s\n' "$*"; }

# check WHAT GOT WANT: prints whether a counter has the value the demo promises, and records a failure if not.
check() {
  local what=$1 got=$2 want=$3
  if [[ $got == "$want" ]]; then
    say "  ok: $what = $got"
  else
    say "  !! $what = $got, expected $want"
    UNEXPECTED+=("$what = $got, expected $want")
  fi
}

ORIGIN_STATS='{}'
# Fetches the origin's per-path request counts (GET /_stats, e.g. {"/users/alice":1}) into ORIGIN_STATS.
fetch_origin_stats() {
  ORIGIN_STATS=$(http_get 127.0.0.1 "$ORIGIN_PORT" /_stats) || die "the origin does not answer GET /_stats"
}

# Requests the origin received for PATH, from ORIGIN_STATS (0 when it never saw the path).
origin_hits() {
  local pattern="\"$1\":([0-9]+)"
  if [[ $ORIGIN_STATS =~ $pattern ]]; then printf '%s\n' "${BASH_REMATCH[1]}"; else printf '0\n'; fi
}

# All requests the origin received, from ORIGIN_STATS.
origin_total() {
  local n total=0
  while read -r n; do total=$((total + n)); done < <(grep -oE ':[0-9]+' <<<"$ORIGIN_STATS" | tr -d :)
  printf '%s\n' "$total"
}

show_origin_stats() {
  fetch_origin_stats
  printf '\n$ curl http://127.0.0.1:%s/_stats    # requests the origin received, per path\n  %s\n' \
    "$ORIGIN_PORT" "$ORIGIN_STATS"
}

# Sum over the three nodes of the metric series NAME{LABELS} (LABELS exactly as the node prints them).
METRICS=()
scrape_metrics() {
  local port text
  METRICS=()
  for port in "${ADMIN_PORTS[@]}"; do
    text=$(http_get 127.0.0.1 "$port" /metrics) || die "node admin 127.0.0.1:$port does not answer GET /metrics"
    METRICS+=("$text")
  done
}
metric_sum() {
  local series="$1{$2}"
  printf '%s\n' "${METRICS[@]}" | awk -v s="$series" '$1 == s { sum += $2 } END { printf "%d\n", sum }'
}

say ""
say "==> scripted session, part 1: read-through (keyspace users, loaded by the http-json hook from the origin)"
note "a Get of a user nobody wrote: a miss; the node owning 'alice' runs the hook, which GETs /users/alice"
step 0 "$EP1" get users alice
note "the same Get again, and through node-2 and node-3: hits, the origin is not asked again"
step 0 "$EP1" get users alice
step 0 "$EP2" get users alice
step 0 "$EP3" get users alice
note "another user, first through node-3, then through node-1"
step 0 "$EP3" get users bob
step 0 "$EP1" get users bob
show_origin_stats
check "origin requests for /users/alice" "$(origin_hits /users/alice)" 1
check "origin requests for /users/bob" "$(origin_hits /users/bob)" 1
note "a user the origin does not have: its 404 becomes NOT_FOUND (exit code 3) ..."
step 3 "$EP1" get users mallory
note "... and is cached for negativeTtl (30s): repeated through every node, the origin is still asked once"
step 3 "$EP1" get users mallory
step 3 "$EP2" get users mallory
step 3 "$EP3" get users mallory
show_origin_stats
check "origin requests for /users/mallory" "$(origin_hits /users/mallory)" 1

scrape_metrics
FETCH_OK=$(metric_sum distcache_source_fetches_total 'keyspace="users",result="ok"')
FETCH_NOT_FOUND=$(metric_sum distcache_source_fetches_total 'keyspace="users",result="not_found"')
FETCH_ALL=$(printf '%s\n' "${METRICS[@]}" |
  awk '$1 ~ /^distcache_source_fetches_total\{keyspace="users",/ { sum += $2 } END { printf "%d\n", sum }')
HITS_MAIN=$(metric_sum distcache_cache_hits_total 'keyspace="users",tier="main"')
HITS_HOT=$(metric_sum distcache_cache_hits_total 'keyspace="users",tier="hot"')
MISSES=$(metric_sum distcache_cache_misses_total 'keyspace="users"')
note "node counters of keyspace users, summed over the 3 nodes (GET /metrics on :7421, :7431, :7441)"
printf '  %-68s %s\n' \
  'distcache_source_fetches_total{keyspace="users",result="ok"}' "$FETCH_OK" \
  'distcache_source_fetches_total{keyspace="users",result="not_found"}' "$FETCH_NOT_FOUND" \
  'distcache_source_fetches_total{keyspace="users"} (any result)' "$FETCH_ALL" \
  'distcache_cache_hits_total{keyspace="users",tier="main"}' "$HITS_MAIN" \
  'distcache_cache_hits_total{keyspace="users",tier="hot"}' "$HITS_HOT" \
  'distcache_cache_misses_total{keyspace="users"}' "$MISSES"
# One load per key over the whole cluster (alice and bob found, mallory not), whichever node was asked; and the
# repeated Gets were answered from the cache (owner's main tier or a non-owner's hot copy).
check "loads from the origin that found a user (alice, bob)" "$FETCH_OK" 2
check "loads from the origin that found nothing (mallory)" "$FETCH_NOT_FOUND" 1
check "loads from the origin in total" "$FETCH_ALL" 3
HITS=$((HITS_MAIN + HITS_HOT))
if ((HITS >= 4)); then
  say "  ok: cache hits of users = $HITS (at least the 4 repeated Gets of alice and bob)"
else
  check "cache hits of users (at least 4)" "$HITS" ">= 4"
fi
fetch_origin_stats
check "origin requests in total" "$(origin_total)" 3

say ""
say "==> scripted session, part 2: cache-aside (keyspace sessions has no hook: values arrive only through Put)"
note "write through node-1; the key is stored on the node that owns it"
step 0 "$EP1" put sessions s-42 '{"user":"alice","scopes":["read","write"]}' --ttl 10m
note "read it back through node-2 and node-3: any node answers for any key"
step 0 "$EP2" get sessions s-42
step 0 "$EP3" get sessions s-42
note "cluster membership and keyspaces"
step 0 "$EP1" members
step 0 "$EP1" keyspaces
note "a session nobody wrote: NOT_FOUND, exit code 3 (no hook, so nothing is loaded)"
step 3 "$EP1" get sessions s-99
note "delete, then the key is gone on every node"
step 0 "$EP1" delete sessions s-42
step 3 "$EP1" get sessions s-42
step 3 "$EP2" get sessions s-42
step 3 "$EP3" get sessions s-42
note "per-node counters of both keyspaces (hits, hot hits, misses, source fetches, ...)"
step 0 "$EP1" stats users
step 0 "$EP1" stats sessions
step 0 "$EP2" stats sessions
step 0 "$EP3" stats sessions

say ""
if ((${#UNEXPECTED[@]})); then
  say "!! ${#UNEXPECTED[@]} step(s) did not behave as expected:"
  printf '   %s\n' "${UNEXPECTED[@]}"
  RESULT=1
else
  say "==> every step behaved as expected"
  RESULT=0
fi

if ((!WAIT_FOR_CTRL_C)); then
  exit "$RESULT"
fi

say ""
say "cluster is up: endpoints $EP1 $EP2 $EP3"
say "  admin:  http://127.0.0.1:7421 http://127.0.0.1:7431 http://127.0.0.1:7441 (/readyz, /metrics, /admin/peers)"
users=("$DATA_DIR"/users/*.json)
users=("${users[@]##*/}")
say "  origin: http://127.0.0.1:$ORIGIN_PORT/users/<id> (users: ${users[*]%.json})"
say "          request counts: curl http://127.0.0.1:$ORIGIN_PORT/_stats"
say "  CLI:    $CLI_BIN --endpoint $EP1 get users carol"
say "  config: $CLUSTER_DIR (edit keyspaces.yaml there: the nodes pick changes up live)"
say "  logs:   $LOG_DIR"
say "press Ctrl-C to stop"

# Wait until Ctrl-C (the INT trap exits, and the EXIT trap stops everything) or until the origin or a node dies on
# its own.
while ((${#STARTED_PIDS[@]})); do
  exited_pid=
  rc=0
  wait -n -p exited_pid "${STARTED_PIDS[@]}" || rc=$?
  [[ -n $exited_pid ]] || continue
  forget_pid "$exited_pid"
  say "!! ${PID_NAME[$exited_pid]} (pid $exited_pid) exited on its own with status $rc"
  log_tail "$exited_pid"
  exit 1
done
