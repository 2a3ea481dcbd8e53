"""The Python API with N-d arrays, as a user script under horovodrun. ARRAYS picks the data:

images: [240, 8, 8, 1] images whose class is where the bright square is (left or right half);
hw: the same without the channel axis ([240, 8, 8]); flat: features of shape [240] (1-D: bad);
mismatch: 240 images and 239 labels (bad). Every rank prints "rank R: <error>" on an error and exits 3.
Usage: train_arrays.py [hvd-train options...]
"""
import os
import sys

import numpy as np

from hvd_train import train
from hvd_train.cli import config_from_args

rng = np.random.default_rng(0)
y = rng.integers(0, 2, size=240)
x = rng.normal(0, 0.3, size=(240, 8, 8, 1)).astype(np.float32)
for i, label in enumerate(y):
    col = 1 + 4 * label + rng.integers(0, 2)
    row = rng.integers(0, 6)
    x[i, row:row + 2, col:col + 2, 0] += 2.0
arrays = {"images": (x, y), "hw": (x[..., 0], y), "flat": (x[:, 0, 0, 0], y), "mismatch": (x, y[:-1])}
try:
    train(config_from_args(sys.argv[1:]), data=arrays[os.environ["ARRAYS"]])
except Exception as err:  # noqa: BLE001 - the test reads the message every rank got
    print(f"rank {os.environ.get('HOROVOD_RANK', '?')}: {type(err).__name__}: {err}", flush=True)
    sys.exit(3)
