#!/usr/bin/env bash
# Starts the three-node local cluster of examples/local-cluster, runs a scripted CLI session against it, then keeps
# the cluster up until Ctrl-C. Called by `make demo` (which builds the release binaries first).
#
# Usage: scripts/demo.sh [--no-wait]
#   --no-wait   stop the cluster right after the scripted session (a smoke test; exit 1 if a step misbehaved)
#
# Every process this script starts is stopped on every exit path (normal end, error, Ctrl-C, SIGTERM). Node logs go
# to a fresh temporary directory that is printed and kept; `make clean-demo` removes it.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

WAIT_FOR_CTRL_C=1
case "${1:-}" in
  "") ;;
  --no-wait) WAIT_FOR_CTRL_C=0 ;;
  -h | --help)
    sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
  *) die "unknown argument: $1 (try --help)" ;;
esac

CLUSTER_DIR="$ROOT/examples/local-cluster"
NODES=(node-1 node-2 node-3)
GRPC_PORTS=(7420 7430 7440)
ADMIN_PORTS=(7421 7431 7441)
CLI_TIMEOUT=30 # seconds; bounds every CLI call of the scripted session

require_release_bins
for node in "${NODES[@]}"; do
  [[ -f $CLUSTER_DIR/$node.yaml ]] || die "missing $CLUSTER_DIR/$node.yaml"
done
require_free_ports "${GRPC_PORTS[@]}" "${ADMIN_PORTS[@]}"

LOG_DIR=$(mktemp -d "${TMPDIR:-/tmp}/distcache-demo.XXXXXX")
record_owner "$LOG_DIR/pids"

cleanup() {
  local rc=$?
  trap '' INT TERM # a second Ctrl-C must not interrupt the shutdown
  if ((${#STARTED_PIDS[@]})); then
    say ""
    say "stopping the cluster (PIDs ${STARTED_PIDS[*]}) ..."
    stop_started
    say "stopped; logs kept in $LOG_DIR (make clean-demo removes them)"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

say "==> starting 3 nodes (binaries from $BIN_DIR, logs in $LOG_DIR)"
export RUST_LOG=${RUST_LOG:-info}
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

say ""
say "==> scripted session"
note "write through node-1; the key is stored on the node that owns it"
step 0 "$EP1" put users alice '{"name":"Alice"}'
note "read it back through node-2 and node-3: any node answers for any key"
step 0 "$EP2" get users alice
step 0 "$EP3" get users alice
note "cluster membership and keyspaces"
step 0 "$EP1" members
step 0 "$EP1" keyspaces
note "a second read through node-2 (a non-owner answers repeated reads from its hot tier)"
step 0 "$EP2" get users alice
note "a key nobody wrote: NOT_FOUND, exit code 3"
step 3 "$EP1" get users bob
note "delete, then the key is gone on every node"
step 0 "$EP1" delete users alice
step 3 "$EP1" get users alice
step 3 "$EP2" get users alice
step 3 "$EP3" get users alice
note "per-node counters of keyspace users (hits, hot hits, misses, ...)"
step 0 "$EP1" stats users
step 0 "$EP2" stats users
step 0 "$EP3" stats users

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
say "  admin: http://127.0.0.1:7421 http://127.0.0.1:7431 http://127.0.0.1:7441 (/readyz, /metrics, /admin/peers)"
say "  CLI:   $CLI_BIN --endpoint $EP1 get users alice"
say "  logs:  $LOG_DIR"
say "press Ctrl-C to stop"

# Wait until Ctrl-C (the INT trap exits, and the EXIT trap stops the nodes) or until a node dies on its own.
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
