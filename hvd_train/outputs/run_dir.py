"""The run directory: every file name in it, its checks, and the writing of a finished run.

Written by rank 0 only (via runtime.on_rank0), each file whole (storage.py: a local folder or an
``s3://`` prefix; what Keras and matplotlib write goes to a local temporary file first). What the files
hold: ``model.keras`` (load with keras.models.load_model: Keras 3, float32), ``preprocessing.json`` (feature and
class names, the scaler), ``config.json`` (config, plan, versions), ``config.toml`` (re-run with
``--config``), ``history.csv``, ``report.json`` (confusion matrix, per-class scores),
``curves.png``, ``confusion_matrix.png`` (classification) or ``predictions.png`` (regression:
predicted vs true), ``events.jsonl`` (live, events.py), ``tensorboard/``,
``autotune.csv``, and ``metrics.json``, written last: a run without it did not finish.
"""
from __future__ import annotations

import csv
import datetime
import io
import json
import math
import os
import tempfile
from dataclasses import asdict
from typing import Any, Dict, List, Optional

import numpy as np

from .. import runtime, storage
from ..config import configfile
from . import plots

MODEL_FILE = "model.keras"
PREPROCESSING_FILE = "preprocessing.json"
CONFIG_FILE = "config.json"
CONFIG_TOML_FILE = "config.toml"
HISTORY_FILE = "history.csv"
REPORT_FILE = "report.json"
CURVES_FILE = "curves.png"
CONFUSION_FILE = "confusion_matrix.png"
PREDICTIONS_PLOT_FILE = "predictions.png"
EVENTS_FILE = "events.jsonl"
TENSORBOARD_DIR = "tensorboard"
AUTOTUNE_FILE = "autotune.csv"
METRICS_FILE = "metrics.json"


class OutputError(OSError):
    """The output directory cannot be used."""


def check_dir(path: Optional[str]) -> str:
    """Resolve the output directory (default runs/<timestamp>) and prove it can be created and written.

    Nothing is left behind: the directory is made only when training starts (after every set-up
    check passed on every rank), so bad input leaves no output directory at all.
    """
    path = storage.absolute(path or os.path.join("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S")))
    try:
        storage.check_writable(path, "output directory")
    except storage.StorageError as err:
        raise OutputError(str(err)) from None
    return path


def check_file(path: str) -> None:
    """A file the run will write (timeline, autotune log): its directory exists or can be made, and is writable."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise OutputError(f"{path} is a directory; give a file path")
    check_dir(os.path.dirname(path))


def autotune_scratch() -> str:
    """Where rank 0's Horovod autotune log goes before the output directory exists (moved there at the end)."""
    return os.path.join(tempfile.gettempdir(), f"hvd_train-autotune-{os.getpid()}.csv")


def plain(value: Any) -> Any:
    """JSON-safe: numpy scalars to Python numbers, non-finite floats to null (JSON has no NaN;
    Python's json writes one that most readers reject)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str, obj: Dict[str, Any]) -> None:
    storage.write_text(path, json.dumps(plain(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")


def _written(write, location: str, *args: Any) -> None:
    """``write(location, *args)``: one file of the run, whole (storage's temp-and-rename or whole
    upload) or OutputError naming it and the cause (a full disk, a folder made read-only or
    removed, ...)."""
    try:
        write(location, *args)
    except Exception as err:  # noqa: BLE001 - Keras and matplotlib raise their own types on a write error
        raise OutputError(f"could not write {location}: {storage.cause(err)}") from None


def _plot(location: str, draw) -> Optional[str]:
    """A plot: a failure to write it is a warning, the run's other files still come."""
    try:
        with storage.writing(location) as tmp:
            draw(tmp)
    except Exception as err:  # noqa: BLE001 - as _written
        return f"could not write the plot {location}: {storage.cause(err)}"
    return None


def history_csv(history: Dict[str, List[float]]) -> str:
    keys = sorted(history)
    rows = [[epoch + 1] + [history[k][epoch] for k in keys] for epoch in range(len(history[keys[0]]))] if keys else []
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["epoch"] + keys)
    writer.writerows(rows)
    return text.getvalue()


def write_run(run, model, history: Dict[str, List[float]], metrics: Dict[str, Any], report: Dict[str, Any],
              points: Optional[np.ndarray] = None) -> None:
    """Rank 0 only: every file of a finished run; metrics.json last, as the mark of completion.
    ``run``: the run's context (training/context.RunContext: config, plan, data, task); ``model``:
    the model to save (plain Keras, float32: session.saved_model); ``points``: regression's
    (true, predicted) test pairs for predictions.png."""
    config, plan, splits, task = run.config, run.plan, run.data, run.task
    d = config.output_dir

    def save_model(location: str) -> None:
        with storage.writing(location) as tmp:
            model.save(tmp)

    _written(save_model, storage.join(d, MODEL_FILE))
    _written(write_json, storage.join(d, PREPROCESSING_FILE), {**splits.preprocessing(), "logits": config.logits})
    _written(write_json, storage.join(d, CONFIG_FILE),
             {"config": config.to_dict(), "plan": asdict(plan), "versions": runtime.versions()})
    _written(storage.write_text, storage.join(d, CONFIG_TOML_FILE), configfile.dumps(config))
    _written(storage.write_text, storage.join(d, HISTORY_FILE), history_csv(history))
    _written(write_json, storage.join(d, REPORT_FILE), report)
    title = f"{config.dataset}, {plan.world_size} process(es), global batch {plan.global_batch_size}"
    warnings = [_plot(storage.join(d, CURVES_FILE), lambda tmp: plots.curves(history, tmp, title, task.curve_metric))]
    if config.regression:
        warnings.append(_plot(storage.join(d, PREDICTIONS_PLOT_FILE), lambda tmp: plots.predicted_vs_true(
            points, tmp, splits.target_name, f"test set: RMSE {report['rmse']:.4g}, R^2 {report['r2']:.4f} "
                                             f"({len(points)} of {report['samples']} samples)")))
    else:
        warnings.append(_plot(storage.join(d, CONFUSION_FILE), lambda tmp: plots.confusion(
            np.array(report["confusion_matrix"]), report["classes"], tmp,
            f"test set, accuracy {report['accuracy']:.4f} ({report['samples']} samples)")))
    for warning in filter(None, warnings):
        runtime.write_line(f"[hvd_train] warning: {warning}; the run's other files are written")
    if config.autotune and not config.autotune_log and os.path.exists(autotune_scratch()):
        _written(lambda location: storage.upload(autotune_scratch(), location), storage.join(d, AUTOTUNE_FILE))
        os.remove(autotune_scratch())  # nothing left in /tmp
    _written(write_json, storage.join(d, METRICS_FILE), metrics)
