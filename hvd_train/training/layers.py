"""Layers that know they run on several processes, and the batch norm hvd_train's CNN trains with.

``FusedBatchNormalization``: Keras's BatchNormalization computed, for 4-D training batches
(images, channels last), by TensorFlow's fused kernel. Keras 3's own layer is unfused and
upcasts 16-bit inputs to float32, which cost the bench's CNN 17% of its float32 step and 34%
under mixed_bfloat16 (docs/performance.md); the fused kernel keeps bfloat16 inputs as they are.
Same results (2.4e-7; tests/test_model.py), same weights, moving statistics updated as Keras
does (biased batch variance); inference, masks, renorm and other shapes go to Keras's own code.

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
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """Keras's BatchNormalization with TensorFlow's fused kernel in training (see module doc)."""

    def call(self, inputs, training=None, mask=None):
        fused = (training and self.trainable and mask is None and not self.renorm and len(inputs.shape) == 4
                 and self.axis in (3, -1))
        if not fused:
            return super().call(inputs, training=training, mask=mask)
        channels = inputs.shape[-1]
        scale = tf.cast(self.gamma, tf.float32) if self.scale else tf.ones([channels], tf.float32)
        offset = tf.cast(self.beta, tf.float32) if self.center else tf.zeros([channels], tf.float32)
        x = inputs if inputs.dtype in (tf.float32, tf.bfloat16, tf.float16) else tf.cast(inputs, tf.float32)
        y, mean, variance = tf.compat.v1.nn.fused_batch_norm(x, scale, offset, epsilon=self.epsilon,
                                                             is_training=True)[:3]
        # The kernel returns the unbiased variance; Keras's moving average takes the biased one.
        n = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), tf.float32)
        variance = variance * (n - 1.0) / tf.maximum(n, 1.0)
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
        return tf.cast(y, self.compute_dtype)


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
