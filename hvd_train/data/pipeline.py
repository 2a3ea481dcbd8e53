"""This rank's training batches of an in-memory dataset, as a Keras Sequence following the plan
in sharding.py; ``ArrayFeed`` is what the training loop gets from data.Splits.train_feed (a file
dataset's counterpart: stream.StreamFeed)."""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from . import sharding


class ShardedBatches(tf.keras.utils.Sequence):
    """(features, labels, loss weights) for this rank; reshuffles identically on every rank.

    Pass ``shuffle=False`` to ``fit``: the order is ours, Keras must not permute the steps.
    ``position``: the first epoch starts that far into its order (an elastic reset mid-epoch).
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, rank: int, world_size: int,
                 batch_size: int, seed: int, shuffle: bool, epoch: int = 0, position: int = 0):
        super().__init__()
        self.x, self.y = x, y
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.seed, self.shuffle = seed, shuffle
        self.set_epoch(epoch, position)

    def set_epoch(self, epoch: int, position: int = 0) -> None:
        self.epoch = epoch
        order = sharding.epoch_order(len(self.y), epoch, self.seed, self.shuffle)
        self.batches = sharding.local_batches(len(self.y), self.rank, self.world_size, self.batch_size, order,
                                              position)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, step: int):
        rows, weight = self.batches[step]
        return self.x[rows], self.y[rows], np.full(len(rows), weight, np.float32)

    def on_epoch_end(self) -> None:
        self.set_epoch(self.epoch + 1)


class ArrayFeed:
    """What the epoch loop (loop.py) trains on, for arrays: this rank's batches of ``epoch``
    after ``position`` samples of its order, then of the epochs after it. ``steps``: of the
    first epoch (fewer than the plan's when it starts mid-epoch). Arrays cannot go bad mid-run,
    so ``failure`` is always None."""

    def __init__(self, splits, rank: int, size: int, config, epoch: int, position: int = 0):
        self.batches = ShardedBatches(splits.x_train, splits.y_train, rank, size, config.batch_size, config.seed,
                                      config.shuffle, epoch=epoch, position=position)
        self.steps = len(self.batches)

    def keras_input(self) -> ShardedBatches:
        return self.batches

    def failure(self, after_error: bool = False):
        return None
