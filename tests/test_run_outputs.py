"""What a run leaves for people and tools: curves, classification report, confusion matrix,
TensorBoard scalars, the JSON-lines event log, Horovod's timeline and autotune log, and quiet
ranks. One real horovodrun -np 2 run with everything on; the tests read its files."""
from __future__ import annotations

import csv
import json
import math
import re

import numpy as np
import pytest
from conftest import check_run, horovodrun, png_size, read_json, run_many

from hvd_train.config.options import TrainConfig
from hvd_train.outputs import events

pytestmark = pytest.mark.integration

EPOCHS = 12
ARGS = ["--epochs", EPOCHS, "--batch-size", 16, "--val-fraction", 0.2, "--dataset", "wine", "--progress", "epoch"]


def history_csv(path):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return {k: [float(r[k]) for r in rows] for k in rows[0]}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("outputs")
    out = tmp / "run"
    proc = horovodrun(2, [*ARGS, "--output-dir", out, "--tensorboard", "--timeline-file", tmp / "timeline.json",
                          "--autotune", "--checkpoint-dir", tmp / "ckpt", "--checkpoint-every", 4],
                      env={"TF_CPP_MIN_LOG_LEVEL": "0"})  # let TensorFlow talk: rank 1 must still be quiet
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, tmp, proc


def test_curves_and_confusion_matrix_pngs(run_dir):
    out, _, _ = run_dir
    assert png_size(out / "curves.png") == (1200, 400)
    width, height = png_size(out / "confusion_matrix.png")
    assert width == height and width >= 400


def test_report_json_matches_the_saved_model_on_the_test_split(run_dir):
    import keras
    from sklearn.metrics import classification_report, confusion_matrix

    from hvd_train.data.arrays import load_splits

    out, _, _ = run_dir
    report = json.loads((out / "report.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    config = TrainConfig.from_dict(json.loads((out / "config.json").read_text())["config"])
    splits = load_splits(config)
    model = keras.models.load_model(out / "model.keras")
    predicted = np.argmax(model.predict(splits.x_test, verbose=0), axis=1)

    assert report["classes"] == list(splits.class_names)
    # The matrix was summed over both ranks' shards; it must equal the whole test set's.
    assert report["confusion_matrix"] == confusion_matrix(splits.y_test, predicted,
                                                         labels=range(len(splits.class_names))).tolist()
    assert report["samples"] == metrics["test_samples"] == len(splits.y_test)
    assert report["accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-12)
    expected = classification_report(splits.y_test, predicted, target_names=list(splits.class_names),
                                     output_dict=True, zero_division=0)
    for name in splits.class_names:
        got = report["per_class"][name]
        assert got["support"] == expected[name]["support"]
        for key, theirs in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score")):
            assert got[key] == pytest.approx(expected[name][theirs], abs=1e-12)
    for ours, theirs in (("macro_avg", "macro avg"), ("weighted_avg", "weighted avg")):
        assert report[ours]["f1"] == pytest.approx(expected[theirs]["f1-score"], abs=1e-12)


def test_tensorboard_scalars_are_the_global_history(run_dir):
    import tensorflow as tf

    out, _, _ = run_dir
    history = history_csv(out / "history.csv")
    seen = {}
    for run in ("train", "validation"):
        files = list((out / "tensorboard" / run).glob("events.out.tfevents.*"))
        assert len(files) == 1, f"one event file for {run}"
        for record in tf.compat.v1.train.summary_iterator(str(files[0])):
            for value in record.summary.value:
                seen.setdefault((run, value.tag), {})[record.step] = float(tf.make_ndarray(value.tensor))
    steps = list(range(1, EPOCHS + 1))
    for (run, tag), key in {("train", "epoch_loss"): "loss", ("train", "epoch_accuracy"): "accuracy",
                            ("train", "epoch_learning_rate"): "lr", ("validation", "epoch_loss"): "val_loss",
                            ("validation", "epoch_accuracy"): "val_accuracy"}.items():
        assert sorted(seen[(run, tag)]) == steps, (run, tag)
        assert [seen[(run, tag)][s] for s in steps] == pytest.approx(history[key], rel=1e-6), (run, tag)


def test_event_log_tells_the_whole_run(run_dir):
    out, tmp, _ = run_dir
    log = events.read(out / "events.jsonl")
    kinds = [e["event"] for e in log]
    assert kinds[0] == "run_start" and kinds[-1] == "run_end"
    start = log[0]
    assert start["config"]["epochs"] == EPOCHS and start["plan"]["world_size"] == 2
    assert start["plan"]["global_batch_size"] == 32 and start["versions"]["horovod"] == "0.28.1"
    epochs = [e for e in log if e["event"] == "epoch"]
    assert [e["epoch"] for e in epochs] == list(range(1, EPOCHS + 1))
    history = history_csv(out / "history.csv")
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert [e["metrics"][key] for e in epochs] == pytest.approx(history[key], rel=1e-9)
    assert [e["lr"] for e in epochs] == pytest.approx(history["lr"], rel=1e-9)
    assert all(e["seconds"] > 0 for e in epochs)
    checkpoints = [e for e in log if e["event"] == "checkpoint"]
    assert [e["epoch"] for e in checkpoints] == [4, 8, 12]
    assert all(str(tmp / "ckpt") in e["path"] for e in checkpoints)
    # Every event comes after the epoch it reports: checkpoint N follows epoch N.
    assert kinds.index("checkpoint") == kinds.index("epoch") + 4
    end = log[-1]
    metrics = json.loads((out / "metrics.json").read_text())
    assert end["metrics"]["test_accuracy"] == metrics["test_accuracy"]
    assert {"events.jsonl", "metrics.json", "report.json", "curves.png", "model.keras"} <= set(end["files"])


def test_horovod_timeline_records_the_gradient_allreduces(run_dir):
    _, tmp, _ = run_dir
    text = (tmp / "timeline.json").read_text().rstrip().rstrip(",")
    records = json.loads(text if text.endswith("]") else text + "]")  # Horovod leaves the array open
    names = {r["args"]["name"] for r in records if r.get("name") == "process_name" and "name" in r.get("args", {})}
    assert any("DistributedAdam_Allreduce" in n for n in names), sorted(names)[:10]
    phases = {r.get("name") for r in records if r.get("ph") == "B"}
    assert {"NEGOTIATE_ALLREDUCE", "ALLREDUCE"} <= phases


def test_autotune_log_in_the_output_dir(run_dir):
    out, _, _ = run_dir
    lines = (out / "autotune.csv").read_text().splitlines()
    assert lines and lines[0].split(",")[-3:] == ["cycle_time_ms", "tensor_fusion_threshold", "score"], lines[:1]
    assert all(line.count(",") == lines[0].count(",") for line in lines if line)


def test_ranks_other_than_0_are_quiet(run_dir):
    _, _, proc = run_dir
    text = proc.stdout + proc.stderr
    assert re.search(r"\[0\]<std(out|err)>:.*\S", text), "rank 0 speaks"
    assert not re.findall(r"\[1\]<std(out|err)>:.*\S", text), re.findall(r"\[1\]<std(out|err)>:.*", text)[:5]


FAILS_IN_FIT = """
import sys, keras, tensorflow as tf
from hvd_train import TrainConfig, train

class FailsInTraining(keras.layers.Layer):  # builds and predicts fine; fails in fit's first step
    def call(self, x, training=None):
        if training:
            tf.debugging.assert_less(tf.reduce_sum(x) * 0.0, -1.0, message="boom in training")
        return x

def model(n_features, n_classes):
    return keras.Sequential([keras.Input(shape=(n_features,)), FailsInTraining(),
                             keras.layers.Dense(n_classes, activation="softmax")])
train(TrainConfig(epochs=1, progress='none', output_dir=sys.argv[1]), model_fn=model)
"""


@pytest.fixture(scope="module")
def api_runs(tmp_path_factory):
    """One job of 2 processes: a run with --verbose-ranks, a script whose model fails inside fit,
    and Keras 3 models as users write them (user_models.py) through the API."""
    base = tmp_path_factory.mktemp("api")
    (base / "fails.py").write_text(FAILS_IN_FIT)
    short = ["--epochs", 3, "--progress", "none"]
    return base, run_many(2, {"verbose": ["--epochs", 2, "--verbose-ranks"],
                              "fails_in_fit": {"script": str(base / "fails.py"), "args": [str(base / "fails")]},
                              "subclassed": {"args": short, "model": "subclassed"},
                              "functional": {"args": short, "model": "functional"},
                              "mobilenet": {"args": ["--epochs", 1, "--batch-size", 16, "--progress", "none"],
                                            "model": "mobilenet", "arrays": "rgb32"}},
                          base / "job")


def test_verbose_ranks_lets_every_rank_speak(api_runs):
    run = api_runs[1]["verbose"]
    assert run.ok, run
    assert re.search(r"\[1\]<stdout>:\[hvd_train rank 1\] world size 2", run.job_stdout), run.job_stdout[-3000:]


def test_a_failure_inside_fit_is_logged_as_run_failed(api_runs):
    base, runs = api_runs
    assert not runs["fails_in_fit"].ok
    out = base / "fails"
    log = events.read(out / "events.jsonl")
    assert [e["event"] for e in log] == ["run_start", "run_failed"]
    assert "boom in training" in log[-1]["error"] and "InvalidArgumentError" in log[-1]["error"]
    assert not (out / "metrics.json").exists() and not (out / "model.keras").exists()


@pytest.mark.parametrize("kind", ["subclassed", "functional", "mobilenet"])
def test_keras_3_models_as_users_write_them_train_with_identical_replicas(api_runs, kind):
    import keras
    import user_models  # noqa: F401 - registers the subclassed model's class, as its user would

    from hvd_train.training.consensus import weights_digest

    run = api_runs[1][kind]
    assert run.ok, run
    m = read_json(run.out / "metrics.json")
    assert m["replicas_identical"] and len(set(m["replica_weight_digests"])) == 1
    assert [r["final"] for r in run.reports] == m["replica_weight_digests"]
    assert [r["built"] != r["final"] for r in run.reports] == [True, True], "it trained"
    saved = keras.models.load_model(run.out / "model.keras")  # plain Keras, no hvd_train
    assert weights_digest(saved.get_weights()) == m["replica_weight_digests"][0]
    if kind != "mobilenet":  # iris: the test metrics are one process scoring the saved model
        check_run(run.out, run, 2)


def test_finite_numbers_only_in_events(run_dir):
    out, _, _ = run_dir
    for line in (out / "events.jsonl").read_text().splitlines():
        record = json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
        for value in record.get("metrics", {}).values():
            assert value is None or not isinstance(value, float) or math.isfinite(value)
