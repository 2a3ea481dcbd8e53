"""The models and their compilation, on one process with plain Keras (no launcher)."""
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from hvd_train.config.options import TrainConfig
from hvd_train.training import tasks
from hvd_train.training.model import build_cnn, check_inputs, compile_model, model_for


@pytest.mark.parametrize("task", [tasks.Classification("abc", logits=False), tasks.Regression("huber", 3.0, 2.0)])
def test_exact_loss_counts_weight_decay_as_keras_does(task):
    # With full batches and no sample weights, Keras's own epoch "loss" (data loss + the L2 term of
    # each step, before its update) is what the per-sample metric must equal: the regulariser is in.
    tf.keras.utils.set_random_seed(0)
    config = TrainConfig(task=task.name, hidden=(8,), l2=0.01, dropout=0.0)
    model = model_for(config)(5, task.outputs)
    assert model.losses, "the L2 penalty is a model loss"
    compile_model(model, tf.keras.optimizers.legacy.SGD(0.1), task)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5)).astype(np.float32)
    y = rng.integers(0, 3, size=40) if task.name == "classification" else rng.normal(size=40).astype(np.float32)
    history = model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0).history
    assert history[tasks.EXACT_LOSS] == pytest.approx(history["loss"], rel=1e-5)
    without = model_for(config.replace(l2=0.0))(5, task.outputs)
    assert not without.losses


def test_cnn_shapes_and_its_refusals():
    model = build_cnn((8, 8, 1), 10, filters=(4, 6, 8))
    assert model.output_shape == (None, 10)
    pools = [layer.output_shape[1:3] for layer in model.layers if layer.name.startswith("pool_")]
    assert pools == [(4, 4), (2, 2), (1, 1)]  # pooling stops at 1x1
    assert build_cnn((3, 3, 2), 1, filters=(4,), regression=True).output_shape == (None, 1)
    with pytest.raises(ValueError, match="needs images"):
        build_cnn(64, 10)
    cnn = TrainConfig(model="cnn")
    assert "use --model mlp" in check_inputs(cnn, (4,), "iris")
    assert check_inputs(cnn, (8, 8, 1), "digits") is None
    assert check_inputs(TrainConfig(), (8, 8, 1), "x") is None  # the MLP flattens N-d samples


def test_mlp_flattens_images_and_regression_has_one_linear_output():
    model = model_for(TrainConfig(task="regression"))((8, 8, 3), 1)
    assert model.output_shape == (None, 1) and model.layers[-1].activation.__name__ == "linear"
    assert model.layers[1].name == "flatten"


def test_tf_keras_is_keras_2_and_keras_3_is_refused_clearly():
    assert tf.keras.__name__.startswith("tf_keras"), "hvd_train (and conftest) made tf.keras Keras 2"
    # A process that resolved tf.keras (Keras 3) before hvd_train could set TF_USE_LEGACY_KERAS.
    code = ("import tensorflow as tf; tf.keras.layers; import hvd_train.training.model as m; "
            "from hvd_train.config.options import TrainConfig; m.make_optimizer(TrainConfig(), 0.1)")
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "RuntimeError: tf.keras is Keras 3" in proc.stderr and "TF_USE_LEGACY_KERAS=1" in proc.stderr


def test_replica_digests_are_the_saved_models_digest_and_one_per_variable():
    from hvd_train.training.consensus import weights_digest
    from hvd_train.training.replicas import digests

    model = build_cnn((8, 8, 1), 3, filters=(4,))
    whole, each = digests(model)
    assert whole == weights_digest(model.get_weights()) and len(each) == len(model.weights)
    model.weights[1].assign(model.weights[1] + 1.0)
    whole_after, each_after = digests(model)
    assert whole_after != whole and [i for i, (a, b) in enumerate(zip(each, each_after)) if a != b] == [1]
