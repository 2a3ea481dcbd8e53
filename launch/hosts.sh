#!/usr/bin/env bash
# hvd-train across hosts through horovodrun over ssh, after checking every host can run it.
set -euo pipefail

usage() {
  cat <<USAGE
Usage: launch/hosts.sh (-H host1:slots,host2:slots | --hostfile FILE) [options] [-- HVD_TRAIN_ARGS...]

Runs hvd-train on several hosts with horovodrun. Every host needs the same venv path
(\$VENV) with the same hvd_train, TensorFlow and Horovod, and passwordless ssh from here.
  -H HOSTS              comma-separated host:slots (slots = processes on that host)
  --hostfile FILE       one 'host slots=N' (or 'host:N') per line; # comments allowed
  -n, --np NP           processes (default: the sum of the slots)
  -p, --ssh-port PORT   ssh port (default: \$SSH_PORT, else ssh's own)
  -i, --ssh-identity-file KEY
                        ssh private key (default: \$SSH_IDENTITY_FILE, else ssh's own)
  --gloo | --mpi        controller (default: gloo, or \$CONTROLLER)
  --skip-preflight      do not check the hosts first
  -h, --help            this text
Pre-flight: each host must answer over ssh within \$SSH_CONNECT_TIMEOUT (10) seconds and report
the same 'hvd-train versions' line as this host; otherwise one message names the host.
Environment: VENV, CONTROLLER, SSH_PORT, SSH_IDENTITY_FILE, SSH_OPTS (extra ssh options),
DRY_RUN=1 (print the horovodrun command instead of running it; the pre-flight still runs).
Example: launch/hosts.sh -H node1:2,node2:2 -- --epochs 50 --output-dir /shared/runs/iris
USAGE
}

prog=hosts.sh
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
venv="$(venv_dir)"
controller="${CONTROLLER:-gloo}"
hosts="" hostfile="" np=""
ssh_port="${SSH_PORT:-}" ssh_key="${SSH_IDENTITY_FILE:-}" preflight=1

while [[ $# -gt 0 ]]; do
  case "$1" in
    -H|--hosts) hosts="${2:?-H needs host:slots,...}"; shift 2 ;;
    --hostfile) hostfile="${2:?--hostfile needs a file}"; shift 2 ;;
    -n|--np) np="${2:?--np needs a number}"; shift 2 ;;
    -p|--ssh-port) ssh_port="${2:?--ssh-port needs a port}"; shift 2 ;;
    -i|--ssh-identity-file) ssh_key="${2:?--ssh-identity-file needs a file}"; shift 2 ;;
    --mpi) controller=mpi; shift ;;
    --gloo) controller=gloo; shift ;;
    --skip-preflight) preflight=0; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "hosts.sh: unknown option $1 (hvd-train options go after --)" >&2; usage >&2; exit 2 ;;
  esac
done

if [[ -n "$hostfile" ]]; then
  [[ -z "$hosts" ]] || die "give -H or --hostfile, not both"
  [[ -r "$hostfile" ]] || die "cannot read hostfile $hostfile"
  # 'host slots=N', 'host:N' or 'host' (1 slot) per line -> host:N,host:N
  hosts="$(sed -e 's/#.*//' "$hostfile" | awk 'NF {
      n = 1; h = $1
      if (h ~ /:/) { split(h, a, ":"); h = a[1]; n = a[2] }
      for (i = 2; i <= NF; i++) if ($i ~ /^slots=/) n = substr($i, 7)
      printf "%s%s:%s", sep, h, n; sep = "," }')"
fi
[[ -n "$hosts" ]] || { echo "hosts.sh: no hosts: give -H host1:slots,... or --hostfile FILE" >&2; usage >&2; exit 2; }
[[ "$controller" == gloo || "$controller" == mpi ]] || die "CONTROLLER must be gloo or mpi"

total="$(slot_sum "$hosts")"
np="${np:-$total}"
require_np "$np"
[[ -x "$venv/bin/hvd-horovodrun" ]] || die "no hvd-horovodrun in $venv (run 'make setup' or set VENV)"
IFS=',' read -r -a entries <<< "$hosts"

ssh_args=(-o BatchMode=yes -o "ConnectTimeout=${SSH_CONNECT_TIMEOUT:-10}")
[[ -n "$ssh_port" ]] && ssh_args+=(-p "$ssh_port")
[[ -n "$ssh_key" ]] && ssh_args+=(-i "$ssh_key")
# shellcheck disable=SC2206  # SSH_OPTS is a list of options, split on purpose
[[ -n "${SSH_OPTS:-}" ]] && ssh_args+=(${SSH_OPTS})

# Hosts horovodrun runs without ssh: this machine's names and interface addresses.
local_names="$(this_machine)"

if (( preflight )); then
  want="$("$venv/bin/hvd-train" versions)"
  for entry in "${entries[@]}"; do
    host="${entry%:*}"
    [[ "$local_names" == *" $host "* ]] && continue
    # shellcheck disable=SC2029  # the venv path is this host's, expanded here on purpose
    if ! got="$(ssh "${ssh_args[@]}" "$host" "'$venv/bin/hvd-train' versions" 2>&1 </dev/null)"; then
      if ssh "${ssh_args[@]}" "$host" true </dev/null >/dev/null 2>&1; then
        echo "hosts.sh: host $host has no working hvd_train at $venv (install it there at the same path): ${got##*$'\n'}" >&2
      else
        echo "hosts.sh: host $host is not reachable over ssh: ${got##*$'\n'}" >&2
      fi
      exit 2
    fi
    if [[ "$got" != "$want" ]]; then
      echo "hosts.sh: host $host has '$got', this host has '$want'; install the same versions everywhere" >&2
      exit 2
    fi
  done
  echo "hosts.sh: ${#entries[@]} host(s) reachable with $want" >&2
fi

hvd_args=(-np "$np" -H "$hosts" "--$controller")
[[ -n "$ssh_port" ]] && hvd_args+=(--ssh-port "$ssh_port")
[[ -n "$ssh_key" ]] && hvd_args+=(--ssh-identity-file "$ssh_key")
# horovodrun, without the TensorFlow import of its build check (hvd_train/launchers/horovodrun.py).
run_command "$venv/bin/hvd-horovodrun" "${hvd_args[@]}" "$venv/bin/hvd-train" "$@"
