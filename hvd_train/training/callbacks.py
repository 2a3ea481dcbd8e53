"""The Keras callbacks of a run, and their order (run_callbacks).

Each class says whether it is collective (every rank must run it, in the same epoch) or rank 0
only (files and printing, never a collective). Order matters: metrics are made global first,
so every later callback (early stopping, checkpoints, the event log, the progress line, the
user's own) sees the same numbers on every rank.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import keras
import numpy as np
import tensorflow as tf

from .. import runtime, storage, watchdog
from ..config.options import TrainConfig
from ..outputs.events import EventLog
from ..outputs.run_dir import TENSORBOARD_DIR
from . import checkpoint, distributed, metrics, pruning, schedules, stopping, tasks
from .context import RunContext


def run_callbacks(run: RunContext, resumed: checkpoint.ResumePoint) -> List[Any]:
    """Every callback of a fit, in order; hvd_train's own first, the user's after them.

    ``resumed``: where this fit starts; a ``position`` into the epoch (after an elastic reset, or
    resumed from a stop mid-epoch) makes it a fit of the rest of that epoch, its ``sums`` carried.
    """
    rt, config, plan, log = run.rt, run.config, run.plan, run.log
    # First: what this rank is doing, for the watchdog (a training step, an epoch's end).
    found: List[Any] = [Phases()]
    # Before validation, checkpoints and everything else at the epoch's end.
    found.append(SyncReplicaState())
    position, carried = resumed.position, resumed.sums
    train_metrics = ExactTrainMetrics(run, resumed.epoch, position, carried=carried)
    found.append(train_metrics)
    # A diverged run stops before anything is written of it (no checkpoint, no event of NaN).
    nonfinite = NonFinite(run)
    found.append(nonfinite)
    if plan.val_samples:
        found.append(GlobalValidation(run))
    # The learning rate of every step: warmup, then the schedule (no collective: a function of the step).
    found.append(schedules.LearningRate(config, plan, position / plan.global_batch_size))
    found.append(LearningRateLog())
    found.append(EpochEvents(log, config.epochs, train_metrics))
    if config.tensorboard and rt.is_rank0:
        # Rank 0 only, and free of collectives: it writes files from values already global.
        found.append(TensorBoardScalars(storage.join(config.output_dir, TENSORBOARD_DIR)))
    early_stopping = None
    if config.early_stopping_patience:
        early_stopping = EarlyStopping(rt, config, log, resumed.early_stopping)
        found.append(early_stopping)
    if config.prune_file:  # a sweep trial: stop when worse than earlier trials (pruning.py)
        found.append(Pruner(rt, config, log, resumed.history))
    checkpointer = None
    if config.checkpoint_dir:
        checkpointer = Checkpointer(run, resumed.history, early_stopping)
        found.append(checkpointer)
    found += run.user_callbacks
    progress = progress_mode(config, rt)
    if progress == "bar" and rt.is_rank0:
        # Last in the list, so the bar shows metrics after they have been combined over ranks.
        found.append(keras.callbacks.ProgbarLogger())
    elif progress == "epoch" and rt.is_rank0:
        found.append(EpochLine(config.epochs))
    # Last: a stop after a batch, or after an epoch's end work (its checkpoint included).
    found.append(stopping.StopCheck(run, resumed.epoch, position, carried, checkpointer, nonfinite))
    found.append(StepBegins())  # after every callback's batch start: the step itself (Phases)
    return found


def progress_mode(config: TrainConfig, rt: runtime.Runtime) -> str:
    """``--progress`` resolved: launchers pipe (or pty) and prefix each chunk of output, so a
    live bar only when run alone on a terminal."""
    if config.progress != "auto":
        return config.progress
    return "bar" if sys.stdout.isatty() and not runtime.under_launcher() else "epoch"


class FeedGuard(keras.callbacks.Callback):
    """Every rank, first at each epoch's end: training data that went bad or could not be read
    (a feed's ``failure``: a file of a stream deleted or changed, an object store that failed
    on some rank, whose stream then gave idle steps) stops every rank here, together, with its
    message, before any other collective or checkpoint of the cut-short epoch. Mid-epoch,
    stopping.StopCheck's agreement asks too."""

    def __init__(self, rt: runtime.Runtime, feed):
        super().__init__()
        self.rt, self.feed = rt, feed

    def on_epoch_end(self, epoch, logs=None):
        if self.feed.can_fail:
            stopping.agree_feed(self.rt, self.feed)


class Phases(keras.callbacks.Callback):
    """Every rank, no collective: tells the watchdog what this rank does, so a stall names what
    was being waited for. First in the list: the callbacks after a step and at an epoch's end
    (the user's among them) are a phase of their own; ``StepBegins``, last, marks the step. A
    rank stuck in a callback is then one mark behind the ranks already in the next step."""

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        watchdog.mark(f"the start of epoch {epoch + 1}")

    def on_train_batch_end(self, batch, logs=None):
        watchdog.mark(f"the callbacks after training step {batch + 1} of epoch {self.epoch + 1}")

    def on_epoch_end(self, epoch, logs=None):
        watchdog.mark(f"the end of epoch {epoch + 1}")


class StepBegins(keras.callbacks.Callback):
    """Every rank, no collective, last in the list: the training step starts (Phases)."""

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        watchdog.mark(f"training step {batch + 1} of epoch {self.epoch + 1}", step=True)


class NonFinite(keras.callbacks.Callback):
    """Every rank, no collective of its own: a diverged run stops (``--on-nonfinite stop``) or is
    reported once (``warn``).

    ``check`` runs where the ranks agree to look (the stop check's batches, about once a second;
    stopping.StopCheck calls it) and at every epoch's end, before anything of the epoch is
    written: the optimizer counted an update whose averaged gradients were not finite
    (distributed.py; the same count on every rank, so every rank stops after the same batch), or
    the epoch's global training loss (the same on every rank) is not finite. Stopping raises
    stopping.Diverged: the last checkpoint stays, no checkpoint, model or metrics of this point
    are written. Not after every batch: reading the count costs a step's sync, 5-20% of a small
    model's step here."""

    def __init__(self, run: RunContext):
        super().__init__()
        self.run, self.rt, self.config = run, run.rt, run.config
        self.warned = False

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self.seen = distributed.nonfinite(self.run.optimizer)[0]
        self.first_step = int(self.run.optimizer.iterations.numpy())  # the optimizer's step at batch 1

    def check(self, done: int, logs=None) -> None:
        """After batch ``done`` of the epoch, a batch every rank checks after."""
        self._count(f"after batch {done}")
        if self.config.on_nonfinite == "warn" and not self.warned and \
                not np.isfinite(float((logs or {}).get("loss", 0.0))):
            self._warn(f"batch {done}", "this rank's loss")

    def _count(self, stopped: str) -> None:
        count, first = distributed.nonfinite(self.run.optimizer)
        if count > self.seen:
            batch = (first - self.first_step + 1) * self.config.backward_passes_per_step  # its last pass
            self._diverged(f"batch {batch}", "the gradient averaged over the ranks", stopped)

    def on_epoch_end(self, epoch, logs=None):
        self._count("at its end")  # before anything of the epoch is written
        loss = float((logs or {}).get("loss", 0.0))
        if np.isfinite(loss):
            return
        if self.config.on_nonfinite == "stop":
            self._diverged("its end", "the training loss over all ranks", "at its end")
        elif not self.warned:
            self._warn("its end", "the training loss over all ranks")

    def _diverged(self, where: str, what: str, stopped: str) -> None:
        if not self.rt.is_rank0:  # with --verbose-ranks: each rank says where it stopped
            runtime.log(self.rt, f"diverged: stopping in epoch {self.epoch + 1} {stopped}")
        kept = runtime.on_rank0(self.rt, _last_checkpoint, self.config.checkpoint_dir)
        raise stopping.Diverged(
            f"training diverged in epoch {self.epoch + 1}: {what} was not finite at {where} (learning rate "
            f"{schedules.current(self.model.optimizer):.4g}); every rank stopped {stopped}, no model written; "
            f"{kept}. Try a lower --lr or a longer --warmup-epochs, and look for NaN or infinite values in the "
            "data; --on-nonfinite warn trains on regardless")

    def _warn(self, where: str, what: str) -> None:
        self.warned = True
        runtime.log(self.rt, f"warning: in epoch {self.epoch + 1} at {where}, {what} is not finite; training "
                             "goes on (--on-nonfinite warn): its metrics are written as null")


def _last_checkpoint(directory: Optional[str]) -> Optional[str]:
    """Rank 0: the newest checkpoint kept, said for --resume."""
    if not directory:
        return "no checkpoint (--checkpoint-dir DIR keeps one per epoch)"
    try:
        found = checkpoint.listed(directory)
    except OSError:
        found = []
    return (f"the last checkpoint, {found[0][1]}, is kept (--resume continues from it)" if found
            else f"no checkpoint in {directory} yet")


class SyncReplicaState(keras.callbacks.Callback):
    """Collective, every rank, epoch end, first: the non-trainable state (batch-norm moving
    statistics averaged, the rest rank 0's) identical on every rank (distributed.sync_state)."""

    def on_epoch_end(self, epoch, logs=None):
        distributed.sync_state(self.model)


class ExactTrainMetrics(keras.callbacks.Callback):
    """Collective, every rank, epoch end: training metrics over all ranks' samples.

    Horovod's MetricAverageCallback takes the plain mean of the rank means; this weighs each
    rank by the samples it trained on. Keras's "loss" carries the uneven-step weights of
    sharding.py, so "loss" is replaced by tasks.EXACT_LOSS: the unweighted per-sample loss plus
    the regularisation of each sample's step (model.compile_model), whose mean over all samples is
    what one process with the global batch reports. Then the task's derived figures (RMSE).
    ``carried``: global sums of the epoch's part trained before an elastic reset (elastic.py).
    """

    def __init__(self, run: RunContext, first: int, position: int, carried: Optional[Dict[str, float]] = None):
        super().__init__()
        self.run, self.task, self.carried = run, run.task, carried
        self.first, self.position = first, position  # the fit's first epoch starts after ``position`` samples

    def on_epoch_end(self, epoch, logs=None):
        cursor = self.run.cursor(epoch, self.position if epoch == self.first else 0)
        sums = metrics.global_sums(logs, cursor.samples(cursor.steps), "train", self.carried)
        self.counted = int(sums["count"])  # every rank's samples of the epoch (the event log records it)
        logs.update({k: sums[k] / sums["count"] for k in list(logs)})
        self.carried = None  # the next epoch starts afresh
        logs["loss"] = logs.pop(tasks.EXACT_LOSS)
        self.task.derived(logs)


class GlobalValidation(keras.callbacks.Callback):
    """Collective, on every rank at every epoch end: exact validation figures (loss and accuracy,
    or loss, MSE, RMSE, MAE and R^2)."""

    def __init__(self, run: RunContext):
        super().__init__()
        self.run = run

    def on_epoch_end(self, epoch, logs=None):
        rt, task = self.run.rt, self.run.task
        result = metrics.evaluate(self.run.scoring_model(), self.run.data.eval_pieces("val", rt.rank, rt.size), task)
        logs.update({f"val_{k}": v for k, v in task.scores(result).items()})


class LearningRateLog(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        logs["lr"] = schedules.current(self.model.optimizer)


class EpochEvents(keras.callbacks.Callback):
    """Every rank, epoch end, after the metrics are global: one ``epoch`` event (rank 0 writes),
    with the number of training samples the epoch's metrics count (``train_samples``)."""

    def __init__(self, log: EventLog, epochs: int, train_metrics: ExactTrainMetrics):
        super().__init__()
        self.log, self.epochs, self.train_metrics = log, epochs, train_metrics

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        lr = logs.pop("lr", None)
        self.log.emit("epoch", epoch=epoch + 1, epochs=self.epochs, metrics=logs, lr=lr,
                      train_samples=self.train_metrics.counted, seconds=round(time.perf_counter() - self.start, 6))


class TensorBoardScalars(keras.callbacks.Callback):
    """Rank 0 only (no collectives): each epoch's global metrics as TensorBoard scalars.

    Training and validation values go to two runs (``train``, ``validation``) under the same tags
    (``epoch_loss``, ``epoch_accuracy``), so TensorBoard draws them in one chart, as Keras does.
    """

    def __init__(self, log_dir: str):
        super().__init__()
        self.log_dir = log_dir
        self.mirror: Optional[storage.Mirror] = None  # a local folder, uploaded each epoch to s3://
        self.writers: Dict[str, Any] = {}
        self.failed = False

    def _writer(self, run: str):
        if self.mirror is None:
            self.mirror = storage.Mirror(self.log_dir)
        if run not in self.writers:
            self.writers[run] = tf.summary.create_file_writer(os.path.join(self.mirror.folder, run))
        return self.writers[run]

    def on_epoch_end(self, epoch, logs=None):
        if self.failed:
            return
        try:
            for key, value in (logs or {}).items():
                run, name = ("validation", key[4:]) if key.startswith("val_") else ("train", key)
                name = "learning_rate" if name == "lr" else name
                with self._writer(run).as_default(step=epoch + 1):
                    tf.summary.scalar(f"epoch_{name}", float(value))
            for writer in self.writers.values():
                writer.flush()
            if self.mirror:
                self.mirror.sync()
        except Exception as err:  # noqa: BLE001 - TensorFlow's and storage's errors alike
            self._give_up(err)

    def on_train_end(self, logs=None):
        try:
            for writer in self.writers.values():
                writer.close()
            if self.mirror:
                self.mirror.close()
        except Exception as err:  # noqa: BLE001 - as on_epoch_end
            if not self.failed:
                self._give_up(err)

    def _give_up(self, err: BaseException) -> None:
        """TensorBoard is a view, not a result: a write that fails (a full disk, a folder gone)
        is said once and training goes on without it."""
        self.failed = True
        runtime.write_line(f"[hvd_train] warning: could not write TensorBoard scalars to {self.log_dir}: "
                           f"{storage.cause(err).splitlines()[0]}; training goes on without them")


class EpochLine(keras.callbacks.Callback):
    """Rank 0 only: one line per epoch with a bar over the whole run, readable through launcher pipes."""

    WIDTH = 20

    def __init__(self, epochs: int):
        super().__init__()
        self.epochs = epochs

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        done = int(self.WIDTH * (epoch + 1) / self.epochs)
        values = "  ".join(f"{k} {v:.4g}" for k, v in sorted((logs or {}).items()))
        runtime.write_line(f"epoch {epoch + 1:>{len(str(self.epochs))}}/{self.epochs} "
                           f"[{'#' * done}{'.' * (self.WIDTH - done)}] {values}  "
                           f"{time.perf_counter() - self.start:.2f}s")


class EarlyStopping(keras.callbacks.Callback):
    """Collective, every rank, epoch end: stop when the global validation metric stops improving.

    The metric is the exact cross-rank value from GlobalValidation, so every rank sees the same
    number; rank 0's state and decision are broadcast anyway, so no rounding can split the ranks.
    The state is checkpointed, so a resumed run keeps counting where the interrupted one was.
    """

    def __init__(self, rt: runtime.Runtime, config: TrainConfig, log: EventLog,
                 state: Optional[Dict[str, Any]] = None):
        super().__init__()
        self.rt, self.log, self.metric = rt, log, config.early_stopping_metric
        self.patience, self.min_delta = config.early_stopping_patience, config.early_stopping_min_delta
        self.lower_is_better = self.metric not in ("val_accuracy", "val_r2")
        self.state = dict(state or {"best": None, "best_epoch": None, "wait": 0})

    def _improved(self, value: float) -> bool:
        best = self.state["best"]
        if best is None:
            return True
        return value < best - self.min_delta if self.lower_is_better else value > best + self.min_delta

    def on_epoch_end(self, epoch, logs=None):
        value = float(logs[self.metric])
        if self._improved(value):
            self.state.update(best=value, best_epoch=epoch + 1, wait=0)
        else:
            self.state["wait"] += 1
        # Horovod: rank 0 decides, every rank follows in the same epoch.
        self.state = runtime.broadcast(self.state, "early_stopping")
        if self.state["wait"] >= self.patience:
            self.model.stop_training = True
            self.log.emit("early_stopping", epoch=epoch + 1, metric=self.metric, **self.state)
            runtime.log(self.rt, f"early stopping after epoch {epoch + 1}: {self.metric} has not improved by more "
                                 f"than {self.min_delta:g} for {self.patience} epoch(s); best "
                                 f"{self.state['best']:.4f} at epoch {self.state['best_epoch']}")


class Pruner(keras.callbacks.Callback):
    """Collective, every rank, epoch end, after validation: a sweep trial whose best validation
    value so far is worse than the median of earlier trials at this epoch stops (pruning.py).
    Rank 0 reads the rule and decides; both are broadcast, so every rank stops after the same epoch
    (a rank stopping alone would leave the others waiting in the next allreduce)."""

    def __init__(self, rt: runtime.Runtime, config: TrainConfig, log: EventLog, history: Dict[str, List[float]]):
        super().__init__()
        self.rt, self.log = rt, log
        # Horovod: rank 0's reading of the file on every rank (checked at set-up: session.settle).
        self.rule = runtime.broadcast(runtime.on_rank0(rt, pruning.read, config.prune_file, config.task), "prune")
        self.values = list(history.get(self.rule["metric"], []))  # a resumed run's epochs so far

    def on_epoch_end(self, epoch, logs=None):
        self.values.append(float(logs[self.rule["metric"]]))
        decision = runtime.on_rank0(self.rt, pruning.decide, self.rule, epoch + 1, self.values)
        # Horovod: rank 0 decides, every rank follows in the same epoch.
        decision = runtime.broadcast(decision, "prune.decision")
        if decision:
            self.model.stop_training = True
            self.log.emit("pruned", **decision)
            runtime.log(self.rt, f"pruned after epoch {epoch + 1}: best {decision['metric']} so far "
                                 f"{decision['best']:.4g} is worse than {decision['median']:.4g}, the median of "
                                 f"{decision['trials']} earlier trial(s) at this epoch")


class Checkpointer(keras.callbacks.Callback):
    """Collective, every rank, epoch end: rank 0 writes a checkpoint every N epochs and at the end;
    all ranks then agree that it was written, so a full disk stops the job with one message, not a hang."""

    def __init__(self, run: RunContext, history: Dict[str, List[float]], early_stopping: Optional[EarlyStopping]):
        super().__init__()
        self.run, self.rt, self.config, self.log = run, run.rt, run.config, run.log
        self.history = {k: list(v) for k, v in history.items()}  # the resumed run's, extended each epoch
        self.early_stopping = early_stopping

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
        done = epoch + 1
        if done % self.config.checkpoint_every and done != self.config.epochs and not self.model.stop_training:
            return
        self.write(done)

    def write(self, epoch: int, position: int = 0, sums: Optional[Dict[str, float]] = None) -> str:
        """Collective: the checkpoint of ``epoch`` epochs done (and ``position`` samples of the next,
        with their metric ``sums``), written by rank 0; every rank returns its path once written."""
        if position:
            # Mid-epoch (a stop): the non-trainable state made every rank's first, as SyncReplicaState
            # (the first of an epoch's end callbacks, before this one) does at an epoch's end.
            distributed.sync_state(self.model)
        path, error = runtime.on_rank0(self.rt, self._save, epoch, position, sums) or (None, None)
        return runtime.agree_gather(error, path, "checkpoint")[0]  # rank 0's path, on every rank

    def _save(self, epoch: int, position: int, sums: Optional[Dict[str, float]]) -> Tuple[Optional[str], Optional[str]]:
        meta = checkpoint.run_meta(
            self.config, self.run.plan, self.run.data.fingerprint(), self.history,
            self.early_stopping.state if self.early_stopping else None, bool(self.model.stop_training),
            schedules.current(self.model.optimizer), position, sums)
        try:
            state = checkpoint.State.of(self.model, self.run.optimizer)
            path = checkpoint.save(self.config.checkpoint_dir, epoch, state, meta, self.config.keep_checkpoints)
        except checkpoint.CheckpointError as err:
            return None, str(err)
        except OSError as err:  # the folder: made, listed or pruned
            return None, f"could not write the checkpoint for epoch {epoch} in {self.config.checkpoint_dir}: " \
                         f"{storage.cause(err)}"
        runtime.log(self.rt, f"checkpoint {path}")
        self.log.emit("checkpoint", epoch=epoch, path=path, **({"position": position} if position else {}))
        return path, None
