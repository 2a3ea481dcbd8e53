"""Exact metric combination, with real TensorFlow on a small model."""
import numpy as np
import pytest
import tensorflow as tf

from hvd_train import metrics
from hvd_train.model import build_mlp
from hvd_train.sharding import eval_shard


@pytest.fixture(scope="module")
def model_and_data():
    tf.keras.utils.set_random_seed(0)
    model = build_mlp(5, 3, hidden=(8,))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(23, 5)).astype(np.float32)
    y = rng.integers(0, 3, size=23)
    return model, x, y


def test_sum_combination_is_exact_on_unequal_shards(model_and_data):
    model, x, y = model_and_data
    shards = [np.arange(0, 3), np.arange(3, 23)]  # 3 and 20 samples: very unequal
    totals = sum(metrics.local_sums(model, x[s], y[s], from_logits=False) for s in shards)
    combined = metrics.from_sums(totals)
    scores = model(x, training=False).numpy()
    whole_loss = float(np.mean(tf.keras.losses.sparse_categorical_crossentropy(y, scores).numpy()))
    whole_acc = float(np.mean(np.argmax(scores, 1) == y))
    assert combined["samples"] == 23
    assert combined["loss"] == pytest.approx(whole_loss, rel=1e-6)
    assert combined["accuracy"] == pytest.approx(whole_acc, abs=1e-12)
    per_shard = [metrics.from_sums(metrics.local_sums(model, x[s], y[s], False))["loss"] for s in shards]
    assert abs(np.mean(per_shard) - whole_loss) > 1e-4, "a mean of rank means would differ here"


def test_empty_shard_contributes_nothing(model_and_data):
    model, x, y = model_and_data
    rows = eval_shard(1, rank=1, world_size=2)
    assert len(rows) == 0
    assert metrics.local_sums(model, x[rows], y[rows], False).tolist() == [0.0, 0.0, 0.0]
    assert metrics.from_sums(np.zeros(3))["samples"] == 0


def test_logits_and_softmax_agree(model_and_data):
    _, x, y = model_and_data
    tf.keras.utils.set_random_seed(1)
    logit_model = build_mlp(5, 3, hidden=(8,), logits=True)
    probs_model = tf.keras.Sequential([logit_model, tf.keras.layers.Softmax()])
    a = metrics.from_sums(metrics.local_sums(logit_model, x, y, from_logits=True))
    b = metrics.from_sums(metrics.local_sums(probs_model, x, y, from_logits=False))
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["accuracy"] == b["accuracy"]
