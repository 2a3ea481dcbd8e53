"""Train through the Python API and write what this rank saw to $REPORT_DIR/rank-<r>.json.

Usage (under a launcher): rank_report.py [--different-init] [hvd-train options...]
--different-init: every rank builds its model from a different seed on purpose, so the test
can show that rank 0's weights win before the first update.
"""
import json
import os
import sys

import tensorflow as tf

from hvd_train import build_mlp, train
from hvd_train.cli import config_from_args
from hvd_train.consensus import weights_digest as digest


def main():
    import horovod.tensorflow.keras as hvd

    argv = sys.argv[1:]
    different_init = "--different-init" in argv
    if different_init:
        argv.remove("--different-init")
    config = config_from_args(argv)
    report = {"history": None}

    def model_fn(n_features, n_classes):
        if different_init:
            tf.keras.utils.set_random_seed(1000 + hvd.rank())
        model = build_mlp(n_features, n_classes, hidden=config.hidden)
        report["built"] = digest(model.get_weights())
        return model

    class Watch(tf.keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            report["train_begin"] = digest(self.model.get_weights())
            report["train_begin_optimizer"] = digest(self.model.optimizer.get_weights())

        def on_train_batch_end(self, batch, logs=None):
            if "after_first_step" not in report:
                report["after_first_step"] = digest(self.model.get_weights())
                report["after_first_step_optimizer"] = digest(self.model.optimizer.get_weights())
                report["optimizer_iterations"] = int(self.model.optimizer.iterations.numpy())

    result = train(config, model_fn=model_fn, callbacks=[Watch()])
    report.update(rank=hvd.rank(), size=hvd.size(), history=result.history,
                  epochs_completed=result.metrics["epochs_completed"],
                  stopped_early=result.metrics["stopped_early"], final=digest(result.model.get_weights()))
    path = os.path.join(os.environ["REPORT_DIR"], f"rank-{hvd.rank()}.json")
    with open(path, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
