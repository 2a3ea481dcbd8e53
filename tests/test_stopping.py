"""Stopping a run: a signal to the launcher (Ctrl-C, `kill` from a script) ends every process of
the job within seconds; with checkpoints on, the ranks stop together after a batch, checkpoint
that point, and --resume continues to exactly the uninterrupted run."""
import os
import re
import signal
import time

import pytest
from conftest import BIN, REPO, Background, read_json, requires_mpi, run_many

from hvd_train.outputs import events
from hvd_train.training import checkpoint

pytestmark = pytest.mark.integration

# With dropout: a checkpoint holds rank 0's dropout random state and every rank's follows from it,
# so even the masks of a resumed run are the uninterrupted run's (bit for bit, below).
RUN = ["--dataset", "synthetic", "--samples", "4000", "--batch-size", "16", "--optimizer", "sgd",
       "--dropout", "0.2", "--progress", "epoch"]
GONE_WITHIN = 10  # seconds from the signal to the last process of the job


def local(*args):
    """launch/local.sh, Gloo, 2 processes, in a session of its own (as a script's background job)."""
    return Background([REPO / "launch" / "local.sh", "-n", "2", "--gloo", "--", *RUN, *args],
                      env={"VENV": str(BIN.parent)})


def job_pids(job) -> list:
    from conftest import _descendants

    return [job.proc.pid, *_descendants(job.proc.pid)]


def alive(pids) -> list:
    left = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    left.append(pid)
        except OSError:
            pass
    return left


def stop_at_epoch(job, out, sig, epoch=2) -> tuple:
    job.wait_until(lambda: re.search(rf"epoch +{epoch}/", job.output), 240, f"epoch {epoch}")
    pids = job_pids(job)
    job.proc.send_signal(sig)
    sent = time.monotonic()
    while alive(pids) and time.monotonic() - sent < 60:
        time.sleep(0.05)
    took = time.monotonic() - sent
    return job.wait(10), alive(pids), took


def test_ctrl_c_checkpoints_and_resume_equals_an_uninterrupted_run(tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "stopped"
    args = ["--epochs", "4", "--checkpoint-dir", ckpt]
    job = local(*args, "--output-dir", out)
    code, left, took = stop_at_epoch(job, out, signal.SIGINT)
    print(f"SIGINT -> launcher exited {code}; every process gone after {took:.1f}s")
    assert code == 128 + signal.SIGINT and not left and took <= GONE_WITHIN, job.output[-3000:]
    (stop,) = [e for e in events.read(out / "events.jsonl") if e["event"] == "run_stopped"]
    assert stop["signal"] == "SIGINT" and stop["checkpoint"] == str(ckpt / checkpoint.file_name(
        stop["epoch"], stop["position"]))
    assert os.path.exists(stop["checkpoint"]) and "stopped by SIGINT" in job.output
    assert not (out / "metrics.json").exists(), "a stopped run writes no results"

    # The resumed run and the uninterrupted one, in one job of 2 processes.
    runs = run_many(2, {"resumed": [*RUN, *args, "--resume"], "whole": [*RUN, "--epochs", "4"]}, tmp_path / "job")
    assert runs["resumed"].ok and runs["whole"].ok, runs
    resumed, whole = runs["resumed"].out, runs["whole"].out
    a, b = read_json(resumed / "metrics.json"), read_json(whole / "metrics.json")
    # Bit for bit: the same weights, so the same test metrics; the history within float summation.
    assert a["replica_weight_digests"] == b["replica_weight_digests"]
    assert (a["test_loss"], a["test_accuracy"]) == (b["test_loss"], b["test_accuracy"])
    assert a["epochs_completed"] == b["epochs_completed"] == 4
    history = [(d / "history.csv").read_text().splitlines() for d in (resumed, whole)]
    assert history[0][0] == history[1][0] and len(history[0]) == len(history[1]) == 5
    for row_a, row_b in zip(history[0][1:], history[1][1:]):
        assert [float(v) for v in row_a.split(",")] == pytest.approx([float(v) for v in row_b.split(",")], rel=1e-5)


# launch/local.sh over Gloo with SIGINT: the test above. A signal to one rank only (as scancel or
# a pod deletion delivers it): tests/parallel/test_collectives.py.
@pytest.mark.parametrize("script,extra,sig", [
    pytest.param("local.sh", ["-n", "2", "--mpi"], signal.SIGTERM, marks=requires_mpi),
    pytest.param("mpirun.sh", ["-n", "2"], signal.SIGINT, marks=requires_mpi),
    # No --network-interface: every listed host is this machine, so the launcher picks lo itself.
    ("elastic.sh", ["--min-np", "1", "--max-np", "2", "-n", "2",
                    "--discovery", REPO / "launch" / "discover" / "hostfile.sh"], signal.SIGTERM),
])
def test_a_signal_to_the_launcher_ends_every_process(tmp_path, script, extra, sig):
    out = tmp_path / "out"
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("localhost:1\n127.0.0.1:1\n")
    job = Background([REPO / "launch" / script, *extra, "--", *RUN, "--epochs", "100", "--checkpoint-dir",
                      tmp_path / "ckpt", "--output-dir", out],
                     env={"VENV": str(BIN.parent), "HOSTS_FILE": str(hosts)})
    code, left, took = stop_at_epoch(job, out, sig)
    print(f"{script} {' '.join(map(str, extra[:3]))}: {sig.name} -> exit {code}, every process gone after {took:.1f}s")
    assert not left and took <= GONE_WITHIN, f"still running {took:.1f}s after {sig.name}: {left}\n{job.output[-3000:]}"
    assert code == 128 + sig, job.output[-3000:]
    kinds = [e["event"] for e in events.read(out / "events.jsonl")]
    assert kinds[-1] == "run_stopped" and "run_end" not in kinds, kinds
    assert f"stopped by {sig.name}" in job.output
    assert script != "elastic.sh" or "Gloo uses the loopback interface" in job.output
