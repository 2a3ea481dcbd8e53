"""Files a run leaves behind. Called on rank 0 only (via runtime.on_rank0); writes are atomic."""
from __future__ import annotations

import contextlib
import csv
import datetime
import json
import os
import tempfile
from typing import Any, Dict, Iterator, List, Optional

MODEL_FILE = "model.keras"
PREPROCESSING_FILE = "preprocessing.json"
CONFIG_FILE = "config.json"
HISTORY_FILE = "history.csv"
METRICS_FILE = "metrics.json"


class OutputError(OSError):
    """The output directory cannot be used."""


def prepare_dir(path: Optional[str]) -> str:
    """Create the output directory (default runs/<timestamp>) and prove it is writable."""
    path = path or os.path.join("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    path = os.path.abspath(path)
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as err:
        raise OutputError(f"output directory {path} is not writable: {err.strerror or err}") from None
    return path


def remove_if_empty(path: Optional[str]) -> None:
    """Undo prepare_dir after a failed run, unless the directory holds anything."""
    if path and os.path.isdir(path) and not os.listdir(path):
        os.rmdir(path)


@contextlib.contextmanager
def removed_if_empty_on_failure(path: Optional[str]) -> Iterator[None]:
    """On any exception inside, remove ``path`` if it is still empty (None: do nothing)."""
    try:
        yield
    except BaseException:
        remove_if_empty(path)
        raise


def write_json(path: str, obj: Dict[str, Any]) -> None:
    _atomic_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


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
