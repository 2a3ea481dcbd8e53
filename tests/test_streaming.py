"""csv: and parquet: datasets under real horovodrun: each rank reads a share, the global facts
are exact, the split is the same for every world size, training batches are streamed, and the
core promise holds on this path too: N processes x batch b == 1 process x batch N*b (uneven
files, an empty one, np=2 and np=3). Bad input in files: one message, every rank stops."""
import os
import re

import keras
import numpy as np
import pytest
from conftest import HVD_TRAIN, Background, Jobs, horovodrun_cmd, max_weight_difference, read_json
from files import FEATURES, FILE_ROWS, make_data, rows_by_split

from hvd_train import cli
from hvd_train.data import stream
from hvd_train.data.interface import Standardizer

pytestmark = pytest.mark.integration

GLOBAL_BATCH = 30  # 414 (csv) and 434 (parquet) training rows: the last step has >= 3 rows, never folded
COMMON = ["--label-column", "label", "--lr-scaling", "none", "--warmup-epochs", "0", "--seed", "7",
          "--epochs", "4", "--progress", "none", "--optimizer", "sgd", "--lr", "0.05"]


def regression_data(directory):
    """The files of make_data with the label column replaced by a numeric target."""
    x, _ = make_data(directory, "csv")
    target = 3.0 * x[:, 0] - x[:, 1] + 0.2 * x[:, 2] + 50.0 + np.random.default_rng(1).normal(0, 0.5, len(x))
    start = 0
    for i, n in enumerate(FILE_ROWS):
        with open(directory / f"part-{i}.csv", "w") as f:
            f.write(",".join(FEATURES + ["label"]) + "\n")
            f.writelines(",".join(repr(float(v)) for v in row) + f",{float(t)!r}\n"
                         for row, t in zip(x[start:start + n], target[start:start + n]))
        start += n


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    base = tmp_path_factory.mktemp("files")
    for kind in ("csv", "parquet"):
        make_data(base / kind, kind)
    regression_data(base / "regression")
    make_data(base / "few", "csv", n_rows=[120, 0])  # 1 unit of data, an empty file, 3 ranks
    return {**{kind: f"{kind}:{base / kind}" for kind in ("csv", "parquet")},
            "regression": f"csv:{base / 'regression'}", "few": f"csv:{base / 'few'}"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, datasets):
    """Every training run of this module: one job per world size (tests/programs/many_runs.py)."""

    def options(kind, world_size, *extra, batch=None):
        return ["--dataset", datasets[kind], *COMMON, *extra, "--batch-size", str(batch or GLOBAL_BATCH // world_size)]

    plans = {world: {} for world in (1, 2, 3)}
    for kind in ("csv", "parquet"):
        for world in (1, 2, 3):
            plans[world][f"{kind}"] = options(kind, world, "--no-shuffle")
        for world in (1, 2):  # the order is the same for every world size with shuffling too
            plans[world][f"{kind}_shuffled"] = options(kind, world, "--shuffle-buffer", "100")
        plans[2][f"{kind}_batch_8"] = options(kind, 2, "--no-shuffle", batch=8)
    for world in (1, 2):
        plans[world]["regression"] = options("regression", world, "--task", "regression", "--dropout", "0")
    plans[3]["few"] = ["--dataset", datasets["few"], *COMMON, "--batch-size", "4"]
    return Jobs(tmp_path_factory.mktemp("streaming"), plans)




@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_n_processes_streaming_equal_one_process_with_n_times_the_batch(runs, kind):
    one = runs.finished(1, kind).out
    for world_size in (2, 3):
        many = runs.finished(world_size, kind).out
        m = read_json(many / "metrics.json")
        assert m["replicas_identical"] and m["global_batch_size"] == GLOBAL_BATCH
        assert m["steps_per_epoch"] == read_json(one / "metrics.json")["steps_per_epoch"]
        diff = max_weight_difference(one, many)
        print(f"{kind} streamed, np={world_size} vs np=1: max |w_N - w_1| = {diff:.2e}")
        assert diff <= 1e-5
    # The order is the same for every world size with shuffling too (windows and units seeded by epoch).
    shuffled_one = runs.finished(1, f"{kind}_shuffled").out
    shuffled_two = runs.finished(2, f"{kind}_shuffled").out
    assert max_weight_difference(shuffled_one, shuffled_two) <= 1e-5
    assert max_weight_difference(one, shuffled_one) > 1e-3, "shuffling changes the order"
    # Negative control: another global batch ends elsewhere.
    other = runs.finished(2, f"{kind}_batch_8").out
    assert max_weight_difference(one, other) > 1e-3


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_global_facts_split_and_exact_metrics_are_the_same_for_every_world_size(runs, datasets, kind, capsys):
    x, labels, split = rows_by_split(datasets[kind])
    train = split == stream.TRAIN
    classes = sorted(set(labels))
    for world_size in (1, 2, 3):
        proc = runs.finished(world_size, kind)
        out = proc.out
        m = read_json(out / "metrics.json")
        plan = read_json(out / "config.json")["plan"]
        assert (plan["train_samples"], plan["val_samples"], plan["test_samples"]) == (
            int(train.sum()), int((split == stream.VAL).sum()), int((split == stream.TEST).sum()))
        prep = read_json(out / "preprocessing.json")
        assert prep["class_names"] == classes
        # Standardisation from per-shard moments combined over ranks = numpy over all training rows.
        np.testing.assert_allclose(prep["scaler"]["mean"], x[train].mean(axis=0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(prep["scaler"]["scale"], x[train].std(axis=0), rtol=1e-12)
        # Exact test metrics: the saved model scored on every test row by one process.
        test = split == stream.TEST
        scaled = Standardizer.from_dict(prep["scaler"]).transform(x[test])
        scores = keras.models.load_model(out / "model.keras")(scaled, training=False).numpy()
        codes = np.array([classes.index(v) for v in labels[test]])
        loss = float(np.mean(keras.losses.sparse_categorical_crossentropy(codes, scores).numpy()))
        assert m["test_samples"] == int(test.sum())
        assert m["test_loss"] == pytest.approx(loss, rel=1e-5)
        assert m["test_accuracy"] == pytest.approx(float(np.mean(scores.argmax(1) == codes)), abs=1e-9)
        assert "training rows stream each epoch" in proc.stdout
    capsys.readouterr()
    assert cli.main(["plan", "--np", "2", "--dataset", datasets[kind], "--label-column", "label"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"rank 1 reads \d+ unit\(s\) of \d+ file\(s\) .*: \d+ rows, scores their \d+ "
                     r"validation/test rows; data memory ~", printed), printed


def test_more_ranks_than_files_and_predict_from_parquet(runs, tmp_path):
    proc = runs.finished(3, "few")
    out = proc.out
    assert re.search(r"data: 2 csv file\(s\), [\d.]+ MB, 1 unit\(s\)", proc.stdout), "ranks 1 and 2 read nothing"
    assert read_json(out / "metrics.json")["replicas_identical"]
    # predict (its command line, one process) streams a Parquet input and writes one row per input row.
    make_data(tmp_path / "new", "parquet", n_rows=[70], seed=5)
    assert cli.main(["predict", "--model-dir", str(out), "--input", str(tmp_path / "new" / "part-0.parquet")]) == 0
    rows = (tmp_path / "new" / "part-0.predictions.csv").read_text().splitlines()
    assert rows[0].startswith("predicted_class,prob_") and len(rows) == 71


def test_a_file_that_disappears_mid_run_stops_every_rank_with_one_message(tmp_path):
    make_data(tmp_path / "d", "parquet", n_rows=[3000, 3000])
    out = tmp_path / "out"
    job = Background([*horovodrun_cmd(2), *HVD_TRAIN, "--dataset", f"parquet:{tmp_path / 'd'}", "--label-column",
                      "label", "--epochs", "500", "--progress", "epoch", "--output-dir", out])
    job.wait_until(lambda: re.search(r"epoch +2/500", job.output), 180, "epoch 2")
    os.remove(tmp_path / "d" / "part-1.parquet")
    code = job.wait(120)
    assert code != 0
    assert job.output.count("hvd-train: error: ") == 1, job.output[-3000:]
    assert re.search(r"hvd-train: error: .*part-1.parquet disappeared while being read", job.output)
    assert not re.search(r"^\[\d+\]<std\w+>:Traceback", job.output, re.M)
    assert not (out / "metrics.json").exists() and not (out / "model.keras").exists()


def test_regression_from_files_n_processes_equal_one_process_with_exact_metrics(runs, datasets):
    # A numeric label column: the target's statistics come from the ranks' shares (merged moments),
    # N x b == 1 x N*b holds, and the test metrics are scikit-learn's on the test rows.
    from sklearn import metrics as skm

    dataset = datasets["regression"]
    outs = {world_size: runs.finished(world_size, "regression").out for world_size in (1, 2)}
    diff = max_weight_difference(outs[1], outs[2])
    print(f"streamed regression np=2 vs np=1: max |w_N - w_1| = {diff:.2e}")
    assert diff <= 1e-5
    m = read_json(outs[2] / "metrics.json")
    assert m["test_r2"] == pytest.approx(read_json(outs[1] / "metrics.json")["test_r2"], rel=1e-5)
    assert m["test_r2"] > 0.8
    rows, labels, splits = rows_by_split(dataset)
    train, test = splits == stream.TRAIN, splits == stream.TEST
    prep = read_json(outs[2] / "preprocessing.json")
    values = labels.astype(np.float64)
    assert prep["target"]["mean"] == pytest.approx(values[train].mean(), rel=1e-9)
    assert prep["target"]["scale"] == pytest.approx(values[train].std(), rel=1e-9)
    scaler = Standardizer.from_dict(prep["scaler"])
    model = keras.models.load_model(outs[2] / "model.keras")
    predicted = model(scaler.transform(rows[test].astype(np.float32))).numpy().reshape(-1)
    predicted = predicted * prep["target"]["scale"] + prep["target"]["mean"]
    assert m["test_samples"] == int(test.sum())
    assert m["test_rmse"] == pytest.approx(skm.mean_squared_error(values[test], predicted) ** 0.5, rel=1e-5)
    assert m["test_r2"] == pytest.approx(skm.r2_score(values[test], predicted), rel=1e-5)
