#!/usr/bin/env bash
# Removes what scripts/demo.sh and scripts/bench.sh leave in ${TMPDIR:-/tmp} (demo logs are kept on purpose; bench
# work directories only when a run failed). Called by `make clean-demo`.
#
# Normally those scripts stop their own processes on every exit path. Only a SIGKILLed script (whose traps never ran)
# leaves processes behind; their PIDs are in the directory's `pids` file, and this script stops those PIDs, and only
# while /proc shows the very process that was recorded (same PID and same start time), never anything found by name.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

shopt -s nullglob
dirs=("${TMPDIR:-/tmp}"/distcache-demo.* "${TMPDIR:-/tmp}"/distcache-bench.*)
if ((${#dirs[@]} == 0)); then
  say "nothing to clean"
  exit 0
fi

for dir in "${dirs[@]}"; do
  [[ -d $dir ]] || continue
  if [[ -f $dir/pids ]]; then
    read -r pid start name <"$dir/pids" || true
    if [[ ${name:-} == owner && $pid =~ ^[0-9]+$ ]] && is_live_process "$pid" "$start"; then
      say "skipping $dir: the script that made it (pid $pid) is still running"
      continue
    fi
    while read -r pid start name; do
      [[ $pid =~ ^[0-9]+$ && $name != owner ]] || continue
      is_live_process "$pid" "$start" || continue
      say "stopping leftover $name (pid $pid) from $dir"
      kill -TERM "$pid" 2>/dev/null || true
      for ((i = 0; i < 100; i++)); do
        is_live_process "$pid" "$start" || break
        sleep 0.1
      done
      if is_live_process "$pid" "$start"; then
        kill -KILL "$pid" 2>/dev/null || true
      fi
    done <"$dir/pids"
  fi
  rm -rf "$dir"
  say "removed $dir"
done
