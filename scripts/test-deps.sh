#!/usr/bin/env bash
# Tools the multi-host, container and Slurm tests need (they are skipped without them), and
# the shellcheck that make lint runs.
# Debian/Ubuntu as root only; elsewhere this says what to install and succeeds.
set -euo pipefail

packages=(openssh-client openssh-server podman buildah debootstrap fuse-overlayfs uidmap util-linux shellcheck
          slurm-wlm munge)
missing=()
for tool in ssh sshd podman buildah debootstrap unshare shellcheck slurmctld slurmd munged; do
  command -v "$tool" >/dev/null 2>&1 || [[ -x "/usr/sbin/$tool" ]] || missing+=("$tool")
done
if [[ ${#missing[@]} -eq 0 ]]; then
  echo "[test-deps] present: ssh, sshd, podman, buildah, debootstrap, unshare, shellcheck, slurmctld, slurmd, munged"
  exit 0
fi
if [[ $EUID -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
  echo "[test-deps] missing ${missing[*]}; install ${packages[*]} as root to run every test" >&2
  exit 0
fi
echo "[test-deps] installing ${packages[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# policy-rc.d 101: do not start the services the packages install (ssh, munge, slurm); the tests
# run their own sshd, slurmctld and slurmd.
policy=/usr/sbin/policy-rc.d
if [[ ! -e "$policy" ]]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy"
  trap 'rm -f "$policy"' EXIT
fi
apt-get install -y -q --no-install-recommends "${packages[@]}"
