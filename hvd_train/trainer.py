"""The training flow, top to bottom: Horovod up, data agreed, model built, fit, exact metrics, outputs.

Python API::

    from hvd_train import TrainConfig, train
    result = train(TrainConfig(epochs=20), data=(x, y), model_fn=my_builder)

Run it under a launcher (``horovodrun -np 2 python my_script.py``); every rank calls ``train``.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import tensorflow as tf

from . import __version__, checkpoint, configfile, consensus, data as data_mod, events, metrics, outputs, plots, runtime
from . import plan as plan_mod
from .plan import Plan, make_plan
from .checkpoint import CheckpointError
from .config import RESUME_FIXED_FIELDS, ConfigError, TrainConfig, scaled_learning_rate
from .data import DataError, Splits, Table
from .model import build_mlp
from .outputs import OutputError


class _SkipSlowCallbackWarning(logging.Filter):
    # Horovod's one-off broadcast after step 1 trips Keras's "callback is slow" check on tiny models.
    def filter(self, record: logging.LogRecord) -> bool:
        return "is slow compared to the batch time" not in record.getMessage()


tf.get_logger().addFilter(_SkipSlowCallbackWarning())

ModelFn = Callable[[int, int], Any]  # (n_features, n_classes) -> uncompiled tf.keras.Model
DataArg = Union[None, Table, Tuple[Any, Any], Any]  # None = config.dataset; (x, y); finite tf.data


@dataclass(frozen=True)
class TrainResult:
    output_dir: str
    metrics: Dict[str, Any]
    history: Dict[str, List[float]]
    plan: Plan
    model: Any  # the trained tf.keras.Model (identical on every rank)


def train(config: TrainConfig, data: DataArg = None, model_fn: Optional[ModelFn] = None,
          callbacks: Optional[List[Any]] = None) -> TrainResult:
    """Train on every rank of the current launch; rank 0 writes the outputs. See module doc.

    ``callbacks`` (extra Keras callbacks) run on every rank after hvd_train's own, so they see
    metrics already combined over ranks. Keep rank-0-only side effects behind ``hvd.rank() == 0``
    and never put a collective there.
    """
    rt = runtime.init(config.threads, config.verbose_ranks, horovod_env(config))
    config, splits, plan = prepare(rt, config, data)
    for line in plan.lines():
        runtime.log(rt, line)
    return _fit_evaluate_save(rt, config, plan, splits, model_fn, list(callbacks or []))


def dry_run(config: TrainConfig, data: DataArg = None, world_size: Optional[int] = None,
            as_json: bool = False) -> Plan:
    """What train() would do, without training: the same set-up checks and plan, printed by rank 0.

    Under a launcher the world is the launcher's. Run alone, ``world_size`` plans for that many
    processes on this host (the plan is pure arithmetic on the data and the config).
    """
    rt = runtime.init(config.threads, config.verbose_ranks)
    world = rt
    if world_size is not None and world_size != rt.size:
        if rt.size > 1:
            raise ConfigError(f"--np {world_size} disagrees with the launcher, which started {rt.size} processes")
        world = runtime.planned(rt, world_size, config.threads)
    config, _, plan = prepare(world, config, data)
    if as_json:
        runtime.on_rank0(rt, runtime.write_line, json.dumps(plan_mod.report(plan, config), indent=2))
    else:
        for line in plan_mod.report_lines(plan, config):
            runtime.log(rt, line)
        runtime.log(rt, f"dry run: nothing trained, nothing written (outputs would go to {config.output_dir})")
    return plan


def prepare(rt: runtime.Runtime, config: TrainConfig, data: DataArg) -> Tuple[TrainConfig, Splits, Plan]:
    """Collective: load and check the data and directories on every rank, agree, plan, check consensus."""
    # 1. Data, output and checkpoint directories. A failure on any rank stops every rank with one message.
    splits, output_dir, error = None, None, None
    try:
        splits = _load_splits(config, data)
        if len(splits.y_train) < rt.size:
            raise DataError(f"{len(splits.y_train)} training samples are fewer than the {rt.size} processes")
        output_dir = runtime.on_rank0(rt, outputs.check_dir, config.output_dir)
        for path in filter(None, (config.timeline, config.autotune_log)):
            runtime.on_rank0(rt, outputs.check_file, path)
        if config.checkpoint_dir:
            runtime.on_rank0(rt, checkpoint.check_writable, config.checkpoint_dir)
    except (DataError, OutputError, ConfigError, CheckpointError) as err:
        error = str(err)
    runtime.agree(error, "setup")
    # Horovod: rank 0 chose the directory (its default holds a timestamp); everyone uses it.
    config = config.replace(output_dir=runtime.broadcast(output_dir, "output_dir"))
    hosts = runtime.allgather(runtime.host_name(), "host")
    if rt.planned:  # dry run for a world this process only imagines: every rank on this host
        hosts = hosts * rt.size
    plan = make_plan(config, len(splits.y_train), len(splits.y_val), len(splits.y_test),
                     rt.size, rt.intra_op_threads, hosts)

    # 2. Consensus: same config, data, plan and versions on every rank, or nobody trains.
    consensus.check(consensus.fingerprint(config, splits, plan, _versions()))
    return config, splits, plan


def horovod_env(config: TrainConfig) -> Dict[str, str]:
    """Horovod settings that must be in the environment before hvd.init() (this rank's)."""
    env = {}
    if config.timeline:
        # Horovod: a timeline started later (hvd.start_timeline), once the set-up checks have passed.
        env["HOROVOD_TIMELINE"] = "DYNAMIC"
    if config.autotune:
        # Horovod: Bayesian search of fusion threshold, cycle time, ... while training.
        env["HOROVOD_AUTOTUNE"] = "1"
        if runtime.launcher_rank() == 0:  # one writer for the log, rank 0
            env["HOROVOD_AUTOTUNE_LOG"] = os.path.abspath(config.autotune_log or events.autotune_scratch())
    return env


def _fit_evaluate_save(rt: runtime.Runtime, config: TrainConfig, plan: Plan, splits: Splits,
                       model_fn: Optional[ModelFn], user_callbacks: List[Any]) -> TrainResult:
    import horovod.tensorflow as hvd_tf
    import horovod.tensorflow.keras as hvd

    from .pipeline import ShardedBatches

    # 3. Model and optimizer.
    model_fn = model_fn or functools.partial(
        build_mlp, hidden=config.hidden, activation=config.activation,
        dropout=config.dropout, logits=config.logits)
    tf.keras.utils.set_random_seed(config.seed)
    model = model_fn(splits.n_features, splits.n_classes)
    loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=config.logits)
    # Horovod: gradients are averaged across ranks by ring-allreduce before every update.
    optimizer = hvd.DistributedOptimizer(
        _make_optimizer(config, plan.scaled_lr),
        # Horovod: optional fp16 on the wire, and local accumulation to allreduce less often.
        compression=hvd.Compression.fp16 if config.fp16_allreduce else hvd.Compression.none,
        backward_passes_per_step=config.backward_passes_per_step)
    # "xent" is the unweighted per-sample loss; it becomes the exact epoch "loss" (see _ExactTrainMetrics).
    model.compile(optimizer=optimizer, loss=loss, metrics=[
        "accuracy", tf.keras.metrics.SparseCategoricalCrossentropy(name="xent", from_logits=config.logits)])
    # The optimizer's slots exist before the first step, so they can be restored and broadcast.
    optimizer._create_all_weights(model.trainable_variables)

    # 4. Resume: rank 0 picks and verifies the checkpoint and loads it; the others follow.
    resumed = _resume(rt, config, plan, splits, model, optimizer)
    # Horovod: every rank starts from rank 0's weights and optimizer state (fresh or restored),
    # whatever model_fn did with randomness.
    hvd_tf.broadcast_variables(model.variables + optimizer.variables(), root_rank=0)

    callbacks = [
        # Horovod: rank 0's weights and optimizer state again after the first step (Horovod's
        # standard guard for state created lazily inside the first step).
        hvd.callbacks.BroadcastGlobalVariablesCallback(0),
        # Horovod: combine the training metrics over ranks before any later callback reads them.
        _ExactTrainMetrics(plan.train_samples_per_rank[rt.rank], exact_loss=not model.losses),
    ]
    if plan.val_samples:
        callbacks.append(_GlobalValidation(splits.x_val, splits.y_val, rt, config.logits))
    callbacks += _lr_callbacks(hvd, config, plan)
    callbacks.append(_LearningRateLog())
    log = events.EventLog(rt, config.output_dir)
    callbacks.append(log.callback(config.epochs))
    if config.tensorboard and rt.is_rank0:
        # Rank 0 only, and free of collectives: it writes files from values already global.
        callbacks.append(events.TensorBoardScalars(os.path.join(config.output_dir, events.TENSORBOARD_DIR)))
    early_stopping = None
    if config.early_stopping_patience:
        early_stopping = _EarlyStopping(rt, config, log, resumed.get("early_stopping"))
        callbacks.append(early_stopping)
    history_so_far = {k: list(v) for k, v in resumed.get("history", {}).items()}
    if config.checkpoint_dir:
        callbacks.append(_Checkpointer(rt, config, plan, consensus.data_fingerprint(splits),
                                       history_so_far, early_stopping, log))
    callbacks += user_callbacks
    progress = config.progress
    if progress == "auto":
        # Launchers pipe (or pty) and prefix each chunk of output: a live bar only when run alone.
        progress = "bar" if sys.stdout.isatty() and not runtime.under_launcher() else "epoch"
    verbose = 1 if progress == "bar" and rt.is_rank0 else 0
    if verbose:
        # Last in the list, so the bar shows metrics after they have been combined over ranks.
        callbacks.append(tf.keras.callbacks.ProgbarLogger(count_mode="steps"))
    elif progress == "epoch" and rt.is_rank0:
        callbacks.append(_EpochLine(config.epochs))

    # 5. Train, from the first epoch not yet done, to the requested total.
    initial_epoch = resumed.get("epoch", 0)
    if resumed.get("stopped_early"):
        initial_epoch = config.epochs  # the checkpointed run had already stopped early: nothing to add
    batches = ShardedBatches(splits.x_train, splits.y_train, rt.rank, rt.size,
                             config.batch_size, config.seed, config.shuffle, epoch=initial_epoch)
    # Every set-up check has passed on every rank: rank 0 makes the output directory and starts the event log.
    log.start(config=config.to_dict(), plan=asdict(plan), versions=_versions(), initial_epoch=initial_epoch)
    if config.timeline:
        timeline = os.path.abspath(config.timeline)
        runtime.on_rank0(rt, os.makedirs, os.path.dirname(timeline), exist_ok=True)
        # Horovod: every rank turns recording on; rank 0, the coordinator, writes the file.
        hvd_tf.start_timeline(timeline)
    start = time.perf_counter()
    try:
        history = model.fit(batches, epochs=config.epochs, initial_epoch=initial_epoch, shuffle=False,
                            callbacks=callbacks, verbose=verbose)
    except Exception as err:
        log.emit("run_failed", error=f"{type(err).__name__}: {err}")
        raise
    train_seconds = time.perf_counter() - start
    epochs_trained = len(history.epoch)
    full_history = _concat_history(resumed.get("history", {}), history.history)
    epochs_completed = initial_epoch + epochs_trained if epochs_trained else resumed.get("epoch", 0)

    # 6. Exact test metrics and a check that every replica ended with the same weights.
    test = metrics.evaluate(model, splits.x_test, splits.y_test, rt, config.logits, splits.n_classes)
    report = metrics.classification_report(test["confusion"], splits.class_names)
    weight_digests = runtime.allgather(_weights_digest(model), "weights_digest")
    if config.timeline:
        hvd_tf.stop_timeline()  # Horovod: closes the file, on every rank
    result_metrics = {
        "test_loss": test["loss"],
        "test_accuracy": test["accuracy"],
        "test_samples": test["samples"],
        "world_size": rt.size,
        "global_batch_size": plan.global_batch_size,
        "scaled_lr": plan.scaled_lr,
        "epochs_completed": epochs_completed,
        "epochs_trained_this_run": epochs_trained,
        "resumed_from_epoch": resumed.get("epoch"),
        "stopped_early": bool(resumed.get("stopped_early")) or bool(early_stopping and early_stopping.stopped),
        "steps_per_epoch": plan.steps_per_epoch,
        "train_seconds": train_seconds,
        "samples_per_second": plan.train_samples * epochs_trained / train_seconds if epochs_trained else 0.0,
        "replica_weight_digests": weight_digests,
        "replicas_identical": len(set(weight_digests)) == 1,
    }
    for key in ("val_loss", "val_accuracy"):
        if full_history.get(key):
            result_metrics[key] = full_history[key][-1]

    # 7. Outputs, written once by rank 0.
    runtime.on_rank0(rt, _write_outputs, config, plan, splits, model, model_fn, full_history, result_metrics, report)
    log.finish({k: v for k, v in result_metrics.items() if k != "replica_weight_digests"})
    runtime.log(rt, f"test loss {test['loss']:.4f}, test accuracy {test['accuracy']:.4f} "
                    f"on {test['samples']} samples from {rt.size} process(es)")
    runtime.log(rt, f"outputs in {config.output_dir}")
    return TrainResult(output_dir=config.output_dir, metrics=result_metrics,
                       history=full_history, plan=plan, model=model)


def _resume(rt: runtime.Runtime, config: TrainConfig, plan: Plan, splits: Splits, model, optimizer) -> Dict[str, Any]:
    """Collective. Rank 0 finds, verifies and loads the checkpoint; every rank gets the decision.

    Returns {} for a fresh start, else the epoch to continue from, the history so far, the
    early-stopping state and the learning rate at the checkpoint. The weights themselves reach
    the other ranks by the broadcast that follows.
    """
    if not config.resume:
        return {}
    decision, error = runtime.on_rank0(rt, _load_resume_point, rt, config, plan, splits, model, optimizer) or (None, None)
    runtime.agree(error, "resume")
    # Horovod: rank 0 decided where to resume; every rank follows (ranks never race on the files).
    decision = runtime.broadcast(decision, "resume")
    if decision.get("lr") is not None:
        tf.keras.backend.set_value(optimizer.lr, decision["lr"])
    return decision


def _load_resume_point(rt, config, plan, splits, model, optimizer) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """Rank 0 only (no collectives): choose the checkpoint, check it fits this run, load it."""
    try:
        if config.resume == "auto":
            ckpt, skipped = checkpoint.newest_valid(config.checkpoint_dir)
        else:
            ckpt, skipped = checkpoint.load(config.resume), []
        for note in skipped:
            runtime.log(rt, note)
        if ckpt is None:
            runtime.log(rt, f"no usable checkpoint in {config.checkpoint_dir}: starting at epoch 1")
            return {}, None
        _check_compatible(ckpt, config, splits)
        try:
            model.set_weights(ckpt.model_weights)
            optimizer.set_weights(ckpt.optimizer_weights)
        except ValueError as err:
            raise CheckpointError(f"{ckpt.path} does not fit this model: {err}") from None
    except CheckpointError as err:
        return None, str(err)
    meta = ckpt.meta
    was = meta["plan"]
    runtime.log(
        rt, f"resuming from {ckpt.path}: {ckpt.epoch} of {config.epochs} epoch(s) done"
        + (" (that run had stopped early)" if meta.get("stopped_early") else ""))
    runtime.log(
        rt, f"it was written by {was['world_size']} process(es) (global batch {was['global_batch_size']}, "
        f"lr {was['scaled_lr']:g}); now {plan.world_size} process(es): global batch {plan.global_batch_size}, "
        f"lr {plan.scaled_lr:g}")
    same_world = was["world_size"] == plan.world_size and was["scaled_lr"] == plan.scaled_lr
    return {
        "epoch": ckpt.epoch,
        "history": meta["history"],
        "early_stopping": meta.get("early_stopping"),
        "stopped_early": meta.get("stopped_early", False),
        # The learning rate schedules set next: carry the exact value only if the scale is unchanged.
        "lr": meta.get("lr") if same_world else None,
    }, None


def _check_compatible(ckpt, config: TrainConfig, splits: Splits) -> None:
    saved = ckpt.meta["config"]
    now = config.to_dict()
    changed = [f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in RESUME_FIXED_FIELDS if saved.get(k) != now[k]]
    if changed:
        raise CheckpointError(f"{ckpt.path} was written by a different run ({', '.join(changed)}); "
                              f"resume with the same model and data settings or start afresh without --resume")
    if ckpt.meta.get("data") != consensus.data_fingerprint(splits):
        raise CheckpointError(f"{ckpt.path} was trained on different data than this run loads")


def _concat_history(before: Dict[str, List[float]], after: Dict[str, List[float]]) -> Dict[str, List[float]]:
    keys = list(dict.fromkeys([*before, *after]))
    return {k: [float(v) for v in before.get(k, [])] + [float(v) for v in after.get(k, [])] for k in keys}


def _lr_callbacks(hvd, config: TrainConfig, plan: Plan) -> List[Any]:
    """Warmup, then the schedule: functions of the epoch alone, so every rank (and a resumed run) agrees."""
    callbacks = []
    if config.warmup_epochs:
        # Horovod: ramp from scaled_lr / size to scaled_lr over the first epochs (Goyal et al.).
        callbacks.append(hvd.callbacks.LearningRateWarmupCallback(
            initial_lr=plan.scaled_lr, warmup_epochs=config.warmup_epochs,
            steps_per_epoch=plan.steps_per_epoch, verbose=0))
    warm, total = config.warmup_epochs, config.epochs
    if config.lr_schedule == "step":
        # Horovod: multiply by the factor every lr_decay_epochs after warmup, at epoch starts.
        callbacks.append(hvd.callbacks.LearningRateScheduleCallback(
            initial_lr=plan.scaled_lr, start_epoch=warm, staircase=True,
            multiplier=lambda epoch: config.lr_decay_factor ** ((epoch - warm) // config.lr_decay_epochs)))
    elif config.lr_schedule == "cosine":
        # Horovod: half a cosine from scaled_lr to 0 between the end of warmup and the last step, per batch.
        callbacks.append(hvd.callbacks.LearningRateScheduleCallback(
            initial_lr=plan.scaled_lr, start_epoch=warm, staircase=False, steps_per_epoch=plan.steps_per_epoch,
            multiplier=lambda epoch: cosine_multiplier(epoch, warm, total)))
    return callbacks


def cosine_multiplier(epoch: float, warmup_epochs: int, epochs: int) -> float:
    """The cosine schedule's factor at a (fractional) epoch: 1 at the end of warmup, 0 at the end."""
    progress = (epoch - warmup_epochs) / (epochs - warmup_epochs)
    return 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def _load_splits(config: TrainConfig, data: DataArg) -> Splits:
    if data is None:
        table = data_mod.load(config.dataset, config.label_column, samples=config.samples,
                              features=config.features, classes=config.classes, seed=config.seed)
    elif isinstance(data, Table):
        table = data
    elif isinstance(data, tuple) and len(data) == 2:
        table = data_mod.from_arrays(*data)
    else:
        table = _table_from_tf_data(data)
    return data_mod.split_and_scale(table, config.val_fraction, config.test_fraction, config.seed)


def _table_from_tf_data(dataset) -> Table:
    """A finite tf.data.Dataset of (features, label) elements, materialised (tabular data fits)."""
    if not isinstance(dataset, tf.data.Dataset):
        raise DataError(f"data must be None, (x, y) arrays, a Table or a tf.data.Dataset, not {type(dataset).__name__}")
    if dataset.cardinality() == tf.data.INFINITE_CARDINALITY:
        raise DataError("the tf.data.Dataset is infinite; pass a finite one (no .repeat())")
    xs, ys = [], []
    for element in dataset.unbatch() if _is_batched(dataset) else dataset:
        if not isinstance(element, tuple) or len(element) != 2:
            raise DataError("tf.data elements must be (features, label) pairs")
        xs.append(np.asarray(element[0]))
        ys.append(np.asarray(element[1]))
    if not xs:
        raise DataError("the tf.data.Dataset is empty")
    return data_mod.from_arrays(np.stack(xs), np.stack(ys).reshape(-1))


def _is_batched(dataset) -> bool:
    spec = dataset.element_spec
    return isinstance(spec, tuple) and len(spec[0].shape) == 2


def _make_optimizer(config: TrainConfig, lr: float):
    # Keras 2's legacy optimizers: the ones Horovod 0.28's callbacks (warmup, LR schedules) drive.
    if config.optimizer == "sgd":
        return tf.keras.optimizers.legacy.SGD(learning_rate=lr, momentum=config.momentum)
    return tf.keras.optimizers.legacy.Adam(learning_rate=lr)


def _weights_digest(model) -> str:
    h = hashlib.sha256()
    for w in model.get_weights():
        h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()


def _versions() -> Dict[str, str]:
    import horovod
    import sklearn

    return {"hvd_train": __version__, "tensorflow": tf.__version__, "horovod": horovod.__version__,
            "numpy": np.__version__, "scikit-learn": sklearn.__version__, "python": platform.python_version()}


def _write_outputs(config, plan, splits, model, model_fn, history, result_metrics, report) -> None:
    d = config.output_dir
    # A clean copy for tf.keras.models.load_model: the Horovod-wrapped optimizer is not serialisable.
    clean = model_fn(splits.n_features, splits.n_classes)
    clean.set_weights(model.get_weights())
    clean.compile(optimizer=_make_optimizer(config, plan.scaled_lr),
                  loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=config.logits),
                  metrics=["accuracy"])
    outputs.save_model(f"{d}/{outputs.MODEL_FILE}", clean)
    outputs.write_json(f"{d}/{outputs.PREPROCESSING_FILE}", {**splits.preprocessing(), "logits": config.logits})
    outputs.write_json(f"{d}/{outputs.CONFIG_FILE}",
                       {"config": config.to_dict(), "plan": asdict(plan), "versions": _versions()})
    outputs.write_text(f"{d}/{outputs.CONFIG_TOML_FILE}", configfile.dumps(config))
    outputs.write_history(f"{d}/{outputs.HISTORY_FILE}", history)
    outputs.write_json(f"{d}/{outputs.REPORT_FILE}", report)
    title = f"{config.dataset}, {plan.world_size} process(es), global batch {plan.global_batch_size}"
    plots.curves(history, f"{d}/{plots.CURVES_FILE}", title)
    plots.confusion(np.array(report["confusion_matrix"]), report["classes"], f"{d}/{plots.CONFUSION_FILE}",
                    f"test set, accuracy {report['accuracy']:.4f} ({report['samples']} samples)")
    if config.autotune and not config.autotune_log and os.path.exists(events.autotune_scratch()):
        shutil.move(events.autotune_scratch(), f"{d}/{outputs.AUTOTUNE_FILE}")  # nothing left in /tmp
    outputs.write_json(f"{d}/{outputs.METRICS_FILE}", result_metrics)  # last: marks the run complete


class _ExactTrainMetrics(tf.keras.callbacks.Callback):
    """Collective, every rank, epoch end: training metrics over all ranks' samples.

    Horovod's MetricAverageCallback takes the plain mean of the rank means; this weighs each
    rank by the samples it trained on. Keras's "loss" carries the uneven-step weights of
    sharding.py, so "loss" is replaced by the unweighted per-sample cross-entropy ("xent"),
    unless the model adds its own losses (regularisers), which "xent" would leave out.
    """

    def __init__(self, samples_this_rank: int, exact_loss: bool):
        super().__init__()
        self.samples_this_rank, self.exact_loss = samples_this_rank, exact_loss

    def on_epoch_end(self, epoch, logs=None):
        logs.update(metrics.combine_by_count(logs, self.samples_this_rank, "train"))
        xent = logs.pop("xent")
        if self.exact_loss:
            logs["loss"] = xent


class _GlobalValidation(tf.keras.callbacks.Callback):
    """Collective, on every rank at every epoch end: exact validation loss and accuracy."""

    def __init__(self, x, y, rt, from_logits):
        super().__init__()
        self.x, self.y, self.rt, self.from_logits = x, y, rt, from_logits

    def on_epoch_end(self, epoch, logs=None):
        result = metrics.evaluate(self.model, self.x, self.y, self.rt, self.from_logits)
        logs["val_loss"], logs["val_accuracy"] = result["loss"], result["accuracy"]


class _LearningRateLog(tf.keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        logs["lr"] = float(self.model.optimizer.lr.numpy())


class _EpochLine(tf.keras.callbacks.Callback):
    """One line per epoch with a bar over the whole run: readable through launcher pipes."""

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


class _EarlyStopping(tf.keras.callbacks.Callback):
    """Collective, every rank, epoch end: stop when the global validation metric stops improving.

    The metric is the exact cross-rank value from _GlobalValidation, so every rank sees the same
    number; rank 0's state and decision are broadcast anyway, so no rounding can split the ranks.
    The state is checkpointed, so a resumed run keeps counting where the interrupted one was.
    """

    def __init__(self, rt: runtime.Runtime, config: TrainConfig, log: events.EventLog,
                 state: Optional[Dict[str, Any]] = None):
        super().__init__()
        self.rt, self.log, self.metric = rt, log, config.early_stopping_metric
        self.patience, self.min_delta = config.early_stopping_patience, config.early_stopping_min_delta
        self.lower_is_better = self.metric.endswith("loss")
        self.state = dict(state or {"best": None, "best_epoch": None, "wait": 0})
        self.stopped = False

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
            self.stopped = self.model.stop_training = True
            self.log.emit("early_stopping", epoch=epoch + 1, metric=self.metric, **self.state)
            runtime.log(self.rt, f"early stopping after epoch {epoch + 1}: {self.metric} has not improved by more "
                                 f"than {self.min_delta:g} for {self.patience} epoch(s); best "
                                 f"{self.state['best']:.4f} at epoch {self.state['best_epoch']}")


class _Checkpointer(tf.keras.callbacks.Callback):
    """Every rank, epoch end: rank 0 writes a checkpoint every N epochs and at the end; all ranks
    then agree that it was written, so a full disk stops the job with one message, not a hang."""

    def __init__(self, rt, config: TrainConfig, plan: Plan, data_fingerprint, history, early_stopping, log):
        super().__init__()
        self.rt, self.config, self.plan, self.data_fingerprint = rt, config, plan, data_fingerprint
        self.history, self.early_stopping, self.log = history, early_stopping, log

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
        done = epoch + 1
        if done % self.config.checkpoint_every and done != self.config.epochs and not self.model.stop_training:
            return
        error = runtime.on_rank0(self.rt, self._save, done)
        runtime.agree(error, "checkpoint")

    def _save(self, epoch: int) -> Optional[str]:
        meta = {
            "config": self.config.to_dict(), "plan": asdict(self.plan), "versions": _versions(),
            "history": self.history, "data": self.data_fingerprint,
            "early_stopping": self.early_stopping.state if self.early_stopping else None,
            "stopped_early": bool(self.model.stop_training),
            "lr": float(tf.keras.backend.get_value(self.model.optimizer.lr)),
        }
        try:
            path = checkpoint.save(self.config.checkpoint_dir, epoch, self.model.get_weights(),
                                   self.model.optimizer.get_weights(), meta, self.config.keep_checkpoints)
        except OSError as err:
            return f"could not write the checkpoint for epoch {epoch} in {self.config.checkpoint_dir}: {err}"
        runtime.log(self.rt, f"checkpoint {path}")
        self.log.emit("checkpoint", epoch=epoch, path=path)
        return None
