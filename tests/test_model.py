"""The models and their compilation, on one process with plain Keras (no launcher)."""
import keras
import numpy as np
import pytest

from hvd_train.config.options import ConfigError, TrainConfig
from hvd_train.training import tasks
from hvd_train.training.model import build, build_cnn, check_inputs, compile_model, model_for


@pytest.mark.parametrize("task", [tasks.Classification("abc", logits=False), tasks.Regression("huber", 3.0, 2.0)])
def test_exact_loss_counts_weight_decay_as_keras_does(task):
    # With full batches and no sample weights, Keras's own epoch "loss" (data loss + the L2 term of
    # each step, before its update) is what the per-sample metric must equal: the regulariser is in.
    keras.utils.set_random_seed(0)
    config = TrainConfig(task=task.name, hidden=(8,), l2=0.01, dropout=0.0)
    model = model_for(config)(5, task.outputs)
    assert model.losses, "the L2 penalty is a model loss"
    compile_model(model, keras.optimizers.SGD(0.1), task)
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
    pools = [tuple(layer.output.shape[1:3]) for layer in model.layers if layer.name.startswith("pool_")]
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


def test_models_are_keras_3_built_and_checked_before_training():
    assert keras.__version__.startswith("3."), "the engine is Keras 3"

    class Subclassed(keras.Model):  # variables only once called: build() calls it
        def __init__(self, outputs):
            super().__init__()
            self.hidden, self.out = keras.layers.Dense(8, activation="relu"), keras.layers.Dense(outputs)

        def call(self, x):
            return self.out(self.hidden(x))

    model = build(lambda n, k: Subclassed(k), 5, 3)
    assert len(model.trainable_variables) == 4 and model.built
    with pytest.raises(ConfigError, match=r"output has shape \[2, 2\] for 2 samples; this run needs \[2, 3\]"):
        build(lambda n, k: Subclassed(2), 5, 3)
    with pytest.raises(ConfigError, match=r"does not take samples of shape \[5\]"):
        build(lambda n, k: keras.Sequential([keras.Input((7,)), keras.layers.Dense(k)]), 5, 3)
    with pytest.raises(ConfigError, match="not a keras.Model"):
        build(lambda n, k: "a model", 5, 3)
    # What model_fn returns when written for tf_keras (Keras 2): the class's module is what says so.
    keras2 = type("Sequential", (), {"__module__": "tf_keras.src.engine.sequential"})
    with pytest.raises(ConfigError, match=r"Keras 2 model \(tf_keras.src.engine.sequential.Sequential.*`import keras`"):
        build(lambda n, k: keras2(), 5, 3)

    # A model_fn that fails itself, and a model with nothing to train: one line each, not a traceback.
    def broken(n, k):
        return keras.Sequential([keras.layers.Dense(k, activation="nope")])

    with pytest.raises(ConfigError, match=r"model_fn\(5, 3\) failed: ValueError: Could not interpret activation"):
        build(broken, 5, 3)

    def frozen(n, k):
        model = keras.Sequential([keras.Input((n,)), keras.layers.Dense(k)])
        model.trainable = False
        return model

    with pytest.raises(ConfigError, match="no trainable weights: nothing to train"):
        build(frozen, 5, 3)


def test_a_model_keras_cannot_compile_is_one_message_before_training():
    from hvd_train.data.arrays import load_splits
    from hvd_train.training.session import build_model

    class Uncompilable(keras.Model):  # compile itself refuses (as a model with a custom compile may)
        def __init__(self, k):
            super().__init__()
            self.out = keras.layers.Dense(k)

        def call(self, x):
            return self.out(x)

        def compile(self, **kwargs):
            raise TypeError("compile() got an unexpected keyword argument 'steps_per_execution'")

    config = TrainConfig(epochs=1)
    with pytest.raises(ConfigError, match=r"cannot be compiled for this run: TypeError: compile\(\) got"):
        build_model(config, load_splits(config, None), 0.01, lambda n, k: Uncompilable(k))


def test_the_precision_policy_applies_while_building_and_is_restored_after():
    before = keras.config.dtype_policy().name
    model = build(model_for(TrainConfig(hidden=(8,))), 4, 3, "mixed_bfloat16")
    assert model.get_layer("dense_0").compute_dtype == "bfloat16" and model.get_layer("dense_0").dtype == "float32"
    assert model.get_layer("classes").compute_dtype == "float32", "the output layer stays float32"
    assert keras.config.dtype_policy().name == before


def test_replica_digests_are_the_saved_models_digest_and_one_per_variable():
    from hvd_train.training.consensus import weights_digest
    from hvd_train.training.replicas import digests

    model = build_cnn((8, 8, 1), 3, filters=(4,))
    whole, each = digests(model)
    assert whole == weights_digest(model.get_weights()) and len(each) == len(model.weights)
    model.weights[1].assign(model.weights[1] + 1.0)
    whole_after, each_after = digests(model)
    assert whole_after != whole and [i for i, (a, b) in enumerate(zip(each, each_after)) if a != b] == [1]


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_the_cnns_fused_batch_norm_computes_what_keras_does(policy):
    from hvd_train.training.layers import FusedBatchNormalization
    from hvd_train.training.model import precision

    x = np.random.default_rng(2).normal(2, 3, size=(16, 8, 8, 5)).astype(np.float32)
    with precision(policy):
        ours, theirs = FusedBatchNormalization(momentum=0.9), keras.layers.BatchNormalization(momentum=0.9)
    for layer in (ours, theirs):
        layer.build(x.shape)
        layer.gamma.assign(np.linspace(0.5, 2.0, 5)), layer.beta.assign(np.linspace(-1.0, 1.0, 5))
    tolerance = 1e-5 if policy == "float32" else 2e-2  # bfloat16 outputs: 8 bits of mantissa
    for _ in range(3):  # moving statistics after three training batches
        got, want = ours(x, training=True), theirs(x, training=True)
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tolerance)
    for a, b in ((ours.moving_mean, theirs.moving_mean), (ours.moving_variance, theirs.moving_variance)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(ours(x, training=False), np.float32),
                               np.asarray(theirs(x, training=False), np.float32), atol=tolerance)
    trained = model_for(TrainConfig(model="cnn"))((8, 8, 1), 3)
    saved = model_for(TrainConfig(model="cnn"), inference=True)((8, 8, 1), 3)
    assert {type(layer).__name__ for layer in trained.layers} >= {"FusedBatchNormalization"}
    assert "FusedBatchNormalization" not in {type(layer).__name__ for layer in saved.layers}
    assert [w.shape for w in trained.weights] == [w.shape for w in saved.weights]
