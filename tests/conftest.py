"""Shared helpers: run the real launchers in subprocesses with timeouts."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT = 240  # seconds; a hang anywhere fails the test instead of the CI run


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.pop("PYTHONPATH", None)
    return env


def run(cmd, timeout: int = LAUNCH_TIMEOUT, cwd=None) -> subprocess.CompletedProcess:
    """Run a command, fail the test (not hang) if it outlives the timeout."""
    try:
        return subprocess.run([str(c) for c in cmd], cwd=cwd or REPO, env=_env(), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"timed out after {timeout}s: {' '.join(map(str, cmd))}\n{err.stdout}\n{err.stderr}")


HVD_TRAIN = (BIN / "python", "-m", "hvd_train")  # what the launchers start unless told otherwise


def horovodrun(np_: int, args, controller: str = "gloo", timeout: int = LAUNCH_TIMEOUT, command=HVD_TRAIN):
    return run([BIN / "horovodrun", "-np", np_, "-H", f"localhost:{np_}", f"--{controller}",
                *command, *args], timeout=timeout)


def mpirun(np_: int, args, timeout: int = LAUNCH_TIMEOUT, command=HVD_TRAIN):
    return run(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", np_, *command, *args], timeout=timeout)


def read_json(path) -> dict:
    with open(path) as f:
        return json.load(f)


requires_mpi = pytest.mark.skipif(shutil.which("mpirun") is None, reason="no MPI on this machine (Gloo-only set-up)")
