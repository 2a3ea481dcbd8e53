"""Predictions from a finished run's model.keras and preprocessing.json, on one process."""
from __future__ import annotations

import csv
import json
import os
from typing import Any, Callable, Optional

import numpy as np

from .. import runtime, storage
from ..data import formats
from ..data.interface import DataError, Standardizer
from . import run_dir


def predict_file(model_dir: str, input_path: str, output_csv: Optional[str] = None,
                 load_model: Optional[Callable[[str, str], Any]] = None) -> str:
    """Write <class, probability per class> (regression: the predicted value, in the target's
    units) for every row of the input (N-d models: each row holds a sample's values flattened,
    row-major, in the order of preprocessing.json's feature names) (a CSV or Parquet file,
    or ``csv:``/``parquet:`` PATH with a directory or glob), read and written in pieces, so inputs
    larger than memory work; the output appears atomically when complete. Returns its path.
    ``load_model(model_dir, model_path)``: opens the run's model (the command line passes
    training.legacy.load_run_model, which also reads runs of hvd_train 0.1); default keras's."""
    model_path = storage.join(model_dir, run_dir.MODEL_FILE)
    prep_path = storage.join(model_dir, run_dir.PREPROCESSING_FILE)
    try:
        for path in (model_path, prep_path):
            if not storage.is_file(path):
                raise DataError(f"{model_dir} is not a finished training run: {storage.basename(path)} is missing")
        prep = json.loads(storage.read_text(prep_path))
    except storage.StorageError as err:
        raise DataError(f"cannot read the run {err}") from None
    if formats.is_file_source(input_path):
        spec = input_path
    elif prep.get("format") == "images":  # the run trained on images: a file, folder or glob of them
        spec = f"images:{input_path}"
    else:
        spec = f"parquet:{input_path}" if input_path.endswith(".parquet") else f"csv:{input_path}"
    kind, _, where = spec.partition(":")
    source = formats.format_of(kind).predict_source(kind, where, prep)
    images = bool(source.sample_shape) and source.dtype == "uint8"
    scaler = Standardizer.from_dict(prep["scaler"])
    classes = prep["class_names"]
    shape = tuple(prep.get("input_shape") or (len(prep["feature_names"]),))
    target = Standardizer.from_dict(prep["target"]) if prep.get("task") == "regression" else None

    import keras
    import tensorflow as tf

    with storage.local_copy(model_path) as local:  # Keras opens local files only
        model = (load_model or (lambda _, path: keras.models.load_model(path)))(model_dir, local)
    stem = spec.split(":", 1)[1]
    output_csv = output_csv or (os.path.splitext(stem)[0] if storage.is_file(stem) else stem.rstrip("/*"))
    output_csv = output_csv if output_csv.endswith(".csv") else output_csv + ".predictions.csv"
    storage.check(output_csv, "output")
    count = 0
    with storage.writing(output_csv) as tmp, open(tmp, "w", newline="") as out:
        writer = csv.writer(out)
        first = ["file"] if images else []  # an image's prediction says which file (or record) it is
        if target is not None:
            writer.writerow(first + [f"predicted_{prep.get('target_name') or 'target'}"])
        else:
            writer.writerow(first + ["predicted_class"] + [f"prob_{c}" for c in classes])
        for unit in source.units:
            for x, _ in formats.read_unit(source, unit, None if images else prep["feature_names"]):
                if not len(x):
                    continue
                if images:  # the float32 arithmetic training applied inside TensorFlow
                    inputs = scaler.transform32(x)
                    names = [[n] for n in formats.sample_names(source, unit, len(x))]
                else:
                    inputs, names = scaler.transform(x.reshape((-1, *shape))), [[]] * len(x)
                scores = model.predict(inputs, verbose=0, batch_size=256 if images else 4096)
                if target is not None:
                    writer.writerows(n + [f"{v:.8g}"] for n, v in zip(names, target.inverse(scores.reshape(-1))))
                else:
                    probs = tf.nn.softmax(scores).numpy() if prep.get("logits") else scores
                    writer.writerows(n + [classes[int(np.argmax(row))]] + [f"{p:.6f}" for p in row]
                                     for n, row in zip(names, probs))
                count += len(scores)
    runtime.write_line(f"[hvd_train] wrote {count} predictions to {output_csv}")
    return output_csv
