# hvd_train image: CPU by default. GPU: see README, "Docker" (CUDA base, tensorflow, NCCL).
#
# Versions are coupled and pinned in constraints.txt (the same file the set-up uses):
# Horovod 0.28.1 compiles its TensorFlow ops against the TensorFlow installed first (2.15.1, the
# last with Keras 2 as tf.keras, which Horovod's Keras callbacks need); TensorFlow 2.15 needs
# Python 3.9-3.11 and numpy < 2. bookworm's python3 is 3.11. The ARGs below must agree with
# constraints.txt (a test checks); change both together.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

ARG TENSORFLOW_PACKAGE=tensorflow-cpu
ARG TENSORFLOW_VERSION=2.15.1
ARG HOROVOD_VERSION=0.28.1
# Empty for CPU; NCCL for the GPU variant (needs a CUDA/cuDNN base image with NCCL).
ARG HOROVOD_GPU_OPERATIONS=
ARG PYTHON=python3

SHELL ["/bin/bash", "-euo", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 VENV=/opt/hvd_train/venv
ENV PATH=/opt/hvd_train/venv/bin:${PATH}

# Compilers for Horovod, Open MPI (mpirun and the headers Horovod builds against), ssh for
# multi-host runs (the client for the launcher, the server for workers).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates g++ make python3 python3-dev python3-venv \
      openmpi-bin libopenmpi-dev openssh-client openssh-server \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /run/sshd

# Dependencies before the package source, so editing hvd_train/ rebuilds neither TF nor Horovod.
COPY constraints.txt /opt/hvd_train/constraints.txt
RUN "${PYTHON}" -m venv "${VENV}" \
 && pip install --no-cache-dir -c /opt/hvd_train/constraints.txt setuptools wheel cmake numpy \
      "${TENSORFLOW_PACKAGE}==${TENSORFLOW_VERSION}" scikit-learn matplotlib mpi4py

RUN gpu_env=() \
 && if [[ -n "${HOROVOD_GPU_OPERATIONS}" ]]; then gpu_env=("HOROVOD_GPU_OPERATIONS=${HOROVOD_GPU_OPERATIONS}"); fi \
 && env "${gpu_env[@]}" HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 \
      HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_CMAKE="${VENV}/bin/cmake" \
      pip install --no-cache-dir --no-build-isolation -c /opt/hvd_train/constraints.txt "horovod==${HOROVOD_VERSION}" \
 && horovodrun --check-build | tee /tmp/check-build \
 && for need in TensorFlow Gloo MPI; do grep -q "\[X\] ${need}" /tmp/check-build \
      || { echo "horovod was built without ${need}" >&2; exit 1; }; done \
 && rm /tmp/check-build

COPY pyproject.toml setup.cfg README.md /opt/hvd_train/src/
COPY hvd_train /opt/hvd_train/src/hvd_train
RUN pip install --no-cache-dir --no-deps --no-build-isolation /opt/hvd_train/src \
 && rm -rf /opt/hvd_train/src/build \
 && hvd-train versions

# Training runs as an unprivileged user. Multi-host workers run sshd as this user on a chosen
# port (launch/docker.sh); keys are mounted at run time, never baked in.
RUN useradd --create-home --shell /bin/bash trainer
USER trainer
WORKDIR /home/trainer

CMD ["horovodrun", "-np", "2", "-H", "localhost:2", "--gloo", "hvd-train", "--output-dir", "runs/iris"]
