"""Identical replicas for every model: non-trainable state (batch-norm moving statistics, counters)
kept in step by distributed.sync_state, and a run whose replicas still differ fails loudly.

The launched tests are runs of one real horovodrun job (tests/programs/many_runs.py); each rank
records its own non-trainable state after every training batch, so the test can compare what each
rank would have had with what hvd_train made of it.
"""
import keras
import numpy as np
import pytest
from conftest import Jobs, check_run, max_weight_difference, read_json

from hvd_train.outputs import events
from hvd_train.training import checkpoint
from hvd_train.training.distributed import split_state
from hvd_train.training.model import build_mlp
from hvd_train.training.replicas import first_difference

integration = pytest.mark.integration


# --- without a launcher -------------------------------------------------------------------------

def test_batchnorm_statistics_are_averaged_and_every_other_state_broadcast():
    inputs = keras.Input(shape=(4,))
    inner = keras.Sequential([keras.layers.Dense(3), keras.layers.BatchNormalization(name="inner_bn")])
    frozen = keras.layers.Dense(2, name="frozen")
    frozen.trainable = False
    model = keras.Model(inputs, frozen(inner(keras.layers.BatchNormalization(name="outer_bn")(inputs))))
    averaged, broadcast = split_state(model)
    def names(variables):
        return sorted("/".join(v.path.split("/")[-2:]) for v in variables)

    assert names(averaged) == ["inner_bn/moving_mean", "inner_bn/moving_variance", "outer_bn/moving_mean",
                               "outer_bn/moving_variance"]
    assert names(broadcast) == ["frozen/bias", "frozen/kernel"]


def test_first_difference_names_the_first_differing_variable_and_the_ranks():
    names = ["a:0", "b:0", "c:0"]
    assert first_difference(names, [["1", "2", "3"]] * 3) is None
    message = first_difference(names, [["1", "2", "3"], ["1", "2", "9"], ["1", "7", "3"]])
    assert message.startswith("replicas differ after training, first in variable b:0 (2 of 3): rank(s) 2 ")
    assert "no model written" in message
    assert "different numbers of variables" in first_difference(names, [["1", "2", "3"], ["1", "2"]])


def test_the_mlp_with_batch_norm_and_its_saved_form():
    local = build_mlp(4, 3, hidden=(8, 8), batch_norm=True)
    synced = build_mlp(4, 3, hidden=(8, 8), batch_norm=True, sync_batchnorm=True)
    assert [w.path for w in local.weights] == [w.path for w in synced.weights]
    assert [type(layer).__name__ for layer in synced.layers].count("SyncBatchNormalization") == 2
    assert not any("dense" in w.path and "bias" in w.path for w in local.weights), "no bias before a batch norm"
    # On one process (Horovod not even initialised) the synced layer is Keras's, in both modes.
    synced.set_weights(local.get_weights())
    x = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
    for training in (True, False):
        np.testing.assert_allclose(synced(x, training=training), local(x, training=training), atol=1e-6)


# --- real horovodrun: one job of 2 processes makes every run (tests/programs/many_runs.py) ------

BN_RUN = ["--batch-norm", "--dataset", "wine", "--progress", "none", "--batch-size", "16"]
EARLY = [*BN_RUN, "--epochs", "200", "--lr", "0.05", "--early-stopping-patience", "2"]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    base = tmp_path_factory.mktemp("replicas")
    ckpt, ckpt_es = base / "ckpt", base / "ckpt-es"
    return Jobs(base, {2: {
        "batchnorm": {"args": ["--dataset", "wine", "--epochs", "6", "--batch-size", "16", "--progress", "none"],
                      "model": "batchnorm"},
        "counter": {"args": ["--epochs", "3", "--progress", "none"], "model": "counter"},
        "straight": [*BN_RUN, "--epochs", "6", "--checkpoint-dir", ckpt, "--keep-checkpoints", "6"],
        "resumed": [*BN_RUN, "--epochs", "6", "--resume", ckpt / checkpoint.file_name(3)],
        "stopping": [*EARLY, "--checkpoint-dir", ckpt_es],
        "again": [*EARLY, "--checkpoint-dir", ckpt_es, "--resume"],
        "drift": {"args": ["--epochs", "2", "--progress", "none"], "model": "drift"},
    }})[2]


@integration
def test_a_batchnorm_model_through_the_api_ends_with_identical_replicas(job):
    run = job["batchnorm"]
    # Replicas identical, saved model = every rank's, test metrics = one process scoring the saved model.
    metrics = check_run(run.out, run, 2)
    reports = run.reports
    assert reports[0]["final"] == reports[1]["final"] == metrics["replica_weight_digests"][0]
    assert reports[0]["final_state"] == reports[1]["final_state"]
    saved = {w.path: w.numpy() for w in keras.models.load_model(run.out / "model.keras").weights}
    for name in ("bn/moving_mean", "bn/moving_variance"):
        own = [np.array(r["local_state"][name]) for r in reports]  # each rank's, before the sync
        drift = float(np.max(np.abs(own[0] - own[1])))
        print(f"{name}: ranks 0 and 1 {drift:.3g} apart before the sync")
        assert drift > 1e-3, f"{name}: the ranks really drifted apart"
        np.testing.assert_allclose(saved[name], (own[0] + own[1]) / 2, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(np.array(reports[1]["final_state"][name]), saved[name])


@integration
def test_a_non_trainable_counter_is_broadcast_from_rank_0(job):
    epochs, run = 3, job["counter"]
    assert run.ok, run
    c0, c1 = read_json(run.out / "config.json")["plan"]["train_samples_per_rank"]
    assert c0 != c1, "uneven shards, so the ranks' own counts differ"
    # Rank 1 counted its own samples in the last epoch, on top of rank 0's count at the last sync ...
    assert run.reports[1]["local_state"]["counter/seen"] == (epochs - 1) * c0 + c1
    # ... and every rank ends with rank 0's count.
    assert [r["final_state"]["counter/seen"] for r in run.reports] == [epochs * c0] * 2


@integration
def test_replicas_made_to_differ_fail_the_run_with_one_message_and_no_model(job):
    run = job["drift"]
    message = ("replicas differ after training, first in variable drift/offset (1 of 7): rank(s) 1 hold "
               "another value than rank 0")
    assert [(r["ok"], r["error_type"]) for r in run.reports] == [(False, "AgreedFailure")] * 2, "no rank returned"
    assert all(r["error"].startswith(message) for r in run.reports)
    assert not (run.out / "model.keras").exists() and not (run.out / "metrics.json").exists()
    failed = [e for e in events.read(run.out / "events.jsonl") if e["event"] == "run_failed"]
    assert len(failed) == 1 and failed[0]["error"].startswith(message)


@integration
def test_resume_and_early_stopping_with_batch_norm(job):
    straight, resumed = job["straight"], job["resumed"]
    check_run(straight.out, straight, 2)
    # Resumed from epoch 3, the run continues the same trajectory: the checkpoint holds the synced
    # moving statistics, as the uninterrupted run had them at that epoch's end.
    assert check_run(resumed.out, resumed, 2)["resumed_from_epoch"] == 3
    assert max_weight_difference(straight.out, resumed.out) <= 1e-6

    m = check_run(job["stopping"].out, job["stopping"], 2)
    assert m["stopped_early"] and m["epochs_completed"] < 200
    again = job["again"]
    m_again = check_run(again.out, again, 2)
    assert "(that run had stopped early)" in again.stdout and m_again["epochs_trained_this_run"] == 0
    assert m_again["replica_weight_digests"] == m["replica_weight_digests"]
