"""Many training runs in one launched job: every rank calls the Python API once per run, in the
plan's order, and writes what it saw to $REPORT_DIR/<run>/rank-<r>.json.

A launch costs 8-10 s of start-up on 2 cores (TensorFlow's import, hvd.init, the first trace)
before any step; the tests' standard runs pay it once per job instead of once per run.

Usage (under a launcher; alone it is one process): many_runs.py PLAN.json
PLAN.json is a list of runs, each an object with
  name            the run's directory under $REPORT_DIR (and the marker lines on stdout)
  args            hvd-train's options, parsed by its own command line (cli.parse)
  model           optional: "subclassed", "functional", "mobilenet" (Keras 3 models as users write
                  them: user_models.py), "batchnorm" (Dense -> BatchNormalization -> ReLU -> Dense), "counter" (the
                  MLP behind a layer with a non-trainable count of the samples it trained on), "drift"
                  (the MLP behind a layer whose trainable variable each rank moves by its own amount,
                  outside the gradients: replicas that differ on purpose), "mlp" (build_mlp with the
                  configured hidden sizes); default: hvd_train's own model for the config
  different_init  optional: every rank builds its model from another seed on purpose, so a test can
                  show that rank 0's weights win before the first update
  arrays          optional: train on N-d arrays through the API instead of --dataset: "rgb32" ([96, 32, 32,
                  3], for MobileNetV2), "images"
                  ([240, 8, 8, 1], the class is where a bright square is), "hw" (the same without the
                  channel axis), "flat" (1-D features: bad), "mismatch" (240 images, 239 labels: bad)
  script          optional: run this Python file (a user's script) instead, with args as its argv
                  (and "cwd": in that directory)
  cli             optional: true runs the command line itself (hvd_train.cli.main) with args as its
                  argv, subcommands included ("plan --json ..."); its exit status is the report's "exit"

A report holds "ok" and, for a finished run, its metrics and history, digests of the weights when
built, at the start of training, after the first step and at the end (optimizer state too), every
non-trainable variable after each training batch ("local_state": this rank's own, before
hvd_train syncs it) and at the end ("final_state"), and the sets of cores the process's threads
may run on; for a failed run, "error_type" and "error". A run that fails goes on to the next: a
failure every rank agreed on leaves the ranks in step.
"""
import json
import os
import runpy
import sys
import traceback

import keras
import numpy as np
import tensorflow as tf
import user_models

from hvd_train import build_mlp, train
from hvd_train.cli import config_from_args
from hvd_train.runtime import write_line
from hvd_train.training.consensus import weights_digest as digest
from hvd_train.training.distributed import optimizer_values
from hvd_train.training.model import model_for


class SampleCounter(keras.layers.Layer):
    """Identity; counts the samples it sees in training in a non-trainable variable."""

    def build(self, input_shape):
        self.seen = self.add_weight(name="seen", shape=(), dtype=tf.int64, initializer="zeros", trainable=False)

    def call(self, x, training=None):
        if training:
            self.seen.assign_add(tf.cast(tf.shape(x)[0], tf.int64))
        return x


class Drift(keras.layers.Layer):
    """Identity with a trainable offset (zero gradient) that each rank moves by rank + 1 per step."""

    def build(self, input_shape):
        self.offset = self.add_weight(name="offset", shape=(), initializer="zeros", trainable=True)

    def call(self, x, training=None):
        import horovod.tensorflow as hvd

        if training:
            self.offset.assign_add(float(hvd.rank() + 1))
        return x + 0.0 * self.offset


def build(kind, config, n_features, n_classes):
    if kind is None:
        return model_for(config)(n_features, n_classes)
    if kind in user_models.BUILDERS:
        return user_models.BUILDERS[kind](n_features, n_classes)
    if kind == "mlp":
        return build_mlp(n_features, n_classes, hidden=config.hidden)
    inputs = keras.Input(shape=(n_features,))
    if kind == "batchnorm":
        x = keras.layers.Dense(16, name="dense")(inputs)
        x = keras.layers.BatchNormalization(name="bn")(x)
        x = keras.layers.ReLU(name="relu")(x)
        return keras.Model(inputs, keras.layers.Dense(n_classes, activation="softmax", name="classes")(x))
    layer = {"counter": SampleCounter, "drift": Drift}[kind](name=kind)
    return keras.Model(inputs, build_mlp(n_features, n_classes, hidden=config.hidden)(layer(inputs)))


def arrays(kind):
    rng = np.random.default_rng(0)
    if kind == "rgb32":  # 96 RGB images 32x32; the class is which half holds a bright square
        y = rng.integers(0, 2, size=96)
        x = rng.normal(0, 0.3, size=(96, 32, 32, 3)).astype(np.float32)
        for i, label in enumerate(y):
            col, row = 2 + 16 * label + rng.integers(0, 8), rng.integers(0, 24)
            x[i, row:row + 6, col:col + 6, :] += 2.0
        return x, y
    y = rng.integers(0, 2, size=240)
    x = rng.normal(0, 0.3, size=(240, 8, 8, 1)).astype(np.float32)
    for i, label in enumerate(y):
        col = 1 + 4 * label + rng.integers(0, 2)
        row = rng.integers(0, 6)
        x[i, row:row + 2, col:col + 2, 0] += 2.0
    return {"images": (x, y), "hw": (x[..., 0], y), "flat": (x[:, 0, 0, 0], y), "mismatch": (x, y[:-1])}[kind]


def run_one(spec, rank):
    """One run on this rank; its report."""
    import horovod.tensorflow as hvd

    if spec.get("script"):
        sys.argv, here = [spec["script"], *spec["args"]], os.getcwd()
        os.chdir(spec.get("cwd") or here)  # a script that writes where it runs (runs/<timestamp>)
        try:
            runpy.run_path(spec["script"], run_name="__main__")
        finally:
            os.chdir(here)
        return {}
    if spec.get("cli"):
        from hvd_train import cli

        return {"exit": cli.main(spec["args"])}
    config = config_from_args(spec["args"])
    report = {"history": None}
    kind, different_init = spec.get("model"), spec.get("different_init", False)

    def model_fn(n_features, n_classes):
        if different_init:
            keras.utils.set_random_seed(1000 + hvd.rank())
        model = build(kind, config, n_features, n_classes)
        report["built"] = digest(model.get_weights())
        return model

    class Watch(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            report["train_begin"] = digest(self.model.get_weights())
            report["train_begin_optimizer"] = digest(optimizer_values(self.model.optimizer))

        def on_train_batch_end(self, batch, logs=None):
            report["local_state"] = {v.path: v.numpy().tolist() for v in self.model.non_trainable_weights}
            if "after_first_step" not in report:
                report["after_first_step"] = digest(self.model.get_weights())
                report["after_first_step_optimizer"] = digest(optimizer_values(self.model.optimizer))
                report["optimizer_iterations"] = int(self.model.optimizer.iterations.numpy())

    custom = kind is not None or different_init
    result = train(config, data=arrays(spec["arrays"]) if spec.get("arrays") else None,
                   model_fn=model_fn if custom else None, callbacks=[Watch()])
    report.update(history=result.history, metrics=result.metrics, epochs_completed=result.metrics["epochs_completed"],
                  stopped_early=result.metrics["stopped_early"], final=digest(result.model.get_weights()),
                  final_state={v.path: v.numpy().tolist() for v in result.model.non_trainable_weights},
                  # The cores every thread of this process may run on (core pinning), after training.
                  affinity=sorted({tuple(sorted(os.sched_getaffinity(int(t)))) for t in os.listdir("/proc/self/task")}))
    return report


def main():
    import horovod.tensorflow as hvd

    with open(sys.argv[1]) as f:
        plan = json.load(f)
    hvd.init()
    rank = hvd.rank()
    for spec in plan:
        directory = os.path.join(os.environ["REPORT_DIR"], spec["name"])
        os.makedirs(directory, exist_ok=True)
        write_line(f"[many_runs] start {spec['name']}")
        try:
            report = {"ok": True, **run_one(spec, rank)}
        except (Exception, SystemExit) as err:  # noqa: BLE001 - the test judges what every rank got
            message = str(err) if not isinstance(err, SystemExit) else f"exit {err.code}"
            report = {"ok": False, "error_type": type(err).__name__, "error": message,
                      "traceback": traceback.format_exc()}
        report.update(rank=hvd.rank(), size=hvd.size())
        with open(os.path.join(directory, f"rank-{rank}.json"), "w") as f:
            json.dump(report, f)
        write_line(f"[many_runs] end {spec['name']}")
        keras.backend.clear_session()
        # Horovod: a barrier, so no rank starts the next run before rank 0 has written this one's
        # outputs (a run may read them: a saved config.toml, a checkpoint).
        hvd.allreduce(np.zeros(1), op=hvd.Sum, name=f"many_runs.{spec['name']}")


if __name__ == "__main__":
    main()
