"""hvd_train: data-parallel training of TensorFlow/Keras models with Horovod.

The layers, each a subpackage (docs/design.md):

- config/     what a run is asked: TrainConfig (options.py), TOML files, the plan for a world
- data/       where data comes from and who trains on what: the data interface, in-memory
              arrays, CSV/Parquet sources streamed in shares, the sharding rule
- training/   how a step is distributed and a run goes: set-up and agreement, the epoch loop
              (plain and elastic), callbacks, checkpoints, exact metrics, the model
- outputs/    what a run writes: the run directory, the event log, plots, predictions
- launchers/  how it is launched, Python side (launch/ holds the shell launchers)
- tools/      built on the rest: hvd-bench, hvd-sweep

At the top: cli.py (hvd-train), runtime.py (this process in its Horovod world: start-up,
collectives on Python values, rank-0 side effects), version.py.
"""
import os

from .version import __version__

# TensorFlow's C++ INFO lines (oneDNN, CPU features) repeat once per rank; keep warnings and errors.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
# Keras 3 on TensorFlow (training/distributed.py drives it with Horovod's TensorFlow ops).
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

__all__ = ["TrainConfig", "ConfigError", "DataError", "Table", "train", "dry_run", "build_mlp", "sync_replicas",
           "SyncBatchNormalization", "DistributedOptimizer", "__version__"]


def __getattr__(name):
    # Lazy: `hvd-train --help` and the unit tests should not pay for importing TensorFlow.
    if name in ("TrainConfig", "ConfigError"):
        from .config import options
        return getattr(options, name)
    if name in ("DataError", "Table"):
        from .data import arrays
        return getattr(arrays, name)
    if name in ("train", "dry_run"):
        from .training import trainer
        return getattr(trainer, name)
    if name == "sync_replicas":  # for your own loops: distributed.sync_state (collective)
        from .training.distributed import sync_state
        return sync_state
    if name == "DistributedOptimizer":  # for your own loops: a Keras 3 optimizer averaged over ranks
        from .training.distributed import DistributedOptimizer
        return DistributedOptimizer
    if name == "SyncBatchNormalization":  # weighted by slice size; registered with Keras
        from .training.layers import SyncBatchNormalization
        return SyncBatchNormalization
    if name == "build_mlp":
        from .training.model import build_mlp
        return build_mlp
    raise AttributeError(f"module 'hvd_train' has no attribute {name!r}")
