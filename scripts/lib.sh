# shellcheck shell=bash
# Helpers shared by scripts/*.sh (sourced, never run): finding the built binaries, starting background processes
# and stopping exactly those again, and polling for readiness with a deadline.
#
# Process hygiene: every process a script starts goes through `start_bg`, which records its PID together with the
# kernel's start time of that PID. `stop_started` signals only PIDs whose start time still matches, so a PID that was
# reaped and reused by an unrelated process is never touched. With STATE_PIDS_FILE set, the records are also written
# to that file, so `scripts/clean-demo.sh` can stop what a SIGKILLed script (whose traps never ran) left behind.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

STARTED_PIDS=()
declare -A PID_NAME=() PID_LOG=() PID_START=()
LAST_PID=
STATE_PIDS_FILE=${STATE_PIDS_FILE:-}

say() { printf '%s\n' "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

# Microseconds since the epoch, from bash itself (no fork; independent of the locale's decimal separator).
now_us() { printf '%s\n' "${EPOCHREALTIME//[!0-9]/}"; }

# The cargo target directory, absolute (a relative CARGO_TARGET_DIR is relative to the repository root, where the
# Makefile runs cargo).
target_dir() {
  local dir=${CARGO_TARGET_DIR:-target}
  [[ $dir == /* ]] || dir="$ROOT/$dir"
  printf '%s\n' "$dir"
}

# Sets BIN_DIR, NODE_BIN and CLI_BIN to the release binaries, or fails with how to build them.
require_release_bins() {
  BIN_DIR="$(target_dir)/release"
  NODE_BIN="$BIN_DIR/distcache-node"
  CLI_BIN="$BIN_DIR/distcache"
  local bin
  for bin in "$NODE_BIN" "$CLI_BIN"; do
    [[ -x $bin ]] || die "$bin not found; build it first: make build (cargo build --release -p distcache-node -p distcache-client)"
  done
}

# Field N (1-based, as in proc(5)) of /proc/PID/stat. Field 2 (comm) may contain spaces and parentheses, so the
# fields are split after its closing ')'.
proc_stat_field() {
  local pid=$1 field=$2 line rest
  IFS= read -r line 2>/dev/null <"/proc/$pid/stat" || return 1
  rest=${line##*) }
  local -a fields
  read -r -a fields <<<"$rest"
  printf '%s\n' "${fields[field - 3]}"
}

# True while PID is a live (non-zombie) process that is still the one we started.
is_ours_running() {
  local pid=$1 state start
  state=$(proc_stat_field "$pid" 3 2>/dev/null) || return 1
  [[ $state != Z && $state != X ]] || return 1
  start=$(proc_stat_field "$pid" 22 2>/dev/null) || return 1
  [[ -z ${PID_START[$pid]:-} || ${PID_START[$pid]} == "$start" ]]
}

# True if PID is a live (non-zombie) process whose start time is START, i.e. still the process that was recorded.
is_live_process() {
  local pid=$1 start=$2 state
  state=$(proc_stat_field "$pid" 3 2>/dev/null) || return 1
  [[ $state != Z && $state != X && $(proc_stat_field "$pid" 22 2>/dev/null) == "$start" ]]
}

# start_bg NAME LOGFILE CMD [ARGS...]: runs CMD in the background (stdin from /dev/null, stdout and stderr to
# LOGFILE), records it, and leaves its PID in LAST_PID.
start_bg() {
  local name=$1 logf=$2
  shift 2
  "$@" </dev/null >"$logf" 2>&1 &
  record_bg "$!" "$name" "$logf"
}

# start_bg_split NAME STDOUT_FILE STDERR_FILE CMD [ARGS...]: like start_bg, with stdout and stderr kept apart.
start_bg_split() {
  local name=$1 outf=$2 errf=$3
  shift 3
  "$@" </dev/null >"$outf" 2>"$errf" &
  record_bg "$!" "$name" "$errf"
}

record_bg() {
  local pid=$1 name=$2 logf=$3
  STARTED_PIDS+=("$pid")
  PID_NAME[$pid]=$name
  PID_LOG[$pid]=$logf
  PID_START[$pid]=$(proc_stat_field "$pid" 22 2>/dev/null || true)
  if [[ -n $STATE_PIDS_FILE ]]; then
    printf '%s %s %s\n' "$pid" "${PID_START[$pid]:-?}" "$name" >>"$STATE_PIDS_FILE"
  fi
  # shellcheck disable=SC2034 # read by the scripts that source this file
  LAST_PID=$pid
}

# wait_exit PID TIMEOUT_SECONDS: polls every 50 ms until PID (started by start_bg) exits, reaps it and returns its
# exit status. Fails (the EXIT trap then stops it) if it still runs at the deadline.
wait_exit() {
  local pid=$1 timeout=$2 rc=0
  local deadline=$(($(now_us) + timeout * 1000000))
  while is_ours_running "$pid"; do
    if (($(now_us) > deadline)); then
      log_tail "$pid"
      die "${PID_NAME[$pid]:-pid $pid} still running after ${timeout}s"
    fi
    sleep 0.05
  done
  wait "$pid" || rc=$?
  forget_pid "$pid"
  return "$rc"
}

# Starts the state file of this script run (STATE_PIDS_FILE) with a line for the script itself, so clean-demo.sh
# leaves the directory of a run that is still going alone.
record_owner() {
  STATE_PIDS_FILE=$1
  printf '%s %s owner\n' "$$" "$(proc_stat_field "$$" 22 2>/dev/null || printf '?')" >"$STATE_PIDS_FILE"
}

# Drops PID from the records (after it was reaped by `wait`), so it is never signalled again.
forget_pid() {
  local pid=$1 p kept=()
  for p in "${STARTED_PIDS[@]}"; do [[ $p == "$pid" ]] || kept+=("$p"); done
  STARTED_PIDS=("${kept[@]}")
}

# Prints the last lines of a process's log, indented.
log_tail() {
  local pid=$1 lines=${2:-30}
  local logf=${PID_LOG[$pid]:-}
  [[ -n $logf && -f $logf ]] || return 0
  printf -- '--- last %s lines of %s ---\n' "$lines" "$logf" >&2
  tail -n "$lines" "$logf" | sed 's/^/  | /' >&2
}

# Stops every process started through start_bg: SIGTERM, up to STOP_GRACE_SECONDS (default 10) for them to exit,
# then SIGKILL; then reaps them. Idempotent; safe to call from traps.
stop_started() {
  local pid i any
  ((${#STARTED_PIDS[@]})) || return 0
  for pid in "${STARTED_PIDS[@]}"; do
    if is_ours_running "$pid"; then kill -TERM "$pid" 2>/dev/null || true; fi
  done
  for ((i = 0; i < ${STOP_GRACE_SECONDS:-10} * 10; i++)); do
    any=0
    for pid in "${STARTED_PIDS[@]}"; do
      if is_ours_running "$pid"; then any=1 && break; fi
    done
    ((any)) || break
    sleep 0.1
  done
  for pid in "${STARTED_PIDS[@]}"; do
    if is_ours_running "$pid"; then
      warn "${PID_NAME[$pid]:-pid $pid} did not stop within ${STOP_GRACE_SECONDS:-10}s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  for pid in "${STARTED_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  STARTED_PIDS=()
}

# True if something accepts TCP connections on 127.0.0.1:PORT.
port_in_use() {
  (: <>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Fails with a clear message if any of the given ports on 127.0.0.1 is taken.
require_free_ports() {
  local port busy=()
  for port in "$@"; do
    if port_in_use "$port"; then busy+=("$port"); fi
  done
  ((${#busy[@]} == 0)) && return 0
  printf 'error: port(s) %s on 127.0.0.1 already in use; stop whatever listens there first.\n' "${busy[*]}" >&2
  if command -v ss >/dev/null 2>&1; then
    for port in "${busy[@]}"; do ss -Hltnp "sport = :$port" 2>/dev/null | sed 's/^/  /' >&2 || true; done
  fi
  printf '  (a demo killed with SIGKILL may have left nodes behind: make clean-demo stops those)\n' >&2
  exit 1
}

# True if GET http://HOST:PORT/PATH answers 200 within about a second. Uses curl when present, else bash's /dev/tcp.
http_ok() {
  local host=$1 port=$2 path=$3
  if command -v curl >/dev/null 2>&1; then
    curl -fsS -o /dev/null --max-time 1 "http://$host:$port$path" 2>/dev/null
    return
  fi
  (
    exec 3<>"/dev/tcp/$host/$port" || exit 1
    printf 'GET %s HTTP/1.1\r\nHost: %s:%s\r\nConnection: close\r\n\r\n' "$path" "$host" "$port" >&3
    IFS= read -r -t 1 status <&3 || exit 1
    [[ $status =~ ^HTTP/[0-9.]+\ 200 ]]
  ) 2>/dev/null
}

# http_get HOST PORT PATH: prints the body of GET http://HOST:PORT/PATH; fails unless it answers 200 within about
# two seconds. Uses curl when present, else bash's /dev/tcp (reading exactly content-length bytes, since the server
# may keep the connection open).
http_get() {
  local host=$1 port=$2 path=$3
  if command -v curl >/dev/null 2>&1; then
    curl -fsS --max-time 2 "http://$host:$port$path"
    return
  fi
  (
    exec 3<>"/dev/tcp/$host/$port" || exit 1
    printf 'GET %s HTTP/1.1\r\nHost: %s:%s\r\nConnection: close\r\n\r\n' "$path" "$host" "$port" >&3
    IFS= read -r -t 2 status <&3 || exit 1
    [[ $status =~ ^HTTP/[0-9.]+\ 200 ]] || exit 1
    local line length=
    while IFS= read -r -t 2 line <&3; do
      line=${line%$'\r'}
      [[ -n $line ]] || break
      if [[ ${line,,} =~ ^content-length:\ *([0-9]+) ]]; then length=${BASH_REMATCH[1]}; fi
    done
    if [[ -n $length ]]; then
      local body='' LC_ALL=C # read -N counts bytes only in the C locale
      ((length == 0)) || IFS= read -r -N "$length" -t 2 body <&3 || true
      ((${#body} == length)) || exit 1
      printf '%s' "$body"
    else
      timeout 2 cat <&3
    fi
  ) 2>/dev/null
}

# wait_ready PID TIMEOUT_SECONDS WHAT CMD [ARGS...]: polls every 100 ms until CMD succeeds. Fails (with the
# process's log tail) when the process exits first or the deadline passes.
wait_ready() {
  local pid=$1 timeout=$2 what=$3
  shift 3
  local name=${PID_NAME[$pid]:-pid $pid}
  local deadline=$(($(now_us) + timeout * 1000000))
  while :; do
    if ! is_ours_running "$pid"; then
      log_tail "$pid"
      die "$name exited before it became ready ($what)"
    fi
    "$@" >/dev/null 2>&1 && return 0
    if (($(now_us) > deadline)); then
      log_tail "$pid"
      die "$name not ready after ${timeout}s ($what)"
    fi
    sleep 0.1
  done
}

# wait_http_ready PID HOST PORT PATH [TIMEOUT_SECONDS]: wait_ready until the URL answers 200 (default 30 s).
wait_http_ready() {
  wait_ready "$1" "${5:-30}" "http://$2:$3$4 answering 200" http_ok "$2" "$3" "$4"
}

# Quotes a command for display the way a person would type it: plain words bare, everything else in single quotes.
display_cmd() {
  local out=() arg
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+=("$arg")
    else
      out+=("'${arg//\'/\'\\\'\'}'")
    fi
  done
  printf '%s\n' "${out[*]}"
}
