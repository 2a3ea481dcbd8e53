"""Checkpoints, resume after a crash, early stopping and LR schedules, all across real ranks."""
import math
import re
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import HVD_TRAIN, Background, horovodrun_cmd, read_json, run_many, saved_weights

from hvd_train.outputs import events
from hvd_train.training import checkpoint
from hvd_train.training.schedules import cosine_multiplier

integration = pytest.mark.integration

EPOCHS = 20
SLOW = ["--dataset", "synthetic", "--samples", "4000", "--epochs", str(EPOCHS), "--progress", "epoch",
        "--lr-schedule", "step", "--lr-decay-epochs", "8", "--lr-decay-factor", "0.5"]



def history_rows(out_dir):
    return (out_dir / "history.csv").read_text().splitlines()[1:]


@integration
def test_kill_the_whole_job_then_resume(tmp_path):
    ckpt = tmp_path / "ckpt"
    job = Background([*horovodrun_cmd(2), *HVD_TRAIN, *SLOW, "--checkpoint-dir", ckpt,
                      "--output-dir", tmp_path / "killed"])
    job.wait_until(lambda: len(checkpoint.listed(str(ckpt))) >= 1 and checkpoint.listed(str(ckpt))[0][0] >= 5,
                   240, "a checkpoint at epoch 5")
    job.kill()  # SIGKILL to the launcher and every rank: nothing gets to clean up
    saved = checkpoint.listed(str(ckpt))
    done = saved[0][0]
    assert 5 <= done < EPOCHS, "killed mid-run"
    assert len(saved) <= 3, "only the newest --keep-checkpoints (3) are kept"
    assert not (tmp_path / "killed" / "metrics.json").exists(), "killed: no results, only the live event log"
    assert "run_end" not in [e["event"] for e in events.read(tmp_path / "killed" / "events.jsonl")]

    # Resumed, and the same run without the crash, in one job: resuming at the same world size
    # continues the same trajectory (weights, optimizer slots, sample order and LR are all restored).
    runs = run_many(2, {"resumed": [*SLOW, "--checkpoint-dir", ckpt, "--resume"], "straight": SLOW}, tmp_path / "job")
    resumed, straight = runs["resumed"], runs["straight"]
    assert resumed.ok and straight.ok, runs
    assert f"resuming from {ckpt}/ckpt-epoch-{done:06d}.npz: {done} of {EPOCHS} epoch(s) done" in resumed.stdout
    assert len(re.findall(r"^\[0\]<stdout>:epoch +\d+/", resumed.stdout, re.M)) == EPOCHS - done
    m = read_json(resumed.out / "metrics.json")
    assert (m["epochs_completed"], m["epochs_trained_this_run"], m["resumed_from_epoch"]) == (
        EPOCHS, EPOCHS - done, done)
    assert [int(row.split(",")[0]) for row in history_rows(resumed.out)] == list(range(1, EPOCHS + 1))
    m_straight = read_json(straight.out / "metrics.json")
    assert m["test_accuracy"] == pytest.approx(m_straight["test_accuracy"], abs=0.01)
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(saved_weights(resumed.out), saved_weights(straight.out)))
    print(f"resumed from epoch {done}: test accuracy {m['test_accuracy']:.4f} vs uninterrupted "
          f"{m_straight['test_accuracy']:.4f}; max weight difference {diff:.2e}")
    assert diff <= 1e-5
    assert history_rows(resumed.out)[:done] == history_rows(straight.out)[:done], "history before the crash is kept"


SCHEDULE = ["--warmup-epochs", "2", "--lr-decay-epochs", "2", "--lr-decay-factor", "0.5", "--epochs", "8"]


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """One job of 2 processes: 6 epochs of iris checkpointed every epoch (the newest 3 kept), and
    the runs that need no checkpoint of an earlier run."""
    base = tmp_path_factory.mktemp("resume")
    runs = run_many(2, {
        "checkpointed": ["--epochs", "6", "--checkpoint-dir", base / "ckpt"],
        "auto_fresh": ["--epochs", "2", "--checkpoint-dir", base / "none-yet", "--resume"],
        "early": {"args": ["--epochs", "200", "--early-stopping-patience", "3", "--early-stopping-metric", "val_loss",
                           "--lr", "0.05"], "model": "mlp"},
        "lr_step": {"args": [*SCHEDULE, "--lr-schedule", "step"], "model": "mlp"},
        "lr_cosine": {"args": [*SCHEDULE, "--lr-schedule", "cosine"], "model": "mlp"},
    }, base / "first")
    assert runs["checkpointed"].ok, runs["checkpointed"]
    ckpt = base / "ckpt"
    assert [e for e, _ in checkpoint.listed(str(ckpt))] == [6, 5, 4]
    assert not list(ckpt.glob("*.tmp")), "no temp files left"
    return base, runs


@pytest.fixture(scope="module")
def resumed(first):
    """Resumes of the checkpoints of ``first``: from damaged copies, with another model (2 processes),
    and on 1 process (another world size)."""
    base, _ = first
    damaged = Path(shutil.copytree(base / "ckpt", base / "damaged"))
    newest = damaged / "ckpt-epoch-000006.npz"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte somewhere in the arrays
    newest.write_bytes(bytes(data))
    middle = damaged / "ckpt-epoch-000005.npz"
    middle.write_bytes(middle.read_bytes()[:1000])  # truncated, as by a full disk
    other_world = Path(shutil.copytree(base / "ckpt", base / "other-world"))
    runs = run_many(2, {
        "damaged": ["--epochs", "8", "--checkpoint-dir", damaged, "--resume"],
        "other_model": ["--epochs", "8", "--hidden", "16", "--checkpoint-dir", base / "ckpt", "--resume"],
    }, base / "np2")
    runs.update(run_many(1, {"other_world": ["--epochs", "30", "--checkpoint-dir", other_world, "--resume"]},
                         base / "np1"))
    return damaged, other_world, runs


@integration
def test_corrupt_and_truncated_checkpoints_are_skipped(resumed):
    ckpt, _, runs = resumed
    run = runs["damaged"]
    assert run.ok, run
    assert re.search(r"skipping checkpoint: \S+ckpt-epoch-000006.npz is (corrupt|truncated or corrupt)", run.stdout)
    assert re.search(r"skipping checkpoint: \S+ckpt-epoch-000005.npz is truncated or corrupt", run.stdout)
    assert "resuming from " + str(ckpt / "ckpt-epoch-000004.npz") + ": 4 of 8 epoch(s) done" in run.stdout
    assert read_json(run.out / "metrics.json")["epochs_completed"] == 8
    assert len(history_rows(run.out)) == 8


@integration
def test_resume_on_a_different_world_size(resumed):
    _, _, runs = resumed
    run = runs["other_world"]
    assert run.ok, run
    assert ("it was written by 2 process(es) (global batch 64, lr 0.02); "
            "now 1 process(es): global batch 32, lr 0.01") in run.stdout
    m = read_json(run.out / "metrics.json")
    assert (m["world_size"], m["global_batch_size"], m["scaled_lr"]) == (1, 32, 0.01)
    assert (m["epochs_completed"], m["resumed_from_epoch"]) == (30, 6)
    assert m["test_accuracy"] >= 0.8, m
    history = history_rows(run.out)
    assert len(history) == 30 and float(history[-1].split(",")[3]) == pytest.approx(0.01), "LR rescaled for 1 process"


@integration
def test_resume_refuses_a_checkpoint_of_another_model(resumed):
    _, _, runs = resumed
    run = runs["other_model"]
    assert [r["error_type"] for r in run.reports] == ["AgreedFailure"] * 2, run
    assert run.errors[0] == run.errors[1]
    assert "was written by a different run (hidden [64, 32] -> [16])" in run.errors[0]
    assert not run.out.exists()


@integration
def test_resume_auto_without_checkpoints_starts_afresh(first):
    run = first[1]["auto_fresh"]
    assert run.ok, run
    assert "no usable checkpoint in " in run.stdout and "starting at epoch 1" in run.stdout
    assert read_json(run.out / "metrics.json")["resumed_from_epoch"] is None


@integration
def test_early_stopping_stops_every_rank_at_the_same_epoch(first):
    patience, run = 3, first[1]["early"]
    assert run.ok, run
    reports = run.reports
    stops = [r["epochs_completed"] for r in reports]
    assert stops[0] == stops[1] < 200 and all(r["stopped_early"] for r in reports)
    assert len(reports[0]["history"]["val_loss"]) == len(reports[1]["history"]["val_loss"]) == stops[0]
    assert reports[0]["history"] == reports[1]["history"], "the same global metrics on every rank"
    assert reports[0]["final"] == reports[1]["final"]
    # The rule, recomputed from the global validation losses: stop `patience` epochs after the best.
    val = reports[0]["history"]["val_loss"]
    best_epoch = int(np.argmin(val)) + 1
    assert stops[0] == best_epoch + patience
    assert f"early stopping after epoch {stops[0]}" in run.stdout


@integration
@pytest.mark.parametrize("schedule", ["step", "cosine"])
def test_lr_schedule_is_the_same_on_every_rank(first, schedule):
    epochs, warmup, run = 8, 2, first[1][f"lr_{schedule}"]
    assert run.ok, run
    lrs = [r["history"]["lr"] for r in run.reports]
    assert lrs[0] == lrs[1]
    scaled = 0.02  # 0.01 x 2 processes
    steps = read_json(run.out / "metrics.json")["steps_per_epoch"]
    if schedule == "step":
        # Logged at each epoch's end: warmup reaches 0.02, then halves every 2 epochs.
        expected = [scaled * 0.5 ** max(0, (e - warmup) // 2) for e in range(epochs)]
    else:
        # Set before each batch: the epoch's last batch starts at e + (steps - 1) / steps.
        expected = [scaled if e < warmup else scaled * cosine_multiplier(e + (steps - 1) / steps, warmup, epochs)
                    for e in range(epochs)]
    assert lrs[0][warmup - 1:] == pytest.approx(expected[warmup - 1:], rel=1e-5)
    assert lrs[0][0] < scaled, "warmup starts below the scaled LR"
    assert min(lrs[0]) < scaled / 3 and math.isfinite(sum(lrs[0]))


@pytest.mark.parametrize("schedule", ["constant", "step", "cosine"])
def test_the_callback_sets_horovods_rates_before_every_step(schedule):
    """schedules.LearningRate sets, before every step, the rate of Horovod's warmup and schedule
    callbacks (their formulas, here on 2 processes' plan: warmup from scaled_lr / 2), and a fit of
    an epoch's rest continues where the epoch was cut."""
    from hvd_train.config.options import TrainConfig
    from hvd_train.config.plan import make_plan
    from hvd_train.training import schedules

    config = TrainConfig(epochs=6, warmup_epochs=2, lr_schedule=schedule, lr_decay_epochs=2, lr=0.1)
    plan = make_plan(config, 90, 0, 0, 2, 1, ["h", "h"])  # 2 steps of 64 an epoch
    steps, scaled = plan.steps_per_epoch, plan.scaled_lr

    def horovod(epoch, batch):  # Horovod 0.28's LearningRateWarmupCallback / LearningRateScheduleCallback
        if epoch < 2:
            e = epoch + batch / steps + 1 / steps
            return scaled * (1 / 2 * (e * (2 - 1) / 2 + 1))
        if schedule == "step":
            return scaled * 0.1 ** ((epoch - 2) // 2)
        if schedule == "cosine":
            return scaled * schedules.cosine_multiplier(epoch + batch / steps, 2, 6)
        return scaled

    for shift in (0.0, 0.5):  # a whole fit, and one resumed half a step into epoch 1
        model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        callbacks = keras.callbacks.CallbackList([schedules.LearningRate(config, plan, shift)], model=model)
        callbacks.on_train_begin()
        for epoch in range(6):
            callbacks.on_epoch_begin(epoch)
            first = shift if epoch == 0 else 0.0
            for batch in range(steps - int(first + 0.5)):
                callbacks.on_train_batch_begin(batch)
                want = horovod(epoch, batch + first)
                assert schedules.current(model.optimizer) == pytest.approx(want, rel=1e-6), (shift, epoch, batch)
                callbacks.on_train_batch_end(batch)
            callbacks.on_epoch_end(epoch, {})
    assert schedules.rate(config, plan, 0.0) == pytest.approx(scaled * 0.5 * (0.25 + 1)), "warmup starts at scaled / 2"
