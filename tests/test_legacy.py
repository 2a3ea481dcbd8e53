"""What becomes of runs and checkpoints of hvd_train 0.1 (the Keras 2 engine on tf_keras): the real
artefacts in tests/data/keras2, made by that engine. ``predict`` on its runs gives its predictions;
``--resume`` from its checkpoints continues its trajectory on Keras 3; a run of a user's own model
gets one message saying how to convert it."""
import csv
import json
import shutil

import numpy as np
import pytest
from conftest import REPO, check_run, run_many

from hvd_train import cli
from hvd_train.training import legacy

DATA = REPO / "tests" / "data" / "keras2"


def rows(path):
    with open(path) as f:
        return list(csv.reader(f))


@pytest.mark.parametrize("name", ["iris", "wine"])
def test_predict_on_a_keras_2_run_gives_the_old_engines_predictions(tmp_path, name, capsys):
    out = tmp_path / "predictions.csv"
    assert legacy.is_keras2_file(str(DATA / name / "run" / "model.keras"))
    assert cli.main(["predict", "--model-dir", str(DATA / name / "run"), "--input", str(DATA / name / "input.csv"),
                     "--output", str(out)]) == 0
    new, old = rows(out), rows(DATA / name / "predictions.csv")
    assert new[0] == old[0] and len(new) == len(old) > 30
    assert [r[0] for r in new[1:]] == [r[0] for r in old[1:]], "the same classes"
    np.testing.assert_allclose(np.array([r[1:] for r in new[1:]], float), np.array([r[1:] for r in old[1:]], float),
                               atol=2e-6)  # written with 6 decimals


def test_a_keras_2_run_hvd_train_cannot_rebuild_is_one_message_saying_how_to_convert(tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(DATA / "iris" / "run", run)
    saved = json.loads((run / "config.json").read_text())
    saved["config"]["hidden"] = [5]  # as if the run's model had been a user's own, not the config's
    (run / "config.json").write_text(json.dumps(saved))
    with pytest.raises(SystemExit) as stopped:
        cli.main(["predict", "--model-dir", str(run), "--input", str(DATA / "iris" / "input.csv"),
                  "--output", str(tmp_path / "p.csv")])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.count("hvd-train: error:") == 1 and "Traceback" not in err
    assert "saved by hvd_train 0.1 (Keras 2) with a model hvd_train does not build from its config" in err
    assert "tf_keras.models.load_model" in err and not (tmp_path / "p.csv").exists()


@pytest.mark.integration
def test_resume_from_a_keras_2_checkpoint_continues_the_old_engines_run(tmp_path):
    """Both runs trained 4 epochs with the Keras 2 engine; its checkpoint after epoch 2, resumed by
    the Keras 3 engine (one process, as they were made), ends where the old engine ended."""
    runs = run_many(1, {
        name: ["--dataset", name, "--epochs", "4", "--progress", "none", *extra,
               "--resume", DATA / name / "checkpoints" / "ckpt-epoch-000002.npz"]
        for name, extra in (("iris", []), ("wine", ["--batch-norm", "--optimizer", "sgd"]))}, tmp_path)
    for name, run in runs.items():
        metrics = check_run(run.out, run, 1)
        assert "written by hvd_train 0.1 (Keras 2): its optimizer state converted to Keras 3's" in run.stdout
        assert (metrics["resumed_from_epoch"], metrics["epochs_trained_this_run"]) == (2, 2)
        old = legacy.load_keras2_run_model(str(DATA / name / "run"), str(DATA / name / "run" / "model.keras"))
        import keras

        new = keras.models.load_model(run.out / "model.keras")
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(old.get_weights(), new.get_weights()))
        print(f"{name}: Keras 3 resumed from the Keras 2 checkpoint vs the Keras 2 run: max |w| diff {diff:.2e}")
        assert diff <= 1e-5
        old_metrics = json.loads((DATA / name / "run" / "metrics.json").read_text())
        assert metrics["test_accuracy"] == old_metrics["test_accuracy"]
        assert metrics["test_loss"] == pytest.approx(old_metrics["test_loss"], rel=1e-4)
