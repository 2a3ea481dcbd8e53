"""launch/ray.py: the same training on Ray workers (horovod.ray.RayExecutor), against a real Ray
head started here (`ray start --head`), and a local instance where no cluster is needed."""
import filecmp
import importlib.util
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from types import SimpleNamespace

import pytest
from conftest import BIN, REPO, Background, check_run, max_weight_difference, process_environ, read_json, run

from hvd_train.outputs import events

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                       reason="the Ray extra is not installed: make setup RAY=1 (CI installs it)"),
]

RAY_PY = [BIN / "python", REPO / "launch" / "ray.py"]
RAY_TIMEOUT = 300  # a Ray job starts its workers in seconds, but a cold head can take a while
REPORTED = "[hvd_train] ray: outputs in"  # the driver's own line (worker output arrives asynchronously)
WORKER_TITLE = b"ray::BaseHorovodWorker"  # how Ray names a Horovod worker actor's process


def _workers() -> list:
    """PIDs of the Horovod worker actors alive on this machine."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if f.read().startswith(WORKER_TITLE):
                        found.append(int(entry))
            except OSError:
                continue
    return found


def _start_head(options: list, env: dict):
    """`ray start --head --block` on a free port (outside Ray's own worker range, 10002-19999):
    the running process and the address Ray prints (this machine's, not 127.0.0.1). Ended by
    signalling that process, not `ray stop`, which would end every Ray instance on the machine."""
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    head = Background([BIN / "ray", "start", "--head", "--block", "--port", port, "--disable-usage-stats",
                       "--include-dashboard=false", *options], env=env)
    head.wait_until(lambda: re.search(r"--address='([^']+)'", head.output), 180, "the head's address")
    return head, re.search(r"--address='([^']+)'", head.output).group(1)


def _stop(started) -> None:
    """End a `ray start --block` and everything it started: SIGTERM, and after a few seconds SIGKILL
    to what is left (its graceful stop took 30 s here; a test cluster has nothing to save)."""
    os.killpg(started.proc.pid, signal.SIGTERM)
    try:
        started.proc.wait(5)
    except subprocess.TimeoutExpired:
        pass
    started.kill()


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A one-node Ray cluster for this module, 2 CPUs, with token authentication (what Ray 2.60
    does wherever a token exists). Yields the address and the environment a driver needs: the
    token's path, no RAY_AUTH_MODE (the driver chooses token mode, ray_launch.token_auth_default)."""
    temp = tmp_path_factory.mktemp("ray")
    (temp / "token").write_text(secrets.token_hex(32))
    driver_env = {"RAY_AUTH_TOKEN_PATH": str(temp / "token")}
    head, address = _start_head(["--num-cpus", "2", "--temp-dir", temp / "t"], {**driver_env, "RAY_AUTH_MODE": "token"})
    yield SimpleNamespace(address=address, env=driver_env)
    _stop(head)


def test_two_ray_workers_train_iris_like_horovodrun(tmp_path, ray_head):
    out, fetched = tmp_path / "run", tmp_path / "fetched"
    proc = run([*RAY_PY, "--address", ray_head.address, "--num-workers", "2", "--fetch-to", fetched, "--",
                "--dataset", "iris", "--epochs", "40", "--output-dir", out], timeout=RAY_TIMEOUT, env=ray_head.env)
    m = check_run(out, proc, 2, reported=REPORTED)  # identical replicas, exact test metrics, every output
    assert m["test_accuracy"] >= 0.9
    assert proc.stdout.count("[hvd_train] ray: 2 worker(s) finished") == 1
    # --fetch-to: the same files, byte for byte, copied back to the driver.
    names = sorted(p.name for p in out.iterdir())
    assert sorted(p.name for p in fetched.iterdir()) == names
    match, mismatch, errors = filecmp.cmpfiles(out, fetched, names, shallow=False)
    assert not mismatch and not errors, (mismatch, errors)
    assert not (tmp_path / "fetched.partial").exists()
    assert not _workers(), "the workers end with the job"


def test_two_ray_workers_with_batch_b_equal_one_process_with_batch_2b(tmp_path, ray_head):
    """The core promise on Ray (tests/test_equivalence.py has it under horovodrun): same samples
    per step, averaged gradients, so the final weights match a lone process with the global batch."""

    common = ["--dataset", "iris", "--no-shuffle", "--lr-scaling", "none", "--warmup-epochs", "0", "--seed", "7",
              "--epochs", "5", "--progress", "none", "--optimizer", "sgd", "--lr", "0.05"]
    on_ray = run([*RAY_PY, "--address", ray_head.address, "--num-workers", "2", "--", *common, "--batch-size", "8",
                  "--output-dir", tmp_path / "ray"], timeout=RAY_TIMEOUT, env=ray_head.env)
    alone = run([BIN / "python", "-m", "hvd_train", *common, "--batch-size", "16", "--output-dir", tmp_path / "one"])
    assert on_ray.returncode == 0 and alone.returncode == 0, on_ray.stderr[-3000:] + alone.stderr[-3000:]
    m_ray, m_one = read_json(tmp_path / "ray" / "metrics.json"), read_json(tmp_path / "one" / "metrics.json")
    assert m_ray["world_size"] == 2 and m_ray["steps_per_epoch"] == m_one["steps_per_epoch"] == 7
    assert max_weight_difference(tmp_path / "ray", tmp_path / "one") <= 1e-5


@pytest.mark.parametrize("args,message", [
    (["--num-workers", "0", "--", "--epochs", "2"], "--num-workers must be >= 1"),
    (["--num-workers", "2", "--", "--epochs", "x"], "argument --epochs: invalid int value: 'x'"),
    (["--num-workers", "2", "--", "--dataset", "nope"], "unknown dataset 'nope'"),
])
def test_bad_option_fails_before_ray_starts(args, message):
    started = time.monotonic()
    proc = run([*RAY_PY, *args], timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert proc.stderr.count("error:") == 1, "one message"
    assert "ray:" not in proc.stdout and time.monotonic() - started < 30, "Ray never started"


def test_fetch_to_a_non_empty_directory_is_refused(tmp_path):
    (tmp_path / "kept.txt").write_text("x")
    proc = run([*RAY_PY, "--num-workers", "2", "--fetch-to", tmp_path, "--", "--epochs", "2"], timeout=60)
    assert proc.returncode == 2 and "exists and is not an empty directory" in proc.stderr, proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["kept.txt"]


def test_unreachable_cluster_fails_at_once():
    """ray.init retries an address where nothing listens for minutes: the driver checks first."""
    proc = run([*RAY_PY, "--address", "127.0.0.1:1", "--num-workers", "2"], timeout=60)
    assert proc.returncode == 1 and proc.stderr.count("error:") == 1, proc.stderr
    assert "cannot reach the Ray cluster at 127.0.0.1:1" in proc.stderr


@pytest.mark.parametrize("workers", [["--num-workers", "3"], ["--min-workers", "3"]], ids=["fixed", "elastic"])
def test_more_workers_than_the_cluster_holds(ray_head, workers):
    elastic = workers[0] == "--min-workers"
    proc = run([*RAY_PY, "--address", ray_head.address, *workers, "--start-timeout", "8" if elastic else "5", "--",
                "--epochs", "2"], timeout=RAY_TIMEOUT, env={**ray_head.env, "RAY_WAIT_REPORT_SECONDS": "2"})
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hvd-train: error:")]
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-3000:]
    assert "could not place 3 worker(s) of 1 CPU(s)" in errors[0] and "the cluster has 2 CPU" in errors[0], errors
    assert "Traceback" not in proc.stderr
    if elastic:  # never silent while Horovod waits for room: a line every RAY_WAIT_REPORT_SECONDS
        waiting = [line for line in proc.stdout.splitlines() if line.startswith("[hvd_train] ray: waiting for room")]
        assert len(waiting) >= 2 and "--min-workers 3 needs 3 worker(s) of 1 CPU(s)" in waiting[0], proc.stdout
        assert "the alive nodes hold 2" in waiting[0]
        assert proc.stdout.count("Gloo uses the loopback interface (lo)") == 1, "one node: said once"
    assert not _workers()


def test_failure_on_the_workers_comes_back_as_one_message(tmp_path):
    """A local Ray instance (no --address): the CSV is missing where the workers look for it,
    which the driver cannot know; every worker agrees, rank 0's message is the driver's."""
    out = tmp_path / "run"
    proc = run([*RAY_PY, "--num-workers", "2", "--", "--dataset", f"csv:{tmp_path}/missing.csv",
                "--epochs", "2", "--output-dir", out], timeout=RAY_TIMEOUT)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hvd-train: error:")]
    assert len(errors) == 1 and "missing.csv" in errors[0], proc.stderr[-3000:]
    assert not out.exists(), "no half-written output"


def test_killed_worker_ends_the_job_with_one_message(tmp_path, ray_head):
    out = tmp_path / "run"
    job = Background([*RAY_PY, "--address", ray_head.address, "--num-workers", "2", "--grace", "10", "--",
                      "--dataset", "synthetic", "--samples", "6000", "--epochs", "200", "--progress", "epoch",
                      "--output-dir", out], env=ray_head.env)
    job.wait_until(lambda: re.search(r"epoch +2/200", job.output), RAY_TIMEOUT, "the second epoch")
    workers = _workers()
    assert len(workers) == 2, workers
    os.kill(max(workers), signal.SIGKILL)
    code = job.wait(120)
    errors = [line for line in job.lines if line.startswith("hvd-train: error:")]
    assert code == 1 and len(errors) == 1 and "died" in errors[0], job.output[-4000:]
    assert not (out / "metrics.json").exists()
    deadline = time.monotonic() + 30
    while _workers() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _workers(), "no worker left behind"


def test_ctrl_c_on_the_driver_ends_every_worker(tmp_path, ray_head):
    job = Background([*RAY_PY, "--address", ray_head.address, "--num-workers", "2", "--",
                      "--dataset", "synthetic", "--samples", "6000", "--epochs", "200", "--progress", "epoch",
                      "--output-dir", tmp_path / "run"], env=ray_head.env)
    job.wait_until(lambda: re.search(r"epoch +2/200", job.output), RAY_TIMEOUT, "the second epoch")
    assert len(_workers()) == 2
    os.kill(job.proc.pid, signal.SIGINT)
    assert job.wait(60) == 130, job.output[-3000:]
    assert job.output.count("hvd-train: stopped by SIGINT") == 1, job.output[-3000:]
    deadline = time.monotonic() + 30
    while _workers() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _workers(), "no worker left behind"


@pytest.fixture
def two_ray_nodes(tmp_path):
    """A head (1 CPU, on this machine's address) and a second node on 127.0.0.2 (1 CPU): two
    hosts to Horovod, so losing one leaves the other (its elastic driver sets aside a failed
    worker's whole host, so one node cannot show a job that survives). No authentication."""
    env = {"RAY_AUTH_MODE": "disabled"}
    common = ["--num-cpus", "1"]
    temp = tempfile.mkdtemp(prefix="ray")  # Ray's socket paths must stay under 108 bytes: not in tmp_path
    head, address = _start_head([*common, "--temp-dir", temp], env)
    node = Background([BIN / "ray", "start", "--address", address, "--node-ip-address", "127.0.0.2", "--block",
                       "--disable-usage-stats", *common], env=env)
    node.wait_until(lambda: "Ray runtime started" in node.output, 180, "the second node")
    yield SimpleNamespace(address=address, env=env, node=node)
    for started in (node, head):
        _stop(started)
    shutil.rmtree(temp, ignore_errors=True)


def _worker_on(node_ip: str) -> int:
    """The Horovod worker running on the Ray node with this address (through its raylet)."""
    for pid in _workers():
        env = process_environ(pid)
        with open(f"/proc/{int(env['RAY_RAYLET_PID'])}/cmdline", "rb") as f:
            if f"--node_ip_address={node_ip}".encode() in f.read():
                return pid
    pytest.fail(f"no worker on node {node_ip}")


def test_elastic_job_on_ray_survives_a_lost_worker(tmp_path, two_ray_nodes):
    """--min-workers 1 --max-workers 2 on two Ray nodes: the worker on one is SIGKILLed mid-run;
    the other restores the last commit and finishes alone, with exact metrics (the elastic state
    handling of hvd_train/training/elastic.py, as under horovodrun)."""
    out = tmp_path / "run"
    job = Background([*RAY_PY, "--address", two_ray_nodes.address, "--min-workers", "1", "--max-workers", "2",
                      "--", "--dataset", "synthetic", "--samples", "3000", "--epochs", "30", "--progress", "epoch",
                      "--output-dir", out], env=two_ray_nodes.env)
    job.wait_until(lambda: re.search(r"epoch +5/30", job.output), RAY_TIMEOUT, "the fifth epoch")
    os.kill(_worker_on("127.0.0.2"), signal.SIGKILL)
    code = job.wait(RAY_TIMEOUT)
    m = check_run(out, SimpleNamespace(returncode=code, stdout=job.output, stderr=""), 1, reported=REPORTED)
    assert m["elastic_resets"] == 1 and m["epochs_completed"] == 30
    resets = [e for e in events.read(out / "events.jsonl") if e["event"] == "reset"]
    assert len(resets) == 1 and (resets[0]["old_world_size"], resets[0]["world_size"]) == (2, 1), resets
    assert set(resets[0]["old_hosts"]) == {"127.0.0.2", two_ray_nodes.address.split(":")[0]}, "one worker per node"
    assert resets[0]["hosts"] == [two_ray_nodes.address.split(":")[0]], "the lost node's worker is gone"


def test_ray_script_has_help():
    """launch/ray.py runs from any directory without shadowing the ray package, and documents itself."""
    proc = subprocess.run([*map(str, RAY_PY), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: launch/ray.py"), proc.stderr
    assert "HVD_TRAIN_ARGS" in proc.stdout and "--fetch-to" in proc.stdout
