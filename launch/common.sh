# shellcheck shell=bash
# Sourced by the launchers in this directory (not run): the pieces they share. Each launcher sets
# $prog (its name in messages) before calling these. slurm.sbatch stays standalone: sbatch runs a
# copy of it from Slurm's spool directory, where this file is not beside it.

# The venv every launcher starts hvd-train from: $VENV, else the repository's .venv; absolute
# when it exists (remote hosts are told the same path).
venv_dir() {
  local here dir
  here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
  dir="${VENV:-$here/../.venv}"
  (cd "$dir" 2>/dev/null && pwd) || echo "$dir"
}

die() {
  echo "${prog:-launch}: $*" >&2
  exit 2
}

require_np() {
  [[ "$1" =~ ^[1-9][0-9]*$ ]] || die "--np must be a positive integer, got '$1'"
}

# host1:2,host2:1 -> 3, after checking every entry is host:slots.
slot_sum() {
  local entry total=0 entries
  IFS=',' read -r -a entries <<< "$1"
  for entry in "${entries[@]}"; do
    [[ "$entry" =~ ^[^:,[:space:]]+:[1-9][0-9]*$ ]] || die "bad host entry '$entry' (want host:slots)"
    total=$(( total + ${entry##*:} ))
  done
  echo "$total"
}

# The final step of every launcher: DRY_RUN=1 prints the command (shell-quoted), else runs it.
run_command() {
  if [[ -n "${DRY_RUN:-}" ]]; then
    printf '%q ' "$@"
    echo
    exit 0
  fi
  exec "$@"
}
