"""Horovod for Keras 3, built on horovod.tensorflow's collective ops alone.

Horovod 0.28's own Keras layer (horovod.tensorflow.keras) drives Keras 2. Under Keras 3 its
DistributedOptimizer hooks methods Keras 3 never calls, so gradients are silently not averaged,
and its broadcast, state and batch-norm helpers fail (docs/design.md). This module is what
hvd_train uses instead, and the only place its training touches Horovod's Keras-facing side:

- ``DistributedOptimizer``: wraps a Keras optimizer with ring-allreduce gradient averaging. The
  optimizer's own class, subclassed: ``apply`` averages the gradients over ranks, then applies
  them as the class would (optionally after accumulating several local passes);
- ``broadcast``: rank 0's variables (weights, optimizer state) on every rank;
- ``sync_state``: the state layers update themselves (batch-norm moving statistics) made
  identical at an epoch's end: averaged, the rest broadcast;
- dropout's random state: each rank draws its own masks, from rank 0's state offset by its rank
  (``seed_states``, ``set_seed_rank``), so a rank's slice of the global batch gets masks
  independent of the others', as one process with the whole batch would, and a checkpoint of
  rank 0's state replays every rank's masks.

XLA: Horovod's ops have no XLA kernels, so every model is compiled with ``JIT_COMPILE`` (False);
with XLA on, compilation fails on every rank ("No registered 'HorovodAllreduce' OpKernel for
XLA_CPU_JIT devices"), and Keras's default ('auto') turns it on for GPUs.
"""
from __future__ import annotations

import functools
import weakref
from typing import List, Optional, Sequence

import numpy as np

JIT_COMPILE = False
# Rank r's dropout seed is rank 0's plus r times this (a prime): separate random streams.
SEED_STRIDE = 1_000_003


def _hvd():
    import horovod.tensorflow as hvd

    return hvd


def tf_variables(variables: Sequence) -> list:
    """TensorFlow variables of Keras variables (Keras 3 wraps them; ``.value`` is the tf.Variable)."""
    return [v.value if hasattr(v, "path") else v for v in variables]


# --- the optimizer ------------------------------------------------------------------------------

def DistributedOptimizer(optimizer, compression=None, backward_passes_per_step: int = 1,
                         name: Optional[str] = None, count_nonfinite: bool = True):
    """A Keras optimizer like ``optimizer`` (a fresh one, from its config) whose updates use the
    gradients averaged over every rank by ring-allreduce.

    ``compression``: Horovod's (``Compression.fp16``: float16 on the wire). ``backward_passes_per_step``
    k > 1: each rank sums k local gradients before one allreduce of their mean and one update
    (k times fewer allreduces; the effective global batch grows k-fold); the sums are optimizer
    variables, so checkpoints and elastic commits keep a partial sum. A LossScaleOptimizer
    (mixed_float16) is wrapped as a whole: the scaled gradients are averaged *before* its finite
    check, so every rank sees the same gradients and skips the same steps.

    The class keeps its base's name and module, so a saved model names the plain optimizer and
    loads without Horovod. ``name``: of the allreduces (Horovod's timeline shows them), by default
    "Distributed<Class>_Allreduce" as Horovod's own wrapper named them; each gradient's is that
    plus "/grad_<i>".

    ``count_nonfinite``: updates whose averaged gradients are not all finite are counted, and the
    first one's step kept (``nonfinite``): the averaged gradients are the same on every rank, so
    every rank counts the same steps, with no collective of its own; callbacks.NonFinite and the
    stop check read it at the batches the ranks agree on. Counted, not skipped: a skip needs a
    conditional around the update, which cost 10-25% of a small model's step here, and the run
    stops before anything of those weights is written. Not under a LossScaleOptimizer, which
    skips such steps itself (a normal event there: the loss scale shrinks).
    """
    cls = _distributed_class(type(optimizer))
    wrapped = cls.from_config(optimizer.get_config())
    wrapped._hvd_compression = compression or _hvd().Compression.none
    wrapped._hvd_passes = int(backward_passes_per_step)
    wrapped._hvd_prefix = name or f"Distributed{type(optimizer).__name__}_Allreduce"
    wrapped._hvd_nonfinite = bool(count_nonfinite) and not _is_loss_scaled(optimizer)
    return wrapped


def _is_loss_scaled(optimizer) -> bool:
    import keras

    return isinstance(optimizer, keras.optimizers.LossScaleOptimizer)


# Each distributed optimizer's count of updates whose averaged gradients were not finite, and the
# optimizer step of the first: plain TensorFlow variables outside the optimizer's own (checkpoints
# and broadcasts hold the same state as before).
_nonfinite: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def nonfinite(optimizer) -> tuple:
    """(updates so far whose averaged gradient was not finite, the optimizer step of the first or
    -1): the same on every rank."""
    found = _nonfinite.get(optimizer)
    return (int(found[0].numpy()), int(found[1].numpy())) if found is not None else (0, -1)


def _elastic() -> bool:
    """An elastic worker's world may grow after the step was traced (Horovod sets this)."""
    import os

    return os.environ.get("HOROVOD_ELASTIC") == "1"


def is_distributed(optimizer) -> bool:
    return getattr(type(optimizer), "_hvd_distributed", False)


@functools.lru_cache(maxsize=None)
def _distributed_class(base: type) -> type:
    import tensorflow as tf

    class Distributed(base):
        _hvd_distributed = True
        _hvd_compression = None
        _hvd_passes = 1
        _hvd_prefix = "DistributedOptimizer_Allreduce"
        _hvd_nonfinite = False  # count updates whose averaged gradients are not finite

        def build(self, variables):
            super().build(variables)
            if self not in _nonfinite:
                with tf.init_scope():
                    _nonfinite[self] = (tf.Variable(0, dtype=tf.int64, trainable=False, name="hvd_nonfinite"),
                                        tf.Variable(-1, dtype=tf.int64, trainable=False, name="hvd_first_nonfinite"))
            if self._hvd_passes > 1:
                # Local sums of the gradients between allreduces, and how many passes they hold.
                self._hvd_sums = [self.add_variable_from_reference(v, name="hvd_gradient_sum") for v in variables]
                self._hvd_count = self.add_variable(shape=(), dtype="int64", initializer="zeros",
                                                    name="hvd_passes")

        def _hvd_average(self, grads):
            hvd = _hvd()
            if hvd.size() == 1 and not _elastic():
                return list(grads)  # traced once: a world that cannot change has nothing to average
            # Horovod: every gradient averaged over the ranks (ring-allreduce), one named op per
            # variable, the same names on every rank.
            return [None if g is None else hvd.allreduce(
                tf.convert_to_tensor(g), op=hvd.Average, compression=self._hvd_compression,
                name=f"{self._hvd_prefix}/grad_{i}") for i, g in enumerate(grads)]

        def _hvd_apply(self, averaged, trainable_variables):
            """The update from averaged gradients; one that is not all finite is counted."""
            present = [g for g in averaged if g is not None]
            if self._hvd_nonfinite and present:
                count, first = _nonfinite[self]
                # One sum per gradient: NaN and infinity carry through it (a sum past float32's
                # range, 3e38, counts too: that run has diverged as well).
                bad = tf.logical_not(tf.math.is_finite(tf.add_n([tf.reduce_sum(tf.cast(g, tf.float32))
                                                                 for g in present])))
                count.assign_add(tf.cast(bad, tf.int64))
                first.assign(tf.where(tf.logical_and(bad, first < 0), tf.cast(self.iterations, tf.int64), first))
            return base.apply(self, averaged, trainable_variables)

        def apply(self, grads, trainable_variables=None):
            grads = list(grads)
            if self._hvd_passes == 1 or not grads:
                if not self.built and self._hvd_nonfinite:
                    self.build(list(trainable_variables))
                return self._hvd_apply(self._hvd_average(grads), trainable_variables)
            if not self.built:
                self.build(list(trainable_variables))
                self.built = True
            for total, g in zip(self._hvd_sums, grads):
                if g is not None:
                    total.assign_add(tf.cast(tf.convert_to_tensor(g), total.dtype))
            self._hvd_count.assign_add(1)

            def update():
                # Horovod: one allreduce of the mean of the k local passes, then one update.
                means = [None if g is None else total.value / self._hvd_passes
                         for g, total in zip(grads, self._hvd_sums)]
                self._hvd_apply(self._hvd_average(means), trainable_variables)
                for total in self._hvd_sums:
                    total.assign(tf.zeros_like(total.value))
                return tf.constant(True)

            # Every rank counts the same passes, so every rank takes the same branch.
            tf.cond(self._hvd_count.value % self._hvd_passes == 0, update, lambda: tf.constant(False))

    Distributed.__name__ = base.__name__
    Distributed.__qualname__ = base.__qualname__
    Distributed.__module__ = base.__module__
    return Distributed


# --- broadcast and dropout seeds --------------------------------------------------------------

def seed_states(model) -> list:
    """The random-generator states of the model's layers (Dropout's SeedGenerator), in order."""
    return [v for v in model.variables if v.name == "seed_generator_state"]


# Which rank's offset each model's seed states hold now (0 when built: every rank builds alike).
_seed_rank: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def set_seed_rank(model, rank: int) -> None:
    """Local: make the model's seed states rank ``rank``'s (rank 0's plus rank x SEED_STRIDE)."""
    shift = (rank - _seed_rank.get(model, 0)) * SEED_STRIDE
    if shift:
        for state in seed_states(model):
            state.assign(state.value + np.array([shift, 0], dtype=state.dtype))
    _seed_rank[model] = rank


def seed_rank(model) -> int:
    """Whose offset the model's seed states hold now."""
    return _seed_rank.get(model, 0)


def assume_seed_rank(model, rank: int) -> None:
    """Local: the seed states were just set to values in rank ``rank``'s form (an elastic restore)."""
    _seed_rank[model] = rank


def broadcast(model, optimizer=None, root_rank: int = 0) -> None:
    """Collective: rank ``root_rank``'s weights, optimizer state and (rank 0 form) dropout seeds
    on every rank; then each rank's own dropout seeds."""
    hvd = _hvd()
    set_seed_rank(model, 0)
    variables = list(model.variables) + (list(optimizer.variables) if optimizer is not None else [])
    # Horovod: every rank starts from the root's variables, whatever it built or loaded itself.
    broadcast_variables(variables, "broadcast.model", root_rank)
    set_seed_rank(model, hvd.rank())


def broadcast_variables(variables: Sequence, name: str, root_rank: int = 0) -> None:
    """Collective: rank ``root_rank``'s values of ``variables`` (Keras or TensorFlow) on every rank,
    in one traced group of broadcasts named ``name/<index>``. Not Horovod's broadcast_variables,
    which names each broadcast after its variable: Keras's automatic names (adam_2/..., dense_5/...)
    differ between ranks once one rank has built more objects than another, and broadcasts of
    different names never meet."""
    import tensorflow as tf

    hvd = _hvd()
    targets = tf_variables(variables)
    if not targets:
        return

    @tf.function(autograph=False)
    def group():
        for i, v in enumerate(targets):
            v.assign(hvd.broadcast(v, root_rank, name=f"{name}/{i}"))

    group()


# --- the state layers update themselves --------------------------------------------------------

def layers_of(model) -> list:
    """Every layer of the model, nested ones included, the model itself first."""
    return list(model._flatten_layers(include_self=True, recursive=True))


def batchnorm_statistics(model) -> List:
    """The moving mean and variance variables of every BatchNormalization layer, nested ones included."""
    import keras

    found = []
    for layer in layers_of(model):
        if isinstance(layer, keras.layers.BatchNormalization) and layer.built:
            found += [layer.moving_mean, layer.moving_variance]
    return found


def split_state(model):
    """(averaged, broadcast): the model's non-trainable weights, in the model's order (dropout's
    seeds are not weights: they are each rank's own, see the module doc)."""
    averaged = {id(v) for v in batchnorm_statistics(model)}
    state = model.non_trainable_weights
    return [v for v in state if id(v) in averaged], [v for v in state if id(v) not in averaged]


def sync_state(model) -> None:
    """Collective (every rank, same model): make the non-trainable state identical on every rank.

    Batch-norm moving statistics are averaged (an EMA is linear: the mean of the ranks' EMAs is
    the EMA of the ranks' mean batch statistics), in float64 and rounded once, so syncing
    replicas that already agree changes no bit; any other non-trainable weight is rank 0's.
    """
    hvd = _hvd()
    if hvd.size() == 1:
        return
    averaged, others = split_state(model)
    if averaged:
        flat = np.concatenate([np.asarray(v.numpy(), np.float64).ravel() for v in averaged])
        # Horovod: one sum-allreduce of every moving statistic, divided by the world size here.
        total = hvd.allreduce(flat, op=hvd.Sum, name="replicas.batchnorm").numpy() / hvd.size()
        offset = 0
        for v in averaged:
            n = int(np.prod(v.shape))
            v.assign(total[offset:offset + n].reshape(v.shape).astype(v.dtype))
            offset += n
    if others:
        # Horovod: rank 0's value of every other non-trainable weight.
        broadcast_variables(others, "replicas.state")


def optimizer_values(optimizer) -> List[np.ndarray]:
    """The optimizer's state as arrays (iterations, learning rate, slots, ...), in its order."""
    return [np.asarray(v.numpy()) for v in optimizer.variables]


def set_optimizer_values(optimizer, values: Sequence[np.ndarray], what: Optional[str] = None) -> None:
    """Assign ``values`` (optimizer_values' order); ValueError if they do not fit."""
    variables = list(optimizer.variables)
    if len(values) != len(variables):
        raise ValueError(f"{what or 'the state'} holds {len(values)} optimizer variables, this optimizer "
                         f"{len(variables)}")
    for v, value in zip(variables, values):
        if tuple(v.shape) != tuple(np.shape(value)):
            raise ValueError(f"optimizer variable {v.path} has shape {tuple(v.shape)}, "
                             f"{what or 'the state'} {tuple(np.shape(value))}")
    for v, value in zip(variables, values):
        v.assign(np.asarray(value).astype(v.dtype))
