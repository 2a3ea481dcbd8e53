"""The models (an MLP for tables, a small CNN for images), the optimizer, and the one way a model
is compiled.

Any builder with build_mlp's first two parameters, ``(inputs, outputs) -> uncompiled
tf.keras.Model``, can replace them (``train(..., model_fn=...)``): ``inputs`` is the number of
features of a table, or the shape of one sample (``(height, width, channels)``) for N-d inputs;
``outputs`` the number of classes, or 1 for regression.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence, Tuple, Union

from ..config.options import TrainConfig

Inputs = Union[int, Tuple[int, ...]]
ModelFn = Callable[[Inputs, int], Any]  # (features or sample shape, outputs) -> uncompiled tf.keras.Model

# Keras's BatchNormalization momentum is 0.99; ours is 0.9. Tables and small image sets give few
# steps per epoch, and with 0.99 the moving statistics still remember their initial 0 and 1 after
# a short run (iris, 20 epochs of 2 steps: test accuracy 0.73 with 0.99, 0.97 with 0.9).
BATCHNORM_MOMENTUM = 0.9


def _norm_layer(sync_batchnorm: bool):
    import tensorflow as tf

    if sync_batchnorm:
        from .layers import SyncBatchNormalization

        return SyncBatchNormalization
    return tf.keras.layers.BatchNormalization


def _head(x, outputs: int, logits: bool, regression: bool, l2: float):
    """The output layer: class probabilities (softmax), logits, or one linear value (regression)."""
    import tensorflow as tf

    linear = logits or regression
    return tf.keras.layers.Dense(outputs, activation=None if linear else "softmax",
                                 kernel_regularizer=_l2(l2), name="target" if regression else "classes")(x)


def _l2(factor: float):
    import tensorflow as tf

    return tf.keras.regularizers.L2(factor) if factor > 0 else None


def build_mlp(inputs: Inputs, outputs: int, hidden: Sequence[int] = (64, 32),
              activation: str = "relu", dropout: float = 0.0, logits: bool = False,
              batch_norm: bool = False, sync_batchnorm: bool = False, l2: float = 0.0,
              regression: bool = False):
    """Dense layers -> ``outputs`` softmax probabilities, raw logits (``logits``), or one linear
    value (``regression``). N-d inputs are flattened first.

    ``batch_norm``: Dense (no bias) -> BatchNormalization -> activation in each hidden layer
    (momentum BATCHNORM_MOMENTUM); ``sync_batchnorm``: those layers are
    layers.SyncBatchNormalization (same weights, global batch statistics in training).
    ``l2``: weight decay on every kernel (Keras adds it to the loss).
    """
    import tensorflow as tf

    norm = _norm_layer(sync_batchnorm)
    shape = (inputs,) if isinstance(inputs, int) else tuple(inputs)
    x = first = tf.keras.Input(shape=shape, name="features")
    if len(shape) > 1:
        x = tf.keras.layers.Flatten(name="flatten")(x)
    for i, width in enumerate(hidden):
        if batch_norm:
            x = tf.keras.layers.Dense(width, use_bias=False, kernel_regularizer=_l2(l2), name=f"dense_{i}")(x)
            x = norm(momentum=BATCHNORM_MOMENTUM, name=f"batchnorm_{i}")(x)
            x = tf.keras.layers.Activation(activation, name=f"{activation}_{i}")(x)
        else:
            x = tf.keras.layers.Dense(width, activation=activation, kernel_regularizer=_l2(l2), name=f"dense_{i}")(x)
        if dropout > 0:
            x = tf.keras.layers.Dropout(dropout, name=f"dropout_{i}")(x)
    return tf.keras.Model(first, _head(x, outputs, logits, regression, l2), name="mlp")


def build_cnn(inputs: Inputs, outputs: int, filters: Sequence[int] = (32, 64), activation: str = "relu",
              dropout: float = 0.0, logits: bool = False, sync_batchnorm: bool = False, l2: float = 0.0,
              regression: bool = False):
    """A small conv net for images ``(height, width, channels)``: per block a 3x3 convolution (no
    bias), batch normalization, the activation and a 2x2 average pool while the image is at least
    2x2; then global average pooling, dropout and the output layer (as build_mlp's).

    Average, not max, pooling: a max pool's choice flips on near-ties (digits' pixels are small
    integers, many windows tie), so float rounding became a different gradient path and N
    processes drifted from one with the global batch (digits, --sync-batchnorm, 6 SGD steps:
    1.7e-4 with max pooling, 1.2e-7 with average pooling; test accuracy after the default 100
    epochs at np=2: 0.994 with max pooling, 0.992 with average pooling)."""
    import tensorflow as tf

    if isinstance(inputs, int) or len(inputs) != 3:
        raise ValueError(f"build_cnn needs images (height, width, channels), got input shape {inputs}")
    norm = _norm_layer(sync_batchnorm)
    x = first = tf.keras.Input(shape=tuple(inputs), name="images")
    side = min(inputs[:2])
    for i, width in enumerate(filters):
        x = tf.keras.layers.Conv2D(width, 3, padding="same", use_bias=False, kernel_regularizer=_l2(l2),
                                   name=f"conv_{i}")(x)
        x = norm(momentum=BATCHNORM_MOMENTUM, name=f"batchnorm_{i}")(x)
        x = tf.keras.layers.Activation(activation, name=f"{activation}_{i}")(x)
        if side >= 2:
            x = tf.keras.layers.AveragePooling2D(2, name=f"pool_{i}")(x)  # see the docstring
            side //= 2
    x = tf.keras.layers.GlobalAveragePooling2D(name="pool")(x)
    if dropout > 0:
        x = tf.keras.layers.Dropout(dropout, name="dropout")(x)
    return tf.keras.Model(first, _head(x, outputs, logits, regression, l2), name="cnn")


def model_for(config: TrainConfig, inference: bool = False) -> ModelFn:
    """The model the config describes, as a model_fn. ``inference``: the same weights with plain
    Keras layers (no SyncBatchNormalization), the model a run saves."""
    sync = config.sync_batchnorm and not inference
    common = dict(activation=config.activation, dropout=config.dropout, logits=config.logits, l2=config.l2,
                  regression=config.regression, sync_batchnorm=sync)
    if config.model == "cnn":
        return functools.partial(build_cnn, filters=config.filters, **common)
    return functools.partial(build_mlp, hidden=config.hidden, batch_norm=config.batch_norm, **common)


def check_inputs(config: TrainConfig, input_shape: Tuple[int, ...], dataset: str) -> Optional[str]:
    """Why the configured model cannot take samples of ``input_shape``, or None."""
    if config.model == "cnn" and len(input_shape) != 3:
        return (f"--model cnn needs images [samples, height, width, channels] (or [samples, height, width]); "
                f"{dataset} has samples of shape {list(input_shape)}" +
                (" (a table): use --model mlp" if len(input_shape) == 1 else ""))
    return None


def require_keras2():
    """tf.keras, if it is Keras 2 (tf_keras); else a clear error. Horovod 0.28's Keras API cannot
    drive Keras 3, and TensorFlow >= 2.16 gives Keras 3 unless TF_USE_LEGACY_KERAS=1 was set
    before tf.keras was first resolved (hvd_train sets it on import)."""
    import tensorflow as tf

    if not tf.keras.__name__.startswith("tf_keras"):
        raise RuntimeError(f"tf.keras is Keras 3 ({tf.keras.__name__}); hvd_train needs Keras 2 (tf_keras): "
                           "import hvd_train before anything uses tf.keras, or set TF_USE_LEGACY_KERAS=1")
    return tf.keras


def make_optimizer(config: TrainConfig, lr: float):
    """The configured optimizer, not yet wrapped for Horovod."""
    tf_keras = require_keras2()

    # Keras 2's legacy optimizers: the ones Horovod 0.28's callbacks (warmup, LR schedules) drive.
    if config.optimizer == "sgd":
        return tf_keras.optimizers.legacy.SGD(learning_rate=lr, momentum=config.momentum)
    return tf_keras.optimizers.legacy.Adam(learning_rate=lr)


def compile_model(model, optimizer, task, exact_loss: bool = True) -> None:
    """The task's loss (tasks.py) and metrics, and, with ``exact_loss``, tasks.EXACT_LOSS: the
    unweighted per-sample loss plus the regularisation of the step (model.losses, as Keras adds it
    to the loss), which callbacks.ExactTrainMetrics turns into the exact epoch "loss". A model to
    save is compiled without it (plain Keras objects only, loadable without hvd_train)."""
    import tensorflow as tf

    from .tasks import EXACT_LOSS

    metrics = task.metrics()
    if exact_loss:
        penalty = _track_regularisation(model) if model.losses else 0.0

        def sample_loss(y_true, y_pred):
            return task.per_sample_loss(y_true, y_pred) + penalty

        metrics = metrics + [tf.keras.metrics.MeanMetricWrapper(sample_loss, name=EXACT_LOSS)]
    model.compile(optimizer=optimizer, loss=task.loss(), metrics=metrics)


def _track_regularisation(model):
    """A variable holding the model's regularisation losses of the current step, as Keras's
    compute_loss adds them (before the update, when the metrics would see the updated weights).
    Held in a closure, not on the model: it is no weight of the model."""
    import tensorflow as tf

    penalty = tf.Variable(0.0, trainable=False, dtype=tf.float32, name="regularisation_of_step")
    compute_loss = model.compute_loss

    def with_penalty(x=None, y=None, y_pred=None, sample_weight=None):
        loss = compute_loss(x, y, y_pred, sample_weight)
        penalty.assign(tf.add_n([tf.cast(v, tf.float32) for v in model.losses]) if model.losses else 0.0)
        return loss

    model.compute_loss = with_penalty
    return penalty
