"""Integration: real horovodrun and hvd-train alone, asserting on files and numbers. (The
launch/ scripts, horovodrun --mpi and plain mpirun train in tests/test_launchers.py.)"""
import os
import re
import shutil

import keras
import numpy as np
import pytest
from conftest import BIN, PINS, REPO, check_run, horovodrun, read_json, run, run_many

from hvd_train import cli
from hvd_train.data import arrays as data

integration = pytest.mark.integration


@pytest.fixture(scope="module")
def gloo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gloo") / "run"
    # Horovod's own horovodrun script, as the README's "by hand" line runs it.
    proc = horovodrun(2, ["--output-dir", out, "--progress", "epoch"], controller="gloo", launcher="horovodrun")
    return out, proc


@integration
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
    assert saved["versions"]["tensorflow"] == PINS["tensorflow"] and saved["versions"]["horovod"] == PINS["horovod"]
    prep = read_json(out / "preprocessing.json")
    assert prep["class_names"] == ["setosa", "versicolor", "virginica"]


@integration
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


@pytest.fixture(scope="module")
def api_runs(tmp_path_factory):
    """The Python API, in one job of 2 processes: the README's example as it stands there, the
    example script, and a run of 1 epoch."""
    base = tmp_path_factory.mktemp("api")
    readme = (REPO / "README.md").read_text()
    snippet = re.search(r"## Python API\n\n```python\n(.*?)```", readme, re.S).group(1)
    (base / "readme_example.py").write_text(snippet)
    (base / "readme").mkdir()
    return base, run_many(2, {
        "readme_example": {"script": str(base / "readme_example.py"), "args": [], "cwd": str(base / "readme")},
        "custom_model": {"script": str(REPO / "examples" / "custom_model.py"), "args": [str(base / "custom")]},
        "one_epoch": ["--epochs", "1", "--lr", "1e-9", "--warmup-epochs", "0", "--progress", "none"],
    }, base / "job")


@integration
def test_the_readmes_python_api_example_trains_a_keras_3_model(api_runs):
    base, runs = api_runs
    assert runs["readme_example"].ok, runs["readme_example"]
    (out,) = (base / "readme" / "runs").iterdir()  # runs/<timestamp>, where the script ran
    printed = re.findall(r"^\[(\d)\]<stdout>:([\d.]+) (\S+)$", runs["readme_example"].job_stdout, re.M)
    assert sorted(r for r, _, _ in printed) == ["0", "1"] and {d for _, _, d in printed} == {str(out)}
    m = read_json(out / "metrics.json")
    assert m["replicas_identical"] and float(printed[0][1]) == m["test_accuracy"] >= 0.9


@integration
def test_python_api_custom_model(api_runs):
    base, runs = api_runs
    assert runs["custom_model"].ok, runs["custom_model"]
    accuracies = re.findall(r"^\[(\d)\]<stdout>:test accuracy ([\d.]+)", runs["custom_model"].job_stdout, re.M)
    assert sorted(r for r, _ in accuracies) == ["0", "1"] and len({a for _, a in accuracies}) == 1
    assert float(accuracies[0][1]) >= 0.9
    m = read_json(base / "custom" / "metrics.json")
    assert m["replicas_identical"]
    assert read_json(base / "custom" / "preprocessing.json")["class_names"] == ["negative", "positive"]


@integration
def test_single_process_without_launcher(tmp_path):
    out = tmp_path / "run"
    proc = run([BIN / "hvd-train", "--dataset", "synthetic", "--samples", "400", "--features", "8", "--classes", "4",
                "--epochs", "3", "--output-dir", out, "--progress", "none"], timeout=120)
    m = check_run(out, proc, 1)
    assert m["global_batch_size"] == 32 and m["test_samples"] == 80
    assert read_json(out / "preprocessing.json")["class_names"] == ["0", "1", "2", "3"]


def test_setup_left_the_promised_tools():
    import horovod.tensorflow as hvd

    from hvd_train.launchers import horovodrun

    for tool in ("hvd-train", "hvd-horovodrun", "horovodrun", "python"):
        assert (BIN / tool).is_file(), tool
    # What `horovodrun --check-build` lists (set-up checks it), as hvd-horovodrun asks Horovod's library
    # before each launch, and as Horovod's own Python API says it.
    facts = horovodrun.built()
    assert facts == {"gloo": True, "mpi": shutil.which("mpirun") is not None}
    assert (hvd.gloo_built(), bool(hvd.mpi_built())) == (facts["gloo"], facts["mpi"])


def test_hvd_horovodrun_leaves_horovods_own_check_when_the_library_cannot_be_asked(monkeypatch):
    from hvd_train.launchers import horovodrun

    monkeypatch.setattr(horovodrun, "TENSORFLOW_LIBRARIES", ("libtensorflow_nothing.so.2",))
    assert horovodrun.built() is None


def test_predict_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["predict", "--model-dir", str(tmp_path), "--input", str(tmp_path / "x.csv")])
    assert exited.value.code == 2
    assert capsys.readouterr().err.count("is not a finished training run: model.keras is missing") == 1


@integration
def test_api_twice_in_one_process_with_tf_data(tmp_path):
    # API users may train several models in one process: TF's thread pools are set only once.
    # The second call also takes a batched tf.data.Dataset of (features, label).
    script = ("import sys, tensorflow as tf; from hvd_train import TrainConfig, train\n"
              "from hvd_train.data import arrays as data\n"
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


@integration
def test_training_metrics_are_exact_over_all_ranks(api_runs):
    # With a vanishing learning rate the weights barely move in one epoch, so the epoch's
    # training loss/accuracy must equal the saved model's loss/accuracy on the whole training
    # split, although the ranks hold 53 and 52 samples and the last step is split 21 + 20.
    run = api_runs[1]["one_epoch"]
    assert run.ok, run
    header, row = (run.out / "history.csv").read_text().splitlines()
    history = dict(zip(header.split(","), map(float, row.split(","))))
    assert "xent" not in history
    model = keras.models.load_model(run.out / "model.keras")
    splits = data.split_and_scale(data.load("iris"), 0.1, 0.2, 42)
    scores = model(splits.x_train, training=False)
    loss = float(np.mean(keras.losses.sparse_categorical_crossentropy(splits.y_train, scores).numpy()))
    accuracy = float(np.mean(scores.numpy().argmax(1) == splits.y_train))
    assert history["loss"] == pytest.approx(loss, rel=1e-5)
    assert history["accuracy"] == pytest.approx(accuracy, abs=1e-6)
