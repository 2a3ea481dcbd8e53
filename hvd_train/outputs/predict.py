"""Predictions from a finished run's model.keras and preprocessing.json, on one process."""
from __future__ import annotations

import csv
import json
import os
from typing import Any, Callable, Optional

import numpy as np

from .. import runtime, storage
from ..data import sources
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
    spec = input_path if sources.is_file_source(input_path) else (
        f"parquet:{input_path}" if input_path.endswith(".parquet") else f"csv:{input_path}")
    source = sources.open_source(spec, "")
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
        if target is not None:
            writer.writerow([f"predicted_{prep.get('target_name') or 'target'}"])
        else:
            writer.writerow(["predicted_class"] + [f"prob_{c}" for c in classes])
        for unit in source.units:
            for x, _ in sources.read_unit(source, unit, prep["feature_names"]):
                if not len(x):
                    continue
                scores = model.predict(scaler.transform(x.reshape((-1, *shape))), verbose=0, batch_size=4096)
                if target is not None:
                    writer.writerows([f"{v:.8g}"] for v in target.inverse(scores.reshape(-1)))
                else:
                    probs = tf.nn.softmax(scores).numpy() if prep.get("logits") else scores
                    writer.writerows([classes[int(np.argmax(row))]] + [f"{p:.6f}" for p in row] for row in probs)
                count += len(scores)
    runtime.write_line(f"[hvd_train] wrote {count} predictions to {output_csv}")
    return output_csv
