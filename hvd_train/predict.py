"""Predictions from a finished run's model.keras and preprocessing.json, on one process."""
from __future__ import annotations

import csv
import io
import json
import os
from typing import Optional

import numpy as np

from . import data, files, outputs, runtime
from .data import DataError


def predict_file(model_dir: str, input_csv: str, output_csv: Optional[str] = None) -> str:
    """Write <class, probability per class> for every row of input_csv; return the output path."""
    model_path = os.path.join(model_dir, outputs.MODEL_FILE)
    prep_path = os.path.join(model_dir, outputs.PREPROCESSING_FILE)
    for path in (model_path, prep_path):
        if not os.path.isfile(path):
            raise DataError(f"{model_dir} is not a finished training run: {os.path.basename(path)} is missing")
    with open(prep_path) as f:
        prep = json.load(f)
    x = data.read_features(input_csv, prep["feature_names"])
    x = data.Standardizer.from_dict(prep["scaler"]).transform(x)

    import tensorflow as tf

    model = tf.keras.models.load_model(model_path)
    scores = model.predict(x, verbose=0) if len(x) else np.zeros((0, len(prep["class_names"])))
    probs = tf.nn.softmax(scores).numpy() if prep.get("logits") else scores
    classes = prep["class_names"]
    output_csv = output_csv or os.path.splitext(input_csv)[0] + ".predictions.csv"
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["predicted_class"] + [f"prob_{c}" for c in classes])
    for row in probs:
        writer.writerow([classes[int(np.argmax(row))]] + [f"{p:.6f}" for p in row])
    files.write_text(output_csv, text.getvalue())
    runtime.write_line(f"[hvd_train] wrote {len(probs)} predictions to {output_csv}")
    return output_csv
