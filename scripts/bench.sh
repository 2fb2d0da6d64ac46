#!/usr/bin/env bash
# Side-by-side benchmark of a one-node DistCache against Redis, in one run, on this machine's loopback: the hit path
# (GET) and the miss path (a DistCache Get that loads the value through a hook, beside a Redis SET); and the cost
# of TLS on the hit path (the same Get run against a second node that serves its client port over TLS).
# Called by `make bench` (which builds the release binaries and the hooks first).
#
# The servers are started here (free ports, PIDs recorded) and stopped on every exit path: redis-server, a plain
# node and a TLS node (its certificate, for IP 127.0.0.1 from a throwaway CA, made here with openssl). All get the
# same data: 100,000 keys of 100 B. Then these runs of BENCH_SECONDS each (default 10):
#   redis GET P1           redis-benchmark -t get -d 100 -c 50 -P 1 -r 100000
#   distcache Get c50      distcache bench --op get --concurrency 50 --value-size 100 --keys 100000 --transport h2
#   distcache Get c50 TLS  the same against the TLS node (https://, --tls-ca; no client certificate)
#   ... client library     the plain Get with --transport client (the Rust client library, tonic)
#   redis GET P16          redis-benchmark ... -P 16               (ops/s of pipelined GETs = keys/s)
#   distcache GetMany(16)  distcache bench ... --batch 16 --transport h2    (keys/s)
#   redis SET P1           redis-benchmark -t set -d 100 -c 50 -P 1 -r 1000000000   (nearly every SET a new key)
#   distcache Get miss     distcache bench --op get --concurrency 50 --keyspace misses --unique-keys --transport h2
#   ... client library     the same with --transport client
#   expiring, no SWR       distcache bench --op get --concurrency 50 --keys 1000 --keyspace expiring
#   expiring, SWR          distcache bench --op get --concurrency 50 --keys 1000 --keyspace expiring-swr
# The comparisons with Redis use `--transport h2`, a lean gRPC caller on the h2 crate: the load generators then
# cost about the same per request (redis-benchmark is a lean C client), so on cores shared by both, the ratio is
# about the servers. The client-library rows show what a Rust application sees through distcache-client: its
# tonic stack costs the load generator about twice the CPU per call, which here takes CPU from the server too.
# The miss run reads keyspace `misses`, whose hook is the test hook (hooks/testing/test-hook) in `echo` mode with a
# 100 B prefix: every Get uses a key never used before, so each one is a miss that runs the WebAssembly hook (which
# answers prefix + key without I/O: the cost measured is the node's miss path, not an origin's) and stores the value.
# The node's counters are checked around that run: no hit, one hook fetch per Get.
# The two expiring-key runs read 1,000 keys through the http-json example hook from distcache-origin answering in
# 20 ms (--delay 20ms), with a 1 s TTL, so that keys keep expiring under the readers: keyspace `expiring` fetches an
# expired key before it answers, `expiring-swr` (staleWhileRevalidate: 30s) answers it stale at once while one
# background fetch refreshes it. Reported: p99 with SWR ÷ p99 without (and the origin fetches of each).
# The RESP front end: the same redis-benchmark drives redis-server and a third node (bench-node-resp, `resp.listen`
# on, a cache-aside default keyspace holding the same 100,000 keys of 100 B, loaded by the same `redis-cli --pipe`),
# one right after the other, -c 50 -d 100 -r 100000: GET -P 1, GET -P 16 and SET -P 1 (the same keys again).
# Reported per pair: ops/s ÷ redis, the p50 and p99 of each (redis-benchmark --csv), server CPU µs per request, and
# the load generator's own CPU: redis-benchmark is one thread, and when it is busy ≥ 90 % of its core against both
# servers the ops/s ratio is its ceiling, not a comparison of the servers (a warning says so). Then
# memory: a fresh redis-server and a fresh RESP node each get 1,000,000 keys of 100 B (`redis-cli --pipe`), and
# (RSS after − RSS before) ÷ DBSIZE is each one's memory per cached entry. Every redis-benchmark run fails the
# bench when a server answers an error (redis-benchmark 7 exits at the first one; an older one is given -e so that
# it prints them) or when it says anything on stderr; so does a load whose `redis-cli --pipe` counts an error.
# The cost of tracing: Get c50 against the plain node and against a node exporting spans (sampleRatio 0.01) to
# distcache-otlp-sink, in BENCH_PAIRS (default 4) interleaved pairs of half-length runs (off, traced; traced, off;
# ...), so that a machine that slows down or speeds up during the bench weighs on both alike; reported: the pooled
# ops/s and server CPU per request of each, their ratio (goal ≥ 0.95) and each pair's ratio. With
# BENCH_BASELINE_NODE=<path of another build's distcache-node>, the plain node is compared the same way with a node
# of that build (the same configuration, its own port): "does this build cost more than that one".
# Server CPU per request (per key for batches) comes from utime+stime in /proc/PID/stat of the server process,
# sampled around the measured window. The table and the ratios (distcache ÷ redis, and TLS ÷ plain Get, whose goal
# is ≥ 0.85 for ops/s) go to stdout, every raw number to ${CARGO_TARGET_DIR:-target}/bench/results.json.
#
# Environment: BENCH_SECONDS (default 10), BENCH_CONNECTIONS (passed to `distcache bench --connections` when set),
# RUST_LOG for the node (default warn), BENCH_RSS_KEYS (keys of the memory test, default 1000000), BENCH_PAIRS and
# BENCH_BASELINE_NODE (above).
#
# The load generators run on the same cores as the servers: compare the ratios, never absolute numbers across
# machines.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

BENCH_SECONDS=${BENCH_SECONDS:-10}
[[ $BENCH_SECONDS =~ ^[1-9][0-9]*$ ]] || die "BENCH_SECONDS must be a positive whole number of seconds, got '$BENCH_SECONDS'"
BENCH_CONNECTIONS=${BENCH_CONNECTIONS:-}
BENCH_PAIRS=${BENCH_PAIRS:-4}
[[ $BENCH_PAIRS =~ ^[1-9][0-9]*$ ]] || die "BENCH_PAIRS must be a positive whole number, got '$BENCH_PAIRS'"
# Each run of an interleaved pair lasts half a BENCH_SECONDS (at least 3 s).
PAIR_SECONDS=$((BENCH_SECONDS / 2 > 3 ? BENCH_SECONDS / 2 : 3))
BENCH_BASELINE_NODE=${BENCH_BASELINE_NODE:-}
if [[ -n $BENCH_BASELINE_NODE ]]; then
  [[ -x $BENCH_BASELINE_NODE ]] || die "BENCH_BASELINE_NODE=$BENCH_BASELINE_NODE is not an executable distcache-node"
  BENCH_BASELINE_NODE=$(realpath "$BENCH_BASELINE_NODE")
fi
[[ -z $BENCH_CONNECTIONS || $BENCH_CONNECTIONS =~ ^[1-9][0-9]*$ ]] || die "BENCH_CONNECTIONS must be a positive number"
KEYS=100000
VALUE_SIZE=100
CONCURRENCY=50
BATCH=16
WARMUP_SECONDS=2
KEYSPACE=bench
MISS_KEYSPACE=misses
# redis-benchmark -r for the SET run: random keys from a range this large are nearly all new, like the miss path's.
SET_KEY_RANGE=1000000000
# The RESP nodes' default keyspace (cache-aside), where redis-benchmark's keys (key:000000012345) land.
RESP_KEYSPACE=resp
# Keys of 100 B loaded into a fresh redis-server and a fresh RESP node to measure memory per cached entry.
RSS_KEYS=${BENCH_RSS_KEYS:-1000000}
[[ $RSS_KEYS =~ ^[1-9][0-9]*$ ]] || die "BENCH_RSS_KEYS must be a positive number, got '$RSS_KEYS'"

for tool in redis-server redis-benchmark redis-cli; do
  command -v "$tool" >/dev/null 2>&1 ||
    die "$tool not found; install Redis first: apt-get install redis-server redis-tools"
done
command -v python3 >/dev/null 2>&1 || die "python3 not found; install it: apt-get install python3"
command -v openssl >/dev/null 2>&1 || die "openssl not found (it makes the TLS node's certificate); install it: apt-get install openssl"
require_release_bins
# The miss path's data source, built from hooks/testing/test-hook by `make hooks`.
TEST_HOOK="$(target_dir)/hooks/wasm32-wasip2/release/distcache_test_hook.wasm"
[[ -f $TEST_HOOK ]] || die "$TEST_HOOK not found; build it first: make hooks"
# The expiring-key runs' data source: the http-json example hook in front of distcache-origin.
HTTP_HOOK="$(target_dir)/hooks/wasm32-wasip2/release/http_json.wasm"
[[ -f $HTTP_HOOK ]] || die "$HTTP_HOOK not found; build it first: make hooks"
ORIGIN_BIN="$BIN_DIR/distcache-origin"
[[ -x $ORIGIN_BIN ]] || die "$ORIGIN_BIN not found; build it first: make build"
# The OTLP collector the traced node exports to (it counts the spans).
SINK_BIN="$BIN_DIR/distcache-otlp-sink"
[[ -x $SINK_BIN ]] || die "$SINK_BIN not found; build it first: make build"
EXPIRING_KEYS=1000
ORIGIN_DELAY=20ms
CLK_TCK=$(getconf CLK_TCK)

OUT_DIR="$(target_dir)/bench"
mkdir -p "$OUT_DIR"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/distcache-bench.XXXXXX")
record_owner "$WORK/pids"

cleanup() {
  local rc=$?
  trap '' INT TERM
  stop_started
  if ((rc == 0)); then
    rm -rf "$WORK"
  else
    say "bench failed (exit $rc); server logs kept in $WORK" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

phase() { printf '==> [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

# utime+stime of PID in clock ticks (fields 14 and 15 of /proc/PID/stat; all threads of the process).
cpu_ticks() {
  local utime stime
  utime=$(proc_stat_field "$1" 14) || die "cannot read /proc/$1/stat (${PID_NAME[$1]:-pid $1} gone?)"
  stime=$(proc_stat_field "$1" 15) || die "cannot read /proc/$1/stat (${PID_NAME[$1]:-pid $1} gone?)"
  printf '%s\n' $((utime + stime))
}

# Resident memory of PID in KiB (VmRSS), or 0 when unknown.
rss_kib() {
  local line
  while IFS= read -r line; do
    if [[ $line == VmRSS:* ]]; then
      line=${line//[!0-9]/}
      printf '%s\n' "${line:-0}"
      return 0
    fi
  done <"/proc/$1/status"
  printf '0\n'
}

# --- servers ---------------------------------------------------------------------------------------------------

read -r REDIS_PORT GRPC_PORT PEER_PORT ADMIN_PORT TLS_GRPC_PORT TLS_PEER_PORT TLS_ADMIN_PORT ORIGIN_PORT \
  RESP_GRPC_PORT RESP_PEER_PORT RESP_ADMIN_PORT RESP_PORT \
  RSS_REDIS_PORT RSS_GRPC_PORT RSS_PEER_PORT RSS_ADMIN_PORT RSS_RESP_PORT \
  TRACED_GRPC_PORT TRACED_PEER_PORT TRACED_ADMIN_PORT SINK_PORT BASE_GRPC_PORT BASE_PEER_PORT BASE_ADMIN_PORT < <(
  python3 -c '
import socket
socks = [socket.socket() for _ in range(24)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
'
)
ENDPOINT="http://127.0.0.1:$GRPC_PORT"
TLS_ENDPOINT="https://127.0.0.1:$TLS_GRPC_PORT"
TRACED_ENDPOINT="http://127.0.0.1:$TRACED_GRPC_PORT"
BASE_ENDPOINT="http://127.0.0.1:$BASE_GRPC_PORT"

# The TLS node's material: a CA and a certificate for 127.0.0.1 (serverAuth for the client port, clientAuth because
# a node is also a client of its peers), ECDSA P-256 like cert-manager's default for ECDSA.
TLS_DIR="$WORK/tls"
mkdir -p "$TLS_DIR"
make_tls_material() {
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$TLS_DIR/ca.key"
  openssl req -x509 -new -key "$TLS_DIR/ca.key" -sha256 -days 2 -subj "/CN=distcache bench CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$TLS_DIR/ca.crt"
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$TLS_DIR/tls.key"
  openssl req -new -key "$TLS_DIR/tls.key" -subj "/CN=bench-node-tls" -out "$TLS_DIR/tls.csr"
  printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=serverAuth,clientAuth" "subjectAltName=IP:127.0.0.1,DNS:localhost" >"$TLS_DIR/leaf.ext"
  openssl x509 -req -in "$TLS_DIR/tls.csr" -CA "$TLS_DIR/ca.crt" -CAkey "$TLS_DIR/ca.key" \
    -set_serial "0x$(openssl rand -hex 8)" -days 2 -sha256 -extfile "$TLS_DIR/leaf.ext" -out "$TLS_DIR/tls.crt"
}
make_tls_material >"$WORK/openssl.log" 2>&1 || {
  sed 's/^/  | /' "$WORK/openssl.log" >&2
  die "openssl failed to make the TLS node's certificate"
}
TLS_CLI_ARGS=(--tls-ca "$TLS_DIR/ca.crt")

# node_config NAME GRPC_PORT PEER_PORT ADMIN_PORT [EXTRA_YAML [KEYSPACES_FILE]]: a one-node configuration (its peer
# port is unused, but on a port of its own so that the nodes do not collide); EXTRA_YAML is a tls or resp section.
node_config() {
  cat <<EOF
name: $1
listen: 127.0.0.1:$2
peerListen: 127.0.0.1:$3
admin: 127.0.0.1:$4
discovery:
  standalone: {}
keyspacesFile: ${6:-./keyspaces.yaml}
# Like for like with redis-server (one event loop) and redis-benchmark (one thread): one server worker (with
# workerThreads 1 a node runs tokio's current-thread runtime, one event loop too), and the load generator runs one
# thread too (distcache bench --threads 1, its default). On a 2-core machine a second worker on either side takes
# the core the other process needs.
workerThreads: ${BENCH_SERVER_THREADS:-1}
${5:-}
EOF
}
node_config bench-node "$GRPC_PORT" "$PEER_PORT" "$ADMIN_PORT" >"$WORK/node.yaml"
# The traced node: the same, exporting spans to the OTLP sink at the default sample ratio of 0.01.
node_config bench-node-traced "$TRACED_GRPC_PORT" "$TRACED_PEER_PORT" "$TRACED_ADMIN_PORT" \
  "tracing: { otlpEndpoint: \"http://127.0.0.1:$SINK_PORT\", sampleRatio: 0.01 }" >"$WORK/node-traced.yaml"
node_config bench-node-baseline "$BASE_GRPC_PORT" "$BASE_PEER_PORT" "$BASE_ADMIN_PORT" >"$WORK/node-baseline.yaml"
node_config bench-node-tls "$TLS_GRPC_PORT" "$TLS_PEER_PORT" "$TLS_ADMIN_PORT" \
  "tls: { certFile: ./tls/tls.crt, keyFile: ./tls/tls.key, caFile: ./tls/ca.crt }" >"$WORK/node-tls.yaml"
# The RESP nodes serve one cache-aside keyspace, the default of every key (redis-benchmark's key:… included), large
# enough that nothing is evicted: 1,000,000 entries weigh about 212 MB (key + value + 96 B each).
node_config bench-node-resp "$RESP_GRPC_PORT" "$RESP_PEER_PORT" "$RESP_ADMIN_PORT" \
  "resp: { listen: 127.0.0.1:$RESP_PORT, defaultKeyspace: $RESP_KEYSPACE }" ./resp-keyspaces.yaml >"$WORK/node-resp.yaml"
node_config bench-node-rss "$RSS_GRPC_PORT" "$RSS_PEER_PORT" "$RSS_ADMIN_PORT" \
  "resp: { listen: 127.0.0.1:$RSS_RESP_PORT, defaultKeyspace: $RESP_KEYSPACE }" ./resp-keyspaces.yaml >"$WORK/node-rss.yaml"
printf 'keyspaces:\n  - name: %s\n    maxBytes: 2Gi\n' "$RESP_KEYSPACE" >"$WORK/resp-keyspaces.yaml"
# The miss keyspace: value = prefix + key from the echo hook, so values are VALUE_SIZE bytes plus the key (about
# 27 B of `distcache bench --unique-keys`). maxBytes is large enough that a run never evicts, and the pool has an
# instance for every request in flight, so no miss waits for a free instance.
cp "$TEST_HOOK" "$WORK/test-hook.wasm"
cp "$HTTP_HOOK" "$WORK/http-json.wasm"
# The origin's data for the expiring-key runs: one 100 B file per key that `distcache bench --keys` draws.
mkdir -p "$WORK/origin/exp"
python3 - "$WORK/origin/exp" "$EXPIRING_KEYS" "$VALUE_SIZE" <<'PY'
import os, sys
path, keys, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(keys):
    with open(os.path.join(path, "key-%08d" % i), "wb") as f:
        f.write(b"o" * size)
PY
MISS_PREFIX=$(printf "%${VALUE_SIZE}s" '' | tr ' ' x)
cat >"$WORK/keyspaces.yaml" <<EOF
keyspaces:
  - name: $KEYSPACE
    maxBytes: 512Mi
  - name: $MISS_KEYSPACE
    maxBytes: 1Gi
    hook:
      module: { path: ./test-hook.wasm }
      config: { mode: echo, prefix: "$MISS_PREFIX" }
      limits: { poolSize: $CONCURRENCY }
  - name: expiring
    maxBytes: 64Mi
    ttl: 1s
    fetchTimeout: 5s
    hook: &origin
      module: { path: ./http-json.wasm }
      config: { baseUrl: "http://127.0.0.1:$ORIGIN_PORT/exp" }
      allowedHosts: ["127.0.0.1:$ORIGIN_PORT"]
      limits: { poolSize: $CONCURRENCY, maxConcurrentRequests: $CONCURRENCY }
  - name: expiring-swr
    maxBytes: 64Mi
    ttl: 1s
    fetchTimeout: 5s
    hook: *origin
    staleWhileRevalidate: 30s
EOF

phase "starting redis-server on 127.0.0.1:$REDIS_PORT, distcache-node on $ENDPOINT (admin :$ADMIN_PORT) and on $TLS_ENDPOINT (admin :$TLS_ADMIN_PORT)"
start_bg redis-server "$WORK/redis.log" \
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --daemonize no --dir "$WORK"
REDIS_PID=$LAST_PID
export RUST_LOG=${RUST_LOG:-warn}
start_bg distcache-node "$WORK/node.log" "$NODE_BIN" --config "$WORK/node.yaml"
NODE_PID=$LAST_PID
start_bg distcache-node-tls "$WORK/node-tls.log" "$NODE_BIN" --config "$WORK/node-tls.yaml"
TLS_NODE_PID=$LAST_PID
start_bg distcache-node-resp "$WORK/node-resp.log" "$NODE_BIN" --config "$WORK/node-resp.yaml"
RESP_NODE_PID=$LAST_PID
# (Stopped with the others by the exit trap; the traced node's exporter connects when its first batch is due.)
start_bg distcache-otlp-sink "$WORK/otlp-sink.log" "$SINK_BIN" --listen "127.0.0.1:$SINK_PORT"
start_bg distcache-node-traced "$WORK/node-traced.log" "$NODE_BIN" --config "$WORK/node-traced.yaml"
TRACED_NODE_PID=$LAST_PID
BASE_NODE_PID=
if [[ -n $BENCH_BASELINE_NODE ]]; then
  start_bg distcache-node-baseline "$WORK/node-baseline.log" "$BENCH_BASELINE_NODE" --config "$WORK/node-baseline.yaml"
  BASE_NODE_PID=$LAST_PID
  "$BENCH_BASELINE_NODE" --version >"$WORK/baseline-version.txt" 2>&1 || true
fi
start_bg distcache-origin "$WORK/origin.log" "$ORIGIN_BIN" --listen "127.0.0.1:$ORIGIN_PORT" --dir "$WORK/origin" \
  --delay "$ORIGIN_DELAY"
ORIGIN_PID=$LAST_PID

# resp_ping PORT: true when the RESP server on PORT answers PING.
resp_ping() { [[ $(redis-cli -p "$1" ping 2>/dev/null) == PONG ]]; }
wait_ready "$REDIS_PID" 30 "redis PING" resp_ping "$REDIS_PORT"
wait_http_ready "$RESP_NODE_PID" 127.0.0.1 "$RESP_ADMIN_PORT" /readyz 30
wait_ready "$RESP_NODE_PID" 30 "RESP PING on :$RESP_PORT" resp_ping "$RESP_PORT"
wait_http_ready "$NODE_PID" 127.0.0.1 "$ADMIN_PORT" /readyz 30
wait_http_ready "$TLS_NODE_PID" 127.0.0.1 "$TLS_ADMIN_PORT" /readyz 30
wait_http_ready "$TRACED_NODE_PID" 127.0.0.1 "$TRACED_ADMIN_PORT" /readyz 30
[[ -z $BASE_NODE_PID ]] || wait_http_ready "$BASE_NODE_PID" 127.0.0.1 "$BASE_ADMIN_PORT" /readyz 30
wait_http_ready "$ORIGIN_PID" 127.0.0.1 "$ORIGIN_PORT" /_stats 30

# --- data ------------------------------------------------------------------------------------------------------

# resp_sets KEYS: the RESP commands SET key:000000000000 .. key:<KEYS-1> to values of VALUE_SIZE B, on stdout. These
# are the keys redis-benchmark -r KEYS asks for.
resp_sets() {
  python3 - "$1" "$VALUE_SIZE" <<'EOF'
import sys
keys, size = int(sys.argv[1]), int(sys.argv[2])
value = b"v" * size
out = sys.stdout.buffer
for i in range(keys):
    key = b"key:%012d" % i
    out.write(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(key), key, len(value), value))
EOF
}

# resp_load NAME PORT KEYS: loads `resp_sets KEYS` through `redis-cli --pipe` into the RESP server on PORT
# (redis-server or a node's front end); fails unless redis-cli counted KEYS replies and no error, and DBSIZE says KEYS.
resp_load() {
  local name=$1 port=$2 keys=$3 held rc=0
  resp_sets "$keys" | timeout --foreground 600 redis-cli -p "$port" --pipe >"$WORK/$name.log" 2>&1 || rc=$?
  if ((rc != 0)) || ! grep -q "errors: 0, replies: $keys\$" "$WORK/$name.log"; then
    sed 's/^/  | /' "$WORK/$name.log" >&2
    die "loading $keys keys into the server on port $port ($name) failed (exit $rc) or got error replies"
  fi
  held=$(redis-cli -p "$port" dbsize)
  [[ $held == "$keys" ]] || die "$name: the server on port $port holds $held keys after loading, expected $keys"
}

phase "loading $KEYS keys of $VALUE_SIZE B into redis (redis-cli --pipe)"
resp_load redis-load "$REDIS_PORT" "$KEYS"
phase "loading $KEYS keys of $VALUE_SIZE B into the RESP node (redis-cli --pipe)"
resp_load resp-load "$RESP_PORT" "$KEYS"
[[ $(redis-cli -p "$RESP_PORT" get key:000000000042) == "$(printf "%${VALUE_SIZE}s" '' | tr ' ' v)" ]] ||
  die "GET key:000000000042 on the RESP node does not answer the value loaded"

DC_COMMON=(--concurrency "$CONCURRENCY" --value-size "$VALUE_SIZE" --keys "$KEYS")
[[ -z $BENCH_CONNECTIONS ]] || DC_COMMON+=(--connections "$BENCH_CONNECTIONS")

# dc_preload NAME CLI_ARGS...: writes every key into a node (the preload of `distcache bench`, then a short run).
dc_preload() {
  local name=$1
  shift
  timeout --foreground 300 "$CLI_BIN" "$@" bench --op get --keyspace "$KEYSPACE" "${DC_COMMON[@]}" \
    --duration 2s --warmup 1s --json >"$WORK/$name.json" 2>"$WORK/$name.err" || {
    sed 's/^/  | /' "$WORK/$name.err" >&2
    die "distcache bench preload ($name) failed"
  }
}
phase "loading $KEYS keys of $VALUE_SIZE B into distcache (distcache bench preload)"
dc_preload dc-preload --endpoint "$ENDPOINT"
phase "loading $KEYS keys of $VALUE_SIZE B into the TLS node (distcache bench preload over TLS)"
dc_preload dc-preload-tls --endpoint "$TLS_ENDPOINT" "${TLS_CLI_ARGS[@]}"
phase "loading $KEYS keys of $VALUE_SIZE B into the traced node (distcache bench preload)"
dc_preload dc-preload-traced --endpoint "$TRACED_ENDPOINT"
if [[ -n $BASE_NODE_PID ]]; then
  phase "loading $KEYS keys of $VALUE_SIZE B into the baseline node (distcache bench preload)"
  dc_preload dc-preload-baseline --endpoint "$BASE_ENDPOINT"
fi

# --- runs ------------------------------------------------------------------------------------------------------

REDIS_TIMEOUT=$((BENCH_SECONDS * 3 + 30))

# The RESP server that redis_bench and redis_run drive: its name (in messages and results), port, PID (for its CPU)
# and, for a node, its admin port (for its hit and miss counters). redis-server unless a RESP run says otherwise.
RB_NAME=redis RB_PORT=$REDIS_PORT RB_PID=$REDIS_PID RB_ADMIN_PORT=
# redis-benchmark 7 exits at the first error reply, printing "Error from server: …" on stderr (its -e only warns that
# it has no effect); an older one counts error replies as answers unless -e makes it print them on stdout.
RB_ERROR_ARGS=()
rb_major=$(redis-benchmark --version 2>/dev/null | awk '{ split($2, v, "."); print v[1] }')
[[ $rb_major =~ ^[0-9]+$ ]] && ((rb_major >= 7)) || RB_ERROR_ARGS=(-e)

# rb_counters: the GET hits and misses so far of the RESP server being driven, as "HITS MISSES" (redis: INFO stats;
# a node: its /metrics for the RESP keyspace).
rb_counters() {
  if [[ -n $RB_ADMIN_PORT ]]; then
    local hits misses _
    read -r hits misses _ <<<"$(node_counters "$RB_ADMIN_PORT" "$RESP_KEYSPACE")"
    printf '%s %s\n' "$hits" "$misses"
  else
    redis-cli -p "$RB_PORT" info stats | tr -d '\r' |
      awk -F: '$1 == "keyspace_hits" { h = $2 } $1 == "keyspace_misses" { m = $2 } END { print h + 0, m + 0 }'
  fi
}

# redis_bench TEST PIPELINE REQUESTS CSV_FILE KEY_RANGE: one redis-benchmark run of TEST (get or set) against the
# RB_ server. Fails the bench, showing what redis-benchmark said, when it exits non-zero, writes anything to stderr,
# or reports an error reply.
redis_bench() {
  local csv_file=$4 err_file=$4.err rc=0
  timeout --foreground "$REDIS_TIMEOUT" redis-benchmark -p "$RB_PORT" -t "$1" -d "$VALUE_SIZE" -c "$CONCURRENCY" \
    -P "$2" -r "$5" -n "$3" --csv "${RB_ERROR_ARGS[@]}" >"$csv_file" 2>"$err_file" || rc=$?
  if ((rc != 0)) || [[ -s $err_file ]] || grep -q 'Error from server' "$csv_file"; then
    sed 's/^/  | /' "$err_file" "$csv_file" >&2
    die "redis-benchmark -t $1 -P $2 -r $5 -n $3 against $RB_NAME (port $RB_PORT) failed: exit status $rc, an error" \
      "reply or output on stderr (above)"
  fi
}

# Requests/s of the row of TEST (GET or SET) in a redis-benchmark --csv file.
csv_rps() {
  python3 - "$1" "$2" <<'EOF'
import csv, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if r]
header = rows[0]
row = next(r for r in rows[1:] if r[0] == sys.argv[2])
print(float(row[header.index("rps")]))
EOF
}

# CPU ticks (user + system) of this script's finished children: sampled around a redis-benchmark run, the load
# generator's own CPU (it is waited for through `timeout`, whose children's time counts as its own).
children_cpu_ticks() { awk '{ print $16 + $17 }' "/proc/$$/stat"; }

# redis_run NAME PIPELINE [TEST [KEY_RANGE]]: calibrates -n so that the run lasts about BENCH_SECONDS (the
# calibration runs also warm the server up), then runs it against the RB_ server with its CPU sampled around it.
# TEST is get (default, keys from the loaded KEYS) or set.
redis_run() {
  local name=$1 pipeline=$2 test=${3:-get} range=${4:-$KEYS} n rps attempt secs
  local row=${test^^}
  n=$((50000 * pipeline))
  for attempt in 1 2 3 4; do
    redis_bench "$test" "$pipeline" "$n" "$WORK/$name.calibration.csv" "$range"
    rps=$(csv_rps "$WORK/$name.calibration.csv" "$row")
    secs=$(python3 -c "print($n / max($rps, 1.0))")
    if python3 -c "import sys; sys.exit(0 if $secs >= 1.0 or $attempt == 4 else 1)"; then break; fi
    n=$(python3 -c "print(min(int($n * 2.0 / max($secs, 0.05)), $n * 40))")
  done
  n=$(python3 -c "print(max(1000, int($rps * $BENCH_SECONDS)))")
  phase "$name: redis-benchmark -p $RB_PORT ($RB_NAME) -t $test -d $VALUE_SIZE -c $CONCURRENCY -P $pipeline -r $range -n $n (calibrated at $(printf '%.0f' "$rps") req/s)"
  local hits0 misses0 hits1 misses1 cpu0 cpu1 t0 t1 client0 client1
  read -r hits0 misses0 <<<"$(rb_counters)"
  cpu0=$(cpu_ticks "$RB_PID")
  client0=$(children_cpu_ticks)
  t0=$(now_us)
  redis_bench "$test" "$pipeline" "$n" "$WORK/$name.csv" "$range"
  t1=$(now_us)
  client1=$(children_cpu_ticks)
  cpu1=$(cpu_ticks "$RB_PID")
  read -r hits1 misses1 <<<"$(rb_counters)"
  printf '{"kind":"%s","name":"%s","port":%d,"test":"%s","pipeline":%d,"key_range":%d,"requests":%d,"cpu_ticks":%d,"client_cpu_ticks":%d,"clk_tck":%d,"wall_us":%d,"hits":%d,"misses":%d,"rss_kib":%d}\n' \
    "$RB_NAME" "$name" "$RB_PORT" "$row" "$pipeline" "$range" "$n" $((cpu1 - cpu0)) $((client1 - client0)) \
    "$CLK_TCK" $((t1 - t0)) $((hits1 - hits0)) $((misses1 - misses0)) "$(rss_kib "$RB_PID")" >"$WORK/$name.meta.json"
}

# node_counters ADMIN_PORT KEYSPACE: the node's hits (main + hot tier), misses and data-source fetches (ok, and any
# other result) of KEYSPACE, as one line of four numbers, from its /metrics.
node_counters() {
  local text
  text=$(http_get 127.0.0.1 "$1" /metrics) || die "the node does not answer GET /metrics on :$1"
  shift
  awk -v ks="keyspace=\"$1\"" '
    index($1, "{" ks ",") || index($1, "{" ks "}") {
      if ($1 ~ /^distcache_cache_hits_total\{/) hits += $2
      else if ($1 ~ /^distcache_cache_misses_total\{/) misses += $2
      else if ($1 ~ /^distcache_source_fetches_total\{.*result="ok"/) ok += $2
      else if ($1 ~ /^distcache_source_fetches_total\{/) other += $2
    }
    END { printf "%d %d %d %d\n", hits, misses, ok, other }' <<<"$text"
}

# distcache_run NAME BATCH KEYSPACE [EXTRA_BENCH_ARGS...]: one `distcache bench` run against the node of
# RUN_ENDPOINT, RUN_NODE_PID and RUN_ADMIN_PORT (with the CLI options RUN_CLI_ARGS); the server's CPU (and the
# node's counters of KEYSPACE) are sampled from the end of the warm-up to the end of the run, so they cover the
# measured window only.
RUN_ENDPOINT=$ENDPOINT RUN_NODE_PID=$NODE_PID RUN_ADMIN_PORT=$ADMIN_PORT
RUN_CLI_ARGS=()
distcache_run() {
  local name=$1 batch=$2 keyspace=$3
  shift 3
  local args=(bench --op get --keyspace "$keyspace" "${DC_COMMON[@]}" --batch "$batch"
    --duration "${RUN_SECONDS:-$BENCH_SECONDS}s" --warmup "${WARMUP_SECONDS}s" --no-preload "$@" --json)
  phase "$name: $(display_cmd distcache "${args[@]}")"
  local pid cpu0 cpu1 t0 t1 rc=0 c0 c1 client0 client1 started
  client0=$(children_cpu_ticks)
  started=$(now_us)
  # The load generator bounds itself (--warmup + --duration); `timeout` is the backstop. While it runs, this script
  # only sleeps and waits, so no polling takes CPU from the two processes under test.
  start_bg_split "distcache bench ($name)" "$WORK/$name.json" "$WORK/$name.err" \
    timeout $((BENCH_SECONDS + WARMUP_SECONDS + 60)) "$CLI_BIN" --endpoint "$RUN_ENDPOINT" "${RUN_CLI_ARGS[@]}" "${args[@]}"
  pid=$LAST_PID
  # The CPU window starts when the warm-up phase ends.
  sleep "$WARMUP_SECONDS"
  cpu0=$(cpu_ticks "$RUN_NODE_PID")
  t0=$(now_us)
  c0=$(node_counters "$RUN_ADMIN_PORT" "$keyspace")
  wait "$pid" || rc=$?
  forget_pid "$pid"
  t1=$(now_us)
  client1=$(children_cpu_ticks)
  cpu1=$(cpu_ticks "$RUN_NODE_PID")
  c1=$(node_counters "$RUN_ADMIN_PORT" "$keyspace")
  if ((rc != 0)); then
    sed 's/^/  | /' "$WORK/$name.err" >&2
    die "distcache bench ($name) exited with status $rc"
  fi
  local h0 m0 ok0 other0 h1 m1 ok1 other1
  read -r h0 m0 ok0 other0 <<<"$c0"
  read -r h1 m1 ok1 other1 <<<"$c1"
  # client_*: the load generator's CPU over its whole life (warm-up included) and that life's wall time.
  printf '{"kind":"distcache","name":"%s","endpoint":"%s","batch":%d,"keyspace":"%s","cpu_ticks":%d,"clk_tck":%d,"wall_us":%d,"rss_kib":%d,"node_hits":%d,"node_misses":%d,"node_fetches_ok":%d,"node_fetches_failed":%d,"client_cpu_ticks":%d,"client_wall_us":%d}\n' \
    "$name" "$RUN_ENDPOINT" "$batch" "$keyspace" $((cpu1 - cpu0)) "$CLK_TCK" $((t1 - t0)) "$(rss_kib "$RUN_NODE_PID")" \
    $((h1 - h0)) $((m1 - m0)) $((ok1 - ok0)) $((other1 - other0)) $((client1 - client0)) $((t1 - started)) \
    >"$WORK/$name.meta.json"
}

redis_run redis-get-p1 1
distcache_run distcache-get-c50 1 "$KEYSPACE" --transport h2
# The TLS node right after the plain one, so that both Get runs see the same machine state.
RUN_ENDPOINT=$TLS_ENDPOINT RUN_NODE_PID=$TLS_NODE_PID RUN_ADMIN_PORT=$TLS_ADMIN_PORT RUN_CLI_ARGS=("${TLS_CLI_ARGS[@]}")
distcache_run distcache-get-c50-tls 1 "$KEYSPACE" --transport h2
RUN_ENDPOINT=$ENDPOINT RUN_NODE_PID=$NODE_PID RUN_ADMIN_PORT=$ADMIN_PORT RUN_CLI_ARGS=()
distcache_run distcache-get-c50-client 1 "$KEYSPACE" --transport client

# use_node plain|traced|baseline: the node that distcache_run drives.
use_node() {
  case $1 in
    plain) RUN_ENDPOINT=$ENDPOINT RUN_NODE_PID=$NODE_PID RUN_ADMIN_PORT=$ADMIN_PORT ;;
    traced) RUN_ENDPOINT=$TRACED_ENDPOINT RUN_NODE_PID=$TRACED_NODE_PID RUN_ADMIN_PORT=$TRACED_ADMIN_PORT ;;
    baseline) RUN_ENDPOINT=$BASE_ENDPOINT RUN_NODE_PID=$BASE_NODE_PID RUN_ADMIN_PORT=$BASE_ADMIN_PORT ;;
    *) die "use_node: unknown node $1" ;;
  esac
  RUN_CLI_ARGS=()
}

# interleave A B: BENCH_PAIRS pairs of PAIR_SECONDS Get runs against nodes A and B, in the order A B, B A, A B, ...;
# run i of node X is named distcache-pair-A-B-X-i.
interleave() {
  local a=$1 b=$2 i first second node
  for ((i = 1; i <= BENCH_PAIRS; i++)); do
    if ((i % 2)); then first=$a second=$b; else first=$b second=$a; fi
    for node in "$first" "$second"; do
      use_node "$node"
      RUN_SECONDS=$PAIR_SECONDS distcache_run "distcache-pair-$a-$b-$node-$i" 1 "$KEYSPACE" --transport h2
    done
  done
  use_node plain
}
# The cost of tracing at the default sample ratio; and, when asked, of this build against another one.
interleave plain traced
[[ -z $BASE_NODE_PID ]] || interleave plain baseline
redis_run redis-get-p16 "$BATCH"
distcache_run distcache-getmany-16 "$BATCH" "$KEYSPACE" --transport h2
redis_run redis-set-p1 1 set "$SET_KEY_RANGE"
distcache_run distcache-get-miss 1 "$MISS_KEYSPACE" --unique-keys --transport h2
distcache_run distcache-get-miss-client 1 "$MISS_KEYSPACE" --unique-keys --transport client
# Keys that keep expiring (1 s TTL) behind an origin answering in 20 ms: without, then with staleWhileRevalidate.
DC_COMMON=(--concurrency "$CONCURRENCY" --value-size "$VALUE_SIZE" --keys "$EXPIRING_KEYS")
[[ -z $BENCH_CONNECTIONS ]] || DC_COMMON+=(--connections "$BENCH_CONNECTIONS")
distcache_run distcache-expiring 1 expiring
distcache_run distcache-expiring-swr 1 expiring-swr

# --- RESP: the same redis-benchmark against redis-server and the RESP node, one right after the other --------------

# resp_pair NAME PIPELINE TEST: redis_run against redis-server (resp-redis-NAME), then the RESP node
# (resp-distcache-NAME), keys from the KEYS loaded into both.
resp_pair() {
  RB_NAME=redis RB_PORT=$REDIS_PORT RB_PID=$REDIS_PID RB_ADMIN_PORT=
  redis_run "resp-redis-$1" "$2" "$3"
  RB_NAME=distcache-resp RB_PORT=$RESP_PORT RB_PID=$RESP_NODE_PID RB_ADMIN_PORT=$RESP_ADMIN_PORT
  redis_run "resp-distcache-$1" "$2" "$3"
  RB_NAME=redis RB_PORT=$REDIS_PORT RB_PID=$REDIS_PID RB_ADMIN_PORT=
}
resp_pair get-p1 1 get
resp_pair get-p16 "$BATCH" get
resp_pair set-p1 1 set

# --- memory per cached entry: a fresh redis-server and a fresh RESP node, RSS_KEYS keys each ------------------------
phase "memory: starting a fresh redis-server on :$RSS_REDIS_PORT and a fresh RESP node on :$RSS_RESP_PORT"
start_bg redis-server-rss "$WORK/redis-rss.log" \
  redis-server --port "$RSS_REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --daemonize no --dir "$WORK"
RSS_REDIS_PID=$LAST_PID
start_bg distcache-node-rss "$WORK/node-rss.log" "$NODE_BIN" --config "$WORK/node-rss.yaml"
RSS_NODE_PID=$LAST_PID
wait_ready "$RSS_REDIS_PID" 30 "redis PING" resp_ping "$RSS_REDIS_PORT"
wait_http_ready "$RSS_NODE_PID" 127.0.0.1 "$RSS_ADMIN_PORT" /readyz 30
wait_ready "$RSS_NODE_PID" 30 "RESP PING on :$RSS_RESP_PORT" resp_ping "$RSS_RESP_PORT"

# rss_fill NAME PID PORT: the server's RSS, then RSS_KEYS keys loaded (resp_load checks DBSIZE), then its RSS again;
# into rss-NAME.json.
rss_fill() {
  local name=$1 pid=$2 port=$3 before after t0 t1
  before=$(rss_kib "$pid")
  phase "memory: loading $RSS_KEYS keys of $VALUE_SIZE B into $name (RSS before: $before KiB)"
  t0=$(now_us)
  resp_load "rss-$name-load" "$port" "$RSS_KEYS"
  t1=$(now_us)
  after=$(rss_kib "$pid")
  printf '{"name":"%s","keys":%d,"value_size":%d,"rss_before_kib":%d,"rss_after_kib":%d,"dbsize":%d,"load_us":%d}\n' \
    "$name" "$RSS_KEYS" "$VALUE_SIZE" "$before" "$after" "$(redis-cli -p "$port" dbsize)" $((t1 - t0)) \
    >"$WORK/rss-$name.json"
}
rss_fill redis "$RSS_REDIS_PID" "$RSS_REDIS_PORT"
rss_fill distcache "$RSS_NODE_PID" "$RSS_RESP_PORT"

"$CLI_BIN" --endpoint "$ENDPOINT" stats "$KEYSPACE" >"$WORK/distcache-stats.txt" 2>&1 || true
"$CLI_BIN" --endpoint "$ENDPOINT" stats "$MISS_KEYSPACE" >"$WORK/distcache-miss-stats.txt" 2>&1 || true
redis-server --version >"$WORK/redis-version.txt" 2>&1 || true
"$CLI_BIN" --version >"$WORK/distcache-version.txt" 2>&1 || true

# --- report ----------------------------------------------------------------------------------------------------

RESULTS="$OUT_DIR/results.json"
python3 - "$WORK" "$RESULTS" "$BENCH_SECONDS" "$KEYS" "$VALUE_SIZE" "$CONCURRENCY" "$BATCH" "$WARMUP_SECONDS" \
  "$BENCH_PAIRS" "$PAIR_SECONDS" "${BENCH_BASELINE_NODE:-}" <<'EOF'
import csv, json, os, platform, sys, time

work, results_path = sys.argv[1], sys.argv[2]
seconds, keys, value_size, concurrency, batch, warmup, pairs, pair_seconds = map(int, sys.argv[3:11])
baseline_node = sys.argv[11]


def read(name):
    path = os.path.join(work, name)
    return open(path).read().strip() if os.path.exists(path) else ""


def last_json_object(text):
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                pass
    try:
        return json.loads(text)
    except ValueError:
        raise SystemExit(f"no JSON object in distcache bench output:\n{text}")


def redis_row(name, label):
    meta = json.loads(read(f"{name}.meta.json"))
    rows = [r for r in csv.reader(read(f"{name}.csv").splitlines()) if r]
    test = meta.get("test", "GET")
    header, row = rows[0], next(r for r in rows[1:] if r[0] == test)
    raw = {h: (row[i] if i == 0 else float(row[i])) for i, h in enumerate(header)}
    cpu_s = meta["cpu_ticks"] / meta["clk_tck"]
    return {
        "label": label,
        "ops_per_sec": raw["rps"],  # with -P 16 every pipelined command is one key, so this is keys/s too
        "p50_us": raw["p50_latency_ms"] * 1000,
        "p99_us": raw["p99_latency_ms"] * 1000,
        "server_cpu_us_per_key": cpu_s * 1e6 / meta["requests"],
        "server_cpu_s": cpu_s,
        # Share of one core the load generator (redis-benchmark, one thread) used during the run.
        "client_busy": meta["client_cpu_ticks"] / meta["clk_tck"] / (meta["wall_us"] / 1e6) if meta["wall_us"] else None,
        "keys": meta["requests"],
        "errors": None,
        "misses": meta["misses"],
        "server_rss_kib": meta["rss_kib"],
        "raw": {"csv": raw, "meta": meta},
    }


def distcache_row(name, label):
    meta = json.loads(read(f"{name}.meta.json"))
    raw = last_json_object(read(f"{name}.json"))
    b = int(raw.get("batch") or meta["batch"])
    requests = float(raw["requests"])
    keys_done = requests * b
    kps = raw.get("keys_per_sec")
    if kps is None:
        kps = float(raw["ops_per_sec"]) * b
    cpu_s = meta["cpu_ticks"] / meta["clk_tck"]
    return {
        "label": label,
        "ops_per_sec": float(kps),
        "p50_us": float(raw["p50_us"]),
        "p99_us": float(raw["p99_us"]),
        "server_cpu_us_per_key": cpu_s * 1e6 / keys_done if keys_done else None,
        "server_cpu_s": cpu_s,
        "keys": keys_done,
        "errors": raw.get("errors"),
        "misses": raw.get("misses"),
        "server_rss_kib": meta["rss_kib"],
        # Share of one core the load generator (distcache bench) used, its warm-up included.
        "client_busy": meta["client_cpu_ticks"] / meta["clk_tck"] / (meta["client_wall_us"] / 1e6)
        if meta["client_wall_us"] else None,
        "raw": {"bench": raw, "meta": meta},
    }


def ratio(a, b):
    return a / b if a is not None and b else None


def ratio_row(label, num, den):
    """The row of ratios num ÷ den of ops/s, p50, p99 and server CPU per request."""
    return {"label": label, **{k: ratio(num[k], den[k])
                               for k in ("ops_per_sec", "p50_us", "p99_us", "server_cpu_us_per_key")}}


rows = [
    redis_row("redis-get-p1", "redis GET P1"),
    distcache_row("distcache-get-c50", f"distcache Get c{concurrency}"),
    redis_row("redis-get-p16", f"redis GET P{batch}"),
    distcache_row("distcache-getmany-16", f"distcache GetMany({batch})"),
    redis_row("redis-set-p1", "redis SET P1"),
    distcache_row("distcache-get-miss", f"distcache Get miss c{concurrency}"),
    distcache_row("distcache-get-c50-tls", f"distcache Get c{concurrency} TLS"),
    distcache_row("distcache-expiring", "distcache Get expiring, no SWR"),
    distcache_row("distcache-expiring-swr", "distcache Get expiring, SWR 30s"),
    distcache_row("distcache-get-c50-client", f"distcache Get c{concurrency}, client library"),
    distcache_row("distcache-get-miss-client", f"distcache Get miss c{concurrency}, client library"),
]
ratios = []
for redis, dc in ((rows[0], rows[1]), (rows[2], rows[3]), (rows[4], rows[5]), (rows[0], rows[9]), (rows[4], rows[10])):
    ratios.append(ratio_row("  ratio distcache ÷ redis", dc, redis))

# TLS ÷ plain, the same Get run against the TLS node right after the plain one. Goal: ops/s ≥ 0.85 of plain.
TLS_GOAL = 0.85
plain_get, tls_get = rows[1], rows[6]
tls_ratio = ratio_row("  ratio TLS ÷ plain", tls_get, plain_get)
tls_summary = {
    "ops_per_sec_ratio": tls_ratio["ops_per_sec"],
    "goal_ops_per_sec_ratio": TLS_GOAL,
    "goal_met": tls_ratio["ops_per_sec"] is not None and tls_ratio["ops_per_sec"] >= TLS_GOAL,
    "plain": {"ops_per_sec": plain_get["ops_per_sec"], "server_cpu_us_per_req": plain_get["server_cpu_us_per_key"],
              "p50_us": plain_get["p50_us"], "p99_us": plain_get["p99_us"]},
    "tls": {"ops_per_sec": tls_get["ops_per_sec"], "server_cpu_us_per_req": tls_get["server_cpu_us_per_key"],
            "p50_us": tls_get["p50_us"], "p99_us": tls_get["p99_us"]},
    "server_cpu_us_per_req_ratio": tls_ratio["server_cpu_us_per_key"],
    "setup": "TLS 1.3 (rustls, ring), ECDSA P-256 certificate, server authentication only; distcache bench "
             "--transport h2 against both nodes",
}



def pooled(a, b, node, label):
    """The runs of `node` in the interleaved pairs of nodes a and b, pooled: mean ops/s, p50 and p99 (the runs
    are equally long), server CPU of all runs ÷ all their requests; and the single runs."""
    runs = [distcache_row(f"distcache-pair-{a}-{b}-{node}-{i}", label) for i in range(1, pairs + 1)]
    mean = lambda k: sum(r[k] for r in runs) / len(runs)
    cpu_s, keys_done = sum(r["server_cpu_s"] for r in runs), sum(r["keys"] for r in runs)
    return {"label": label, "ops_per_sec": mean("ops_per_sec"), "p50_us": mean("p50_us"), "p99_us": mean("p99_us"),
            "server_cpu_us_per_key": cpu_s * 1e6 / keys_done if keys_done else None, "server_cpu_s": cpu_s,
            "keys": keys_done, "errors": sum(r["errors"] or 0 for r in runs),
            "misses": sum(r["misses"] or 0 for r in runs), "client_busy": None, "runs": runs}


def comparison(a, b, label_a, label_b, ratio_label, goal=None):
    """Node b ÷ node a over their interleaved pairs: the pooled rows, their ratio row and a summary."""
    row_a, row_b = pooled(a, b, a, label_a), pooled(a, b, b, label_b)
    rt = ratio_row(ratio_label, row_b, row_a)
    per_pair = [ratio(rb["ops_per_sec"], ra["ops_per_sec"]) for ra, rb in zip(row_a["runs"], row_b["runs"])]
    cpu_per_pair = [ratio(rb["server_cpu_us_per_key"], ra["server_cpu_us_per_key"])
                    for ra, rb in zip(row_a["runs"], row_b["runs"])]
    summary = {
        "ops_per_sec_ratio": rt["ops_per_sec"],
        "server_cpu_us_per_req_ratio": rt["server_cpu_us_per_key"],
        "pair_ops_per_sec_ratios": per_pair,
        "pair_server_cpu_ratios": cpu_per_pair,
        a: {k: row_a[k] for k in ("ops_per_sec", "server_cpu_us_per_key", "p50_us", "p99_us")},
        b: {k: row_b[k] for k in ("ops_per_sec", "server_cpu_us_per_key", "p50_us", "p99_us")},
        "pairs": pairs, "seconds_per_run": pair_seconds,
    }
    if goal is not None:
        summary["goal_ops_per_sec_ratio"] = goal
        summary["goal_met"] = rt["ops_per_sec"] is not None and rt["ops_per_sec"] >= goal
    return row_a, row_b, rt, summary


# Tracing at the default sample ratio (0.01, spans exported to the OTLP sink) ÷ tracing off, over interleaved
# pairs of runs. Goal: ops/s ≥ 0.95.
TRACING_GOAL = 0.95
untraced_get, traced_get, tracing_ratio, tracing_summary = comparison(
    "plain", "traced", f"distcache Get c{concurrency}, tracing off", f"distcache Get c{concurrency}, tracing 0.01",
    "  ratio tracing ÷ off", TRACING_GOAL)
tracing_summary |= {
    # The sink's last count (it prints one each second the count changed).
    "spans_received": next((int(l.split(":")[1]) for l in reversed(read("otlp-sink.log").splitlines())
                            if l.startswith("spans received:")), 0),
    "setup": f"tracing: {{ otlpEndpoint: <distcache-otlp-sink>, sampleRatio: 0.01 }} ÷ no tracing section, "
             f"distcache bench --transport h2, {pairs} interleaved pairs of {pair_seconds} s runs",
}

# This build ÷ another build's node (BENCH_BASELINE_NODE), the same way.
baseline = None
if baseline_node:
    _, _, baseline_ratio, baseline_summary = comparison(
        "plain", "baseline", f"distcache Get c{concurrency}, this build", f"distcache Get c{concurrency}, baseline",
        "  ratio baseline ÷ this build")
    # Said as this build ÷ baseline: < 1 means this build is slower.
    inv = lambda v: 1 / v if v else None
    baseline = {"node": baseline_node, "version": read("baseline-version.txt"),
                "ops_per_sec_ratio_this_over_baseline": inv(baseline_summary["ops_per_sec_ratio"]),
                "server_cpu_ratio_this_over_baseline": inv(baseline_summary["server_cpu_us_per_req_ratio"]),
                "pair_ops_per_sec_ratios_this_over_baseline": [inv(v) for v in baseline_summary["pair_ops_per_sec_ratios"]],
                **{k: baseline_summary[k] for k in ("plain", "baseline", "pairs", "seconds_per_run")}}

# Keys whose 1 s TTL keeps expiring behind a 20 ms origin: p99 with staleWhileRevalidate ÷ without.
no_swr, swr = rows[7], rows[8]
swr_ratio = ratio_row("  ratio SWR ÷ no SWR", swr, no_swr)
swr_summary = {
    "p99_ratio": swr_ratio["p99_us"],
    "no_swr": {"p99_us": no_swr["p99_us"], "p50_us": no_swr["p50_us"], "ops_per_sec": no_swr["ops_per_sec"],
               "source_fetches": no_swr["raw"]["meta"]["node_fetches_ok"]},
    "swr": {"p99_us": swr["p99_us"], "p50_us": swr["p50_us"], "ops_per_sec": swr["ops_per_sec"],
            "source_fetches": swr["raw"]["meta"]["node_fetches_ok"]},
    "setup": "1,000 keys, ttl 1s, http-json hook, distcache-origin --delay 20ms, 50 concurrent readers",
}

cols = [("ops/s (keys/s)", "ops_per_sec"), ("p50 µs", "p50_us"), ("p99 µs", "p99_us"),
        ("server CPU µs/req", "server_cpu_us_per_key")]
width = max(len(r["label"]) for r in rows + ratios + [tls_ratio, swr_ratio, tracing_ratio, traced_get]) + 2


def fmt(value, key, is_ratio):
    if value is None:
        return "n/a"
    if is_ratio:
        return f"{value:.2f}×"
    if key == "ops_per_sec":
        return f"{value:,.0f}"
    return f"{value:,.1f}" if key != "server_cpu_us_per_key" else f"{value:.2f}"


print()
print(f"GET, {value_size} B values, {keys:,} keys, {concurrency} concurrent clients, {seconds} s per run, "
      f"loopback, {os.cpu_count()} cores shared by servers and load generators;\n"
      f"one server thread and one load-generator thread on each side.\n"
      f"Miss path: every distcache Get uses a new key, so it misses, runs the WebAssembly test hook (echo: "
      f"{value_size} B prefix + key,\nno I/O) and stores the value; beside redis SET of {value_size} B values "
      f"to random keys of a 10^9 range (nearly all new).\n"
      f"The distcache rows beside redis use distcache bench --transport h2 (a lean gRPC load generator, as "
      f"redis-benchmark is one);\nthe client-library rows use --transport client (tonic), what a Rust application "
      f"sees.")
print()
print("".ljust(width) + "".join(c.rjust(20) for c, _ in cols))
groups = ((rows[0], rows[1], ratios[0]), (rows[2], rows[3], ratios[1]), (rows[4], rows[5], ratios[2]),
          (rows[0], rows[9], ratios[3]), (rows[4], rows[10], ratios[4]),
          (rows[1], rows[6], tls_ratio), (untraced_get, traced_get, tracing_ratio), (rows[7], rows[8], swr_ratio))
for group in groups:
    for r in group:
        is_ratio = r["label"].strip().startswith("ratio")
        print(r["label"].ljust(width) + "".join(fmt(r[k], k, is_ratio).rjust(20) for _, k in cols))
    print()
print("ops/s with pipelining/batching count keys; CPU is the server process's utime+stime per request (per key).")
print("Load generator CPU (one thread each), share of one core: " + ", ".join(
    f"{r['label']} {r['client_busy']:.0%}" for r in rows[:6] + rows[9:] if r.get("client_busy") is not None))
tls_ops = tls_ratio["ops_per_sec"]
pair_list = lambda values: ", ".join(fmt(v, "ops_per_sec", True) for v in values)
print(f"Tracing: Get ops/s with sampleRatio 0.01 ÷ tracing off = {fmt(tracing_ratio['ops_per_sec'], 'ops_per_sec', True)} "
      f"(goal ≥ {TRACING_GOAL:.2f}: {'met' if tracing_summary['goal_met'] else 'NOT met'}) over {pairs} interleaved "
      f"pairs of {pair_seconds} s runs (each pair: {pair_list(tracing_summary['pair_ops_per_sec_ratios'])}); "
      f"server CPU µs/req {fmt(tracing_ratio['server_cpu_us_per_key'], 'ops_per_sec', True)}; "
      f"{tracing_summary['spans_received']:,} spans reached the OTLP sink")
if baseline:
    print(f"This build ÷ baseline ({baseline['node']}): Get ops/s "
          f"{fmt(baseline['ops_per_sec_ratio_this_over_baseline'], 'ops_per_sec', True)} over {pairs} interleaved "
          f"pairs (each pair: {pair_list(baseline['pair_ops_per_sec_ratios_this_over_baseline'])}); server CPU µs/req "
          f"{fmt(baseline['server_cpu_ratio_this_over_baseline'], 'ops_per_sec', True)} "
          f"({baseline['plain']['server_cpu_us_per_key']:.2f} vs {baseline['baseline']['server_cpu_us_per_key']:.2f})")
print(f"TLS: Get ops/s TLS ÷ plain = {fmt(tls_ops, 'ops_per_sec', True)} (goal ≥ {TLS_GOAL:.2f}: "
      f"{'met' if tls_summary['goal_met'] else 'NOT met'}); server CPU µs/req "
      f"{fmt(plain_get['server_cpu_us_per_key'], 'server_cpu_us_per_key', False)} plain, "
      f"{fmt(tls_get['server_cpu_us_per_key'], 'server_cpu_us_per_key', False)} TLS")

print(f"Expiring keys (1,000 keys, TTL 1 s, origin 20 ms): p99 with staleWhileRevalidate ÷ without = "
      f"{fmt(swr_ratio['p99_us'], 'p99_us', True)} ({swr['p99_us']:,.0f} µs vs {no_swr['p99_us']:,.0f} µs); "
      f"origin fetches {swr_summary['swr']['source_fetches']:,} with SWR, "
      f"{swr_summary['no_swr']['source_fetches']:,} without")

# RESP: the same redis-benchmark against redis-server and the RESP node, pair by pair.
resp_pairs = []
for suffix, what in (("get-p1", "GET P1"), ("get-p16", f"GET P{batch}"), ("set-p1", "SET P1")):
    redis, dc = redis_row(f"resp-redis-{suffix}", f"redis {what}"), redis_row(f"resp-distcache-{suffix}", f"distcache RESP {what}")
    resp_pairs.append((redis, dc, ratio_row("  ratio distcache ÷ redis", dc, redis)))


def memory(name):
    m = json.loads(read(f"rss-{name}.json"))
    m["bytes_per_entry"] = (m["rss_after_kib"] - m["rss_before_kib"]) * 1024 / m["dbsize"] if m["dbsize"] else None
    m["load_keys_per_sec"] = m["keys"] / (m["load_us"] / 1e6) if m["load_us"] else None
    return m


# A load generator this busy is the bottleneck of the run.
CLIENT_BOUND = 0.9
mem_redis, mem_dc = memory("redis"), memory("distcache")
mem_ratio = ratio(mem_dc["bytes_per_entry"], mem_redis["bytes_per_entry"])
resp_summary = {
    "setup": f"redis-benchmark -c {concurrency} -d {value_size} -r {keys} --csv against redis-server and a 1-node "
             f"DistCache with resp.listen (default keyspace cache-aside), both pre-loaded with the same {keys:,} keys "
             "by redis-cli --pipe; one server thread each",
    "runs": [{"test": redis["raw"]["meta"]["test"], "pipeline": redis["raw"]["meta"]["pipeline"],
              "redis": redis, "distcache": dc,
              "ratio": {k: v for k, v in rt.items() if k != "label"}} for redis, dc, rt in resp_pairs],
    "memory": {"redis": mem_redis, "distcache": mem_dc, "bytes_per_entry_ratio": mem_ratio,
               "setup": f"{mem_redis['keys']:,} keys key:%012d of {value_size} B loaded by redis-cli --pipe into a "
                        "fresh redis-server and a fresh RESP node; (RSS after − RSS before) ÷ DBSIZE"},
}

print()
print(f"RESP front end: the same redis-benchmark (-c {concurrency} -d {value_size} -r {keys}) against redis-server "
      "and a 1-node DistCache with resp.listen,\none right after the other, both loaded with the same keys.")
print()
print("".ljust(width) + "".join(c.rjust(20) for c, _ in cols))
for group in resp_pairs:
    for r in group:
        is_ratio = r["label"].strip().startswith("ratio")
        print(r["label"].ljust(width) + "".join(fmt(r[k], k, is_ratio).rjust(20) for _, k in cols))
    print()
# redis-benchmark runs one thread: when it is busy all the time, both servers answer as fast as it asks, and the
# ops/s ratio says how fast the client is, not which server is faster; the server CPU per request still does.
print("Load generator (redis-benchmark, one thread) CPU, share of one core, against redis / distcache: " + ", ".join(
    f"{dc['label'].removeprefix('distcache RESP ')} {redis['client_busy']:.0%} / {dc['client_busy']:.0%}"
    for redis, dc, _ in resp_pairs))
print()
print(f"Memory per cached entry ({mem_redis['keys']:,} keys of {value_size} B, (RSS after − RSS before) ÷ DBSIZE): "
      f"redis {mem_redis['bytes_per_entry']:,.0f} B, distcache {mem_dc['bytes_per_entry']:,.0f} B, "
      f"ratio distcache ÷ redis = {fmt(mem_ratio, 'ops_per_sec', True)}; loaded at "
      f"{mem_redis['load_keys_per_sec']:,.0f} and {mem_dc['load_keys_per_sec']:,.0f} keys/s (redis-cli --pipe)")

warnings = []
for redis, dc, _ in resp_pairs:
    for r in (redis, dc):
        if r["raw"]["meta"]["test"] == "GET" and r["misses"]:
            warnings.append(f"{r['label']}: {r['misses']} misses (keys not loaded or evicted?)")
for redis, dc, rt in resp_pairs:
    if min(redis["client_busy"] or 0, dc["client_busy"] or 0) >= CLIENT_BOUND:
        warnings.append(f"{dc['label']}: redis-benchmark was busy {redis['client_busy']:.0%} / {dc['client_busy']:.0%} "
                        "of its core: the ops/s ratio is the load generator's ceiling for both servers; compare "
                        "server CPU µs/req (ratio " + fmt(rt["server_cpu_us_per_key"], "ops_per_sec", True) + ")")
for r in rows[:7] + rows[9:] + [untraced_get, traced_get]:
    if r["errors"]:
        warnings.append(f"{r['label']}: {r['errors']} errors")
    if r["misses"]:
        warnings.append(f"{r['label']}: {r['misses']} misses (keys not loaded or evicted?)")
# A miss run is only what it claims if the node served no hit and loaded (once) every key it was asked for.
miss_checks = {}
for r in (rows[5], rows[10]):
    bench, meta = r["raw"]["bench"], r["raw"]["meta"]
    miss_checks[r["raw"]["meta"]["name"]] = {
        "requests_measured": bench["requests"],
        "node_hits": meta["node_hits"],
        "node_fetches_ok": meta["node_fetches_ok"],
        "node_fetches_failed": meta["node_fetches_failed"],
    }
    print(f"{r['label']}, node counters over the measured window: {meta['node_fetches_ok']:,} hook loads, "
          f"{meta['node_hits']} hits, {meta['node_fetches_failed']} failed loads (bench: {bench['requests']:,} Gets)")
    if meta["node_hits"]:
        warnings.append(f"{r['label']}: the node served {meta['node_hits']} hits; not a pure miss path")
    if meta["node_fetches_failed"]:
        warnings.append(f"{r['label']}: {meta['node_fetches_failed']} hook loads failed")
    # The counters are sampled around the measured window, the bench counts from its end of warm-up: allow the
    # requests in flight at either edge.
    if abs(meta["node_fetches_ok"] - bench["requests"]) > max(2 * concurrency, bench["requests"] // 100):
        warnings.append(f"{r['label']}: {meta['node_fetches_ok']} hook loads for {bench['requests']} Gets")
if not tracing_summary["goal_met"]:
    warnings.append(f"Get ops/s with tracing at 0.01 is {fmt(tracing_ratio['ops_per_sec'], 'ops_per_sec', True)} of "
                    f"tracing off, below the goal {TRACING_GOAL:.2f}")
if not tls_summary["goal_met"]:
    warnings.append(f"TLS Get ops/s is {fmt(tls_ops, 'ops_per_sec', True)} of plain, below the goal {TLS_GOAL:.2f}")
for w in warnings:
    print(f"warning: {w}")

result = {
    "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "machine": platform.machine()},
    "params": {"seconds": seconds, "keys": keys, "value_size": value_size, "concurrency": concurrency,
               "batch": batch, "distcache_warmup_s": warmup},
    "versions": {"redis": read("redis-version.txt"), "distcache": read("distcache-version.txt")},
    "rows": rows,
    "ratios": ratios + [tls_ratio, swr_ratio, tracing_ratio],
    "tls": tls_summary,
    "tracing": tracing_summary,
    "baseline": baseline,
    "stale_while_revalidate": swr_summary,
    "resp": resp_summary,
    "distcache_preload": last_json_object(read("dc-preload.json")) if read("dc-preload.json") else None,
    "distcache_tls_preload": last_json_object(read("dc-preload-tls.json")) if read("dc-preload-tls.json") else None,
    "distcache_stats_after": read("distcache-stats.txt"),
    "distcache_miss_stats_after": read("distcache-miss-stats.txt"),
    "miss_path_check": miss_checks,
    "warnings": warnings,
}
with open(results_path, "w") as f:
    json.dump(result, f, indent=2)
    f.write("\n")
print(f"raw numbers: {results_path}")
EOF
