"""What hvd_train 0.1 (the Keras 2 engine, on tf_keras) left behind, read by the Keras 3 engine.

- Checkpoints (format 1): the model weights are in the same order under Keras 3; the optimizer
  state was tf_keras's legacy optimizer's (iterations, then each slot kind for every variable)
  and becomes Keras 3's (iterations, the learning rate, then each variable's slots together).
  ``--resume`` on them continues the run (tests/test_legacy.py: to the old engine's weights).
- Saved runs (``model.keras`` written by tf_keras, which Keras 3 cannot open: "Could not locate
  class 'Functional'"): for hvd_train's own models, the run's config.json rebuilds the same
  architecture on Keras 3 and the weights are read from the file's ``model.weights.h5``, layer by
  layer. A run of a user's own model cannot be rebuilt from its config: one message says how to
  convert it.

``load_run_model`` opens a run's model.keras of either engine (``hvd-train predict``).
"""
from __future__ import annotations

import json
import re
import zipfile
from typing import Any, Dict, List

import numpy as np

from .. import storage


class LegacyError(ValueError):
    """A Keras 2 artefact hvd_train cannot convert; the message says what to do."""


def optimizer_state(old: List[np.ndarray], meta: Dict[str, Any]) -> List[np.ndarray]:
    """A format-1 checkpoint's optimizer arrays (tf_keras's legacy layout) in Keras 3's layout."""
    kind = meta["config"].get("optimizer", "adam")
    lr = np.asarray(meta.get("lr") or meta["plan"]["scaled_lr"], np.float32)
    slots = 2 if kind == "adam" else (1 if meta["config"].get("momentum", 0.9) else 0)
    if not old or (slots and (len(old) - 1) % slots) or (not slots and len(old) != 1):
        raise LegacyError(f"it holds {len(old)} optimizer arrays, which is not the state of tf_keras's legacy {kind}")
    n = (len(old) - 1) // slots if slots else 0
    per_kind = [old[1 + k * n:1 + (k + 1) * n] for k in range(slots)]  # legacy: every m, then every v
    new: List[np.ndarray] = [np.asarray(old[0], np.int64), lr]
    for i in range(n):
        new += [per_kind[k][i] for k in range(slots)]  # Keras 3: each variable's slots together
    return new


def is_keras2_file(path: str) -> bool:
    """Whether a .keras file was written by Keras 2 (tf_keras)."""
    try:
        with zipfile.ZipFile(path) as z:
            version = json.loads(z.read("metadata.json")).get("keras_version", "")
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return False
    return version.startswith("2.")


def _snake(name: str) -> str:
    name = re.sub(r"(.)([A-Z][a-z0-9]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


def load_keras2_run_model(model_dir: str, model_file: str):
    """A Keras 3 model holding the weights of a run's Keras 2 ``model_file``, rebuilt from the
    run's config.json; LegacyError when the run's model is not one hvd_train builds."""
    import h5py

    from ..config.options import TrainConfig
    from .model import build, model_for

    how = ("load it with tf_keras (pip install tf-keras; tf_keras.models.load_model), rebuild the same model "
           "with `import keras`, copy the weights over (get_weights / set_weights) and save it, or retrain")
    try:
        saved = json.loads(storage.read_text(storage.join(model_dir, "config.json")))
        config = TrainConfig.from_dict(saved["config"])
        prep = json.loads(storage.read_text(storage.join(model_dir, "preprocessing.json")))
    except (OSError, ValueError, KeyError) as err:
        raise LegacyError(f"{model_file} was saved by hvd_train 0.1 (Keras 2) and its run's config cannot be "
                          f"read to rebuild it ({err}); {how}") from None
    shape = tuple(prep.get("input_shape") or (len(prep["feature_names"]),))
    outputs = 1 if prep.get("task") == "regression" else len(prep["class_names"])
    model = build(model_for(config, inference=True), shape[0] if len(shape) == 1 else shape, outputs)
    seen: Dict[str, int] = {}
    try:
        with zipfile.ZipFile(model_file) as z, z.open("model.weights.h5") as raw, h5py.File(raw, "r") as h5:
            for layer in model.layers:
                base = _snake(type(layer).__name__)
                name = base if base not in seen else f"{base}_{seen[base]}"
                seen[base] = seen.get(base, 0) + 1
                group = h5.get(f"layers/{name}/vars")
                arrays = [np.asarray(group[str(i)]) for i in range(len(group))] if group is not None else []
                if [a.shape for a in arrays] != [tuple(w.shape) for w in layer.weights]:
                    raise ValueError(f"layer {layer.name}")
                layer.set_weights(arrays)
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise LegacyError(f"{model_file} was saved by hvd_train 0.1 (Keras 2) with a model hvd_train does not "
                          f"build from its config ({err}): a model of your own? {how}") from None
    return model


def load_run_model(model_dir: str, path: str):
    """A run's saved model: ``keras.models.load_model``, or for a run of hvd_train 0.1 (Keras 2)
    the same model rebuilt on Keras 3 with its weights; DataError if it cannot be."""
    import keras

    from ..data.interface import DataError

    if is_keras2_file(path):
        try:
            return load_keras2_run_model(model_dir, path)
        except LegacyError as err:
            raise DataError(str(err)) from None
    return keras.models.load_model(path)
