"""--config run.toml: every option from a file, the command line on top, the saved config.toml
reloading to the same run, and clear errors for unknown keys and wrong types."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from conftest import run_many

from hvd_train import cli
from hvd_train.config import configfile
from hvd_train.config.options import ConfigError, TrainConfig

RUN_TOML = """
# a run, as a user would write it
dataset = "wine"
epochs = 6
batch-size = 12          # dashes work too
hidden = [24, 12]
lr = 0.02
optimizer = "sgd"
momentum = 0.8
val_fraction = 0.2
lr_schedule = "cosine"
warmup_epochs = 1
fp16_allreduce = false
"""


def test_every_option_can_live_in_a_file(tmp_path):
    # Each TrainConfig field, set to a non-default value in a file, arrives in the config.
    values = {"dataset": "digits", "label_column": "y", "samples": 77, "features": 5, "classes": 4, "epochs": 9,
              "batch_size": 5, "lr": 0.3, "optimizer": "sgd", "momentum": 0.5, "lr_scaling": "sqrt",
              "warmup_epochs": 1, "hidden": (7, 3), "activation": "tanh", "dropout": 0.25, "task": "regression",
              "loss": "huber", "model": "cnn", "filters": (8, 4), "l2": 0.001, "scale": "none",
              "batch_norm": True, "sync_batchnorm": True, "seed": 3, "shuffle_buffer": 99, "reader": "thread",
              "val_fraction": 0.2,
              "test_fraction": 0.3, "shuffle": False, "threads": 1, "pin_cores": False,
              "output_dir": "x", "progress": "none", "lr_schedule": "step", "lr_decay_epochs": 2,
              "lr_decay_factor": 0.5, "early_stopping_patience": 2, "early_stopping_metric": "val_r2",
              "early_stopping_min_delta": 0.01, "fp16_allreduce": True, "backward_passes_per_step": 2,
              "precision": "mixed_bfloat16", "steps_per_execution": 4,
              "checkpoint_dir": "c", "checkpoint_every": 2, "keep_checkpoints": 1, "resume": "auto", "commit_every": 5,
              "tensorboard": True, "timeline": "t.json", "autotune": True, "autotune_log": "a.csv",
              "verbose_ranks": True, "prune_file": "p.json", "stall_timeout": 30.0, "on_nonfinite": "warn",
              "image_size": (32, 48), "image_channels": 1, "augment": "flip", "image_feature": "img", "image_cache": 0}
    # logits is classification's (the rest regression's): it has its own line below.
    assert set(values) | {"logits"} == {f.name for f in dataclasses.fields(TrainConfig)}, \
        "a new option needs a line here"
    defaults = TrainConfig()
    assert all(getattr(defaults, k) != v for k, v in values.items()), "every value differs from its default"
    text = "\n".join(f"{k} = {configfile._toml_value(v)}" for k, v in values.items())
    (tmp_path / "all.toml").write_text(text)
    config, _ = cli.parse(["--config", str(tmp_path / "all.toml")])
    assert config == TrainConfig(**values)
    (tmp_path / "logits.toml").write_text("logits = true\n")
    assert cli.parse(["--config", str(tmp_path / "logits.toml")])[0].logits


def test_command_line_overrides_the_file(tmp_path):
    (tmp_path / "run.toml").write_text(RUN_TOML)
    config, _ = cli.parse(["--config", str(tmp_path / "run.toml"), "--epochs", "8", "--no-shuffle"])
    assert (config.epochs, config.shuffle, config.batch_size, config.hidden) == (8, False, 12, (24, 12))


def test_numpy_numbers_are_written_as_toml_numbers(tmp_path):
    # NumPy 2's repr of a float64 is "np.float64(0.25)": a config holding one must still save as TOML.
    config = dataclasses.replace(TrainConfig(), lr=np.float64(0.25), dropout=np.float64(0.125))
    (tmp_path / "run.toml").write_text(configfile.dumps(config))
    again, _ = cli.parse(["--config", str(tmp_path / "run.toml")])
    assert (again.lr, again.dropout) == (0.25, 0.125) and "np.float64" not in (tmp_path / "run.toml").read_text()


@pytest.mark.parametrize("text, message", [
    ("epochz = 3", "unknown key 'epochz' (did you mean 'epochs'?)"),
    ('epochs = "3"', 'epochs must be an integer, got string "3"'),
    ("epochs = 3.0", "epochs must be an integer, got float 3.0"),
    ("shuffle = 1", "shuffle must be a boolean (true/false), got integer 1"),
    ("hidden = 64", "hidden must be a non-empty array of integers, e.g. [64, 32], got integer 64"),
    ("lr = true", "lr must be a number, got boolean true"),
    ("[network]\nhidden = [3]", "unknown key 'network'"),
    ("epochs = ", "is not valid TOML"),
])
def test_bad_files_are_one_clear_error(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as err:
        configfile.load(str(path))
    assert message in str(err.value) and str(path) in str(err.value)


# A bad file under a launcher: tests/bad_inputs.py's bad_config_file (the command line in this
# process, and every rank of a real job).


@pytest.mark.integration
def test_saved_config_toml_reloads_to_the_same_run(tmp_path):
    (tmp_path / "run.toml").write_text(RUN_TOML)
    first, second = tmp_path / "first", tmp_path / "second"
    # One job of 2 processes: the second run reads the config.toml the first one saved.
    runs = run_many(2, {"first": ["--config", tmp_path / "run.toml", "--epochs", 5, "--output-dir", first],
                        "second": ["--config", first / "config.toml", "--output-dir", second]}, tmp_path / "job")
    assert runs["first"].ok and runs["second"].ok, runs
    saved = (first / "config.toml").read_text()
    assert "epochs = 5" in saved and f'# output_dir = "{first}"' in saved
    one, two = (json.loads((d / "config.json").read_text()) for d in (first, second))
    assert one["config"] == {**two["config"], "output_dir": str(first)}
    assert one["plan"] == two["plan"]
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (first, second))
    assert m1["replica_weight_digests"] == m2["replica_weight_digests"], "the same run: identical weights"
    assert np.isclose(m1["test_loss"], m2["test_loss"], rtol=0, atol=0)
