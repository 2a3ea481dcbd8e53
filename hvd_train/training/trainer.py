"""The training flow, top to bottom: Horovod up, data agreed, model built, fit, exact metrics, outputs.

Python API::

    from hvd_train import TrainConfig, train
    result = train(TrainConfig(epochs=20), data=(x, y), model_fn=my_builder)

Run it under a launcher (``horovodrun -np 2 python my_script.py``); every rank calls ``train``.
An elastic launch goes to elastic.py. Where each step's details live: session.py (set-up checks
and agreement, the model, the final metrics and outputs, for plain and elastic runs alike),
../data (arrays and files behind one interface, who trains on what), checkpoint.py (resume),
loop.py (the epoch loop, the one model.fit), callbacks.py (per-epoch work, in order),
metrics.py (exact global numbers), ../outputs (the run directory).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import asdict
from typing import Any, List, Optional

from .. import runtime, watchdog
from ..config.options import ConfigError, TrainConfig
from ..config.plan import Plan, report, report_lines
from ..data.arrays import DataArg
from ..data.interface import Dataset
from ..outputs.events import EventLog
from . import checkpoint, distributed, elastic, loop, tasks
from .context import RunContext
from .model import ModelFn
from .session import TrainResult, build_model, finish, horovod_env, prepare


def train(config: TrainConfig, data: DataArg = None, model_fn: Optional[ModelFn] = None,
          callbacks: Optional[List[Any]] = None) -> TrainResult:
    """Train on every rank of the current launch; rank 0 writes the outputs. See module doc.

    ``callbacks`` (extra Keras callbacks) run on every rank after hvd_train's own, so they see
    metrics already combined over ranks. Keep rank-0-only side effects behind ``hvd.rank() == 0``
    and never put a collective there.
    """
    if elastic.launched():
        # Horovod: an elastic launch; the world may change mid-run (elastic.py). No core pinning:
        # a process's share of the cores changes with the world.
        rt = runtime.init(config.threads, config.verbose_ranks, horovod_env(config))
        try:
            return elastic.train(rt, config, data, model_fn, list(callbacks or []))
        finally:
            watchdog.stop()
    rt = runtime.init(config.threads, config.verbose_ranks, horovod_env(config), pin_cores=config.pin_cores)
    # Horovod: a rank that stops answering ends the job with one message naming it (watchdog.py).
    watchdog.start(rt.rank, rt.size, config.stall_timeout, runtime.host_name())
    try:
        return _train(rt, config, data, model_fn, callbacks)
    finally:
        watchdog.stop()


def _train(rt: runtime.Runtime, config: TrainConfig, data: DataArg, model_fn: Optional[ModelFn],
           callbacks: Optional[List[Any]]) -> TrainResult:
    config, splits, plan = prepare(rt, config, data)
    for line in plan.lines():
        runtime.log(rt, line)
    runtime.log(rt, tasks.describe(config, splits, model_fn))
    if rt.cores:
        runtime.log(rt, f"each process bound to its own {len(rt.cores)} core(s) (rank 0: cores "
                        f"{','.join(map(str, rt.cores))}); --no-pin-cores leaves them floating")
    return _run(rt, config, plan, splits, model_fn, list(callbacks or []))


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


def _run(rt: runtime.Runtime, config: TrainConfig, plan: Plan, splits: Dataset,
         model_fn: Optional[ModelFn], user_callbacks: List[Any]) -> TrainResult:
    import horovod.tensorflow as hvd_tf

    # 3. Model and optimizer (its state created, so it can be restored and broadcast).
    model, optimizer, scorer = build_model(config, splits, plan.scaled_lr, model_fn)

    # 4. Resume: rank 0 picks and verifies the checkpoint and loads it; the others follow.
    resumed = checkpoint.resume(rt, config, plan, splits, model, optimizer)
    # Horovod: every rank starts from rank 0's weights and optimizer state (fresh or restored),
    # whatever model_fn did with randomness; each rank then draws its own dropout masks.
    distributed.broadcast(model, optimizer)

    # 5. The start of the run's outputs: every set-up check has passed on every rank, so rank 0
    # makes the output directory and starts the event log.
    log = EventLog(rt, config.output_dir)
    watchdog.on_verdict(lambda message: log.emit("run_failed", error=message))
    initial_epoch = resumed.initial_epoch(config.epochs)
    log.start(config=config.to_dict(), plan=asdict(plan), versions=runtime.versions(), initial_epoch=initial_epoch,
              **({"initial_position": resumed.position} if resumed.position else {}))
    if config.timeline:
        timeline = os.path.abspath(config.timeline)
        runtime.on_rank0(rt, os.makedirs, os.path.dirname(timeline), exist_ok=True)
        # Horovod: every rank turns recording on; rank 0, the coordinator, writes the file.
        hvd_tf.start_timeline(timeline)
    run = RunContext(rt=rt, config=config, plan=plan, data=splits, model=model, optimizer=optimizer, log=log,
                     model_fn=model_fn, user_callbacks=tuple(user_callbacks), scorer=scorer)

    # 6. Train, from the first sample not yet trained to the requested total (loop.py).
    start = time.perf_counter()
    end = loop.fit_epochs(run, dataclasses.replace(resumed, epoch=initial_epoch))
    train_seconds = time.perf_counter() - start
    epochs_trained = end.epoch - initial_epoch
    return finish(run, end.history, {
        "epochs_completed": end.epoch if epochs_trained else resumed.epoch,
        "epochs_trained_this_run": epochs_trained,
        "resumed_from_epoch": resumed.epoch if resumed.path else None,
        "stopped_early": end.stopped_early,
        "train_seconds": train_seconds,
        "samples_per_second": plan.train_samples * epochs_trained / train_seconds if epochs_trained else 0.0,
    })
