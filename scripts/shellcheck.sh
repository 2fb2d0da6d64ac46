#!/usr/bin/env bash
# Runs shellcheck on every shell script of the repository: the files git knows (tracked, or new and not ignored)
# that end in .sh or start with a sh/bash shebang (such as .ci/run). Part of `make test` (`make shellcheck`); every
# warning fails it.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

command -v shellcheck >/dev/null 2>&1 ||
  die "shellcheck not found: apt-get install shellcheck (make setup does it when run as root)"
git rev-parse --is-inside-work-tree >/dev/null 2>&1 || die "not a git checkout: the scripts are found with git ls-files"

shebang='^#!.*[/ ](ba|da)?sh([[:space:]]|$)'
scripts=()
while IFS= read -r -d '' file; do
  [[ -f $file ]] || continue # tracked but deleted in the work tree
  if [[ $file == *.sh ]]; then
    scripts+=("$file")
    continue
  fi
  first=''
  IFS= read -r first <"$file" || true
  if [[ $first =~ $shebang ]]; then
    scripts+=("$file")
  fi
done < <(git ls-files -z --cached --others --exclude-standard)
((${#scripts[@]})) || die "git ls-files lists no shell scripts"

shellcheck "${scripts[@]}"
echo "shellcheck: ${#scripts[@]} scripts clean (${scripts[*]})"
