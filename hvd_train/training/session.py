"""What every run does before and after its epoch loop, plain or elastic.

Before: the data loaded and checked on every rank, agreed, the plan for this world, the
consensus check (``prepare``, ``settle``); the model with its Horovod optimizer (``build_model``).
The run's context (context.RunContext) is made from these by trainer.py and elastic.py.
After: exact test metrics from replicas proven identical, then the outputs (``finish``).
trainer.py (a plain run) and elastic.py (an elastic one) call these around loop.fit_epochs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from .. import runtime, watchdog
from ..config.options import ConfigError, TrainConfig
from ..config.plan import Plan, make_plan
from ..data import formats, stream
from ..data.arrays import DataArg, load_splits
from ..data.interface import DataError, Dataset, check_splits
from ..outputs import run_dir
from ..outputs.run_dir import OutputError
from . import checkpoint, consensus, distributed, metrics, pruning, replicas, tasks
from . import model as model_lib
from .checkpoint import CheckpointError
from .context import RunContext
from .model import ModelFn, check_inputs, compile_model, make_optimizer, model_for


@dataclass(frozen=True)
class TrainResult:
    output_dir: str
    metrics: Dict[str, Any]
    history: Dict[str, List[float]]
    plan: Plan
    model: Any  # the trained keras.Model (identical on every rank)


def streamed(config: TrainConfig, data: DataArg) -> bool:
    """Whether the run reads a file dataset in per-rank shares, whose facts pass (stream.load) is
    collective; otherwise every rank loads the data itself (load_splits)."""
    return data is None and formats.is_file_source(config.dataset)


def prepare(rt: runtime.Runtime, config: TrainConfig, data: DataArg) -> Tuple[TrainConfig, Dataset, Plan]:
    """Collective: load and check the data and directories on every rank, agree, plan, check consensus."""
    splits, error = None, None
    try:
        if streamed(config, data):
            # Collective (each rank reads its share); a failure anywhere raises on every rank.
            splits = stream.load(config, *((0, 1) if rt.simulated else (rt.rank, rt.size)), runtime.host_name())
        else:
            splits = load_splits(config, data)
    except (DataError, ConfigError) as err:
        error = str(err)
    config, plan = settle(rt, config, splits, error)
    return config, splits, plan


def settle(rt: runtime.Runtime, config: TrainConfig, splits: Optional[Dataset],
           error: Optional[str]) -> Tuple[TrainConfig, Plan]:
    """Collective: every rank's data (or its loading ``error``) and directories checked and
    agreed, then the plan for this world and the consensus check. Returns the config with rank
    0's output directory, and the plan."""
    # 1. Data, output and checkpoint directories. A failure on any rank stops every rank with one message.
    output_dir = None
    try:
        if error is None and splits.n_train < rt.size:
            raise DataError(f"{splits.n_train} training samples are fewer than the {rt.size} processes")
        error = error or check_splits(splits, config.val_fraction, config.test_fraction)
        error = error or check_inputs(config, splits.input_shape, config.dataset)
        output_dir = runtime.on_rank0(rt, run_dir.check_dir, config.output_dir)
        for path in filter(None, (config.timeline, config.autotune_log)):
            runtime.on_rank0(rt, run_dir.check_file, path)
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
    reading = splits.plan_lines(rt.size, config.shuffle_buffer)  # file datasets: who reads what
    plan = make_plan(config, splits.n_train, splits.n_val, splits.n_test, rt.size, rt.intra_op_threads, hosts,
                     reading, dict(zip(splits.class_names, splits.class_counts())))

    # 2. Consensus: same config, data, plan and versions on every rank, or nobody trains.
    consensus.check(consensus.fingerprint(config, splits, plan, runtime.versions()))
    return config, plan


def horovod_env(config: TrainConfig) -> Dict[str, str]:
    """Horovod settings that must be in the environment before hvd.init() (this rank's)."""
    # Horovod: its stall inspector warns, then shuts down, at the watchdog's limit (watchdog.py).
    env = watchdog.horovod_env(config.stall_timeout, elastic=os.environ.get("HOROVOD_ELASTIC") == "1")
    if config.timeline:
        # Horovod: a timeline started later (hvd.start_timeline), once the set-up checks have passed.
        env["HOROVOD_TIMELINE"] = "DYNAMIC"
    if config.autotune:
        # Horovod: Bayesian search of fusion threshold, cycle time, ... while training.
        env["HOROVOD_AUTOTUNE"] = "1"
        if runtime.launcher_rank() == 0:  # one writer for the log, rank 0
            env["HOROVOD_AUTOTUNE_LOG"] = os.path.abspath(config.autotune_log or run_dir.autotune_scratch())
    return env


def build_model(config: TrainConfig, splits: Dataset, lr: float, model_fn: Optional[ModelFn]):
    """Local: the compiled model with its Horovod optimizer, whose state already exists (so it can
    be restored and broadcast before the first step), and under a mixed precision policy a
    float32 twin for evaluation. Returns (model, optimizer, scorer or None). ConfigError if
    ``model_fn``'s model cannot be trained (the same on every rank)."""
    model = model_lib.build(model_fn or model_for(config), splits.model_inputs, splits.n_outputs,
                            config.precision, seed=config.seed)
    # Horovod: gradients are averaged across ranks by ring-allreduce before every update.
    optimizer = model_lib.distributed_optimizer(config, lr)
    try:
        compile_model(model, optimizer, tasks.for_run(config, splits))
        optimizer.build(model.trainable_variables)
    except Exception as err:  # noqa: BLE001 - Keras's own error from compile, said once before training
        raise ConfigError(f"the model cannot be compiled for this run: {model_lib.first_line(err)}") from None
    scorer = None
    if config.precision != "float32":
        scorer = model_lib.build(model_fn or model_for(config, inference=True), splits.model_inputs,
                                 splits.n_outputs, "float32")
    return model, optimizer, scorer


_EPOCH_FACTS = ("epochs_completed", "epochs_trained_this_run", "resumed_from_epoch", "stopped_early")


def finish(run: RunContext, full_history: Dict[str, List[float]], facts: Dict[str, Any]) -> TrainResult:
    """Collective: after training, exact test metrics from replicas proven identical, then the
    outputs (rank 0) and the result. ``facts``: what the fit loop knows (epochs, time, ...)."""
    import horovod.tensorflow as hvd_tf

    rt, config, plan, splits, model = run.rt, run.config, run.plan, run.data, run.model
    # 7. Exact test metrics from identical replicas, and the proof that they are identical: the
    # non-trainable state (batch-norm statistics, ...) synced once more, every variable compared.
    distributed.sync_state(model)
    task = run.task
    scorer = run.scoring_model()
    test = metrics.evaluate(scorer, splits.eval_pieces("test", rt.rank, rt.size), task)
    report, points = task.report(test), None
    if config.regression:  # predicted-vs-true points for the plot, gathered from every rank's share
        points = task.to_units(metrics.gather_predictions(scorer, splits.eval_pieces("test", rt.rank, rt.size),
                                                          rt.size, tasks.PLOT_POINTS))
    weight_digests, differ = replicas.check(model)
    if config.timeline:
        hvd_tf.stop_timeline()  # Horovod: closes the file, on every rank
    if differ:  # the same verdict on every rank: all stop together, nothing written
        run.log.emit("run_failed", error=differ)
        raise runtime.AgreedFailure(differ)
    result_metrics = {
        "task": config.task,
        **{f"test_{k}": v for k, v in task.scores(test).items()},
        "test_samples": test["samples"],
        "world_size": rt.size,
        "global_batch_size": plan.global_batch_size,
        "scaled_lr": plan.scaled_lr,
        "precision": config.precision,
        **{k: facts[k] for k in _EPOCH_FACTS},
        "steps_per_epoch": plan.steps_per_epoch,
        **{k: v for k, v in facts.items() if k not in _EPOCH_FACTS},  # time, throughput, elastic resets
        "replica_weight_digests": weight_digests,
        "replicas_identical": True,  # checked above, over every variable
    }
    for key in task.val_metrics:
        if full_history.get(key):
            result_metrics[key] = full_history[key][-1]

    # 8. Outputs, written once by rank 0; a file it cannot write (a full disk, a folder gone)
    # fails every rank with one message naming it (the run is then without metrics.json).
    error = runtime.on_rank0(rt, _write_outputs, run, full_history, result_metrics, report, points)
    if error:
        run.log.emit("run_failed", error=error)
    runtime.agree(error, "outputs")
    run.log.finish({k: v for k, v in result_metrics.items() if k != "replica_weight_digests"})
    runtime.log(rt, f"{task.summary(test)} on {test['samples']} samples from {rt.size} process(es)")
    runtime.log(rt, f"outputs in {config.output_dir}")
    return TrainResult(output_dir=config.output_dir, metrics=result_metrics,
                       history=full_history, plan=plan, model=model)


def saved_model(run: RunContext):
    """The model a run saves: the trained weights in a plain float32 copy (hvd_train's own model
    with plain Keras layers, or the user's model_fn again), compiled with a plain optimizer, so
    ``keras.models.load_model`` opens it without Horovod or hvd_train."""
    config, data = run.config, run.data
    with model_lib.names_kept():  # rank 0 alone builds it: the ranks' next models keep matching names
        clean = model_lib.build(run.model_fn or model_for(config, inference=True), data.model_inputs,
                                data.n_outputs, "float32")
        clean.set_weights(run.model.get_weights())
        compile_model(clean, make_optimizer(config.replace(precision="float32"), run.plan.scaled_lr), run.task,
                      exact_loss=False)
        clean.optimizer.build(clean.trainable_variables)  # its (fresh) state saved too: loads without a warning
    return clean


def _write_outputs(run: RunContext, history, result_metrics, report, points) -> Optional[str]:
    """Rank 0 only: the run directory's files (outputs/run_dir.py), with the model to save; the
    error if one could not be written."""
    try:
        run_dir.write_run(run, saved_model(run), history, result_metrics, report, points)
    except OutputError as err:
        return str(err)
    return None
