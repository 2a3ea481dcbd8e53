import math

import pytest

from hvd_train.cli import config_from_args
from hvd_train.config import ConfigError, TrainConfig, scaled_learning_rate


def test_defaults_are_valid_and_frozen():
    c = TrainConfig()
    assert (c.dataset, c.epochs, c.batch_size, c.hidden) == ("iris", 100, 32, (64, 32))
    with pytest.raises(Exception):
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
    ({"hidden": (64, 0)}, "hidden sizes must be positive"),
    ({"val_fraction": 0.5, "test_fraction": 0.45}, "leave at least 10%"),
    ({"test_fraction": 0.0}, "test fraction"),
    ({"optimizer": "lamb"}, "optimizer must be one of"),
    ({"threads": 0}, "threads must be >= 1"),
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
