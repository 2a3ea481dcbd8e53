"""This rank's training batches of an in-memory dataset, following the plan in sharding.py: the
plan per epoch (ShardedBatches, numpy) and the tf.data pipeline that feeds it to Keras
(sharded_dataset); ``ArrayFeed`` is what the training loop gets from data.Splits.train_feed (a
file dataset's counterpart: stream.StreamFeed)."""
from __future__ import annotations

from typing import Tuple

import numpy as np

from . import sharding

PREFETCH_STEPS = 2  # batches gathered ahead of the step


class ShardedBatches:
    """The plan of one epoch for this rank: (rows, loss weight) per step, the same on every rank
    for a given (seed, epoch). ``position``: the epoch starts that far into its order (an elastic
    reset or a resume mid-epoch). Indexing gives a step's (features, labels, loss weights)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, rank: int, world_size: int,
                 batch_size: int, seed: int, shuffle: bool, epoch: int = 0, position: int = 0):
        self.x, self.y = x, y
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.seed, self.shuffle = seed, shuffle
        self.set_epoch(epoch, position)

    def set_epoch(self, epoch: int, position: int = 0) -> None:
        self.epoch, self.position = epoch, position
        order = sharding.epoch_order(len(self.y), epoch, self.seed, self.shuffle)
        self.batches = sharding.local_batches(len(self.y), self.rank, self.world_size, self.batch_size, order,
                                              position)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, step: int):
        rows, weight = self.batches[step]
        return self.x[rows], self.y[rows], np.full(len(rows), weight, np.float32)

    def flat(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The epoch's plan as three arrays: every step's rows end to end, each step's row
        count and each step's loss weight."""
        return (np.concatenate([rows for rows, _ in self.batches]).astype(np.int64),
                np.array([len(rows) for rows, _ in self.batches], np.int64),
                np.array([weight for _, weight in self.batches], np.float32))


def sharded_dataset(batches: ShardedBatches):
    """A tf.data.Dataset of this rank's steps from ``batches``' epoch (and position) on, epoch
    after epoch without end: Keras takes each epoch's steps from one iterator
    (``steps_per_epoch``), so the next epoch's first batch is ready when an epoch ends.

    Only the plan comes from Python, once per epoch (its permutation is numpy's, as every rank
    and a resume compute it); the rows are gathered inside TensorFlow, on tf.data's thread,
    ``PREFETCH_STEPS`` ahead of the step. A Keras Sequence instead runs Python per batch: an
    enqueuer thread, a queue, and a py_func to hand each batch over (docs/performance.md has
    what that cost). The arrays are held once more, as tensors (as Keras's own fit(x, y) does).
    """
    import tensorflow as tf

    features, labels = tf.convert_to_tensor(batches.x), tf.convert_to_tensor(batches.y)
    b = batches

    def plans():
        epoch, position = b.epoch, b.position
        while True:
            yield ShardedBatches(b.x, b.y, b.rank, b.world_size, b.batch_size, b.seed, b.shuffle, epoch,
                                 position).flat()
            epoch, position = epoch + 1, 0

    def steps(rows, counts, weights):
        starts = tf.cumsum(counts, exclusive=True)
        return tf.data.Dataset.from_tensor_slices((starts, counts, weights)).map(
            lambda start, count, weight: (rows[start:start + count], weight))

    def gather(rows, weight):
        return tf.gather(features, rows), tf.gather(labels, rows), tf.fill(tf.shape(rows), weight)

    signature = (tf.TensorSpec([None], tf.int64), tf.TensorSpec([None], tf.int64), tf.TensorSpec([None], tf.float32))
    return (tf.data.Dataset.from_generator(plans, output_signature=signature)
            .flat_map(steps).map(gather).prefetch(PREFETCH_STEPS))


class ArrayFeed:
    """What the epoch loop (loop.py) trains on, for arrays: this rank's batches of ``epoch``
    after ``position`` samples of its order, then of the epochs after it. ``steps``: of the
    first epoch (fewer than the plan's when it starts mid-epoch). Arrays cannot go bad mid-run,
    so ``failure`` is always None."""

    def __init__(self, splits, rank: int, size: int, config, epoch: int, position: int = 0):
        self.batches = ShardedBatches(splits.x_train, splits.y_train, rank, size, config.batch_size, config.seed,
                                      config.shuffle, epoch=epoch, position=position)
        self.steps = len(self.batches)

    def keras_input(self):
        return sharded_dataset(self.batches)

    can_fail = False  # arrays in memory: nothing to read that could go bad

    def failure(self, after_error: bool = False):
        return None

    def close(self) -> None:
        """Nothing runs beside the pipeline."""
