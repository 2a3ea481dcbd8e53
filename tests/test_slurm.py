"""launch/slurm.sbatch on a real single-node Slurm (Debian's slurm-wlm and munge; make test-deps
installs them): the test starts its own slurmctld and slurmd on this machine, trains with both
launch modes (srun --mpi=pmix, and horovodrun inside the allocation), and stops a job with
scancel: the ranks stop after the same batch, checkpoint, leave no process, and --resume equals
the uninterrupted run. Skipped, saying why, without Slurm or root."""
import os
import shutil
import socket
import subprocess
import time
from types import SimpleNamespace

import pytest
from conftest import BIN, REPO, check_run, process_environ, read_json, record_launch, run_many

from hvd_train.outputs import events

pytestmark = pytest.mark.integration

SBATCH = REPO / "launch" / "slurm.sbatch"
TASKS = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = [tool for tool in ("slurmctld", "slurmd", "sbatch", "munged") if not shutil.which(tool)
               and not os.path.exists(f"/usr/sbin/{tool}")]
    if missing:
        pytest.skip(f"no Slurm here ({', '.join(missing)} missing; make test-deps installs slurm-wlm and munge)")
    if os.geteuid() != 0:
        pytest.skip("starting slurmctld and slurmd needs root")
    base = tmp_path_factory.mktemp("slurm")
    if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode != 0:
        os.makedirs("/run/munge", exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
    node = socket.gethostname().split(".")[0]
    for sub in ("state", "spool", "log"):
        (base / sub).mkdir()
    conf = base / "slurm.conf"
    conf.write_text(f"""ClusterName=hvdtest
SlurmctldHost={node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool
SlurmctldPidFile={base}/slurmctld.pid
SlurmdPidFile={base}/slurmd.pid
SlurmctldLogFile={base}/log/slurmctld.log
SlurmdLogFile={base}/log/slurmd.log
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
ReturnToService=2
MpiDefault=none
KillWait=30
NodeName={node} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory=1000 State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    subprocess.run(["slurmctld", "-f", conf], env=env, check=True)
    subprocess.run(["slurmd", "-f", conf], env=env, check=True)
    deadline = time.monotonic() + 60
    while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout:
        if time.monotonic() > deadline:
            pytest.fail("slurmd did not become idle:\n" + (base / "log" / "slurmd.log").read_text()[-2000:])
        time.sleep(0.5)
    yield SimpleNamespace(env=env, base=base)
    for daemon in ("slurmd", "slurmctld"):
        pid_file = base / f"{daemon}.pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), 15)
            except (ProcessLookupError, ValueError):
                pass


def sbatch(slurm, out_file, args, mode="srun") -> str:
    record_launch(["sbatch"])
    proc = subprocess.run(["sbatch", "--parsable", *TASKS, f"--output={out_file}", SBATCH, "--", *args],
                          env={**slurm.env, "LAUNCH_MODE": mode, "VENV": str(BIN.parent)}, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def running(slurm, job) -> bool:
    return bool(subprocess.run(["squeue", "-h", "-j", job], env=slurm.env, capture_output=True, text=True).stdout)


def wait_job(slurm, job, timeout=300) -> None:
    deadline = time.monotonic() + timeout
    while running(slurm, job):
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job], env=slurm.env)
            pytest.fail(f"Slurm job {job} still running after {timeout}s")
        time.sleep(0.5)


def job_processes(job) -> list:
    """Every process Slurm started for the job (its environment names the job)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if process_environ(int(pid)).get("SLURM_JOB_ID") == str(job):
                found.append(int(pid))
        except OSError:
            pass
    return found


@pytest.mark.parametrize("mode", ["srun", "horovodrun"])
def test_sbatch_trains_in_both_modes(slurm, tmp_path, mode):
    out = tmp_path / "out"
    job = sbatch(slurm, tmp_path / "slurm.out", ["--epochs", "20", "--output-dir", out, "--progress", "epoch"], mode)
    wait_job(slurm, job)
    log = (tmp_path / "slurm.out").read_text()
    check_run(out, SimpleNamespace(returncode=0 if (out / "metrics.json").exists() else 1, stdout=log, stderr=""), 2)
    assert "world size 2" in log


def test_scancel_checkpoints_and_resume_equals_an_uninterrupted_run(slurm, tmp_path):
    ckpt, stopped = tmp_path / "ckpt", tmp_path / "stopped"
    run = ["--dataset", "synthetic", "--samples", "4000", "--batch-size", "16", "--optimizer", "sgd",
           "--epochs", "4", "--progress", "epoch"]
    log = tmp_path / "stopped.out"
    job = sbatch(slurm, log, [*run, "--checkpoint-dir", ckpt, "--output-dir", stopped])
    deadline = time.monotonic() + 240
    while not (stopped / "events.jsonl").exists() or not any(
            e["event"] == "epoch" for e in events.read(stopped / "events.jsonl")):
        assert time.monotonic() < deadline and running(slurm, job), log.read_text()[-3000:] if log.exists() else ""
        time.sleep(0.2)
    pids = job_processes(job)
    subprocess.run(["scancel", job], env=slurm.env, check=True)
    cancelled = time.monotonic()
    while any(os.path.exists(f"/proc/{pid}") for pid in pids) and time.monotonic() - cancelled < 60:
        time.sleep(0.1)
    took = time.monotonic() - cancelled
    print(f"scancel -> every process of the job gone after {took:.1f}s")
    assert took <= 10, log.read_text()[-3000:]
    (stop,) = [e for e in events.read(stopped / "events.jsonl") if e["event"] == "run_stopped"]
    assert stop["signal"] == "SIGTERM" and os.path.exists(stop["checkpoint"]), stop
    wait_job(slurm, job)

    resumed = tmp_path / "resumed"
    wait_job(slurm, sbatch(slurm, tmp_path / "resumed.out", [*run, "--checkpoint-dir", ckpt, "--resume",
                                                             "--output-dir", resumed]))
    # The uninterrupted run needs no allocation: 2 processes of horovodrun (tests/programs/many_runs.py).
    whole = run_many(2, {"whole": run}, tmp_path / "whole")["whole"]
    assert whole.ok, whole
    a, b = read_json(resumed / "metrics.json"), read_json(whole.out / "metrics.json")
    assert a["replica_weight_digests"] == b["replica_weight_digests"], "stop + resume == uninterrupted, bit for bit"
