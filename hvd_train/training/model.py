"""The models (an MLP for tables, a small CNN for images), the optimizer, the precision policy,
and the one way a model is built, checked and compiled.

Models are Keras 3 (``import keras``, TensorFlow backend). Any builder with build_mlp's first two
parameters, ``(inputs, outputs) -> uncompiled keras.Model``, can replace them (``train(...,
model_fn=...)``): ``inputs`` is the number of features of a table, or the shape of one sample
(``(height, width, channels)``) for N-d inputs; ``outputs`` the number of classes, or 1 for
regression. Sequential, functional and subclassed models and Keras's applications alike
(``build_model`` builds a subclassed one by calling it once).
"""
from __future__ import annotations

import collections
import contextlib
import functools
from typing import Any, Callable, Iterator, Optional, Sequence, Tuple, Union

from ..config.options import ConfigError, TrainConfig

Inputs = Union[int, Tuple[int, ...]]
ModelFn = Callable[[Inputs, int], Any]  # (features or sample shape, outputs) -> uncompiled keras.Model

# Keras's BatchNormalization momentum is 0.99; ours is 0.9. Tables and small image sets give few
# steps per epoch, and with 0.99 the moving statistics still remember their initial 0 and 1 after
# a short run (iris, 20 epochs of 2 steps: test accuracy 0.73 with 0.99, 0.97 with 0.9).
BATCHNORM_MOMENTUM = 0.9


def _norm_layer(sync_batchnorm: bool, fused: bool = False):
    """SyncBatchNormalization, else Keras's BatchNormalization; ``fused``: on 4-D batches in
    training TensorFlow's fused kernel computes it (layers.FusedBatchNormalization: the same
    results, faster; a saved model holds Keras's own layer)."""
    import keras

    if sync_batchnorm:
        from .layers import SyncBatchNormalization

        return SyncBatchNormalization
    if fused:
        from .layers import FusedBatchNormalization

        return FusedBatchNormalization
    return keras.layers.BatchNormalization


def _head(x, outputs: int, logits: bool, regression: bool, l2: float):
    """The output layer: class probabilities (softmax), logits, or one linear value (regression).
    float32 under every precision policy (Keras's advice for mixed precision: the loss and its
    softmax stay exact)."""
    import keras

    linear = logits or regression
    return keras.layers.Dense(outputs, activation=None if linear else "softmax", kernel_regularizer=_l2(l2),
                              dtype="float32", name="target" if regression else "classes")(x)


def _l2(factor: float):
    import keras

    return keras.regularizers.L2(factor) if factor > 0 else None


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
    import keras

    norm = _norm_layer(sync_batchnorm)
    shape = (inputs,) if isinstance(inputs, int) else tuple(inputs)
    x = first = keras.Input(shape=shape, name="features")
    if len(shape) > 1:
        x = keras.layers.Flatten(name="flatten")(x)
    for i, width in enumerate(hidden):
        if batch_norm:
            x = keras.layers.Dense(width, use_bias=False, kernel_regularizer=_l2(l2), name=f"dense_{i}")(x)
            x = norm(momentum=BATCHNORM_MOMENTUM, name=f"batchnorm_{i}")(x)
            x = keras.layers.Activation(activation, name=f"{activation}_{i}")(x)
        else:
            x = keras.layers.Dense(width, activation=activation, kernel_regularizer=_l2(l2), name=f"dense_{i}")(x)
        if dropout > 0:
            x = keras.layers.Dropout(dropout, name=f"dropout_{i}")(x)
    return keras.Model(first, _head(x, outputs, logits, regression, l2), name="mlp")


def build_cnn(inputs: Inputs, outputs: int, filters: Sequence[int] = (32, 64), activation: str = "relu",
              dropout: float = 0.0, logits: bool = False, sync_batchnorm: bool = False, l2: float = 0.0,
              regression: bool = False, fused: bool = True):
    """A small conv net for images ``(height, width, channels)``: per block a 3x3 convolution (no
    bias), batch normalization, the activation and a 2x2 average pool while the image is at least
    2x2; then global average pooling, dropout and the output layer (as build_mlp's).

    Average, not max, pooling: a max pool's choice flips on near-ties (digits' pixels are small
    integers, many windows tie), so float rounding became a different gradient path and N
    processes drifted from one with the global batch (docs/design.md). ``fused``: batch norm by
    TensorFlow's fused kernel in training (layers.FusedBatchNormalization), the same weights."""
    import keras

    if isinstance(inputs, int) or len(inputs) != 3:
        raise ValueError(f"build_cnn needs images (height, width, channels), got input shape {inputs}")
    norm = _norm_layer(sync_batchnorm, fused)
    x = first = keras.Input(shape=tuple(inputs), name="images")
    side = min(inputs[:2])
    for i, width in enumerate(filters):
        x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False, kernel_regularizer=_l2(l2),
                                name=f"conv_{i}")(x)
        x = norm(momentum=BATCHNORM_MOMENTUM, name=f"batchnorm_{i}")(x)
        x = keras.layers.Activation(activation, name=f"{activation}_{i}")(x)
        if side >= 2:
            x = keras.layers.AveragePooling2D(2, name=f"pool_{i}")(x)  # see the docstring
            side //= 2
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    if dropout > 0:
        x = keras.layers.Dropout(dropout, name="dropout")(x)
    return keras.Model(first, _head(x, outputs, logits, regression, l2), name="cnn")


def build_application(inputs: Inputs, outputs: int, architecture: str = "resnet50", dropout: float = 0.0,
                      logits: bool = False, l2: float = 0.0, regression: bool = False, **_: object):
    """One of Keras's image architectures (``keras.applications``: ResNet50, MobileNetV2) for
    ``(height, width, channels)`` images, built with ``weights=None`` (random initial weights:
    nothing is downloaded; the ImageNet weights would also fix 3 channels and 1000 classes),
    without its top; then global average pooling, dropout and hvd_train's output layer (float32
    under mixed precision, probabilities or logits, as build_cnn's). Keras asks for at least
    32x32 images."""
    import keras

    if isinstance(inputs, int) or len(inputs) != 3:
        raise ValueError(f"--model {architecture} needs images (height, width, channels), got input shape {inputs}")
    build = {"resnet50": keras.applications.ResNet50, "mobilenetv2": keras.applications.MobileNetV2}[architecture]
    x = first = keras.Input(shape=tuple(inputs), name="images")
    base = build(weights=None, include_top=False, input_shape=tuple(inputs), pooling="avg")
    x = base(x)
    if dropout > 0:
        x = keras.layers.Dropout(dropout, name="dropout")(x)
    return keras.Model(first, _head(x, outputs, logits, regression, l2), name=architecture)


def augmented(model_fn: ModelFn, augment: str) -> ModelFn:
    """``model_fn`` behind random augmentation layers, active in training only: ``flip``, a
    horizontal flip; ``crop``, a shift of up to 4 pixels each way, zero-filled (the pad-4 and
    random-crop of CIFAR training, at the image's size). Each rank draws its own (their random
    states, like dropout's, are rank 0's plus an offset: distributed.set_seed_rank), so N
    processes do not draw what one process with the global batch would: N x b == 1 x N*b holds
    without augmentation only."""
    if augment == "none":
        return model_fn

    def build(inputs, outputs):
        import keras

        inner = model_fn(inputs, outputs)
        x = first = keras.Input(shape=tuple(inputs), name="images")
        if "flip" in augment:
            x = keras.layers.RandomFlip("horizontal", name="random_flip")(x)
        if "crop" in augment:
            h, w = inputs[0], inputs[1]
            x = keras.layers.RandomTranslation(4 / h, 4 / w, fill_mode="constant", interpolation="nearest",
                                               name="random_crop")(x)
        return keras.Model(first, inner(x), name=f"{inner.name}_augmented")

    return build


def model_for(config: TrainConfig, inference: bool = False) -> ModelFn:
    """The model the config describes, as a model_fn. ``inference``: the same weights with plain
    Keras layers (no SyncBatchNormalization or FusedBatchNormalization), the model a run saves."""
    sync = config.sync_batchnorm and not inference
    common = dict(activation=config.activation, dropout=config.dropout, logits=config.logits, l2=config.l2,
                  regression=config.regression, sync_batchnorm=sync)
    if config.model == "cnn":
        built = functools.partial(build_cnn, filters=config.filters, fused=not inference, **common)
    elif config.model in ("resnet50", "mobilenetv2"):
        built = functools.partial(build_application, architecture=config.model, **common)
    else:
        built = functools.partial(build_mlp, hidden=config.hidden, batch_norm=config.batch_norm, **common)
    return augmented(built, config.augment)


def check_inputs(config: TrainConfig, input_shape: Tuple[int, ...], dataset: str) -> Optional[str]:
    """Why the configured model cannot take samples of ``input_shape``, or None."""
    if config.model != "mlp" and len(input_shape) != 3:
        return (f"--model {config.model} needs images [samples, height, width, channels] (or [samples, height, "
                f"width]); {dataset} has samples of shape {list(input_shape)}" +
                (" (a table): use --model mlp" if len(input_shape) == 1 else ""))
    if config.model in ("resnet50", "mobilenetv2") and min(input_shape[:2]) < 32:
        return (f"--model {config.model} needs images of at least 32x32 (Keras's minimum); {dataset} has "
                f"{input_shape[0]}x{input_shape[1]}" + (": give --image-size" if dataset.startswith("images:") else ""))
    if config.augment != "none" and len(input_shape) != 3:
        return f"--augment {config.augment} is for images; {dataset} has samples of shape {list(input_shape)}"
    return None


@contextlib.contextmanager
def names_kept() -> Iterator[None]:
    """Within: Keras's automatic names (dense_3, adam_2, ...) are handed out, then taken back.
    For what one rank builds alone (rank 0's saved model): every rank's next objects get the same
    names, and the TensorFlow ops a traced step runs (a user's SyncBatchNormalization allreduce
    among them) are named after them; differently named collectives never meet. (Keras's naming
    counters, keras.src global state: the pinned Keras 3.15.)"""
    from keras.src.backend.common import global_state

    uids = global_state.get_global_attribute("object_name_uids")
    saved = None if uids is None else dict(uids)
    try:
        yield
    finally:
        global_state.set_global_attribute("object_name_uids",
                                          None if saved is None else collections.defaultdict(int, saved))


@contextlib.contextmanager
def precision(policy: str) -> Iterator[None]:
    """Within: Keras builds layers with the dtype policy ``policy`` (float32, mixed_bfloat16,
    mixed_float16); the previous global policy comes back after."""
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def build(model_fn: ModelFn, inputs: Inputs, outputs: int, policy: str = "float32", seed: Optional[int] = None):
    """``model_fn(inputs, outputs)`` under the precision ``policy``, checked and built: a Keras 3
    model whose variables exist and whose output fits ``outputs``; else ConfigError, before any
    training (the same on every rank)."""
    import keras
    import numpy as np

    if seed is not None:
        keras.utils.set_random_seed(seed)
    try:
        with precision(policy):
            model = model_fn(inputs, outputs)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - the user's function failed: said once, on every rank
        raise ConfigError(f"model_fn({inputs!r}, {outputs}) failed: {first_line(err)}") from None
    if not isinstance(model, keras.Model):
        module = type(model).__module__
        if module.startswith(("tf_keras", "keras.src.legacy", "tensorflow.python.keras")):
            raise ConfigError(
                f"model_fn returned a Keras 2 model ({module}.{type(model).__name__}, from tf_keras or "
                "tf.keras with TF_USE_LEGACY_KERAS=1): hvd_train trains Keras 3 models. Build it with "
                "`import keras` (keras.Sequential, keras.layers...: the same names); see docs/cli-and-api.md")
        raise ConfigError(f"model_fn returned {type(model).__module__}.{type(model).__name__}, not a keras.Model")
    shape = (inputs,) if isinstance(inputs, int) else tuple(inputs)
    try:
        probe = model(np.zeros((2, *shape), np.float32), training=False)  # builds a subclassed model's variables
    except Exception as err:  # noqa: BLE001 - any failure of the user's model, said once
        raise ConfigError(f"the model does not take samples of shape {list(shape)}: {first_line(err)}") from None
    got = tuple(getattr(probe, "shape", ()))
    if len(got) not in (1, 2) or (got[-1] if len(got) == 2 else 1) != outputs:
        raise ConfigError(f"the model's output has shape {list(got)} for 2 samples; this run needs [2, {outputs}] "
                          f"({'one value per sample' if outputs == 1 else f'{outputs} class scores per sample'})")
    if not model.trainable_weights:
        raise ConfigError("the model has no trainable weights: nothing to train (every layer trainable=False?)")
    return model


def first_line(err: BaseException) -> str:
    """An error in one line: its type and its message's first line."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def make_optimizer(config: TrainConfig, lr: float):
    """The configured optimizer, not yet averaged over ranks; under mixed_float16 wrapped in
    Keras's LossScaleOptimizer (which distributed.DistributedOptimizer then wraps as a whole)."""
    import keras

    if config.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(learning_rate=lr, momentum=config.momentum)
    else:
        optimizer = keras.optimizers.Adam(learning_rate=lr)
    if config.precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def distributed_optimizer(config: TrainConfig, lr: float):
    """Horovod: the configured optimizer with its gradients averaged over ranks (distributed.py)."""
    import horovod.tensorflow as hvd

    from .distributed import DistributedOptimizer

    # Horovod: optional fp16 on the wire, and local accumulation to allreduce less often.
    return DistributedOptimizer(make_optimizer(config, lr),
                                compression=hvd.Compression.fp16 if config.fp16_allreduce else hvd.Compression.none,
                                backward_passes_per_step=config.backward_passes_per_step,
                                count_nonfinite=config.on_nonfinite == "stop")


def compile_model(model, optimizer, task, exact_loss: bool = True, steps_per_execution: int = 1) -> None:
    """The task's loss (tasks.py) and metrics, and, with ``exact_loss``, tasks.EXACT_LOSS: the
    unweighted per-sample loss plus the regularisation of the step (model.losses, as Keras adds it
    to the loss), which callbacks.ExactTrainMetrics turns into the exact epoch "loss". A model to
    save is compiled without it, with the task's saved_metrics (Keras's own objects only, so it
    loads with plain Keras).
    Never with XLA (distributed.JIT_COMPILE)."""
    import keras

    from .distributed import JIT_COMPILE
    from .tasks import EXACT_LOSS

    metrics = task.metrics() if exact_loss else task.saved_metrics()
    if exact_loss:
        penalty = _track_regularisation(model) if model.losses else 0.0

        def sample_loss(y_true, y_pred):
            return task.per_sample_loss(y_true, y_pred) + penalty

        metrics = metrics + [keras.metrics.MeanMetricWrapper(sample_loss, name=EXACT_LOSS)]
    model.compile(optimizer=optimizer, loss=task.loss(), metrics=metrics, jit_compile=JIT_COMPILE,
                  steps_per_execution=steps_per_execution)


def _track_regularisation(model):
    """A variable holding the model's regularisation losses of the current step, as Keras's
    compute_loss adds them (before the update, when the metrics would see the updated weights).
    Held in a closure, not on the model: it is no weight of the model."""
    import tensorflow as tf

    penalty = tf.Variable(0.0, trainable=False, dtype=tf.float32, name="regularisation_of_step")
    compute_loss = model.compute_loss

    def with_penalty(x=None, y=None, y_pred=None, sample_weight=None, training=True):
        loss = compute_loss(x, y, y_pred, sample_weight, training=training)
        losses = model.losses
        penalty.assign(tf.add_n([tf.cast(v, tf.float32) for v in losses]) if losses else 0.0)
        return loss

    model.compute_loss = with_penalty
    return penalty

