"""The run directory: every file name in it, its checks, and the writing of a finished run.

Written by rank 0 only (via runtime.on_rank0), each file atomically (files.py). What the files
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
import os
import shutil
import tempfile
from dataclasses import asdict
from typing import Any, Dict, List, Optional

import numpy as np

from .. import runtime
from ..config import configfile
from . import files, plots

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
    path = os.path.abspath(path or os.path.join("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S")))
    created = None  # the outermost directory this check creates, removed again afterwards
    probe = path
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        created, probe = probe, os.path.dirname(probe)
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as err:
        raise OutputError(f"output directory {path} is not writable: {err.strerror or err}") from None
    finally:
        if created:
            shutil.rmtree(created, ignore_errors=True)
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


def write_json(path: str, obj: Dict[str, Any]) -> None:
    files.write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


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
    with files.atomic_path(os.path.join(d, MODEL_FILE)) as tmp:
        model.save(tmp)
    write_json(os.path.join(d, PREPROCESSING_FILE), {**splits.preprocessing(), "logits": config.logits})
    write_json(os.path.join(d, CONFIG_FILE),
               {"config": config.to_dict(), "plan": asdict(plan), "versions": runtime.versions()})
    files.write_text(os.path.join(d, CONFIG_TOML_FILE), configfile.dumps(config))
    files.write_text(os.path.join(d, HISTORY_FILE), history_csv(history))
    write_json(os.path.join(d, REPORT_FILE), report)
    title = f"{config.dataset}, {plan.world_size} process(es), global batch {plan.global_batch_size}"
    with files.atomic_path(os.path.join(d, CURVES_FILE)) as tmp:
        plots.curves(history, tmp, title, task.curve_metric)
    if config.regression:
        with files.atomic_path(os.path.join(d, PREDICTIONS_PLOT_FILE)) as tmp:
            plots.predicted_vs_true(points, tmp, splits.target_name,
                                    f"test set: RMSE {report['rmse']:.4g}, R^2 {report['r2']:.4f} "
                                    f"({len(points)} of {report['samples']} samples)")
    else:
        with files.atomic_path(os.path.join(d, CONFUSION_FILE)) as tmp:
            plots.confusion(np.array(report["confusion_matrix"]), report["classes"], tmp,
                            f"test set, accuracy {report['accuracy']:.4f} ({report['samples']} samples)")
    if config.autotune and not config.autotune_log and os.path.exists(autotune_scratch()):
        shutil.move(autotune_scratch(), os.path.join(d, AUTOTUNE_FILE))  # nothing left in /tmp
    write_json(os.path.join(d, METRICS_FILE), metrics)
