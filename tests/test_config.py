"""TrainConfig validation, learning-rate scaling, and the command line that maps onto it."""
import dataclasses
import math

import pytest

from hvd_train.cli import config_from_args
from hvd_train.config.options import ConfigError, TrainConfig, scaled_learning_rate


def test_defaults_are_valid_and_frozen():
    c = TrainConfig()
    assert (c.dataset, c.epochs, c.batch_size, c.hidden) == ("iris", 100, 32, (64, 32))
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.epochs = 3  # frozen


@pytest.mark.parametrize("changes,message", [
    ({"epochs": 0}, "epochs must be >= 1"),
    ({"batch_size": 0}, "batch size must be >= 1"),
    ({"lr": 0.0}, "learning rate must be > 0"),
    ({"lr": float("nan")}, "learning rate must be > 0"),
    ({"dataset": "mnist"}, "unknown dataset 'mnist'"),
    ({"dataset": "csv:x.csv"}, "needs --label-column"),
    ({"dataset": "csv:"}, "needs a path"),
    ({"dropout": 1.0}, "dropout must be in"),
    ({"sync_batchnorm": True}, "--sync-batchnorm synchronises batch normalization layers and the MLP has none"),
    ({"hidden": (64, 0)}, "hidden sizes must be positive"),
    ({"val_fraction": 0.5, "test_fraction": 0.45}, "leave at least 10%"),
    ({"test_fraction": 0.0}, "test fraction"),
    ({"optimizer": "lamb"}, "optimizer must be one of"),
    ({"threads": 0}, "threads must be >= 1"),
    ({"lr_schedule": "poly"}, "lr schedule must be one of"),
    ({"lr_schedule": "cosine", "epochs": 3, "warmup_epochs": 3}, "needs epochs after the warmup"),
    ({"lr_decay_factor": 0.0}, "lr decay factor must be in"),
    ({"lr_decay_epochs": 0}, "lr decay epochs must be >= 1"),
    ({"early_stopping_patience": -1}, "patience must be >= 0"),
    ({"early_stopping_patience": 2, "val_fraction": 0.0}, "needs --val-fraction > 0"),
    ({"early_stopping_metric": "loss"}, "early stopping metric must be one of"),
    ({"checkpoint_every": 0}, "checkpoint every must be >= 1"),
    ({"keep_checkpoints": 0}, "keep checkpoints must be >= 1"),
    ({"resume": "auto"}, "--resume auto looks in --checkpoint-dir"),
    ({"resume": "ckpt.bin", "checkpoint_dir": "c"}, "resume must be 'auto' or a checkpoint file"),
])
def test_validation(changes, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**changes)


def test_replace_validates_and_round_trips():
    c = TrainConfig().replace(epochs=5, hidden=(8,))
    assert TrainConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ConfigError):
        c.replace(batch_size=-1)
    with pytest.raises(ConfigError, match="unknown config key"):
        TrainConfig.from_dict({"epoch": 3})


@pytest.mark.parametrize("scaling,size,expected", [
    ("linear", 4, 0.04), ("sqrt", 4, 0.02), ("none", 4, 0.01), ("linear", 1, 0.01), ("sqrt", 2, 0.01 * math.sqrt(2)),
])
def test_lr_scaling(scaling, size, expected):
    assert scaled_learning_rate(0.01, size, scaling) == pytest.approx(expected)


def test_cli_maps_every_flag():
    c = config_from_args(["--dataset", "csv:a.csv", "--label-column", "y", "--epochs", "7", "--batch-size", "5",
                          "--lr", "0.2", "--optimizer", "sgd", "--lr-scaling", "sqrt", "--warmup-epochs", "0",
                          "--hidden", "16,8,4", "--activation", "tanh", "--dropout", "0.1", "--seed", "3",
                          "--val-fraction", "0", "--test-fraction", "0.3", "--no-shuffle", "--threads", "1",
                          "--output-dir", "out", "--logits", "--progress", "none"])
    assert c == TrainConfig(dataset="csv:a.csv", label_column="y", epochs=7, batch_size=5, lr=0.2, optimizer="sgd",
                            lr_scaling="sqrt", warmup_epochs=0, hidden=(16, 8, 4), activation="tanh", dropout=0.1,
                            seed=3, val_fraction=0.0, test_fraction=0.3, shuffle=False, threads=1,
                            output_dir="out", logits=True, progress="none")


def test_cli_checkpoint_and_schedule_flags():
    c = config_from_args(["--checkpoint-dir", "ck", "--checkpoint-every", "5", "--keep-checkpoints", "2", "--resume",
                          "--lr-schedule", "step", "--lr-decay-epochs", "10", "--lr-decay-factor", "0.5",
                          "--early-stopping-patience", "4", "--early-stopping-metric", "val_accuracy",
                          "--early-stopping-min-delta", "0.01"])
    assert (c.checkpoint_dir, c.checkpoint_every, c.keep_checkpoints, c.resume) == ("ck", 5, 2, "auto")
    assert (c.lr_schedule, c.lr_decay_epochs, c.lr_decay_factor) == ("step", 10, 0.5)
    assert (c.early_stopping_patience, c.early_stopping_metric, c.early_stopping_min_delta) == (4, "val_accuracy", 0.01)
    assert config_from_args(["--resume", "ck/ckpt-epoch-000003.npz"]).resume == "ck/ckpt-epoch-000003.npz"
    assert TrainConfig.from_dict(c.to_dict()) == c


def test_predict_help_says_each_default_once():
    from hvd_train import cli

    text = " ".join(cli.predict_parser().format_help().split())
    assert "(default: None)" not in text and text.count("(default:") == 1, text
    assert "(default: <input stem>.predictions.csv)" in text
