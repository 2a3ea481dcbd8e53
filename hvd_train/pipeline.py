"""This rank's training batches, as a Keras Sequence following the plan in sharding.py."""
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
