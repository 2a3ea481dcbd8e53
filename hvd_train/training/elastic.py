"""Elastic training: workers lost or added mid-run, training goes on from the last commit.

``horovodrun --min-np A --max-np B --host-discovery-script S`` (launch/elastic.sh), and Horovod's
elastic Ray executor (launch/ray.py --min-workers A --max-workers B), start every worker with
``HOROVOD_ELASTIC=1``; train() then comes here, no option needed. Horovod's elastic
API (Gloo only) gives the mechanism: a state committed in memory, and on a failed collective
(a worker died) or a changed host list, every surviving worker restores the last commit,
re-initialises Horovod with the new world, and calls the training function again after the
state is broadcast from the new rank 0. What that function must redo is ours (../shared/ELASTIC.md):

- the plan for the new world: shards, equal steps, loss weights, the scaled learning rate and
  the warmup position (schedules.rate), from the committed epoch and *position*: the samples of
  the epoch's order already trained. The rest of an interrupted epoch is shared by the new world
  (sharding.local_batches with a position), so no sample is trained twice or skipped;
- exact metrics of an interrupted epoch: a commit stores the global sums of the training
  metrics so far, and the epoch's end adds the rest (metrics.global_sums), so each sample is
  counted once whatever the resets;
- outputs: the committed output directory, written by whoever is rank 0 now; the event log
  records each ``reset`` (old and new world, hosts, epoch, position);
- the trap of horovod.tensorflow.elastic.run: it swallows an error it does not recognise and
  returns None. run() here turns only a failed collective into a reset; any other error fails
  the run.

Every collective of the set-up (agreement, output directory, consensus) happens inside the
training function, never before it: a worker added mid-run starts while the others are in the
state broadcast of the reset, so before it only local work (data, model) may happen.

File datasets (csv:/parquet:) work the same way: their global order does not depend on the world
size, so the rest of an epoch is re-shared like an array's. Their facts pass (stream.load: the
scaler, classes, rows per unit) is collective, so it runs in the first session, and its result,
a few numbers per file unit, is part of the committed state: a worker added later learns it in
the state's sync (before the model can exist, see State) instead of reading the data again.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import keras
import tensorflow as tf
from horovod.common.exceptions import HorovodInternalError, HostsUpdatedInterrupt

from .. import runtime, watchdog
from ..config.options import ConfigError, TrainConfig
from ..data.arrays import DataArg, load_splits
from ..data.interface import DataError
from ..outputs.events import EventLog
from . import checkpoint, distributed, loop, schedules, session
from .callbacks import EarlyStopping
from .context import RunContext
from .metrics import global_sums
from .model import ModelFn

# What Horovod's failed collectives say (a worker died, or Horovod shut down after it did).
_COLLECTIVE_FAILED = ("Horovod", "horovod", "Gloo", "gloo")


def launched() -> bool:
    """Whether horovodrun started this process as an elastic worker."""
    return os.environ.get("HOROVOD_ELASTIC") == "1"


@dataclass(frozen=True)
class Progress:
    """Everything committed besides the variables; the same on every rank after each sync.
    Frozen: a commit keeps a reference, so a change is a new object (dataclasses.replace)."""

    started: bool = False
    epoch: int = 0  # epochs completed
    position: int = 0  # samples of the current epoch's order already trained
    sums: Optional[Dict[str, float]] = None  # their global metric sums (metrics.global_sums)
    history: Dict[str, List[float]] = field(default_factory=dict)
    early_stopping: Optional[Dict[str, Any]] = None
    stopped_early: bool = False
    output_dir: Optional[str] = None
    world_size: int = 0
    hosts: Tuple[str, ...] = ()
    resets: int = 0
    started_at: float = 0.0  # rank 0's clock at the start, for the run's wall time
    first_epoch: int = 0  # epochs already done at the start (resumed from a checkpoint)
    resumed_from_epoch: Optional[int] = None


def train(rt: runtime.Runtime, config: TrainConfig, data: DataArg, model_fn: Optional[ModelFn],
          user_callbacks: List[Any]) -> session.TrainResult:
    """trainer.train() under an elastic launch: local set-up, then the elastic loop."""
    # Local only (see the module doc), so no agreement: a failure here is the same on every
    # worker (the data and options are), and each exits with rank 0's one message.
    local = None
    if not session.streamed(config, data):  # else the facts pass, in the first session
        try:
            local = load_splits(config, data)
        except (DataError, ConfigError) as err:
            runtime.fail(str(err))

    def build(dataset):
        return session.build_model(config, dataset, config.lr, model_fn)

    state = _state_class()(local, build, progress=Progress())
    result = run(_session)(state, rt, config, model_fn, user_callbacks)
    if result is None:  # never silently: see the trap in the module doc
        raise RuntimeError("elastic training returned no result")
    return result


def gloo_timeout() -> float:
    """Seconds a Gloo operation or rendezvous waits for a peer (Horovod's default 30)."""
    return float(os.environ.get("HOROVOD_GLOO_TIMEOUT_SECONDS", 30))


def _state_class():
    """Horovod's elastic state for a Keras model (the role of its KerasState, which fails under
    Keras 3), on Horovod's ObjectState, with two differences.

    The model may not exist yet. A file dataset's facts (features, classes) come from the
    collective facts pass inside the first session, and a worker added later learns them from
    the sync; so sync() broadcasts the objects first (our Progress and the facts), then builds
    the model from the facts if this worker has none, then broadcasts the variables. Every rank
    decides from the synced facts, so all reach the same collectives.

    Added hosts join one Gloo timeout after they appear. A host added to the discovery output
    starts its worker at once, and the others re-form the world at their next commit; the
    rendezvous then waits for the newcomer at most the Gloo timeout, and a newcomer still
    importing TensorFlow (5-12 s here) makes every worker abort (C++, not catchable): the whole
    job lost. Holding additions back for one timeout lets the newcomer arrive first, or wait for
    the others at most that long. Removals act at once.
    """
    import horovod.tensorflow as hvd_tf
    from horovod.common.elastic import ObjectState
    from horovod.runner.elastic.worker import HostUpdateResult

    class State(ObjectState):
        """``local``: a dataset every rank loads itself (arrays), or None (files: ``facts``,
        synced). ``build(dataset)`` -> (model, optimizer, scorer): session.build_model. Attributes
        committed: ``progress``, ``facts``, and the model's and optimizer's variables (dropout's
        random states among them: each rank's own, restored as they were, then re-derived from rank
        0's for the new world)."""

        def __init__(self, local, build, progress: Progress):
            self._held: List[Tuple[float, int, float]] = []  # (driver's timestamp, update, when seen)
            self._local, self._build = local, build
            self.model = self.optimizer = self.scorer = None
            self._saved_seed_rank = 0
            super().__init__(bcast_object=hvd_tf.broadcast_object, get_rank=hvd_tf.rank, progress=progress,
                             facts=None)
            self.use(local)

        @property
        def dataset(self):
            """The dataset of the run, or None before a file dataset's facts pass."""
            return self._local if self._local is not None else self.facts

        def use(self, dataset) -> None:
            """Local: the model for ``dataset`` (a fresh one for new facts), and ``facts`` for files."""
            if dataset is not None:
                if dataset is not self._local:
                    self.facts = dataset
                self.model, self.optimizer, self.scorer = self._build(dataset)
            self._save_variables()

        def _variables(self) -> list:
            return [] if self.model is None else list(self.model.variables) + list(self.optimizer.variables)

        def _save_variables(self) -> None:
            self._saved = [tf.identity(v.value) for v in self._variables()]
            if self.model is not None:
                self._saved_seed_rank = distributed.seed_rank(self.model)

        def save(self):
            self._save_variables()
            super().save()

        def restore(self):
            for var, saved in zip(self._variables(), self._saved):
                var.assign(saved)
            if self.model is not None:
                distributed.assume_seed_rank(self.model, self._saved_seed_rank)
            super().restore()

        def sync(self):
            super().sync()  # Horovod: rank 0's committed objects, facts included
            if self.dataset is not None:
                if self.model is None:  # a newcomer to a file dataset's run
                    self.model, self.optimizer, self.scorer = self._build(self.dataset)
                # Horovod: rank 0's committed weights, optimizer state and (re-derived) dropout states.
                distributed.broadcast(self.model, self.optimizer)
            self._save_variables()

        def reset(self):
            self._held = []
            super().reset()

        def check_host_updates(self):
            now = time.monotonic()
            while not self._host_messages.empty():
                timestamp, update = self._host_messages.get()
                self._held.append((timestamp, update, now))
            due = any(update & HostUpdateResult.removed or now - seen >= gloo_timeout()
                      for _, update, seen in self._held)
            if due:  # hand everything held to Horovod's check (rank 0's view decides for all)
                for timestamp, update, _ in self._held:
                    self._host_messages.put((timestamp, update))
                self._held = []
            super().check_host_updates()

    return State


def run(func):
    """Horovod's elastic loop around ``func(state, ...)``: a failed collective restores the last
    commit and resets; a host change resets after the commit that noticed it; any other error
    ends the run (unlike horovod.tensorflow.elastic.run, which returns None for some)."""
    from horovod.common.elastic import run_fn

    def once(state, *args):
        try:
            return func(state, *args)
        except tf.errors.OpError as err:
            if _collective_failed(err):
                raise HorovodInternalError(err) from err
            raise

    return run_fn(once, _reset)


def _collective_failed(err: BaseException) -> bool:
    return isinstance(err, tf.errors.OpError) and any(word in str(err) for word in _COLLECTIVE_FAILED)


def _reset() -> None:
    import horovod.tensorflow as hvd

    watchdog.stop()
    # Horovod: leave the old world, join the new one (rendezvous with the driver).
    hvd.shutdown()
    hvd.init()


def _session(state, rt: runtime.Runtime, config: TrainConfig, model_fn: Optional[ModelFn],
             user_callbacks: List[Any]) -> session.TrainResult:
    """One pass of the elastic loop, from the committed state to the end of the run."""
    rt = runtime.refresh(rt)
    # Horovod: this world's watchdog (a silent worker is killed when on this machine: a lost one).
    watchdog.start(rt.rank, rt.size, config.stall_timeout, runtime.host_name(), elastic=True)
    progress: Progress = state.progress
    if progress.output_dir:
        config = config.replace(output_dir=progress.output_dir)
    if state.dataset is None:
        # A file dataset's first session: the facts pass (collective), then the model for them.
        config, splits, plan = session.prepare(rt, config, None)
        state.use(splits)
    else:
        splits, error = state.dataset, None
        try:
            splits = splits.here(config)  # files: this host's own listing for the consensus check
        except DataError as err:
            error = str(err)
        config, plan = session.settle(rt, config, splits, error)
    log = EventLog(rt, config.output_dir)
    watchdog.on_verdict(lambda message: log.emit("run_failed", error=message))
    model, optimizer = state.model, state.optimizer
    if not progress.started:
        resumed = checkpoint.resume(rt, config, plan, splits, model, optimizer)
        # Horovod: every rank starts from rank 0's weights and optimizer state (fresh or restored).
        distributed.broadcast(model, optimizer)
        progress = Progress(
            started=True, epoch=resumed.initial_epoch(config.epochs), position=resumed.position, sums=resumed.sums,
            history=resumed.history,
            early_stopping=resumed.early_stopping, stopped_early=resumed.stopped_early,
            output_dir=config.output_dir, world_size=rt.size, hosts=tuple(plan.hosts),
            started_at=runtime.broadcast(time.time(), "elastic.start"),
            first_epoch=resumed.epoch, resumed_from_epoch=resumed.epoch if resumed.path else None)
        log.start(config=config.to_dict(), plan=dataclasses.asdict(plan), versions=runtime.versions(),
                  initial_epoch=progress.epoch, elastic=True)
    else:
        log.emit("reset", old_world_size=progress.world_size, world_size=rt.size, old_hosts=list(progress.hosts),
                 hosts=plan.hosts, epoch=progress.epoch + 1, position=progress.position,
                 samples_per_epoch=plan.train_samples, resets=progress.resets + 1)
        runtime.log(rt, f"elastic reset: {progress.world_size} -> {rt.size} process(es) "
                        f"({', '.join(dict.fromkeys(plan.hosts))}); continuing epoch {progress.epoch + 1} after "
                        f"{progress.position} of {plan.train_samples} samples")
        progress = dataclasses.replace(progress, world_size=rt.size, hosts=tuple(plan.hosts),
                                       resets=progress.resets + 1)
    for line in plan.lines():
        runtime.log(rt, line)
    state.progress = progress
    state.save()  # local: a failure before the next commit comes back to here, not to before set-up

    # The learning rate of this world at the committed point (its scale and warmup position).
    optimizer.learning_rate = schedules.rate(
        config, plan, progress.epoch + progress.position / plan.global_batch_size / plan.steps_per_epoch)

    run = ElasticRun(rt=rt, config=config, plan=plan, data=splits, model=model, optimizer=optimizer, log=log,
                     model_fn=model_fn, user_callbacks=tuple(user_callbacks), scorer=state.scorer, state=state)
    start = checkpoint.ResumePoint(epoch=progress.epoch, history=progress.history,
                                   early_stopping=progress.early_stopping, stopped_early=progress.stopped_early,
                                   position=progress.position, sums=progress.sums)
    loop.fit_epochs(run, start)
    progress = state.progress
    seconds = time.time() - progress.started_at
    trained = progress.epoch - progress.first_epoch
    return session.finish(run, progress.history, {
        "epochs_completed": progress.epoch,
        "epochs_trained_this_run": trained,
        "resumed_from_epoch": progress.resumed_from_epoch,
        "stopped_early": progress.stopped_early,
        "train_seconds": seconds,
        "samples_per_second": plan.train_samples * trained / seconds if trained else 0.0,
        "elastic_resets": progress.resets,
    })


@dataclass(frozen=True)
class ElasticRun(RunContext):
    """A session of an elastic run: its fits end each epoch (and every --commit-every batches)
    with a commit of the state, and a failed collective or a host change is a reset, not a failure."""

    state: Any = None  # the elastic State the commits write to

    def extra_callbacks(self, early_stopping: Optional[EarlyStopping]) -> List[Any]:
        return [Commit(self, early_stopping)]  # last: after the stop check

    def is_reset(self, err: BaseException) -> bool:
        """Not a failure: a reset of the elastic loop (a host change, a failed collective)."""
        return isinstance(err, (HostsUpdatedInterrupt, HorovodInternalError)) or _collective_failed(err)


class Commit(keras.callbacks.Callback):
    """Collective, every rank, last: commit the state at each epoch end and, with
    ``--commit-every N``, after every N batches (the first batch end N or more after the last).
    A commit also asks the driver whether hosts changed (Horovod raises HostsUpdatedInterrupt on
    every rank together, and the loop resets)."""

    def __init__(self, run: "ElasticRun", early_stopping: Optional[EarlyStopping]):
        super().__init__()
        self.run, self.state, self.every = run, run.state, run.config.commit_every
        self.early_stopping = early_stopping
        self.sums = self.state.progress.sums  # the first epoch's part trained before

    def on_epoch_begin(self, epoch, logs=None):
        progress = self.state.progress  # at epoch, after ``position`` samples of it
        self.cursor = self.run.cursor(epoch, progress.position if epoch == progress.epoch else 0)
        self.committed = 0

    def on_train_batch_end(self, batch, logs=None):
        done = batch + 1  # steps of this fit so far (a multiple of --steps-per-execution)
        if not self.every or done - self.committed < self.every or done >= self.cursor.steps:
            return
        self.committed = done
        # Horovod: the running means of this rank's samples so far, as global sums (one allreduce).
        sums = global_sums({k: float(v) for k, v in (logs or {}).items()}, self.cursor.samples(done),
                           "commit", self.sums)
        self.state.progress = dataclasses.replace(self.state.progress, position=self.cursor.position(done), sums=sums)
        self.state.commit()

    def on_epoch_end(self, epoch, logs=None):
        progress: Progress = self.state.progress
        history = {k: list(v) for k, v in progress.history.items()}
        for key, value in (logs or {}).items():
            history.setdefault(key, []).append(float(value))
        self.state.progress = dataclasses.replace(
            progress, epoch=epoch + 1, position=0, sums=None, history=history,
            early_stopping=dict(self.early_stopping.state) if self.early_stopping else None,
            stopped_early=bool(self.model.stop_training))  # early stopping or pruning
        self.sums = None
        self.state.commit()
