"""Integration: real horovodrun (Gloo and MPI) and plain mpirun, asserting on files and numbers."""
import os
import re
import shutil

import numpy as np
import pytest
import tensorflow as tf
from conftest import BIN, REPO, check_run, horovodrun, mpirun, read_json, requires_mpi, run

from hvd_train import data

pytestmark = pytest.mark.integration
@pytest.fixture(scope="module")
def gloo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gloo") / "run"
    proc = horovodrun(2, ["--output-dir", out, "--progress", "epoch"], controller="gloo")
    return out, proc


def test_gloo_default_iris_run(gloo_run):
    out, proc = gloo_run
    m = check_run(out, proc, 2)
    assert m["test_accuracy"] >= 0.90, m
    assert (m["global_batch_size"], m["epochs_completed"], m["steps_per_epoch"]) == (64, 100, 2)
    assert m["train_seconds"] > 0 and m["samples_per_second"] > 0
    assert "global batch 64" in proc.stdout and "scaled to 0.02" in proc.stdout
    # Progress and logs come from rank 0 only (horovodrun prefixes each line with [rank]).
    assert re.search(r"^\[0\]<stdout>:epoch 100/100 \[#{20}\] accuracy [\d.]+  loss ", proc.stdout, re.M)
    assert len(re.findall(r"^\[0\]<stdout>:epoch ", proc.stdout, re.M)) == 100
    assert not re.search(r"^\[1\]<stdout>:(epoch|\[hvd_train\])", proc.stdout, re.M)
    history = (out / "history.csv").read_text().splitlines()
    assert history[0] == "epoch,accuracy,loss,lr,val_accuracy,val_loss" and len(history) == 101
    lrs = [float(row.split(",")[3]) for row in history[1:]]
    assert lrs[0] < lrs[2] == pytest.approx(0.02) == lrs[-1], "warmup ramps to the scaled LR"
    saved = read_json(out / "config.json")
    assert saved["plan"]["train_samples_per_rank"] == [53, 52]
    # Two processes share this host's cores by default.
    assert saved["plan"]["intra_op_threads"] == max(1, len(os.sched_getaffinity(0)) // 2)
    assert saved["versions"]["tensorflow"] == "2.15.1" and saved["versions"]["horovod"] == "0.28.1"
    prep = read_json(out / "preprocessing.json")
    assert prep["class_names"] == ["setosa", "versicolor", "virginica"]


def test_predict_on_saved_model(gloo_run, tmp_path):
    out, _ = gloo_run
    table = data.load("iris")
    csv_path = tmp_path / "new.csv"
    header = ",".join(table.feature_names)
    csv_path.write_text(header + ",species\n" + "".join(
        ",".join(f"{v:.1f}" for v in row) + ",?\n" for row in table.x[::10]))
    proc = run([BIN / "hvd-train", "predict", "--model-dir", out, "--input", csv_path], timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = (tmp_path / "new.predictions.csv").read_text().splitlines()
    assert rows[0] == "predicted_class,prob_setosa,prob_versicolor,prob_virginica"
    assert len(rows) == 1 + 15
    predicted = [r.split(",")[0] for r in rows[1:]]
    truth = [table.class_names[c] for c in table.y[::10]]
    assert sum(p == t for p, t in zip(predicted, truth)) >= 13
    for r in rows[1:]:
        assert sum(float(v) for v in r.split(",")[1:]) == pytest.approx(1.0, abs=1e-5)


@requires_mpi
def test_horovodrun_mpi(tmp_path):
    out = tmp_path / "run"
    proc = horovodrun(2, ["--dataset", "wine", "--epochs", "30", "--logits", "--dropout", "0.1",
                          "--lr-scaling", "sqrt", "--output-dir", out, "--progress", "none"], controller="mpi")
    m = check_run(out, proc, 2)
    assert m["test_accuracy"] >= 0.9
    assert m["scaled_lr"] == pytest.approx(0.01 * 2 ** 0.5)
    saved = read_json(out / "config.json")["config"]
    assert (saved["logits"], saved["dropout"]) == (True, 0.1)


@requires_mpi
def test_plain_mpirun_uneven_eval_shards(tmp_path):
    # 45 test samples over 2 ranks (23 + 22): exact metrics need the sample-weighted combination.
    out = tmp_path / "run"
    proc = mpirun(2, ["--epochs", "40", "--test-fraction", "0.3", "--optimizer", "sgd", "--lr", "0.05",
                      "--warmup-epochs", "0", "--threads", "2", "--output-dir", out, "--progress", "none"])
    m = check_run(out, proc, 2)
    assert m["test_samples"] == 45 and m["test_accuracy"] >= 0.9
    plan = read_json(out / "config.json")["plan"]
    assert plan["intra_op_threads"] == 2, "--threads overrides the cores // local size default"
    assert "learning rate 0.05 scaled to 0.1, warmup 0 epoch(s)" in proc.stdout


def test_python_api_custom_model(tmp_path):
    out = tmp_path / "api"
    proc = horovodrun(2, [out], command=[BIN / "python", REPO / "examples" / "custom_model.py"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    accuracies = re.findall(r"^\[(\d)\]<stdout>:test accuracy ([\d.]+)", proc.stdout, re.M)
    assert sorted(r for r, _ in accuracies) == ["0", "1"] and len({a for _, a in accuracies}) == 1
    assert float(accuracies[0][1]) >= 0.9
    m = read_json(out / "metrics.json")
    assert m["replicas_identical"] and read_json(out / "preprocessing.json")["class_names"] == ["negative", "positive"]


def test_single_process_without_launcher(tmp_path):
    out = tmp_path / "run"
    proc = run([BIN / "hvd-train", "--dataset", "synthetic", "--samples", "400", "--features", "8", "--classes", "4",
                "--epochs", "3", "--output-dir", out, "--progress", "none"], timeout=120)
    m = check_run(out, proc, 1)
    assert m["global_batch_size"] == 32 and m["test_samples"] == 80
    assert read_json(out / "preprocessing.json")["class_names"] == ["0", "1", "2", "3"]


def test_setup_left_the_promised_tools():
    for tool in ("hvd-train", "horovodrun", "python"):
        assert (BIN / tool).is_file(), tool
    proc = run([BIN / "horovodrun", "--check-build"], timeout=120)
    for part in ("TensorFlow", "Gloo") + (("MPI",) if shutil.which("mpirun") else ()):
        assert re.search(rf"\[X\] {part}", proc.stdout), proc.stdout


@requires_mpi
def test_mpi4py_and_horovod_agree_under_mpirun(tmp_path):
    # Each rank writes its own file: ranks' stdout through mpirun may interleave mid-line.
    script = ("import sys; from mpi4py import MPI; import horovod.tensorflow as hvd; hvd.init(); c = MPI.COMM_WORLD\n"
              "open(f'{sys.argv[1]}/rank{c.Get_rank()}', 'w').write("
              "f'{c.Get_rank()} {hvd.rank()} {c.Get_size()} {hvd.size()} {hvd.mpi_enabled()}')\n")
    proc = mpirun(2, [tmp_path], timeout=120, command=[BIN / "python", "-c", script])
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "rank0").read_text() == "0 0 2 2 True"
    assert (tmp_path / "rank1").read_text() == "1 1 2 2 True"


def test_predict_bad_input(tmp_path):
    proc = run([BIN / "hvd-train", "predict", "--model-dir", tmp_path, "--input", tmp_path / "x.csv"], timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.count("is not a finished training run: model.keras is missing") == 1


def test_api_twice_in_one_process_with_tf_data(tmp_path):
    # API users may train several models in one process: TF's thread pools are set only once.
    # The second call also takes a batched tf.data.Dataset of (features, label).
    script = ("import sys, tensorflow as tf; from hvd_train import TrainConfig, train, data\n"
              "iris = data.load('iris')\n"
              "inputs = [None, tf.data.Dataset.from_tensor_slices((iris.x, iris.y)).batch(8)]\n"
              "for i in range(2):\n"
              "    r = train(TrainConfig(epochs=2, progress='none', output_dir=f'{sys.argv[1]}/{i}'), data=inputs[i])\n"
              "    print('run', i, r.metrics['epochs_completed'], r.plan.intra_op_threads, r.plan.train_samples)\n")
    proc = run([BIN / "python", "-c", script, tmp_path], timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.findall(r"^run \d 2 \d+ 105$", proc.stdout, re.M) == [
        line for line in proc.stdout.splitlines() if line.startswith("run ")] and proc.stdout.count("run ") == 2
    assert (tmp_path / "0" / "metrics.json").exists() and (tmp_path / "1" / "metrics.json").exists()


def test_training_metrics_are_exact_over_all_ranks(tmp_path):
    # With a vanishing learning rate the weights barely move in one epoch, so the epoch's
    # training loss/accuracy must equal the saved model's loss/accuracy on the whole training
    # split, although the ranks hold 53 and 52 samples and the last step is split 21 + 20.
    out = tmp_path / "run"
    proc = horovodrun(2, ["--epochs", "1", "--lr", "1e-9", "--warmup-epochs", "0", "--output-dir", out,
                          "--progress", "none"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    header, row = (out / "history.csv").read_text().splitlines()
    history = dict(zip(header.split(","), map(float, row.split(","))))
    assert "xent" not in history
    model = tf.keras.models.load_model(out / "model.keras")
    splits = data.split_and_scale(data.load("iris"), 0.1, 0.2, 42)
    scores = model(splits.x_train, training=False)
    loss = float(np.mean(tf.keras.losses.sparse_categorical_crossentropy(splits.y_train, scores).numpy()))
    accuracy = float(np.mean(scores.numpy().argmax(1) == splits.y_train))
    assert history["loss"] == pytest.approx(loss, rel=1e-5)
    assert history["accuracy"] == pytest.approx(accuracy, abs=1e-6)
