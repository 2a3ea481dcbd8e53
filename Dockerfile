# hvd_train image: CPU by default. GPU: see docs/running.md, "Docker" (CUDA base, tensorflow, NCCL).
#
# Two stages: "builder" compiles Horovod (g++, CMake, the MPI and Python headers, TensorFlow's
# C++ headers); "runtime" gets the finished venv and the runtime libraries only. docs/running.md
# lists the layer sizes.
#
# Versions are coupled and pinned in constraints.txt (the same file the set-up uses):
# Horovod 0.28.1, with the project's patch (patches/), compiles its TensorFlow ops against the
# TensorFlow installed first (2.21.0), with Keras 3 (hvd_train drives it through horovod.tensorflow's
# ops: no tf_keras). trixie's python3 is 3.13 (the host set-up proves 3.11). The ARGs below
# must agree with constraints.txt (a test checks); change both together. Both stages use the same
# BASE_IMAGE, so the venv's python3 and libmpi in the runtime stage are the ones Horovod was built
# against.
ARG BASE_IMAGE=debian:trixie-slim

FROM ${BASE_IMAGE} AS builder
ARG TENSORFLOW_PACKAGE=tensorflow-cpu
ARG TENSORFLOW_VERSION=2.21.0
ARG HOROVOD_VERSION=0.28.1
# Empty for CPU; NCCL for the GPU variant (needs a CUDA/cuDNN base image with NCCL).
ARG HOROVOD_GPU_OPERATIONS=
ARG PYTHON=python3
# Optional: a directory of prebuilt wheels mounted into the build at this path, used instead of
# downloading or compiling (podman build -v "$PWD/.venv/wheels:/opt/wheels:ro": the Horovod wheel
# scripts/setup.sh built, as tests/container/build_and_run.sh does). Absent: nothing changes.
ARG WHEELS=/opt/wheels

SHELL ["/bin/bash", "-euo", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 TF_CPP_MIN_LOG_LEVEL=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 VENV=/opt/hvd_train/venv
ENV PATH=/opt/hvd_train/venv/bin:${PATH}

# Compilers, CMake's runtime needs and the headers Horovod and mpi4py build against.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates g++ make binutils patch python3 python3-dev python3-venv \
      openmpi-bin libopenmpi-dev \
 && rm -rf /var/lib/apt/lists/*

COPY constraints.txt /opt/hvd_train/constraints.txt
RUN "${PYTHON}" -m venv "${VENV}" \
 && pip install --no-cache-dir $([[ -d "${WHEELS}" ]] && echo --find-links "${WHEELS}") \
      -c /opt/hvd_train/constraints.txt setuptools wheel cmake numpy \
      "${TENSORFLOW_PACKAGE}==${TENSORFLOW_VERSION}" keras tensorboard scikit-learn matplotlib pyarrow mpi4py

# Build Horovod, check it, then drop what only the build needed or nothing runs (docs/running.md
# has the sizes): CMake; TensorFlow's C++ headers; libclang, which TensorFlow lists for its
# source tooling and no module imports; TensorBoard's UI server binary (summaries are written
# without it); the test suites of numpy, scipy, scikit-learn and matplotlib; and the debug info
# of Horovod's library (57 MB of its 61).
# Horovod: the wheel mounted in WHEELS if one fits this Python, else the sdist with the project's
# patch applied (the build stops if a hunk no longer applies), built here. The patch is all C++
# (an unpatched Horovod does not compile against TensorFlow 2.21), so the check of the build is
# --check-build's.
COPY patches/horovod-${HOROVOD_VERSION}.patch /opt/hvd_train/horovod.patch
RUN gpu_env=() \
 && if [[ -n "${HOROVOD_GPU_OPERATIONS}" ]]; then gpu_env=("HOROVOD_GPU_OPERATIONS=${HOROVOD_GPU_OPERATIONS}"); fi \
 && if [[ -d "${WHEELS}" ]] && pip install --no-cache-dir --no-deps --no-index --find-links "${WHEELS}" \
      "horovod==${HOROVOD_VERSION}" 2>/dev/null; then echo "horovod: the wheel from ${WHEELS}"; \
    else pip download --no-cache-dir --no-deps --no-binary :all: -d /tmp/horovod "horovod==${HOROVOD_VERSION}" \
      && tar -xzf "/tmp/horovod/horovod-${HOROVOD_VERSION}.tar.gz" -C /tmp/horovod \
      && patch -d "/tmp/horovod/horovod-${HOROVOD_VERSION}" -p1 --forward --batch < /opt/hvd_train/horovod.patch \
      && env "${gpu_env[@]}" HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 \
           HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_CMAKE="${VENV}/bin/cmake" MAKEFLAGS="-j$(nproc)" \
           pip install --no-cache-dir --no-build-isolation -c /opt/hvd_train/constraints.txt \
           "/tmp/horovod/horovod-${HOROVOD_VERSION}" \
      && rm -rf /tmp/horovod; fi \
 && pip install --no-cache-dir -c /opt/hvd_train/constraints.txt "horovod==${HOROVOD_VERSION}" \
 && horovodrun --check-build | tee /tmp/check-build \
 && for need in TensorFlow Gloo MPI; do grep -q "\[X\] ${need}" /tmp/check-build \
      || { echo "horovod was built without ${need}" >&2; exit 1; }; done \
 && pip uninstall -y -q cmake libclang tensorboard-data-server \
 && site="$("${VENV}/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
 && rm -rf "${site}/tensorflow/include" \
 && for pkg in numpy scipy sklearn matplotlib pyarrow; do find "${site}/${pkg}" -type d -name tests -prune -exec rm -rf {} +; done \
 && find "${site}/horovod" -name '*.so' -exec strip --strip-debug {} + \
 && "${VENV}/bin/python" -c 'import tensorflow, keras, sklearn, scipy.stats, matplotlib, pyarrow.parquet, horovod.tensorflow' 


FROM ${BASE_IMAGE} AS runtime
SHELL ["/bin/bash", "-euo", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 VENV=/opt/hvd_train/venv
ENV PATH=/opt/hvd_train/venv/bin:${PATH}

# Runtime only: the Python the venv points at, Open MPI's mpirun and libmpi (no headers), ssh for
# multi-host runs (the client for the launcher, the server for workers).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates python3 openmpi-bin \
      openssh-client openssh-server \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* \
 && mkdir -p /run/sshd

COPY --from=builder /opt/hvd_train /opt/hvd_train
RUN horovodrun --check-build | tee /tmp/check-build \
 && for need in TensorFlow Gloo MPI; do grep -q "\[X\] ${need}" /tmp/check-build \
      || { echo "horovod in the runtime stage lacks ${need}" >&2; exit 1; }; done \
 && rm /tmp/check-build

# The package source last, so editing hvd_train/ rebuilds neither TF nor Horovod. A pure-Python
# install: no compiler needed.
COPY pyproject.toml setup.cfg README.md /opt/hvd_train/src/
COPY hvd_train /opt/hvd_train/src/hvd_train
RUN pip install --no-cache-dir --no-deps --no-build-isolation /opt/hvd_train/src \
 && rm -rf /opt/hvd_train/src \
 && hvd-train versions

# Training runs as an unprivileged user. Multi-host workers run sshd as this user on a chosen
# port (launch/docker.sh); keys are mounted at run time, never baked in.
RUN useradd --create-home --shell /bin/bash trainer
USER trainer
WORKDIR /home/trainer

CMD ["horovodrun", "-np", "2", "-H", "localhost:2", "--gloo", "hvd-train", "--output-dir", "runs/iris"]
