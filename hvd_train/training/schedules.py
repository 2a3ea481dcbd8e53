"""Learning-rate schedules: Horovod's warmup, then constant, step or cosine.

Each is a function of the (fractional) epoch alone, so every rank, and a resumed run, computes
the same rate without communicating.
"""
from __future__ import annotations

import math
from typing import Any, List

import tensorflow as tf

from ..config.options import TrainConfig
from ..config.plan import Plan


def callbacks(config: TrainConfig, plan: Plan, start_step: float = 0.0) -> List[Any]:
    """The Keras callbacks that set the learning rate: warmup first, then the schedule.

    ``start_step``: the first epoch resumes after this many of the plan's steps (its samples
    already trained / the global batch; fractional after an elastic reset changed the world):
    per-batch rates continue from there (rate() gives the one to start with).
    """
    found = _callbacks(config, plan)
    return [_Shifted(c, start_step) for c in found] if start_step else found


def rate(config: TrainConfig, plan: Plan, epoch: float) -> float:
    """The rate the callbacks give at a fractional epoch, for this plan's world (what an elastic
    reset sets before it continues; Horovod's warmup formula, world size from the plan)."""
    size, warm, steps = plan.world_size, config.warmup_epochs, plan.steps_per_epoch
    if warm and epoch < warm:
        done = epoch + 1.0 / steps  # Horovod's warmup rounds each epoch end up to a whole epoch
        return plan.scaled_lr / size * (done * (size - 1) / warm + 1)
    if config.lr_schedule == "step":
        return plan.scaled_lr * config.lr_decay_factor ** ((math.floor(epoch) - warm) // config.lr_decay_epochs)
    if config.lr_schedule == "cosine":
        return plan.scaled_lr * cosine_multiplier(epoch, warm, config.epochs)
    return plan.scaled_lr


def _callbacks(config: TrainConfig, plan: Plan) -> List[Any]:
    import horovod.tensorflow.keras as hvd

    found = []
    if config.warmup_epochs:
        # Horovod: ramp from scaled_lr / size to scaled_lr over the first epochs (Goyal et al.).
        found.append(hvd.callbacks.LearningRateWarmupCallback(
            initial_lr=plan.scaled_lr, warmup_epochs=config.warmup_epochs,
            steps_per_epoch=plan.steps_per_epoch, verbose=0))
    warm, total = config.warmup_epochs, config.epochs
    if config.lr_schedule == "step":
        # Horovod: multiply by the factor every lr_decay_epochs after warmup, at epoch starts.
        found.append(hvd.callbacks.LearningRateScheduleCallback(
            initial_lr=plan.scaled_lr, start_epoch=warm, staircase=True,
            multiplier=lambda epoch: config.lr_decay_factor ** ((epoch - warm) // config.lr_decay_epochs)))
    elif config.lr_schedule == "cosine":
        # Horovod: half a cosine from scaled_lr to 0 between the end of warmup and the last step, per batch.
        found.append(hvd.callbacks.LearningRateScheduleCallback(
            initial_lr=plan.scaled_lr, start_epoch=warm, staircase=False, steps_per_epoch=plan.steps_per_epoch,
            multiplier=lambda epoch: cosine_multiplier(epoch, warm, total)))
    return found


def cosine_multiplier(epoch: float, warmup_epochs: int, epochs: int) -> float:
    """The cosine schedule's factor at a (fractional) epoch: 1 at the end of warmup, 0 at the end."""
    progress = (epoch - warmup_epochs) / (epochs - warmup_epochs)
    return 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


class _Shifted(tf.keras.callbacks.Callback):
    """A Horovod schedule callback that sees each batch ``steps`` later in the epoch."""

    def __init__(self, inner, steps: float):
        super().__init__()
        self.inner, self.steps = inner, steps

    def set_model(self, model):
        super().set_model(model)
        self.inner.set_model(model)

    def set_params(self, params):
        super().set_params(params)
        self.inner.set_params(params)

    def on_train_begin(self, logs=None):
        self.inner.on_train_begin(logs)

    def on_epoch_begin(self, epoch, logs=None):
        self.inner.on_epoch_begin(epoch, logs)

    def on_train_batch_begin(self, batch, logs=None):
        self.inner.on_batch_begin(batch + self.steps, logs)

    def on_train_batch_end(self, batch, logs=None):
        self.inner.on_batch_end(batch + self.steps, logs)

    def on_epoch_end(self, epoch, logs=None):
        self.inner.on_epoch_end(epoch, logs)
