"""A user callback raises a plain error (not Horovod's) at the end of epoch 2, on every rank.

Under an elastic launch the run must fail with it, never carry on or return quietly (the trap
of horovod.tensorflow.elastic.run, ../shared/ELASTIC.md). Usage: elastic_error.py [hvd-train options...]
"""
import sys

import keras

from hvd_train import train
from hvd_train.cli import config_from_args


class Boom(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
            raise ValueError("boom: a bug in a user callback")


result = train(config_from_args(sys.argv[1:]), callbacks=[Boom()])
print(f"train() returned {type(result).__name__}", flush=True)
