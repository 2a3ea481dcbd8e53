"""The model: the default MLP, the optimizer, and the one way a model is compiled.

Any builder with build_mlp's first two parameters, ``(n_features, n_classes) -> uncompiled
tf.keras.Model``, can replace the MLP (``train(..., model_fn=...)``).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

from .config import TrainConfig

ModelFn = Callable[[int, int], Any]  # (n_features, n_classes) -> uncompiled tf.keras.Model


def build_mlp(n_features: int, n_classes: int, hidden: Sequence[int] = (64, 32),
              activation: str = "relu", dropout: float = 0.0, logits: bool = False):
    """Dense layers -> n_classes outputs: softmax probabilities, or raw logits if asked.

    Pair with sparse categorical cross-entropy on integer labels (from_logits=logits).
    """
    import tensorflow as tf

    inputs = tf.keras.Input(shape=(n_features,), name="features")
    x = inputs
    for i, width in enumerate(hidden):
        x = tf.keras.layers.Dense(width, activation=activation, name=f"dense_{i}")(x)
        if dropout > 0:
            x = tf.keras.layers.Dropout(dropout, name=f"dropout_{i}")(x)
    outputs = tf.keras.layers.Dense(n_classes, activation=None if logits else "softmax", name="classes")(x)
    return tf.keras.Model(inputs, outputs, name="mlp")


def mlp_for(config: TrainConfig) -> ModelFn:
    """The MLP the config describes, as a model_fn."""
    return functools.partial(build_mlp, hidden=config.hidden, activation=config.activation,
                             dropout=config.dropout, logits=config.logits)


def make_optimizer(config: TrainConfig, lr: float):
    """The configured optimizer, not yet wrapped for Horovod."""
    import tensorflow as tf

    # Keras 2's legacy optimizers: the ones Horovod 0.28's callbacks (warmup, LR schedules) drive.
    if config.optimizer == "sgd":
        return tf.keras.optimizers.legacy.SGD(learning_rate=lr, momentum=config.momentum)
    return tf.keras.optimizers.legacy.Adam(learning_rate=lr)


def compile_model(model, optimizer, logits: bool) -> None:
    """Sparse cross-entropy on integer labels, accuracy, and "xent": the unweighted per-sample
    loss that callbacks.ExactTrainMetrics turns into the exact epoch "loss"."""
    import tensorflow as tf

    model.compile(optimizer=optimizer, loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=logits),
                  metrics=["accuracy", tf.keras.metrics.SparseCategoricalCrossentropy(name="xent",
                                                                                      from_logits=logits)])
