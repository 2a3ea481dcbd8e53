#!/usr/bin/env bash
# hvd-train through plain mpirun (Open MPI), for clusters where mpirun is the norm.
set -euo pipefail

usage() {
  cat <<USAGE
Usage: launch/mpirun.sh [-n NP] [-H host1:slots,...] [--hostfile FILE] [-- HVD_TRAIN_ARGS...]

Runs hvd-train under Open MPI's mpirun, without horovodrun.
  -n, --np NP       processes (default: \$NP, else 2)
  -H HOSTS          comma-separated host:slots (default: this machine)
  --hostfile FILE   an Open MPI hostfile ('host slots=N' per line)
  -p, --ssh-port PORT, -i, --ssh-identity-file KEY
                    how mpirun's ssh reaches remote hosts (default: ssh's own)
  -h, --help        this text
Everything after -- goes to hvd-train. Remote hosts need the same venv path and
passwordless ssh. Extra mpirun options go in \$MPIRUN_OPTS (split on spaces, e.g. "-mca btl ^openib").
Environment: VENV, NP, MPIRUN (default: mpirun), MPIRUN_OPTS, SSH_PORT, SSH_IDENTITY_FILE, SSH_OPTS,
DRY_RUN=1 (print the command instead of running it). AWS_* (s3:// data and outputs) reach every
rank by name (-x NAME).
Example: launch/mpirun.sh -n 4 -H node1:2,node2:2 -- --epochs 50
USAGE
}

prog=mpirun.sh
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
venv="$(venv_dir)"
np="${NP:-2}" hosts="" hostfile=""
ssh_port="${SSH_PORT:-}" ssh_key="${SSH_IDENTITY_FILE:-}"

while [[ $# -gt 0 ]]; do
  case "$1" in
    -n|--np) np="${2:?--np needs a number}"; shift 2 ;;
    -H|--hosts) hosts="${2:?-H needs host:slots,...}"; shift 2 ;;
    --hostfile) hostfile="${2:?--hostfile needs a file}"; shift 2 ;;
    -p|--ssh-port) ssh_port="${2:?--ssh-port needs a port}"; shift 2 ;;
    -i|--ssh-identity-file) ssh_key="${2:?--ssh-identity-file needs a file}"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "mpirun.sh: unknown option $1 (hvd-train options go after --)" >&2; usage >&2; exit 2 ;;
  esac
done
require_np "$np"
command -v "${MPIRUN:-mpirun}" >/dev/null || die "${MPIRUN:-mpirun} not found (install Open MPI)"
[[ -x "$venv/bin/hvd-train" ]] || die "no hvd-train in $venv (run 'make setup' or set VENV)"

# Horovod's recommended Open MPI settings: no core binding (TensorFlow runs its own thread
# pools), ranks filled slot by slot, and the environment each rank needs exported to remote hosts.
args=(-np "$np" -bind-to none -map-by slot -x PATH="$venv/bin:$PATH" -x LD_LIBRARY_PATH
      -x TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}" -x PYTHONUNBUFFERED=1)
(( EUID == 0 )) && args+=(--allow-run-as-root)
# Object storage's endpoint and credentials, by name: Open MPI sends the values, never the command line.
while read -r name; do args+=(-x "$name"); done < <(storage_env_set)
[[ -n "$hosts" ]] && args+=(-H "$hosts")
[[ -n "$hostfile" ]] && args+=(--hostfile "$hostfile")
# One machine: ranks may exceed cores; and with every core computing, Open MPI's busy-polling
# costs throughput (measured, docs/performance.md), so ranks yield while they wait.
[[ -z "$hosts" && -z "$hostfile" ]] && args+=(--oversubscribe -mca mpi_yield_when_idle "${OMPI_MCA_mpi_yield_when_idle:-1}")
rsh_args="${ssh_port:+-p $ssh_port }${ssh_key:+-i $ssh_key }${SSH_OPTS:-}"
[[ -n "${rsh_args// /}" ]] && args+=(-mca plm_rsh_args "$rsh_args")
# shellcheck disable=SC2206  # MPIRUN_OPTS is a list of options, split on purpose
[[ -n "${MPIRUN_OPTS:-}" ]] && args+=(${MPIRUN_OPTS})
run_command "${MPIRUN:-mpirun}" "${args[@]}" "$venv/bin/hvd-train" "$@"
