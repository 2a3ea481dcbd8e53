"""Files a run leaves behind. Called on rank 0 only (via runtime.on_rank0); writes are atomic."""
from __future__ import annotations

import csv
import datetime
import json
import os
import shutil
import tempfile
from typing import Any, Dict, List, Optional

MODEL_FILE = "model.keras"
PREPROCESSING_FILE = "preprocessing.json"
CONFIG_FILE = "config.json"
HISTORY_FILE = "history.csv"
METRICS_FILE = "metrics.json"
CONFIG_TOML_FILE = "config.toml"
REPORT_FILE = "report.json"
AUTOTUNE_FILE = "autotune.csv"


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


def write_json(path: str, obj: Dict[str, Any]) -> None:
    _atomic_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_text(path: str, text: str) -> None:
    _atomic_text(path, text)


def write_history(path: str, history: Dict[str, List[float]]) -> None:
    keys = sorted(history)
    rows = [[epoch + 1] + [history[k][epoch] for k in keys] for epoch in range(len(history[keys[0]]))] if keys else []
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch"] + keys)
        writer.writerows(rows)
    os.replace(tmp, path)


def save_model(path: str, model) -> None:
    tmp = path[: -len(".keras")] + ".tmp.keras"  # Keras picks the format from the suffix
    model.save(tmp)
    os.replace(tmp, path)


def _atomic_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
