# The two commands the README promises: `make train` and `make test`. Both set up on first use.
SHELL := /bin/bash
VENV ?= .venv
NP ?= 2
# Empty: launch/local.sh picks MPI when mpirun is installed, else Gloo (see docs/performance.md).
CONTROLLER ?=
ARGS ?=
PYTEST_ARGS ?=
BENCH_ARGS ?=
# 1: set-up also installs the pinned Ray for launch/ray.py (its own stamp, so switching re-runs set-up).
RAY ?= 0
export RAY
SETUP_STAMP := $(VENV)/.hvd_train-setup-done$(if $(filter 1,$(RAY)),-ray)
# horovodrun imports TensorFlow itself; keep TF's C++ INFO lines out of the output.
export TF_CPP_MIN_LOG_LEVEL ?= 1

# Everything that must pass shellcheck: the launchers and every shell script of the project.
SHELL_SCRIPTS := $(wildcard launch/*.sh) $(wildcard launch/discover/*.sh) launch/slurm.sbatch $(wildcard scripts/*.sh) \
                 $(wildcard tests/container/*.sh) .ci/run

.PHONY: help setup train sweep test test-fast test-all coverage lint test-deps bench clean
.DEFAULT_GOAL := help

help:
	@echo "make train   set up on first use, then train (NP=$(NP) CONTROLLER=mpi|gloo ARGS='...')"
	@echo "make sweep   set up on first use, then a hyperparameter sweep (ARGS='--config examples/sweep.toml')"
	@echo "make test    set up on first use, then run the test suite (PYTEST_ARGS='...')"
	@echo "make test-fast  the tests that start no launcher (under 2 minutes)"
	@echo "make test-all   make test plus the slow second variants of covered paths (--run-slow)"
	@echo "make coverage   the suite under coverage.py, ranks under the launchers included (coverage/report.txt)"
	@echo "make lint    ruff on the Python, shellcheck on the shell scripts (make test-deps installs shellcheck)"
	@echo "make bench   set up on first use, then the benchmark suite into bench/latest (BENCH_ARGS='...')"
	@echo "make setup   (re)run the idempotent set-up: scripts/setup.sh (RAY=1 adds Ray for launch/ray.py)"
	@echo "make test-deps  (root) install what the multi-host and container tests need; they skip without it"
	@echo "make clean   remove the venv and runs/"

# Re-run set-up only when what it installs from changes; scripts/setup.sh is itself idempotent.
$(SETUP_STAMP): scripts/setup.sh constraints.txt setup.cfg pyproject.toml $(wildcard patches/*.patch)
	bash scripts/setup.sh
	touch $@

setup: $(SETUP_STAMP)

train: $(SETUP_STAMP)
	VENV=$(abspath $(VENV)) CONTROLLER=$(CONTROLLER) launch/local.sh -n $(NP) -- $(ARGS)

# Every trial is a launch/local.sh run (or the sweep file's launcher); see docs/sweeps.md.
sweep: $(SETUP_STAMP)
	VENV=$(abspath $(VENV)) $(VENV)/bin/hvd-train sweep $(or $(ARGS),--config examples/sweep.toml)

test: $(SETUP_STAMP)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# No horovodrun, mpirun, ssh or image: unit tests of the pure parts and the launchers' argument checks.
test-fast: $(SETUP_STAMP)
	$(VENV)/bin/python -m pytest -m "not integration and not container" $(PYTEST_ARGS)

test-all: $(SETUP_STAMP)
	$(VENV)/bin/python -m pytest --run-slow $(PYTEST_ARGS)

# Line coverage of hvd_train/ over the suite, every process the tests launch included.
coverage: $(SETUP_STAMP)
	VENV=$(abspath $(VENV)) bash scripts/coverage.sh $(PYTEST_ARGS)

lint: $(SETUP_STAMP)
	$(VENV)/bin/ruff check .
	@command -v shellcheck >/dev/null || { echo "lint: shellcheck not found (make test-deps installs it)" >&2; exit 1; }
	shellcheck -x $(SHELL_SCRIPTS)

bench: $(SETUP_STAMP)
	$(VENV)/bin/hvd-bench --out bench/latest $(BENCH_ARGS)

# Test-only tools: an sshd to play a second host, podman/buildah/debootstrap for the image.
# Not part of set-up: installing openssh-server starts an ssh service on systemd machines.
test-deps:
	bash scripts/test-deps.sh

clean:
	rm -rf $(VENV) runs .pytest_cache *.egg-info
