"""hvd_train: data-parallel training of TensorFlow/Keras models with Horovod."""
import os

from .version import __version__

# TensorFlow's C++ INFO lines (oneDNN, CPU features) repeat once per rank; keep warnings and errors.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
# Horovod: its Keras API (0.28) drives Keras 2. With TensorFlow >= 2.16, tf.keras is Keras 2 (the
# tf_keras package) only when this is set before TensorFlow first resolves tf.keras; hvd_train
# sets it on import (the launchers too), and model.py stops with a clear message if it was too late.
os.environ["TF_USE_LEGACY_KERAS"] = "1"

__all__ = ["TrainConfig", "ConfigError", "DataError", "Table", "train", "dry_run", "build_mlp", "sync_replicas",
           "__version__"]


def __getattr__(name):
    # Lazy: `hvd-train --help` and the unit tests should not pay for importing TensorFlow.
    if name in ("TrainConfig", "ConfigError"):
        from . import config
        return getattr(config, name)
    if name in ("DataError", "Table"):
        from . import data
        return getattr(data, name)
    if name in ("train", "dry_run"):
        from . import trainer
        return getattr(trainer, name)
    if name == "sync_replicas":  # for your own loops: replicas.sync_state (collective)
        from .replicas import sync_state
        return sync_state
    if name == "build_mlp":
        from .model import build_mlp
        return build_mlp
    raise AttributeError(f"module 'hvd_train' has no attribute {name!r}")
