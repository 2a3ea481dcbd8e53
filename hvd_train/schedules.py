"""Learning-rate schedules: Horovod's warmup, then constant, step or cosine.

Each is a function of the (fractional) epoch alone, so every rank, and a resumed run, computes
the same rate without communicating.
"""
from __future__ import annotations

import math
from typing import Any, List

from .config import TrainConfig
from .plan import Plan


def callbacks(config: TrainConfig, plan: Plan) -> List[Any]:
    """The Keras callbacks that set the learning rate: warmup first, then the schedule."""
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
