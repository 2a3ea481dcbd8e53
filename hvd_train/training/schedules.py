"""Learning-rate schedules: Horovod's warmup, then constant, step or cosine.

Each is a function of the (fractional) epoch alone (``rate``), so every rank, a resumed run and
an elastic reset compute the same rate without communicating. One callback (``LearningRate``)
sets it before every step, as Horovod's LearningRateWarmupCallback and
LearningRateScheduleCallback did (same formulas), on Keras 3's optimizer.

Not carried over from Horovod's callbacks: their momentum correction (SGD's momentum scaled by
new/old rate for the step where the rate changes). Keras 3's SGD compiles its momentum into the
step, so it cannot change per step; the factor it would apply during warmup is at most
1 + (N - 1) / (steps_per_epoch x warmup_epochs) (docs/checkpoints.md).
"""
from __future__ import annotations

import math

import keras

from ..config.options import TrainConfig
from ..config.plan import Plan


def rate(config: TrainConfig, plan: Plan, epoch: float) -> float:
    """The rate at a fractional epoch for this plan's world (Horovod's formulas, world size from
    the plan): warmup from scaled_lr / size to scaled_lr, then the schedule."""
    size, warm, steps = plan.world_size, config.warmup_epochs, plan.steps_per_epoch
    if warm and epoch < warm:
        done = epoch + 1.0 / steps  # Horovod's warmup rounds each epoch end up to a whole epoch
        return plan.scaled_lr * (1.0 / size * (done * (size - 1) / warm + 1))
    if config.lr_schedule == "step":
        return plan.scaled_lr * config.lr_decay_factor ** ((math.floor(epoch) - warm) // config.lr_decay_epochs)
    if config.lr_schedule == "cosine":
        return plan.scaled_lr * cosine_multiplier(epoch, warm, config.epochs)
    return plan.scaled_lr


def cosine_multiplier(epoch: float, warmup_epochs: int, epochs: int) -> float:
    """The cosine schedule's factor at a (fractional) epoch: 1 at the end of warmup, 0 at the end."""
    progress = (epoch - warmup_epochs) / (epochs - warmup_epochs)
    return 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def current(optimizer) -> float:
    """The optimizer's learning rate now, as a float."""
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


class LearningRate(keras.callbacks.Callback):
    """Every rank, before every step (every execution with --steps-per-execution > 1): the
    optimizer's rate for the step about to run. The step rate (staircase) changes at epoch starts,
    warmup and cosine every step; the variable is assigned only when the value changes.

    ``start_step``: the first epoch resumes after this many of the plan's steps (its samples already
    trained / the global batch; fractional after an elastic reset changed the world).
    """

    def __init__(self, config: TrainConfig, plan: Plan, start_step: float = 0.0):
        super().__init__()
        self.config, self.plan, self.shift = config, plan, start_step
        self.last = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        self.shift = 0.0  # later epochs start at their beginning

    def on_train_batch_begin(self, batch, logs=None):
        step = min(batch + self.shift, self.plan.steps_per_epoch - 1)  # a fit of an epoch's rest: its steps
        value = rate(self.config, self.plan, self.epoch + step / self.plan.steps_per_epoch)
        if value != self.last:
            self.model.optimizer.learning_rate = value
            self.last = value
