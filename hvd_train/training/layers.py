"""Layers that know they run on several processes.

``SyncBatchNormalization``: Keras's BatchNormalization whose training-mode statistics are those of
the global batch, not each rank's slice, weighted by each rank's sample count. Horovod 0.28's own
layer drives Keras 2 only and takes the plain mean of the rank means, which is not the global
batch's mean when a step's slices are uneven (sharding.py gives the last step of an epoch slices
that differ by one sample); weighted, N processes x batch b compute what 1 process x batch N*b does.
"""
from __future__ import annotations

import horovod.tensorflow as hvd
import keras
import tensorflow as tf


def _world_size() -> int:
    try:
        return hvd.size()
    except ValueError:  # Horovod not initialised: a plain single-process model (e.g. predict)
        return 1


@keras.saving.register_keras_serializable(package="hvd_train")
class SyncBatchNormalization(keras.layers.BatchNormalization):
    """Batch normalization whose training statistics are those of the global batch (see module doc).

    Sums of x and x^2 and the sample count (each weighted by the mask, if any) are summed over
    ranks in float64, so the mean and variance are exact for any slice sizes. The sum-allreduce
    has Horovod's gradient (a sum-allreduce of the upstream gradients), so backprop through the
    global statistics matches one process's too. In inference, and on one process, it is Keras's
    BatchNormalization; a saved model needs neither Horovod nor this class to load (a run saves
    plain BatchNormalization layers in its place).
    """

    def _moments(self, inputs, mask):
        if _world_size() == 1:
            return super()._moments(inputs, mask)
        axes = self._reduction_axes
        x = tf.cast(inputs, tf.float64)
        weights = tf.ones_like(x) if mask is None else tf.broadcast_to(
            tf.expand_dims(tf.cast(mask, tf.float64), -1), tf.shape(x))
        local = tf.stack([tf.reduce_sum(weights * x, axis=axes), tf.reduce_sum(weights * tf.square(x), axis=axes),
                          tf.reduce_sum(weights, axis=axes)])
        # Horovod: one sum-allreduce of [sum x, sum x^2, count] per layer and step, inside the step's
        # graph (named after its graph op, so a layer called twice in a step gets two names).
        total = hvd.allreduce(local, op=hvd.Sum)
        count = tf.maximum(total[2], 1.0)
        mean = total[0] / count
        variance = tf.maximum(total[1] / count - tf.square(mean), 0.0)
        return tf.cast(mean, inputs.dtype), tf.cast(variance, inputs.dtype)
