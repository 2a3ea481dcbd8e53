"""Exact metric combination, with real TensorFlow on small models: classification and regression."""
import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn import metrics as skm

from hvd_train.data.sharding import eval_shard
from hvd_train.training import metrics, tasks
from hvd_train.training.model import build_mlp

CLASSES = tasks.Classification(("a", "b", "c"), logits=False)
CLASSES_2 = tasks.Classification(("a", "b"), logits=False)


@pytest.fixture(scope="module")
def model_and_data():
    keras.utils.set_random_seed(0)
    model = build_mlp(5, 3, hidden=(8,))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(23, 5)).astype(np.float32)
    y = rng.integers(0, 3, size=23)
    return model, x, y


def test_sum_combination_is_exact_on_unequal_shards(model_and_data):
    model, x, y = model_and_data
    shards = [np.arange(0, 3), np.arange(3, 23)]  # 3 and 20 samples: very unequal
    totals = sum(metrics.local_sums(model, x[s], y[s], CLASSES) for s in shards)
    combined = CLASSES.result(totals)
    scores = model(x, training=False).numpy()
    whole_loss = float(np.mean(keras.losses.sparse_categorical_crossentropy(y, scores).numpy()))
    whole_acc = float(np.mean(np.argmax(scores, 1) == y))
    assert combined["samples"] == 23
    assert combined["loss"] == pytest.approx(whole_loss, rel=1e-6)
    assert combined["accuracy"] == pytest.approx(whole_acc, abs=1e-12)
    assert combined["confusion"].tolist() == skm.confusion_matrix(y, np.argmax(scores, 1), labels=[0, 1, 2]).tolist()
    per_shard = [CLASSES.result(metrics.local_sums(model, x[s], y[s], CLASSES))["loss"] for s in shards]
    assert abs(np.mean(per_shard) - whole_loss) > 1e-4, "a mean of rank means would differ here"


def test_empty_shard_contributes_nothing(model_and_data):
    model, x, y = model_and_data
    rows = eval_shard(1, rank=1, world_size=2)
    assert len(rows) == 0
    assert not metrics.local_sums(model, x[rows], y[rows], CLASSES).any()
    assert CLASSES.result(np.zeros(CLASSES.width()))["samples"] == 0
    regression = tasks.Regression("mse", 0.0, 1.0)
    assert regression.result(np.zeros(regression.width()))["samples"] == 0


def test_logits_and_softmax_agree(model_and_data):
    _, x, y = model_and_data
    keras.utils.set_random_seed(1)
    logit_model = build_mlp(5, 3, hidden=(8,), logits=True)
    probs_model = keras.Sequential([logit_model, keras.layers.Softmax()])
    a = tasks.Classification("abc", logits=True).result(
        metrics.local_sums(logit_model, x, y, tasks.Classification("abc", logits=True)))
    b = CLASSES.result(metrics.local_sums(probs_model, x, y, CLASSES))
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["accuracy"] == b["accuracy"]


@pytest.mark.parametrize("loss", ["mse", "mae", "huber"])
def test_regression_sums_match_scikit_learn_on_unequal_shards(loss):
    # A target of mean 50, std 7: the model works in standardised units, figures come back in the target's.
    keras.utils.set_random_seed(2)
    model = build_mlp(4, 1, hidden=(6,), regression=True)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(31, 4)).astype(np.float32)
    mean, scale = 50.0, 7.0
    z = rng.normal(size=31).astype(np.float32)  # standardised targets
    task = tasks.Regression(loss, mean, scale)
    shards = [np.arange(0, 2), np.arange(2, 31)]
    got = task.result(sum(metrics.local_sums(model, x[s], z[s], task) for s in shards))
    predicted = model(x, training=False).numpy().reshape(-1) * scale + mean
    true = z.astype(np.float64) * scale + mean
    assert got["samples"] == 31
    assert got["mse"] == pytest.approx(skm.mean_squared_error(true, predicted), rel=1e-5)
    assert got["rmse"] == pytest.approx(math.sqrt(skm.mean_squared_error(true, predicted)), rel=1e-5)
    assert got["mae"] == pytest.approx(skm.mean_absolute_error(true, predicted), rel=1e-5)
    assert got["r2"] == pytest.approx(skm.r2_score(true, predicted), rel=1e-5)
    keras_loss = {"mse": keras.losses.MeanSquaredError(), "mae": keras.losses.MeanAbsoluteError(),
                  "huber": keras.losses.Huber()}[loss]
    assert got["loss"] == pytest.approx(float(keras_loss(tf.constant(z), model(x, training=False))), rel=1e-5)
    assert got["residual_mean"] == pytest.approx(np.mean(predicted - true), rel=1e-4, abs=1e-6)
    assert got["residual_std"] == pytest.approx(np.std(predicted - true), rel=1e-4)
    assert got["histogram"].sum() == 31
    report = task.report(got)
    assert sum(report["residuals"]["histogram"]["counts"]) == 31
    assert report["residuals"]["histogram"]["edges"][0] == pytest.approx(-3 * scale)


def test_regression_training_metrics_are_in_target_units():
    task = tasks.Regression("mse", 10.0, 4.0)
    mae, mse = task.metrics()
    y_true, y_pred = tf.constant([0.0, 1.0]), tf.constant([[0.5], [0.0]])  # standardised errors 0.5 and -1
    mae.update_state(y_true, y_pred)
    mse.update_state(y_true, y_pred)
    assert float(mae.result()) == pytest.approx((0.5 + 1.0) / 2 * 4.0)
    assert float(mse.result()) == pytest.approx((0.25 + 1.0) / 2 * 16.0)
    logs = {"mse": 4.0}
    task.derived(logs)
    assert logs["rmse"] == 2.0
    huber = tasks.Regression("huber", 10.0, 4.0).per_sample_loss(tf.constant([0.0, 0.0]),
                                                                 tf.constant([[0.5], [3.0]])).numpy()
    assert huber.tolist() == pytest.approx([0.125, 2.5])


def test_cross_entropy_of_a_confident_softmax_is_not_clipped():
    # A softmax output tensor carries its logits, and Keras's loss uses them (as in training);
    # from plain probabilities it would clip at 1e-7, capping a wrong confident answer's loss at 16.1.
    keras.utils.set_random_seed(4)
    inputs = keras.Input(shape=(1,))
    dense = keras.layers.Dense(2, activation="softmax", kernel_initializer=tf.constant_initializer([[30.0, -30.0]]))
    model = keras.Model(inputs, dense(inputs))
    x, y = np.array([[1.0]], np.float32), np.array([1])
    got = CLASSES_2.result(metrics.local_sums(model, x, y, CLASSES_2))["loss"]
    assert got == pytest.approx(60.0, rel=1e-3)
