"""scripts/setup.sh with another Python than the venv's: a venv of its own, the pinned stack and the
patched Horovod built for that interpreter, then iris trained at np=2 through launch/local.sh. The
host suite otherwise runs on one Python (CI: 3.11) and the image on Debian 13's (3.13). On a
machine where set-up already built Horovod for that interpreter, the wheel it kept is installed
instead of compiling again (scripts/setup.sh, HVD_TRAIN_WHEEL_CACHE); the image test compiles
for 3.13 whatever the cache holds."""
from __future__ import annotations

import glob
import os
import platform
import shutil
import subprocess

import pytest
from conftest import REPO, check_run, read_json, run

# A venv, TensorFlow and a Horovod build for a second interpreter: several minutes on 2 cores.
SETUP_TIMEOUT = 1800


def _version(python: str):
    try:
        out = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def other_python():
    """HVD_TRAIN_OTHER_PYTHON, else a python3.13 / python3.12 that runs (a pyenv shim that is not
    selected does not), else a pyenv installation of one: the first whose version is 3.11-3.13 and
    not this venv's. None if the machine has none."""
    mine = platform.python_version_tuple()[:2]
    mine = f"{mine[0]}.{mine[1]}"
    candidates = [os.environ.get("HVD_TRAIN_OTHER_PYTHON", "")]
    candidates += [shutil.which(name) or "" for name in ("python3.13", "python3.12", "python3.11")]
    root = shutil.which("pyenv") and subprocess.run(["pyenv", "root"], capture_output=True, text=True).stdout.strip()
    if root:
        candidates += sorted(glob.glob(f"{root}/versions/3.1[123].*/bin/python3.1[123]"), reverse=True)
    for python in filter(None, candidates):
        version = _version(python)
        if version in ("3.11", "3.12", "3.13") and version != mine:
            return python, version
    return None


@pytest.mark.integration
def test_setup_with_another_python_trains_iris(tmp_path):
    found = other_python()
    if found is None:
        pytest.skip("no second Python 3.11-3.13 on this machine (set HVD_TRAIN_OTHER_PYTHON=/path/to/python)")
    python, version = found
    venv = tmp_path / "venv"
    proc = run(["bash", REPO / "scripts" / "setup.sh"], timeout=SETUP_TIMEOUT,
               env={"VENV": str(venv), "PYTHON": python})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"creating {venv} with {python} (Python {version}" in proc.stdout
    assert "horovodrun --check-build lists TensorFlow, Gloo" in proc.stdout
    built = [line for line in proc.stdout.splitlines() if "horovod==" in line]
    print("\n".join(built))  # compiled, or a wheel this machine built earlier (HVD_TRAIN_WHEEL_CACHE)
    assert any("building horovod==" in line or "built earlier on this machine" in line for line in built), built
    out = tmp_path / "iris"
    proc = run(["bash", REPO / "launch" / "local.sh", "-n", "2", "--", "--output-dir", out, "--epochs", "60"],
               env={"VENV": str(venv)})
    m = check_run(out, proc, 2)
    assert m["test_accuracy"] >= 0.85
    assert read_json(out / "config.json")["versions"]["python"].startswith(version + ".")
