"""The training flow, top to bottom: Horovod up, data agreed, model built, fit, exact metrics, outputs.

Python API::

    from hvd_train import TrainConfig, train
    result = train(TrainConfig(epochs=20), data=(x, y), model_fn=my_builder)

Run it under a launcher (``horovodrun -np 2 python my_script.py``); every rank calls ``train``.
Where each step's details live: data.py (load, split, scale), sharding.py and pipeline.py (who
trains on what), model.py, checkpoint.py (resume), callbacks.py (per-epoch work, in order),
metrics.py (exact global numbers), outputs.py (the run directory).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Tuple

import tensorflow as tf

from . import checkpoint, consensus, metrics, outputs, pruning, replicas, runtime, sources, stopping, stream, tasks
from .callbacks import EarlyStopping, StreamGuard, progress_mode, run_callbacks
from .checkpoint import CheckpointError
from .config import ConfigError, TrainConfig
from .data import DataArg, DataError, Splits, load_splits
from .events import EventLog
from .model import ModelFn, check_inputs, compile_model, make_optimizer, model_for
from .outputs import OutputError
from .pipeline import ShardedBatches
from .plan import Plan, make_plan, report, report_lines


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
    from . import elastic

    if elastic.launched():
        # Horovod: an elastic launch; the world may change mid-run (elastic.py). No core pinning:
        # a process's share of the cores changes with the world.
        rt = runtime.init(config.threads, config.verbose_ranks, horovod_env(config))
        return elastic.train(rt, config, data, model_fn, list(callbacks or []))
    rt = runtime.init(config.threads, config.verbose_ranks, horovod_env(config), pin_cores=config.pin_cores)
    config, splits, plan = prepare(rt, config, data)
    for line in plan.lines():
        runtime.log(rt, line)
    runtime.log(rt, tasks.describe(config, splits, model_fn))
    if rt.cores:
        runtime.log(rt, f"each process bound to its own {len(rt.cores)} core(s) (rank 0: cores "
                        f"{','.join(map(str, rt.cores))}); --no-pin-cores leaves them floating")
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
        world = runtime.simulated_world(rt, world_size, config.threads)
    config, _, plan = prepare(world, config, data)
    if as_json:
        runtime.on_rank0(rt, runtime.write_line, json.dumps(report(plan, config), indent=2))
    else:
        for line in report_lines(plan, config):
            runtime.log(rt, line)
        runtime.log(rt, f"dry run: nothing trained, nothing written (outputs would go to {config.output_dir})")
    return plan


def prepare(rt: runtime.Runtime, config: TrainConfig, data: DataArg) -> Tuple[TrainConfig, Splits, Plan]:
    """Collective: load and check the data and directories on every rank, agree, plan, check consensus."""
    splits, error = None, None
    try:
        if data is None and sources.is_file_source(config.dataset):
            # Collective (each rank reads its share); a failure anywhere raises on every rank.
            splits = stream.load(config, *((0, 1) if rt.simulated else (rt.rank, rt.size)))
        else:
            splits = load_splits(config, data)
    except (DataError, ConfigError) as err:
        error = str(err)
    config, plan = settle(rt, config, splits, error)
    return config, splits, plan


def settle(rt: runtime.Runtime, config: TrainConfig, splits: Optional[Splits],
           error: Optional[str]) -> Tuple[TrainConfig, Plan]:
    """Collective: every rank's data (or its loading ``error``) and directories checked and
    agreed, then the plan for this world and the consensus check. Returns the config with rank
    0's output directory, and the plan."""
    # 1. Data, output and checkpoint directories. A failure on any rank stops every rank with one message.
    output_dir = None
    try:
        if error is None and splits.n_train < rt.size:
            raise DataError(f"{splits.n_train} training samples are fewer than the {rt.size} processes")
        error = error or check_inputs(config, splits.input_shape, config.dataset)
        output_dir = runtime.on_rank0(rt, outputs.check_dir, config.output_dir)
        for path in filter(None, (config.timeline, config.autotune_log)):
            runtime.on_rank0(rt, outputs.check_file, path)
        if config.checkpoint_dir:
            runtime.on_rank0(rt, checkpoint.check_writable, config.checkpoint_dir)
        if config.prune_file:
            runtime.on_rank0(rt, pruning.read, config.prune_file, config.task)
    except (DataError, OutputError, ConfigError, CheckpointError) as err:
        error = error or str(err)
    runtime.agree(error, "setup")
    # Horovod: rank 0 chose the directory (its default holds a timestamp); everyone uses it.
    config = config.replace(output_dir=runtime.broadcast(output_dir, "output_dir"))
    hosts = runtime.allgather(runtime.host_name(), "host")
    if rt.simulated:  # every imagined rank on this host
        hosts = hosts * rt.size
    reading = splits.plan_lines(rt.size, config.shuffle_buffer) if splits.streamed else None
    plan = make_plan(config, splits.n_train, splits.n_val, splits.n_test, rt.size, rt.intra_op_threads, hosts,
                     reading)

    # 2. Consensus: same config, data, plan and versions on every rank, or nobody trains.
    consensus.check(consensus.fingerprint(config, splits, plan, runtime.versions()))
    return config, plan


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
            env["HOROVOD_AUTOTUNE_LOG"] = os.path.abspath(config.autotune_log or outputs.autotune_scratch())
    return env


def build_model(config: TrainConfig, splits: Splits, lr: float, model_fn: Optional[ModelFn]):
    """Local: the compiled model with its Horovod optimizer, whose slots already exist (so they
    can be restored and broadcast before the first step). Returns (model, optimizer)."""
    import horovod.tensorflow.keras as hvd

    tf.keras.utils.set_random_seed(config.seed)
    model = (model_fn or model_for(config))(splits.model_inputs, splits.n_outputs)
    # Horovod: gradients are averaged across ranks by ring-allreduce before every update.
    optimizer = hvd.DistributedOptimizer(
        make_optimizer(config, lr),
        # Horovod: optional fp16 on the wire, and local accumulation to allreduce less often.
        compression=hvd.Compression.fp16 if config.fp16_allreduce else hvd.Compression.none,
        backward_passes_per_step=config.backward_passes_per_step)
    _allreduce_as_written(optimizer)
    compile_model(model, optimizer, tasks.for_run(config, splits))
    optimizer._create_all_weights(model.trainable_variables)
    return model, optimizer


def _allreduce_as_written(optimizer) -> None:
    """Horovod: trace the optimizer's gradient allreduce without AutoGraph. Horovod makes it a
    tf.function, so Keras's first step converted Horovod's Python source statement by statement
    (about 1 s of every run's first step here, docs/testing.md); its branches are on Python
    values and its tf.cond explicit, so the traced graph is the same without the conversion."""
    # The optimizer calls it, or with --backward-passes-per-step > 1 its aggregation helper.
    for holder in (optimizer, getattr(optimizer, "_agg_helper", None)):
        allreduce = getattr(holder, "_allreduce_grads", None)
        if hasattr(allreduce, "python_function"):
            holder._allreduce_grads = tf.function(allreduce.python_function, autograph=False)


def _fit_evaluate_save(rt: runtime.Runtime, config: TrainConfig, plan: Plan, splits: Splits,
                       model_fn: Optional[ModelFn], user_callbacks: List[Any]) -> TrainResult:
    import horovod.tensorflow as hvd_tf

    # 3. Model and optimizer.
    model, optimizer = build_model(config, splits, plan.scaled_lr, model_fn)

    # 4. Resume: rank 0 picks and verifies the checkpoint and loads it; the others follow.
    resumed = checkpoint.resume(rt, config, plan, splits, model, optimizer)
    # Horovod: every rank starts from rank 0's weights and optimizer state (fresh or restored),
    # whatever model_fn did with randomness.
    hvd_tf.broadcast_variables(model.variables + optimizer.variables(), root_rank=0)

    # 5. The start of the run's outputs: every set-up check has passed on every rank, so rank 0
    # makes the output directory and starts the event log.
    log = EventLog(rt, config.output_dir)
    initial_epoch = resumed.initial_epoch(config.epochs)
    log.start(config=config.to_dict(), plan=asdict(plan), versions=runtime.versions(), initial_epoch=initial_epoch,
              **({"initial_position": resumed.position} if resumed.position else {}))
    if config.timeline:
        timeline = os.path.abspath(config.timeline)
        runtime.on_rank0(rt, os.makedirs, os.path.dirname(timeline), exist_ok=True)
        # Horovod: every rank turns recording on; rank 0, the coordinator, writes the file.
        hvd_tf.start_timeline(timeline)

    # 6. Train, from the first sample not yet trained to the requested total: the rest of an epoch
    # a stop interrupted (a fit of its own, fewer steps), then every remaining epoch.
    live_bar = progress_mode(config, rt) == "bar" and rt.is_rank0
    epoch, position, carried = initial_epoch, resumed.position, resumed.sums
    history, early_stopping, done = dict(resumed.history), resumed.early_stopping, resumed.stopped_early
    streamed = None
    start = time.perf_counter()
    try:
        with stopping.handlers():
            while epoch < config.epochs and not done:
                callbacks = run_callbacks(rt, config, plan, splits, model, log,
                                          checkpoint.ResumePoint(epoch=epoch, history=history,
                                                                 early_stopping=early_stopping, position=position,
                                                                 sums=carried),
                                          user_callbacks)
                if splits.streamed:  # a file dataset: this rank's batches streamed from the files
                    streamed = stream.TrainStream(splits, rt.rank, rt.size, config.batch_size, config.shuffle,
                                                  config.shuffle_buffer)
                    batches = streamed.dataset(epoch)
                    callbacks.insert(0, StreamGuard(streamed))
                else:
                    batches = ShardedBatches(splits.x_train, splits.y_train, rt.rank, rt.size, config.batch_size,
                                             config.seed, config.shuffle, epoch=epoch, position=position)
                fitted = model.fit(batches, epochs=epoch + 1 if position else config.epochs, initial_epoch=epoch,
                                   shuffle=False, steps_per_epoch=len(batches) if position else plan.steps_per_epoch,
                                   callbacks=callbacks, verbose=int(live_bar))
                if streamed is not None and streamed.error:  # ran out of data without an epoch end
                    raise stream.StreamError(streamed.error)
                history = _concat_history(history, fitted.history)
                epoch, position, carried = epoch + len(fitted.epoch), 0, None
                # Early stopping, pruning or a user's callback: every rank stopped after the same epoch.
                stopper = next((c for c in callbacks if isinstance(c, EarlyStopping)), None)
                early_stopping, done = (stopper.state if stopper else None), bool(model.stop_training)
    except stopping.Stopped as stop:
        log.emit("run_stopped", **stop.fields())
        raise
    except Exception as err:
        # A file that went bad mid-run: the rank that read it first stops, and the others see a
        # collective fail; every rank can tell why, and rank 0 says it (cli.py).
        problem = streamed and (streamed.error or streamed.check_files())
        if problem:
            log.emit("run_failed", error=problem)
            raise stream.StreamError(problem) from None
        log.emit("run_failed", error=f"{type(err).__name__}: {err}")
        raise
    train_seconds = time.perf_counter() - start
    epochs_trained = epoch - initial_epoch
    return finish(rt, config, plan, splits, model, model_fn, log, history, {
        "epochs_completed": epoch if epochs_trained else resumed.epoch,
        "epochs_trained_this_run": epochs_trained,
        "resumed_from_epoch": resumed.epoch if resumed.path else None,
        "stopped_early": done,
        "train_seconds": train_seconds,
        "samples_per_second": plan.train_samples * epochs_trained / train_seconds if epochs_trained else 0.0,
    })


_EPOCH_FACTS = ("epochs_completed", "epochs_trained_this_run", "resumed_from_epoch", "stopped_early")


def finish(rt: runtime.Runtime, config: TrainConfig, plan: Plan, splits: Splits, model, model_fn: Optional[ModelFn],
           log: EventLog, full_history: Dict[str, List[float]], facts: Dict[str, Any]) -> TrainResult:
    """Collective: after training, exact test metrics from replicas proven identical, then the
    outputs (rank 0) and the result. ``facts``: what the fit loop knows (epochs, time, ...)."""
    import horovod.tensorflow as hvd_tf

    # 7. Exact test metrics from identical replicas, and the proof that they are identical: the
    # non-trainable state (batch-norm statistics, ...) synced once more, every variable compared.
    replicas.sync_state(model)
    task = tasks.for_run(config, splits)
    test = metrics.evaluate(model, splits.eval_pieces("test", rt.rank, rt.size), task)
    report, points = task.report(test), None
    if config.regression:  # predicted-vs-true points for the plot, gathered from every rank's share
        points = task.to_units(metrics.gather_predictions(model, splits.eval_pieces("test", rt.rank, rt.size),
                                                          rt.size, tasks.PLOT_POINTS))
    weight_digests, differ = replicas.check(model)
    if config.timeline:
        hvd_tf.stop_timeline()  # Horovod: closes the file, on every rank
    if differ:  # the same verdict on every rank: all stop together, nothing written
        log.emit("run_failed", error=differ)
        raise runtime.AgreedFailure(differ)
    result_metrics = {
        "task": config.task,
        **{f"test_{k}": v for k, v in task.scores(test).items()},
        "test_samples": test["samples"],
        "world_size": rt.size,
        "global_batch_size": plan.global_batch_size,
        "scaled_lr": plan.scaled_lr,
        **{k: facts[k] for k in _EPOCH_FACTS},
        "steps_per_epoch": plan.steps_per_epoch,
        **{k: v for k, v in facts.items() if k not in _EPOCH_FACTS},  # time, throughput, elastic resets
        "replica_weight_digests": weight_digests,
        "replicas_identical": True,  # checked above, over every variable
    }
    for key in task.val_metrics:
        if full_history.get(key):
            result_metrics[key] = full_history[key][-1]

    # 8. Outputs, written once by rank 0.
    save_fn = model_fn or model_for(config, inference=True)  # ours saves plain Keras layers
    runtime.on_rank0(rt, outputs.write_run, config, plan, splits, task, model, save_fn, full_history,
                     result_metrics, report, points)
    log.finish({k: v for k, v in result_metrics.items() if k != "replica_weight_digests"})
    runtime.log(rt, f"{task.summary(test)} on {test['samples']} samples from {rt.size} process(es)")
    runtime.log(rt, f"outputs in {config.output_dir}")
    return TrainResult(output_dir=config.output_dir, metrics=result_metrics,
                       history=full_history, plan=plan, model=model)


def _concat_history(before: Dict[str, List[float]], after: Dict[str, List[float]]) -> Dict[str, List[float]]:
    keys = list(dict.fromkeys([*before, *after]))
    return {k: [float(v) for v in before.get(k, [])] + [float(v) for v in after.get(k, [])] for k in keys}
