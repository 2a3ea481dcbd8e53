"""The run's event log, ``events.jsonl``, written live by rank 0 into the output directory.

One JSON object per line, ``{"event": ..., "time": ..., ...}``: ``run_start`` (config, plan,
versions), ``epoch`` (the global metrics, learning rate and the training samples they count;
callbacks.EpochEvents), ``checkpoint`` (path), ``early_stopping``, ``reset`` (an elastic reset:
old and new world size and hosts, the epoch and the position in it; elastic.py), ``run_end``
(final metrics and files) or ``run_failed`` (the error). A run without ``run_end`` did not finish.

Every method may be called on every rank; only rank 0 writes (runtime.on_rank0).
"""
from __future__ import annotations

import datetime
import json
from typing import Any, Dict, List

from .. import runtime, storage
from .run_dir import EVENTS_FILE, plain


class EventLog:
    def __init__(self, rt: runtime.Runtime, output_dir: str):
        self.rt, self.path, self.dir = rt, storage.join(output_dir, EVENTS_FILE), output_dir
        self.out = storage.Appender(self.path)
        self.warned = False

    def start(self, **fields: Any) -> None:
        """Creates the output directory (set-up checks have all passed by now) and logs run_start."""
        runtime.on_rank0(self.rt, storage.make_dirs, self.dir)
        self.emit("run_start", **fields)

    def emit(self, event: str, **fields: Any) -> None:
        runtime.on_rank0(self.rt, self._append, event, fields)

    def finish(self, metrics: Dict[str, Any]) -> None:
        """``run_end``, with the final metrics and the files the run left (the log itself included)."""
        runtime.on_rank0(self.rt, lambda: self._append("run_end", {
            "metrics": metrics, "files": storage.names(self.dir)}))

    def _append(self, event: str, fields: Dict[str, Any]) -> None:
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
        record = {"event": event, "time": now, **plain(fields)}
        try:
            self.out.add(json.dumps(record, sort_keys=False, allow_nan=False) + "\n")
        except storage.StorageError as err:
            # The record is kept (an object's next upload carries every line so far); the run's
            # own failure or success is decided elsewhere: say it once and go on.
            if not self.warned:
                self.warned = True
                runtime.log(self.rt, f"could not write the event log: {err}")


def read(path: str) -> List[Dict[str, Any]]:
    """The events of a run, in order (for tools and tests)."""
    return [json.loads(line) for line in storage.read_lines(path) if line.strip()]

