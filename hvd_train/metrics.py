"""Exact global evaluation: per-rank sums combined by sample count, never a mean of means."""
from __future__ import annotations

from typing import Dict

import numpy as np

from . import sharding
from .runtime import Runtime


def local_sums(model, x: np.ndarray, y: np.ndarray, from_logits: bool, batch_size: int = 4096) -> np.ndarray:
    """[sum of per-sample losses, number correct, number of samples] on this rank's rows."""
    import tensorflow as tf

    totals = np.zeros(3, np.float64)
    for start in range(0, len(y), batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        scores = model(xb, training=False)
        losses = tf.keras.losses.sparse_categorical_crossentropy(yb, scores, from_logits=from_logits)
        totals += [np.sum(losses.numpy(), dtype=np.float64),
                   np.sum(np.argmax(scores.numpy(), axis=1) == yb), len(yb)]
    return totals


def from_sums(totals: np.ndarray) -> Dict[str, float]:
    loss_sum, correct, count = (float(v) for v in totals)
    if count == 0:
        return {"loss": float("nan"), "accuracy": float("nan"), "samples": 0}
    return {"loss": loss_sum / count, "accuracy": correct / count, "samples": int(count)}


def evaluate(model, x: np.ndarray, y: np.ndarray, runtime: Runtime, from_logits: bool) -> Dict[str, float]:
    """Collective: every rank scores its strided shard, then one sum-allreduce of the totals."""
    import horovod.tensorflow as hvd

    rows = sharding.eval_shard(len(y), runtime.rank, runtime.size)
    totals = local_sums(model, x[rows], y[rows], from_logits)
    # Horovod: sum (not average) so ranks with more samples weigh more: exact whole-set metrics.
    totals = hvd.allreduce(totals, op=hvd.Sum, name="eval_sums").numpy()
    return from_sums(totals)


def combine_by_count(values: Dict[str, float], count: int, what: str) -> Dict[str, float]:
    """Collective: per-rank means over ``count`` samples -> means over all ranks' samples.

    Every rank must pass the same keys. Exact for any metric that is a mean over samples.
    """
    import horovod.tensorflow as hvd

    keys = sorted(values)
    local = np.array([float(values[k]) * count for k in keys] + [count], np.float64)
    # Horovod: sum of count-weighted values, divided by the total count; not a mean of rank means.
    total = hvd.allreduce(local, op=hvd.Sum, name=f"combine.{what}").numpy()
    return {k: v / total[-1] for k, v in zip(keys, total[:-1])}
