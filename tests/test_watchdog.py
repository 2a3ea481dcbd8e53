"""The watchdog's verdicts (hvd_train/watchdog.py), from the states rank 0 holds: a silent rank, a
stuck one, collectives that do not match, and what is *not* a stall (a long step every rank is
in, ranks a few marks apart). The heartbeats themselves and the job's end are tested on real
launches (test_resilience.py: a SIGSTOPped rank under Gloo and MPI; test_elastic.py). Also the
writes that fail on a real full filesystem (a small tmpfs) without a launch."""
import json
import os
import subprocess
import time

import numpy as np
import pytest
from conftest import small_filesystem

from hvd_train import storage, watchdog
from hvd_train.training import checkpoint

LIMIT = 10.0


@pytest.fixture
def dog(monkeypatch):
    """Rank 0's watchdog of 3 ranks, ranks 1 and 2 on this machine (not started: no thread)."""
    peers = [{"host": f"h{r}", "pid": 100 + r, "machine": watchdog._machine()} for r in range(3)]
    monkeypatch.setattr(watchdog, "_mark", (0, "set-up", False, time.monotonic()))
    found = watchdog.Watchdog(0, 3, LIMIT, peers, None, False, "token")
    yield found
    found.sock.close()


def state(dog, rank, phase, waiting=False, seconds=0.0, count=0, heard=0.0):
    """Rank ``rank`` in ``phase`` for ``seconds`` at its ``count``-th mark, heard ``heard`` s ago."""
    now = time.monotonic()
    if rank == 0:
        watchdog._mark = (dog.base + count, phase, waiting, now - seconds)
    else:
        dog.heard[rank] = (now - heard, {"phase": phase, "waiting": waiting, "for": seconds - heard,
                                         "count": count})


def test_a_long_step_every_rank_is_in_is_not_a_stall(dog, monkeypatch):
    # As long as earlier steps (the first one's trace included) were not many times shorter.
    monkeypatch.setitem(watchdog._steps, "longest", LIMIT)
    for r in range(3):
        state(dog, r, "training step 5 of epoch 2", seconds=5 * LIMIT, count=40)
    monkeypatch.setitem(watchdog._steps, "in_step", True)
    assert dog._judge(dog.heard, set()) is None


def test_a_step_every_rank_is_in_for_many_times_the_longest_step_is_stuck(dog, monkeypatch):
    monkeypatch.setitem(watchdog._steps, "longest", 0.25)
    for r in range(3):
        state(dog, r, "training step 5 of epoch 2", seconds=LIMIT + 1, count=40)
    monkeypatch.setitem(watchdog._steps, "in_step", True)
    assert dog._judge(dog.heard, set()) == (
        "no rank finished training step 5 of epoch 2 for 11 s, where every step so far took at most 0.25 s; every "
        "rank still answers, so one is stuck inside the step (its input pipeline on a hung read, an op that never "
        "returns) (--stall-timeout 10; raise it if a step may take that long)")
    assert dog.doomed == []  # nobody to kill: every rank answers


def test_ranks_a_few_marks_apart_within_the_limit_are_not_a_stall(dog):
    state(dog, 0, "the stop check after batch 8 of epoch 1", waiting=True, seconds=LIMIT / 2, count=41)
    state(dog, 1, "the callbacks after training step 8 of epoch 1", seconds=LIMIT / 2, count=40)
    state(dog, 2, "the stop check after batch 8 of epoch 1", waiting=True, seconds=1, count=41)
    assert dog._judge(dog.heard, set()) is None


def test_a_rank_not_heard_from_for_the_limit_is_named_silent(dog):
    for r in (0, 1):
        state(dog, r, "training step 3 of epoch 2", seconds=LIMIT + 2, count=30)
    state(dog, 2, "training step 3 of epoch 2", seconds=LIMIT + 2, count=30, heard=LIMIT + 1)
    verdict = dog._judge(dog.heard, set())
    assert verdict == ("rank 2 (host h2, pid 102) stopped answering: nothing heard from it for 11 s while ranks 0,1 "
                       "were in training step 3 of epoch 2 (--stall-timeout 10)")
    assert dog.doomed == [102]  # on this machine: killed as the job ends


def test_a_rank_that_has_left_is_not_silent(dog):
    state(dog, 0, "writing the outputs", seconds=LIMIT * 3)
    state(dog, 1, "done", heard=LIMIT * 2)
    state(dog, 2, "done", heard=LIMIT * 2)
    assert dog._judge(dog.heard, {1, 2}) is None


def test_a_rank_behind_the_others_that_wait_for_it_is_named_stuck(dog):
    state(dog, 0, "the stop check at the end of epoch 2", waiting=True, seconds=LIMIT + 3, count=51)
    state(dog, 1, "the end of epoch 2", seconds=LIMIT + 3, count=50)  # in a user's callback
    state(dog, 2, "the stop check at the end of epoch 2", waiting=True, seconds=LIMIT + 3, count=51)
    verdict = dog._judge(dog.heard, set())
    assert verdict.startswith("rank 1 (host h1, pid 101) in the end of epoch 2 for 13 s: no progress while ranks "
                              "0,2 were in the stop check at the end of epoch 2 (--stall-timeout 10; raise it")
    assert dog.doomed == [101]


def test_ranks_waiting_in_different_collectives_are_a_mismatch(dog):
    state(dog, 0, "agreeing on checkpoint", waiting=True, seconds=LIMIT + 1, count=20)
    state(dog, 1, "the stop check at the end of epoch 1", waiting=True, seconds=LIMIT + 1, count=20)
    state(dog, 2, "agreeing on checkpoint", waiting=True, seconds=LIMIT + 1, count=20)
    verdict = dog._judge(dog.heard, set())
    assert "wait for each other in different collectives" in verdict and "rank 1 in the stop check" in verdict


def test_an_elastic_world_drops_a_silent_rank_on_this_machine_instead_of_ending():
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        peers = [{"host": "a", "pid": os.getpid(), "machine": watchdog._machine()},
                 {"host": "b", "pid": sleeper.pid, "machine": watchdog._machine()}]
        dog = watchdog.Watchdog(0, 2, LIMIT, peers, None, True, "token")
        dog.heard[1] = (time.monotonic() - LIMIT - 1, {"phase": "training step 1 of epoch 1", "count": 5})
        assert dog._judge(dog.heard, set()) is None  # no verdict: the job goes on without it
        assert sleeper.wait(5) == -9
        dog.sock.close()
    finally:
        sleeper.kill()


def test_the_stall_inspector_and_glloo_follow_the_limit(monkeypatch):
    monkeypatch.delenv("HOROVOD_GLOO_TIMEOUT_SECONDS", raising=False)
    assert watchdog.horovod_env(0, elastic=False) == {}
    assert watchdog.horovod_env(60, elastic=False) == {
        "HOROVOD_STALL_CHECK_TIME_SECONDS": "60", "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "120",
        "HOROVOD_GLOO_TIMEOUT_SECONDS": "90"}
    assert "HOROVOD_GLOO_TIMEOUT_SECONDS" not in watchdog.horovod_env(60, elastic=True)
    monkeypatch.setenv("HOROVOD_GLOO_TIMEOUT_SECONDS", "20")  # the user's own stays
    assert "HOROVOD_GLOO_TIMEOUT_SECONDS" not in watchdog.horovod_env(60, elastic=False)


# --- writes on a full disk, a read-only or a removed folder ---------------------------------------

def fill(folder) -> None:
    """Use up every free byte of the filesystem holding ``folder``."""
    with open(folder / "filler", "wb", buffering=0) as f:
        try:
            while f.write(b"x" * 4096):
                pass
        except OSError:
            pass


def test_an_event_line_that_does_not_fit_is_kept_whole_for_later(tmp_path):
    with small_filesystem(tmp_path / "fs", "16k") as fs:
        log = storage.Appender(str(fs / "events.jsonl"))
        log.add(json.dumps({"n": 0}) + "\n")
        fill(fs)
        with pytest.raises(storage.StorageError, match="events.jsonl: No space left on device"):
            log.add(json.dumps({"n": 1, "pad": "y" * 6000}) + "\n")
        assert (fs / "events.jsonl").read_text() == '{"n": 0}\n'  # no half line
        (fs / "filler").unlink()
        log.add(json.dumps({"n": 2}) + "\n")  # the kept line first, whole
        assert [json.loads(x)["n"] for x in (fs / "events.jsonl").read_text().splitlines()] == [0, 1, 2]


def small_state():
    return checkpoint.State(model=[np.ones((50, 50), np.float32)], optimizer=[np.zeros(3, np.float32)], seeds=[])


def test_a_checkpoint_that_cannot_be_written_keeps_the_earlier_ones(tmp_path):
    with small_filesystem(tmp_path / "fs", "28k") as fs:  # two checkpoints of about 11 kB fit
        for epoch in (1, 2):
            checkpoint.save(str(fs), epoch, small_state(), {}, keep=1 if epoch == 2 else 3)
        assert [e for e, _ in checkpoint.listed(str(fs))] == [2]  # kept 1: the older pruned after
        checkpoint.save(str(fs), 3, small_state(), {}, keep=3)
        with pytest.raises(checkpoint.CheckpointError, match=rf"could not write the checkpoint {fs}/ckpt-epoch-"
                                                             rf"000004.npz: No space left on device; the earlier"):
            checkpoint.save(str(fs), 4, small_state(), {}, keep=1)  # keep 1: nothing pruned before the write
        assert [e for e, _ in checkpoint.listed(str(fs))] == [3, 2] and not list(fs.glob("*.tmp*"))
        assert checkpoint.newest_valid(str(fs))[0].epoch == 3
        subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
        with pytest.raises(checkpoint.CheckpointError, match="Read-only file system; the earlier checkpoints"):
            checkpoint.save(str(fs), 5, small_state(), {}, keep=3)
    gone = tmp_path / "gone"
    gone.mkdir()
    checkpoint.save(str(gone), 1, small_state(), {}, keep=3)
    for p in gone.iterdir():
        p.unlink()
    gone.rmdir()  # removed mid-run: made again (storage.make_dirs), so the next checkpoint is written
    assert checkpoint.save(str(gone), 2, small_state(), {}, keep=3).endswith("ckpt-epoch-000002.npz")


def test_tensorboard_on_a_full_disk_warns_once_and_training_goes_on(tmp_path, capsys):
    from hvd_train.training.callbacks import TensorBoardScalars

    with small_filesystem(tmp_path / "fs", "16k") as fs:
        fill(fs)
        board = TensorBoardScalars(str(fs / "tensorboard"))
        for epoch in range(3):
            board.on_epoch_end(epoch, {"loss": 0.5, "val_loss": 0.6})
        board.on_train_end()
    out = capsys.readouterr().out
    assert out.count("warning: could not write TensorBoard scalars to") == 1
    assert "training goes on without them" in out


def test_json_files_hold_null_for_what_json_has_no_number_for(tmp_path):
    from hvd_train.outputs.run_dir import write_json

    write_json(str(tmp_path / "m.json"), {"loss": float("nan"), "x": np.float32(np.inf), "ok": [1.5]})
    assert json.loads((tmp_path / "m.json").read_text(), parse_constant=pytest.fail) == \
        {"loss": None, "x": None, "ok": [1.5]}
