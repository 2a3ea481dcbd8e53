"""The default model: an MLP classifier. Any builder with the same signature can replace it."""
from __future__ import annotations

from typing import Sequence


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
