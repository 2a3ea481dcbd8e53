"""Identical replicas: the model state Horovod's gradient allreduce does not cover, kept in step,
and the end-of-run proof that every rank holds the same model.

Trainable variables stay identical by construction: every rank starts from rank 0's (broadcast)
and applies the same allreduced gradients. Non-trainable variables are updated by the layers
themselves from each rank's own batches, so they drift apart: BatchNormalization's moving mean
and variance above all. ``sync_state`` brings them back together, and runs (collectively) before
every evaluation, every checkpoint and the final save:

- BatchNormalization moving statistics are averaged over ranks. Each is an exponential moving
  average of per-step batch statistics, and an EMA is linear, so the average of the ranks'
  EMAs is the EMA of the ranks' averaged batch statistics: for the mean, the mean over the
  global batch (slices are equal to within one sample); for the variance, the mean of the
  within-slice variances, which leaves out the spread of the slice means (small when shards are
  drawn from one shuffled order; with ``--sync-batchnorm`` the batch statistics are already
  global and identical, and averaging them changes nothing). Broadcasting rank 0's instead
  would keep 1/N of the data's evidence and throw the rest away.
- Any other non-trainable variable (a counter, a frozen layer) is broadcast from rank 0.

The average is taken in float64 and rounded once, so syncing replicas that already agree
changes no bit: the helper is safe to call as often as needed.
"""
from __future__ import annotations

import hashlib
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .. import runtime


def batchnorm_statistics(model) -> List:
    """The moving mean and variance variables of every BatchNormalization layer, nested ones included."""
    import tensorflow as tf

    found = []
    for layer in [model, *model.submodules]:
        if isinstance(layer, tf.keras.layers.BatchNormalization) and layer.built:
            found += [layer.moving_mean, layer.moving_variance]
    return found


def split_state(model) -> Tuple[List, List]:
    """(averaged, broadcast): the model's non-trainable variables, in the model's order."""
    averaged = {id(v) for v in batchnorm_statistics(model)}
    state = model.non_trainable_variables
    return [v for v in state if id(v) in averaged], [v for v in state if id(v) not in averaged]


def sync_state(model) -> None:
    """Collective (every rank, same model): make the non-trainable state identical on every rank."""
    import horovod.tensorflow as hvd

    if hvd.size() == 1:
        return
    averaged, broadcast = split_state(model)
    if averaged:
        flat = np.concatenate([v.numpy().astype(np.float64).ravel() for v in averaged])
        # Horovod: one sum-allreduce of every moving statistic, divided by the world size here.
        total = hvd.allreduce(flat, op=hvd.Sum, name="replicas.batchnorm").numpy() / hvd.size()
        offset = 0
        for v in averaged:
            n = int(np.prod(v.shape))
            v.assign(total[offset:offset + n].reshape(v.shape).astype(v.dtype.as_numpy_dtype))
            offset += n
    if broadcast:
        # Horovod: rank 0's value of every other non-trainable variable.
        hvd.broadcast_variables(broadcast, root_rank=0)


def digests(model) -> Tuple[str, List[str]]:
    """SHA-256 of the whole model (consensus.weights_digest of ``model.get_weights()``) and of
    each variable (``model.weights`` order, trainable or not), from one pass over the bytes."""
    whole, each = hashlib.sha256(), []
    for array in model.get_weights():
        data = np.ascontiguousarray(array).tobytes()
        whole.update(data)
        each.append(hashlib.sha256(data).hexdigest())
    return whole.hexdigest(), each


def first_difference(names: Sequence[str], per_rank: Sequence[Sequence[str]]) -> Optional[str]:
    """None if every rank's variable digests match rank 0's, else a message naming the first
    variable (in the model's order) that differs, and the ranks that hold another value."""
    if len({len(d) for d in per_rank}) > 1:
        return (f"replicas differ: the ranks hold different numbers of variables "
                f"({', '.join(f'rank {r}: {len(d)}' for r, d in enumerate(per_rank))})")
    for i, name in enumerate(names):
        ranks = [r for r, d in enumerate(per_rank) if d[i] != per_rank[0][i]]
        if ranks:
            return (f"replicas differ after training, first in variable {name} ({i + 1} of {len(names)}): "
                    f"rank(s) {', '.join(map(str, ranks))} hold another value than rank 0. Something changed "
                    f"it outside the allreduced gradients and the state sync; no model written")
    return None


def check(model) -> Tuple[List[str], Optional[str]]:
    """Collective: every rank's whole-model digest (rank order), and the difference, if any."""
    # Horovod: one allgather of every rank's digests; each rank compares the same list.
    gathered = runtime.allgather(digests(model), "replicas")
    problem = first_difference([v.name for v in model.weights], [each for _, each in gathered])
    return [whole for whole, _ in gathered], problem
