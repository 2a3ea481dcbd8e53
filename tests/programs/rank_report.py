"""Train through the Python API and write what this rank saw to $REPORT_DIR/rank-<r>.json.

Usage (under a launcher): rank_report.py [--different-init] [--test-model KIND] [hvd-train options...]
--different-init: every rank builds its model from a different seed on purpose, so the test
can show that rank 0's weights win before the first update.
--test-model: mlp (default, the configured MLP); batchnorm (Dense -> BatchNormalization -> ReLU
-> Dense); counter (the MLP behind a layer with a non-trainable count of the samples it trained
on); drift (the MLP behind a layer whose trainable variable each rank moves by its own amount,
outside the gradients: replicas that differ on purpose).
Every kind records its non-trainable variables after each training batch ("local_state"): the
last record is this rank's own state at the end of training, before hvd_train syncs it.
"affinity" lists the distinct sets of cores this process's threads may run on, after training.
"""
import json
import os
import sys

import tensorflow as tf

from hvd_train import build_mlp, train
from hvd_train.cli import config_from_args
from hvd_train.consensus import weights_digest as digest


class SampleCounter(tf.keras.layers.Layer):
    """Identity; counts the samples it sees in training in a non-trainable variable."""

    def build(self, input_shape):
        self.seen = self.add_weight(name="seen", shape=(), dtype=tf.int64, initializer="zeros", trainable=False)

    def call(self, x, training=None):
        if training:
            self.seen.assign_add(tf.cast(tf.shape(x)[0], tf.int64))
        return x


class Drift(tf.keras.layers.Layer):
    """Identity with a trainable offset (zero gradient) that each rank moves by rank + 1 per step."""

    def build(self, input_shape):
        self.offset = self.add_weight(name="offset", shape=(), initializer="zeros", trainable=True)

    def call(self, x, training=None):
        import horovod.tensorflow as hvd

        if training:
            self.offset.assign_add(float(hvd.rank() + 1))
        return x + 0.0 * self.offset


def build(kind, config, n_features, n_classes):
    if kind == "mlp":
        return build_mlp(n_features, n_classes, hidden=config.hidden)
    inputs = tf.keras.Input(shape=(n_features,))
    if kind == "batchnorm":
        x = tf.keras.layers.Dense(16, name="dense")(inputs)
        x = tf.keras.layers.BatchNormalization(name="bn")(x)
        x = tf.keras.layers.ReLU(name="relu")(x)
        return tf.keras.Model(inputs, tf.keras.layers.Dense(n_classes, activation="softmax", name="classes")(x))
    layer = {"counter": SampleCounter, "drift": Drift}[kind](name=kind)
    return tf.keras.Model(inputs, build_mlp(n_features, n_classes, hidden=config.hidden)(layer(inputs)))


def main():
    import horovod.tensorflow.keras as hvd

    argv = sys.argv[1:]
    different_init = "--different-init" in argv
    if different_init:
        argv.remove("--different-init")
    kind = "mlp"
    if "--test-model" in argv:
        at = argv.index("--test-model")
        kind = argv[at + 1]
        del argv[at:at + 2]
    config = config_from_args(argv)
    report = {"history": None}

    def model_fn(n_features, n_classes):
        if different_init:
            tf.keras.utils.set_random_seed(1000 + hvd.rank())
        model = build(kind, config, n_features, n_classes)
        report["built"] = digest(model.get_weights())
        return model

    class Watch(tf.keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            report["train_begin"] = digest(self.model.get_weights())
            report["train_begin_optimizer"] = digest(self.model.optimizer.get_weights())

        def on_train_batch_end(self, batch, logs=None):
            report["local_state"] = {v.name: v.numpy().tolist() for v in self.model.non_trainable_variables}
            if "after_first_step" not in report:
                report["after_first_step"] = digest(self.model.get_weights())
                report["after_first_step_optimizer"] = digest(self.model.optimizer.get_weights())
                report["optimizer_iterations"] = int(self.model.optimizer.iterations.numpy())

    result = train(config, model_fn=model_fn, callbacks=[Watch()])
    report.update(rank=hvd.rank(), size=hvd.size(), history=result.history,
                  epochs_completed=result.metrics["epochs_completed"],
                  stopped_early=result.metrics["stopped_early"], final=digest(result.model.get_weights()),
                  final_state={v.name: v.numpy().tolist() for v in result.model.non_trainable_variables},
                  # The cores every thread of this process may run on (core pinning), after training.
                  affinity=sorted({tuple(sorted(os.sched_getaffinity(int(t)))) for t in os.listdir("/proc/self/task")}))
    path = os.path.join(os.environ["REPORT_DIR"], f"rank-{hvd.rank()}.json")
    with open(path, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
