#!/usr/bin/env bash
# N hvd-train processes on this machine through horovodrun.
set -euo pipefail

usage() {
  cat <<USAGE
Usage: launch/local.sh [-n NP] [--mpi|--gloo] [-- HVD_TRAIN_ARGS...]

Runs NP processes of hvd-train on this machine with horovodrun.
  -n, --np NP   processes (default: \$NP, else one per GPU, else 2)
  --mpi         MPI controller (\$CONTROLLER=mpi; the default when mpirun is installed)
  --gloo        Gloo controller (\$CONTROLLER=gloo; the default without mpirun)
  -h, --help    this text
Everything after -- goes to hvd-train (see: hvd-train --help).
Environment: VENV (default: the repository's .venv), NP, CONTROLLER,
DRY_RUN=1 (print the command instead of running it).
Example: launch/local.sh -n 2 -- --dataset wine --epochs 50 --output-dir runs/wine
USAGE
}

prog=local.sh
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
venv="$(venv_dir)"
controller="${CONTROLLER:-}"
np="${NP:-}"

while [[ $# -gt 0 ]]; do
  case "$1" in
    -n|--np) np="${2:?--np needs a number}"; shift 2 ;;
    --mpi) controller=mpi; shift ;;
    --gloo) controller=gloo; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "local.sh: unknown option $1 (hvd-train options go after --)" >&2; usage >&2; exit 2 ;;
  esac
done

if [[ -z "$np" ]]; then
  gpus=0
  if command -v nvidia-smi >/dev/null 2>&1; then
    gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
  fi
  np=$(( gpus > 0 ? gpus : 2 ))
fi
require_np "$np"
# Measured (docs/performance.md): on one host MPI's shared-memory transport (with yield, below)
# trains 10-20% faster than Gloo's TCP loopback at np=2, so it is the default when present.
if [[ -z "$controller" ]]; then
  controller=gloo
  if command -v mpirun >/dev/null 2>&1; then controller=mpi; fi
fi
[[ "$controller" == gloo || "$controller" == mpi ]] || die "CONTROLLER must be gloo or mpi"
[[ -x "$venv/bin/hvd-horovodrun" ]] || die "no hvd-horovodrun in $venv (run 'make setup' or set VENV)"

# Measured (docs/performance.md): with every core computing, Open MPI's busy-polling while it
# waits costs 23% of the throughput; yielding gives it back. Gloo does not poll.
cores="$(nproc 2>/dev/null || echo 1)"
if [[ "$controller" == mpi && "$np" -ge "$cores" ]]; then
  export OMPI_MCA_mpi_yield_when_idle="${OMPI_MCA_mpi_yield_when_idle:-1}"
fi
# horovodrun, without the TensorFlow import of its build check (hvd_train/launchers/horovodrun.py).
run_command "$venv/bin/hvd-horovodrun" -np "$np" -H "localhost:$np" "--$controller" "$venv/bin/hvd-train" "$@"
