"""The run's machine-readable logs, written live by rank 0 into the output directory.

- ``events.jsonl``: one JSON object per line, ``{"event": ..., "time": ..., ...}``:
  ``run_start`` (config, plan, versions), ``epoch`` (the global metrics and learning rate),
  ``checkpoint`` (path), ``early_stopping``, ``run_end`` (final metrics and files) or
  ``run_failed`` (the error). A run without ``run_end`` did not finish.
- ``tensorboard/train`` and ``tensorboard/validation`` (``--tensorboard``): per-epoch scalars,
  the same global values, learning rate included.

Every method may be called on every rank; only rank 0 writes (runtime.on_rank0).
"""
from __future__ import annotations

import datetime
import json
import math
import os
import tempfile
import time
from typing import Any, Dict, List

import tensorflow as tf

from . import runtime

EVENTS_FILE = "events.jsonl"
TENSORBOARD_DIR = "tensorboard"


def autotune_scratch() -> str:
    """Where rank 0's Horovod autotune log goes before the output directory exists (copied there at the end)."""
    return os.path.join(tempfile.gettempdir(), f"hvd_train-autotune-{os.getpid()}.csv")


def _plain(value: Any) -> Any:
    """JSON-safe: numpy scalars to Python numbers, non-finite floats to null."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class EventLog:
    def __init__(self, rt: runtime.Runtime, output_dir: str):
        self.rt, self.path = rt, os.path.join(output_dir, EVENTS_FILE)

    def start(self, **fields: Any) -> None:
        """Creates the output directory (set-up checks have all passed by now) and logs run_start."""
        runtime.on_rank0(self.rt, os.makedirs, os.path.dirname(self.path), exist_ok=True)
        self.emit("run_start", **fields)

    def emit(self, event: str, **fields: Any) -> None:
        runtime.on_rank0(self.rt, self._append, event, fields)

    def finish(self, metrics: Dict[str, Any]) -> None:
        """``run_end``, with the final metrics and the files the run left (the log itself included)."""
        runtime.on_rank0(self.rt, lambda: self._append("run_end", {
            "metrics": metrics, "files": sorted(os.listdir(os.path.dirname(self.path)))}))

    def _append(self, event: str, fields: Dict[str, Any]) -> None:
        record = {"event": event, "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
                  **_plain(fields)}
        # One write of one whole line, flushed: a reader tailing the file never sees half a record.
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=False, allow_nan=False) + "\n")

    def callback(self, epochs: int) -> tf.keras.callbacks.Callback:
        return _EpochEvents(self, epochs)


class _EpochEvents(tf.keras.callbacks.Callback):
    """Every rank, epoch end, after the metrics are global: one ``epoch`` event (rank 0 writes)."""

    def __init__(self, log: EventLog, epochs: int):
        super().__init__()
        self.log, self.epochs = log, epochs

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        lr = logs.pop("lr", None)
        self.log.emit("epoch", epoch=epoch + 1, epochs=self.epochs, metrics=logs, lr=lr,
                      seconds=round(time.perf_counter() - self.start, 6))


class TensorBoardScalars(tf.keras.callbacks.Callback):
    """Rank 0 only (no collectives): each epoch's global metrics as TensorBoard scalars.

    Training and validation values go to two runs (``train``, ``validation``) under the same tags
    (``epoch_loss``, ``epoch_accuracy``), so TensorBoard draws them in one chart, as Keras does.
    """

    def __init__(self, log_dir: str):
        super().__init__()
        self.log_dir = log_dir
        self.writers: Dict[str, Any] = {}

    def _writer(self, run: str):
        if run not in self.writers:
            self.writers[run] = tf.summary.create_file_writer(os.path.join(self.log_dir, run))
        return self.writers[run]

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            run, name = ("validation", key[4:]) if key.startswith("val_") else ("train", key)
            name = "learning_rate" if name == "lr" else name
            with self._writer(run).as_default(step=epoch + 1):
                tf.summary.scalar(f"epoch_{name}", float(value))
        for writer in self.writers.values():
            writer.flush()

    def on_train_end(self, logs=None):
        for writer in self.writers.values():
            writer.close()


def read(path: str) -> List[Dict[str, Any]]:
    """The events of a run, in order (for tools and tests)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]

