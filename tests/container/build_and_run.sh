#!/usr/bin/env bash
# Build the project's Dockerfile (unchanged but for BASE_IMAGE) with podman, then train inside
# the image with horovodrun -np 2 and copy the run's outputs out. No Docker engine is needed:
# podman/buildah with chroot isolation and the host network (see docs/running.md, "Docker").
set -euo pipefail

usage() {
  cat <<USAGE
Usage: tests/container/build_and_run.sh OUT_DIR [-- HVD_TRAIN_ARGS...]

Writes OUT_DIR/build.log, train.log, versions.txt, check-build.txt and run/ (the run's output directory).
Environment:
  IMAGE        tag to build (default: localhost/hvd_train:test)
  BASE_IMAGE   base image (default: localhost/debian:trixie-slim, made once with debootstrap
               because no registry is reachable here; any other must already be in podman's store)
  ROOTFS_CACHE where the debootstrap tree is kept (default: /var/cache/hvd_train/trixie-minbase)
  DEBIAN_MIRROR (default: http://deb.debian.org/debian)
  WHEELS       a directory of prebuilt wheels the build uses instead of compiling (default: the
               venv's wheels/, where scripts/setup.sh keeps the Horovod wheel it built)
  OUTPUT_DIR   the run's --output-dir (default: /home/trainer/runs/test, copied out to OUT_DIR/run);
               an s3:// URI is left in the bucket. AWS_* (launch/common.sh's STORAGE_ENV) reach
               the container when set.
  PREDICT      "MODEL_DIR INPUT": after training, hvd-train predict in the image (predict.log)
Layers are cached by podman, so a rebuild after a change to hvd_train/ only redoes the last layers.
USAGE
}

[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && { usage; exit 0; }
out="${1:?$(usage)}"
shift
[[ "${1:-}" == "--" ]] && shift
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
image="${IMAGE:-localhost/hvd_train:test}"
base="${BASE_IMAGE:-localhost/debian:trixie-slim}"
rootfs="${ROOTFS_CACHE:-/var/cache/hvd_train/trixie-minbase}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

for tool in podman buildah; do
  command -v "$tool" >/dev/null || { echo "build_and_run.sh: $tool not found (apt-get install podman buildah)" >&2; exit 2; }
done

# 1. The base image, once per machine.
if ! podman image exists "$base"; then
  [[ "$base" == localhost/debian:trixie-slim ]] \
    || { echo "build_and_run.sh: base image $base is not in podman's store" >&2; exit 2; }
  command -v debootstrap >/dev/null || { echo "build_and_run.sh: debootstrap not found" >&2; exit 2; }
  if [[ ! -x "$rootfs/usr/bin/apt-get" ]]; then
    rm -rf "$rootfs.partial"
    debootstrap --variant=minbase trixie "$rootfs.partial" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" \
      > "$out/debootstrap.log" 2>&1 || { tail -20 "$out/debootstrap.log" >&2; exit 1; }
    rm -rf "$rootfs" && mv "$rootfs.partial" "$rootfs"
  fi
  # Like the real trixie-slim: no downloaded .debs, package caches or lists in the image.
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | podman import - "$base" >/dev/null
fi

# 2. The project's Dockerfile. Only BASE_IMAGE differs from a plain 'docker build .'.
# --format docker: OCI images have no SHELL instruction, and the Dockerfile relies on bash.
build_args=(--format docker --isolation chroot --network host --cgroup-manager cgroupfs
            --build-arg "BASE_IMAGE=$base" -t "$image")
# Local CAs (e.g. a TLS-inspecting egress proxy) must be trusted inside the build too: the
# image's ca-certificates package adds every *.crt of this directory to its bundle, so pip trusts them.
local_ca=/usr/local/share/ca-certificates
if compgen -G "$local_ca/*.crt" >/dev/null; then
  build_args+=(-v "$local_ca:$local_ca:ro")
fi
# The Horovod wheel set-up built for this machine's Debian, Python and Open MPI: the image's
# build installs it instead of compiling Horovod again (the Dockerfile's WHEELS; it still checks
# the build for TensorFlow, Gloo and MPI).
wheels="${WHEELS:-$repo/.venv/wheels}"
if compgen -G "$wheels/*.whl" >/dev/null; then
  build_args+=(-v "$wheels:/opt/wheels:ro")
fi
if ! podman build "${build_args[@]}" -f "$repo/Dockerfile" "$repo" > "$out/build.log" 2>&1; then
  tail -40 "$out/build.log" >&2
  exit 1
fi

# 3. Train inside the image as its non-root user: 2 processes through horovodrun.
ctr="$(buildah from "$image")"
trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
args=("$@")
[[ ${#args[@]} -gt 0 ]] || args=(--epochs 30)
# --uts host with --network host, as docker run --network host does: Gloo resolves the hostname.
# shellcheck source=launch/common.sh
source "$repo/launch/common.sh"
envs=()
while read -r name; do envs+=(--env "$name=${!name}"); done < <(storage_env_set)
output="${OUTPUT_DIR:-/home/trainer/runs/test}"
buildah run --isolation chroot --network host --uts host --user trainer "${envs[@]}" "$ctr" -- \
  horovodrun -np 2 -H localhost:2 --gloo hvd-train "${args[@]}" --output-dir "$output" \
  > "$out/train.log" 2>&1 || { tail -40 "$out/train.log" >&2; exit 1; }
if [[ -n "${PREDICT:-}" ]]; then
  read -r model input <<< "$PREDICT"
  buildah run --isolation chroot --network host --user trainer "${envs[@]}" "$ctr" -- \
    hvd-train predict --model-dir "$model" --input "$input" > "$out/predict.log" 2>&1 \
    || { tail -40 "$out/predict.log" >&2; exit 1; }
fi
buildah run --isolation chroot --user trainer "$ctr" -- hvd-train versions > "$out/versions.txt"
buildah run --isolation chroot --user trainer "$ctr" -- horovodrun --check-build > "$out/check-build.txt"

# 4. The outputs, copied out of the container's filesystem.
if [[ "$output" == s3://* ]]; then
  echo "build_and_run.sh: trained in $image; outputs in $output"
  exit 0
fi
mnt="$(buildah mount "$ctr")"
rm -rf "$out/run"
cp -r "$mnt$output" "$out/run"
buildah umount "$ctr" >/dev/null
echo "build_and_run.sh: trained in $image; outputs in $out/run"
