"""Stopping a run on a signal: SIGTERM (Kubernetes, Slurm, a launcher passing a stop on) or SIGINT.

While model.fit runs, a handler only records the signal. About once a second, after a batch
the ranks have agreed on, and at every epoch's end, they agree whether any of them got one (one
small allreduce, max), so all stop after the same batch however the signal reached them: one
rank or all, at different moments. Not after every batch: a lone eager allreduce costs about
9 ms here (Horovod's cycle), more than a small model's whole step; rank 0 sizes the interval
from its step time and sends it in the same allreduce. Then, with
``--checkpoint-dir``, rank 0 writes a checkpoint of that point: the epochs done, the samples of
the current epoch already trained and their global metric sums, so that ``--resume`` continues
with nothing lost or repeated (stop and resume equals an uninterrupted run). The event log
records ``run_stopped``; every rank exits 128 + the signal number (143 for SIGTERM, 130 for
SIGINT), as a process killed by it would, but cleanly.

Outside model.fit (set-up, the final evaluation and outputs) the default handlers stay: those
phases end at once, and the launcher (launch/common.sh) ends whatever is left after its grace.
In-memory and file datasets alike: a file dataset's stream starts again at the stop's position
(stream.TrainStream skips the windows before it).
"""
from __future__ import annotations

import contextlib
import signal
import time
from typing import Dict, Iterator, Optional

import keras
import numpy as np

from .. import runtime, watchdog
from ..data.interface import agree_failure
from .metrics import global_sums


def agree_feed(rt: runtime.Runtime, feed) -> None:
    """Collective (for a feed that can fail): StreamError on every rank if a read failed on any,
    with its message (naming the ranks when not all of them failed)."""
    agree_failure(feed.failure(), "feed", rt.size)





SIGNALS = (signal.SIGTERM, signal.SIGINT)
CHECK_SECONDS = 1.0  # about how often the ranks agree on a stop: at most this much more training
_received = {"signal": 0}


class Stopped(Exception):
    """Every rank raises this after the same batch once any rank received a stop signal."""

    def __init__(self, signum: int, epoch: int, position: int, n_train: int, checkpoint: Optional[str]):
        self.signum, self.epoch, self.position, self.checkpoint = signum, epoch, position, checkpoint
        where = (f"after {position} of {n_train} samples of epoch {epoch + 1}" if position
                 else f"after epoch {epoch}")
        then = (f"checkpoint {checkpoint}: --resume continues from there" if checkpoint
                else "no checkpoint of this point (--checkpoint-dir DIR to keep one)")
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}; {then}")

    def fields(self) -> Dict[str, object]:
        """The ``run_stopped`` event's fields."""
        return {"signal": signal.Signals(self.signum).name, "epoch": self.epoch, "position": self.position,
                "checkpoint": self.checkpoint}

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class Diverged(RuntimeError):
    """Every rank raises this after the same batch (or epoch) when training diverged (callbacks.NonFinite)."""


def received() -> int:
    """The signal this process received since handlers() began (0: none)."""
    return _received["signal"]


@contextlib.contextmanager
def handlers() -> Iterator[None]:
    """Within: SIGTERM and SIGINT are recorded for StopCheck instead of ending the process."""
    _received["signal"] = 0

    def record(signum, frame):
        _received["signal"] = _received["signal"] or signum

    previous = {sig: signal.signal(sig, record) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class StopCheck(keras.callbacks.Callback):
    """Collective, every rank, after the agreed batches and last at every epoch's end: stop together."""

    def __init__(self, run, first: int, position: int, carried: Optional[Dict[str, float]], checkpointer,
                 nonfinite=None):
        super().__init__()
        self.nonfinite = nonfinite  # callbacks.NonFinite: checked at the same batches
        self.run, self.rt, self.plan = run, run.rt, run.plan
        self.first, self.position = first, position  # the fit's first epoch starts after ``position`` samples
        self.carried, self.checkpointer = carried, checkpointer
        self.feed = None  # the fit's input (loop.py sets it): a read that failed on any rank stops all
        self.interval, self.steps, self.since = 1, 0, time.perf_counter()  # the first check after one batch

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self.cursor = self.run.cursor(epoch, self.position if epoch == self.first else 0)

    def on_train_batch_end(self, batch, logs=None):
        done = batch + 1
        self.steps += 1
        if done >= self.cursor.steps or self.steps < self.interval:  # the last batch: the epoch's end decides
            return
        stop = self._agreed(f"after batch {done} of epoch {self.epoch + 1}")
        if self.nonfinite is not None:  # a diverged run stops here too, on every rank (callbacks.NonFinite)
            self.nonfinite.check(done, logs)
        if not stop:
            return
        position, path = self.cursor.position(done), None
        # Horovod: the epoch's metrics so far, as global sums for the resumed run (one allreduce).
        sums = global_sums({k: float(v) for k, v in (logs or {}).items()}, self.cursor.samples(done), "stop",
                           self.carried)
        if self.checkpointer:
            path = self.checkpointer.write(self.epoch, position, sums)
        raise Stopped(self._signal, self.epoch, position, self.plan.train_samples, path)

    def on_epoch_end(self, epoch, logs=None):
        self.carried = None
        if self._agreed(f"at the end of epoch {epoch + 1}"):
            path = self.checkpointer.write(epoch + 1) if self.checkpointer else None
            raise Stopped(self._signal, epoch + 1, 0, self.plan.train_samples, path)

    def _agreed(self, where: str) -> bool:
        import horovod.tensorflow as hvd

        local, now = received(), time.perf_counter()
        failed = int(bool(self.feed is not None and self.feed.failure()))
        # Rank 0 proposes the batches until the next check (about CHECK_SECONDS of its steps).
        step = (now - self.since) / max(self.steps, 1)
        interval = max(1, int(CHECK_SECONDS / step)) if self.rt.is_rank0 and step > 0 else 0
        if self.rt.size == 1:
            self.interval = interval or 1
        else:
            # Horovod: every rank asks after the same batches; a signal or a failed read on any
            # rank stops all together, and everyone takes rank 0's interval (the only non-zero one).
            with watchdog.waiting(f"the stop check {where}"):
                local, self.interval, failed = (int(v) for v in hvd.allreduce(
                    np.array([local, interval, failed], np.int32), op=hvd.Max, name="stop.check").numpy())
        self.steps, self.since, self._signal = 0, now, local
        if failed:  # every rank is here: the failing rank's message, on every rank
            agree_feed(self.rt, self.feed)
        return bool(local)
