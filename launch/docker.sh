#!/usr/bin/env bash
# The hvd_train image on one machine, or across hosts (one container per host, host networking).
set -euo pipefail

usage() {
  cat <<USAGE
Usage: launch/docker.sh [local|worker|launcher] [options] [-- HVD_TRAIN_ARGS...]

  local      (default) one container on this machine running horovodrun -np NP
  worker     on every host but the first: a detached container running sshd (as the image's
             user 'trainer') on --ssh-port, accepting the keys in --authorized-keys
  launcher   on the first host: a container running horovodrun over ssh to the workers,
             authenticating with --identity

Options:
  --image IMAGE           image (default: \$IMAGE, else hvd_train:latest)
  -n, --np NP             processes (default: \$NP, else 2 for local, else the sum of the slots)
  -H HOSTS                launcher: host:slots,... (the first entry is this host)
  -p, --ssh-port PORT     worker sshd / launcher ssh port (default: \$SSH_PORT, else 2222)
  --identity KEY          launcher: private key, mounted read-only at run time
  --authorized-keys FILE  worker: public key(s) allowed in, mounted read-only at run time
  --runs DIR              host directory mounted at /home/trainer/runs for outputs (default: ./runs)
  -h, --help              this text
Keys are never part of the image. Mounted key files must be readable by uid 1000 (trainer).
Environment: DOCKER (default: docker; podman works the same), IMAGE, NP, SSH_PORT,
DRY_RUN=1 prints the container command instead of running it. AWS_* (s3:// data and outputs) reach
the container by name (-e NAME).
Examples:
  launch/docker.sh -- --epochs 50 --output-dir runs/iris
  node2$ launch/docker.sh worker --authorized-keys ~/.ssh/hvd.pub
  node1$ launch/docker.sh launcher -H node1:2,node2:2 --identity ~/.ssh/hvd -- --output-dir runs/iris
USAGE
}

prog=docker.sh
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

mode=local
case "${1:-}" in local|worker|launcher) mode="$1"; shift ;; esac
image="${IMAGE:-hvd_train:latest}" np="${NP:-}" hosts="" port="${SSH_PORT:-2222}"
identity="" authorized="" runs="$PWD/runs"

while [[ $# -gt 0 ]]; do
  case "$1" in
    --image) image="${2:?--image needs a name}"; shift 2 ;;
    -n|--np) np="${2:?--np needs a number}"; shift 2 ;;
    -H|--hosts) hosts="${2:?-H needs host:slots,...}"; shift 2 ;;
    -p|--ssh-port) port="${2:?--ssh-port needs a port}"; shift 2 ;;
    --identity) identity="${2:?--identity needs a key file}"; shift 2 ;;
    --authorized-keys) authorized="${2:?--authorized-keys needs a file}"; shift 2 ;;
    --runs) runs="${2:?--runs needs a directory}"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "docker.sh: unknown option $1 (hvd-train options go after --)" >&2; usage >&2; exit 2 ;;
  esac
done

docker="${DOCKER:-docker}"
hvd_train=/opt/hvd_train/venv/bin/hvd-train  # absolute: ssh sessions don't get the image's PATH
mkdir -p "$runs"
run=("$docker" run --rm --network host -v "$(cd "$runs" && pwd):/home/trainer/runs")
# Object storage's endpoint and credentials, by name: docker copies the values from this environment.
while read -r name; do run+=(-e "$name"); done < <(storage_env_set)

case "$mode" in
  local)
    np="${np:-2}"
    require_np "$np"
    cmd=("${run[@]}" "$image" horovodrun -np "$np" -H "localhost:$np" --gloo "$hvd_train" "$@")
    ;;
  worker)
    [[ -r "$authorized" ]] || die "worker needs --authorized-keys FILE (readable)"
    # sshd as the unprivileged user: a host key made fresh in the container, config in /tmp.
    # shellcheck disable=SC2016  # expanded by the container's bash, not here
    sshd_script='set -euo pipefail; mkdir -p /tmp/sshd
ssh-keygen -q -t ed25519 -N "" -f /tmp/sshd/host_key
printf "Port %s\nHostKey /tmp/sshd/host_key\nPidFile /tmp/sshd/pid\nUsePAM no\nStrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nAuthorizedKeysFile /home/trainer/.ssh/authorized_keys\n" "$1" > /tmp/sshd/config
exec /usr/sbin/sshd -D -e -f /tmp/sshd/config'
    cmd=("$docker" run -d --rm --name "hvd-train-worker-$port" --network host
         -v "$(cd "$runs" && pwd):/home/trainer/runs"
         -v "$(cd "$(dirname "$authorized")" && pwd)/$(basename "$authorized"):/home/trainer/.ssh/authorized_keys:ro"
         "$image" bash -c "$sshd_script" sshd "$port")
    ;;
  launcher)
    [[ -n "$hosts" ]] || die "launcher needs -H host1:slots,host2:slots"
    [[ -r "$identity" ]] || die "launcher needs --identity KEY (readable)"
    total="$(slot_sum "$hosts")"
    np="${np:-$total}"
    require_np "$np"
    cmd=("${run[@]}" -v "$(cd "$(dirname "$identity")" && pwd)/$(basename "$identity"):/home/trainer/.ssh/id:ro"
         "$image" horovodrun -np "$np" -H "$hosts" --gloo --ssh-port "$port"
         --ssh-identity-file /home/trainer/.ssh/id "$hvd_train" "$@")
    ;;
esac

run_command "${cmd[@]}"
