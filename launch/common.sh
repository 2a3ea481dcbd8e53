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

# What hvd_train's object storage reads from the environment (hvd_train/storage.py, ENV): the
# standard AWS variables and our timeouts. Launchers that start ranks elsewhere pass the ones set
# by NAME (mpirun -x NAME, docker -e NAME), so no value is ever on a command line.
STORAGE_ENV=(AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_SESSION_TOKEN AWS_ENDPOINT_URL AWS_ENDPOINT_URL_S3
             AWS_REGION AWS_DEFAULT_REGION AWS_PROFILE AWS_EC2_METADATA_DISABLED
             HVD_TRAIN_STORAGE_TIMEOUT HVD_TRAIN_STORAGE_ATTEMPTS)

# The STORAGE_ENV names set here, one per line.
storage_env_set() {
  local name
  for name in "${STORAGE_ENV[@]}"; do
    [[ -n "${!name+x}" ]] && echo "$name"
  done
  return 0
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

# The final step of every launcher: DRY_RUN=1 prints the command (shell-quoted), else runs it
# as the job (run_job).
# This machine's names and interface addresses, space-separated and padded ("  a b  "): the hosts
# horovodrun runs without ssh.
this_machine() {
  local names
  names=" localhost 127.0.0.1 $(hostname) $(hostname -f 2>/dev/null || true) "
  if command -v ip >/dev/null 2>&1; then
    names+="$(ip -o addr show 2>/dev/null | awk '{split($4, a, "/"); printf "%s ", a[1]}')"
  else
    names+="$(hostname -I 2>/dev/null || true) "
  fi
  echo "$names "
}

run_command() {
  if [[ -n "${DRY_RUN:-}" ]]; then
    printf '%q ' "$@"
    echo
    exit 0
  fi
  run_job "$@"
}

# Runs the job in a session of its own and passes a stop on. SIGTERM, SIGINT or SIGHUP to this
# launcher (Ctrl-C, `kill` from a script, a scheduler) goes to the job's training processes on
# this host, which stop together after a batch (within about a second), checkpoint (--checkpoint-dir) and exit
# (hvd_train/training/stopping.py); whatever is left of the job STOP_GRACE seconds later (default 30) is
# terminated, then killed. No process of the job outlives the launcher, which exits 128+signal
# after a stop and with the job's status otherwise.
run_job() {
  setsid "$@" &
  job=$!
  stop_signal=""
  trap 'stop_job TERM 15' TERM
  trap 'stop_job INT 2' INT
  trap 'stop_job HUP 1' HUP
  local code=0
  while :; do
    wait "$job" && code=0 || code=$?
    kill -0 "$job" 2>/dev/null || break  # ended (not a signal interrupting the wait)
  done
  trap - TERM INT HUP
  [[ -z "${watchdog:-}" ]] || kill "$watchdog" 2>/dev/null || true
  [[ -z "${helper:-}" ]] || kill "$helper" 2>/dev/null || true  # a launcher's own background loop
  # Leftovers (a rank orphaned by its launcher, a stuck mpirun): none may outlive the job.
  kill_job KILL
  [[ -z "$stop_signal" ]] || exit $((128 + stop_signal))
  exit "$code"
}

stop_job() {
  local name=$1 number=$2
  if [[ -n "$stop_signal" ]]; then  # a second stop: do not wait for the batch
    kill_job TERM
    return
  fi
  stop_signal=$number
  echo "${prog:-launch}: SIG$name: stopping the job at its next agreed batch (up to ${STOP_GRACE:-30} s)" >&2
  local ranks
  ranks="$(job_processes "$job" training)"
  # shellcheck disable=SC2086  # one word per PID
  if [[ -n "$ranks" ]]; then kill -"$name" $ranks 2>/dev/null || true; else kill -"$name" -- "-$job" 2>/dev/null || true; fi
  ( sleep "${STOP_GRACE:-30}"; kill_job TERM; sleep 5; kill_job KILL ) &
  watchdog=$!
}

# Signal every process of the job: its process group, its session and its descendants.
kill_job() {
  local pids
  pids="$(job_processes "$job" all)"
  kill -"$1" -- "-$job" 2>/dev/null || true
  pkill -"$1" -s "$job" 2>/dev/null || true
  # shellcheck disable=SC2086  # one word per PID
  [[ -z "$pids" ]] || kill -"$1" $pids 2>/dev/null || true
}

# The PIDs under the job's process, all of them or only the training processes (python
# running hvd-train / hvd_train, not horovodrun, mpirun or their shells).
job_processes() {
  ps -e -o pid=,ppid=,args= | awk -v root="$1" -v which="$2" '
    { parent[$1] = $2; line[$1] = $0; pids[++n] = $1 }
    END {
      keep[root] = 1
      for (changed = 1; changed; ) {
        changed = 0
        for (i = 1; i <= n; i++) { p = pids[i]; if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; changed = 1 } }
      }
      for (p in keep) {
        if (p == root) continue
        split(line[p], f, " ")
        if (which == "all" || (f[3] ~ /python/ && line[p] ~ /hvd[-_]train/ && line[p] !~ /horovodrun|mpirun|orted|prterun/)) print p
      }
    }'
}
