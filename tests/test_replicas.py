"""Identical replicas for every model: non-trainable state (batch-norm moving statistics, counters)
kept in step by replicas.sync_state, and a run whose replicas still differ fails loudly.

The launched tests run tests/programs/rank_report.py under real horovodrun; each rank records
its own non-trainable state after every training batch, so the test can compare what each rank
would have had with what hvd_train made of it.
"""
import numpy as np
import pytest
import tensorflow as tf
from conftest import BIN, REPO, check_run, horovodrun, rank_reports, read_json

from hvd_train import checkpoint, events
from hvd_train.model import build_mlp
from hvd_train.replicas import first_difference, split_state

integration = pytest.mark.integration


# --- without a launcher -------------------------------------------------------------------------

def test_batchnorm_statistics_are_averaged_and_every_other_state_broadcast():
    inputs = tf.keras.Input(shape=(4,))
    inner = tf.keras.Sequential([tf.keras.layers.Dense(3), tf.keras.layers.BatchNormalization(name="inner_bn")])
    frozen = tf.keras.layers.Dense(2, name="frozen")
    frozen.trainable = False
    model = tf.keras.Model(inputs, frozen(inner(tf.keras.layers.BatchNormalization(name="outer_bn")(inputs))))
    averaged, broadcast = split_state(model)
    assert sorted(v.name for v in averaged) == ["inner_bn/moving_mean:0", "inner_bn/moving_variance:0",
                                                 "outer_bn/moving_mean:0", "outer_bn/moving_variance:0"]
    assert sorted(v.name for v in broadcast) == ["frozen/bias:0", "frozen/kernel:0"]


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
    assert [w.name for w in local.weights] == [w.name for w in synced.weights]
    assert [type(layer).__name__ for layer in synced.layers].count("SyncBatchNormalization") == 2
    assert not any("dense" in w.name and "bias" in w.name for w in local.weights), "no bias before a batch norm"
    # On one process (Horovod not even initialised) the synced layer is Keras's, in both modes.
    synced.set_weights(local.get_weights())
    x = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
    for training in (True, False):
        np.testing.assert_allclose(synced(x, training=training), local(x, training=training), atol=1e-6)


# --- real horovodrun ----------------------------------------------------------------------------

@integration
def test_a_batchnorm_model_through_the_api_ends_with_identical_replicas(tmp_path):
    out = tmp_path / "out"
    reports, proc = rank_reports(2, ["--test-model", "batchnorm", "--dataset", "wine", "--epochs", "6",
                                     "--batch-size", "16", "--progress", "none", "--output-dir", out],
                                 tmp_path / "reports")
    # Replicas identical, saved model = every rank's, test metrics = one process scoring the saved model.
    metrics = check_run(out, proc, 2)
    assert reports[0]["final"] == reports[1]["final"] == metrics["replica_weight_digests"][0]
    assert reports[0]["final_state"] == reports[1]["final_state"]
    saved = {w.name: w.numpy() for w in tf.keras.models.load_model(out / "model.keras").weights}
    for name in ("bn/moving_mean:0", "bn/moving_variance:0"):
        own = [np.array(r["local_state"][name]) for r in reports]  # each rank's, before the sync
        drift = float(np.max(np.abs(own[0] - own[1])))
        print(f"{name}: ranks 0 and 1 {drift:.3g} apart before the sync")
        assert drift > 1e-3, f"{name}: the ranks really drifted apart"
        np.testing.assert_allclose(saved[name], (own[0] + own[1]) / 2, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(np.array(reports[1]["final_state"][name]), saved[name])


@integration
def test_a_non_trainable_counter_is_broadcast_from_rank_0(tmp_path):
    epochs = 3
    reports, _ = rank_reports(2, ["--test-model", "counter", "--epochs", str(epochs), "--progress", "none",
                                  "--output-dir", tmp_path / "out"], tmp_path / "reports")
    c0, c1 = read_json(tmp_path / "out" / "config.json")["plan"]["train_samples_per_rank"]
    assert c0 != c1, "uneven shards, so the ranks' own counts differ"
    # Rank 1 counted its own samples in the last epoch, on top of rank 0's count at the last sync ...
    assert reports[1]["local_state"]["counter/seen:0"] == (epochs - 1) * c0 + c1
    # ... and every rank ends with rank 0's count.
    assert [r["final_state"]["counter/seen:0"] for r in reports] == [epochs * c0] * 2


@integration
def test_replicas_made_to_differ_fail_the_run_with_one_message_and_no_model(tmp_path):
    out = tmp_path / "out"
    (tmp_path / "reports").mkdir()
    proc = horovodrun(2, ["--test-model", "drift", "--epochs", "2", "--progress", "none", "--output-dir", out],
                      command=[BIN / "python", REPO / "tests" / "programs" / "rank_report.py"],
                      env={"REPORT_DIR": str(tmp_path / "reports")})
    assert proc.returncode != 0
    message = ("replicas differ after training, first in variable drift/offset:0 (1 of 7): rank(s) 1 hold "
               "another value than rank 0")
    assert message in proc.stdout + proc.stderr
    assert not (out / "model.keras").exists() and not (out / "metrics.json").exists()
    failed = [e for e in events.read(out / "events.jsonl") if e["event"] == "run_failed"]
    assert len(failed) == 1 and failed[0]["error"].startswith(message)
    assert not list((tmp_path / "reports").iterdir()), "no rank returned from train()"


@integration
def test_resume_and_early_stopping_with_batch_norm(tmp_path):
    common = ["--batch-norm", "--dataset", "wine", "--progress", "none", "--batch-size", "16"]
    straight, ckpt = tmp_path / "straight", tmp_path / "ckpt"
    proc = horovodrun(2, [*common, "--epochs", "6", "--checkpoint-dir", ckpt, "--keep-checkpoints", "6",
                          "--output-dir", straight])
    check_run(straight, proc, 2)
    # Resumed from epoch 3, the run continues the same trajectory: the checkpoint holds the synced
    # moving statistics, as the uninterrupted run had them at that epoch's end.
    resumed = tmp_path / "resumed"
    proc = horovodrun(2, [*common, "--epochs", "6", "--resume", ckpt / checkpoint.file_name(3),
                          "--output-dir", resumed])
    assert read_json(check_run(resumed, proc, 2) and resumed / "metrics.json")["resumed_from_epoch"] == 3
    a, b = (tf.keras.models.load_model(d / "model.keras").get_weights() for d in (straight, resumed))
    assert max(float(np.max(np.abs(x - y))) for x, y in zip(a, b)) <= 1e-6

    stopping = tmp_path / "stopping"
    proc = horovodrun(2, [*common, "--epochs", "200", "--lr", "0.05", "--early-stopping-patience", "2",
                          "--checkpoint-dir", tmp_path / "ckpt-es", "--output-dir", stopping])
    m = check_run(stopping, proc, 2)
    assert m["stopped_early"] and m["epochs_completed"] < 200
    again = tmp_path / "again"
    proc = horovodrun(2, [*common, "--epochs", "200", "--lr", "0.05", "--early-stopping-patience", "2",
                          "--checkpoint-dir", tmp_path / "ckpt-es", "--resume", "--output-dir", again])
    m_again = check_run(again, proc, 2)
    assert "(that run had stopped early)" in proc.stdout and m_again["epochs_trained_this_run"] == 0
    assert m_again["replica_weight_digests"] == m["replica_weight_digests"]
