"""What each benchmark process runs, under a launcher (or alone). One JSON result per run.

Usage: python -m hvd_train.tools.bench.workers TASK PARAMS_JSON RESULT_FILE

Tasks:
- ``hvd_train``: the real hvd_train.train() on the synthetic workload (an MLP on a synthetic
  table, or ``model: cnn``: the CNN on random images, as Horovod's
  tensorflow2_synthetic_benchmark); throughput from epoch timings taken on every rank (first
  epoch skipped: it traces the graph).
- ``keras``: plain Keras fit, no Horovod, on the same model and the same batches.
- ``mwms``: tf.distribute.MultiWorkerMirroredStrategy, one worker per process (TF_CONFIG).
- ``profile``: plain Keras and hvd_train alternated in one np=1 process, every epoch's time
  split into the step, each callback hook and the rest (profile.py).
- ``wire``: hvd.allreduce bandwidth over tensor sizes, with and without fp16 compression,
  and a single-threaded memory copy of the same sizes as the physical baseline.
Total throughput is sum(samples over ranks) / max(seconds over ranks): an allreduce of each
rank's count and time, not rank 0's figure times N.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Dict, List

import numpy as np

from ... import runtime, storage
from ...data.arrays import load_splits  # the data path train() uses, for the runs that bypass train()
from ...training.model import build, compile_model, make_optimizer, model_for
from ...training.tasks import for_run


class EpochTimer:
    """Keras callback factory: wall time of every epoch on this rank."""

    @staticmethod
    def make():
        import keras

        class _Timer(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.seconds: List[float] = []

            def on_epoch_begin(self, epoch, logs=None):
                self.start = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                self.seconds.append(time.perf_counter() - self.start)

        return _Timer()


def workload_config(p: Dict[str, Any], world_size: int):
    """The synthetic workload: ``steps`` steps per epoch of ``batch`` samples per process; an MLP
    on a synthetic table, or with ``model: cnn`` the CNN (``filters``) on images (workload_data)."""
    from ...config.options import TrainConfig

    test_fraction = 0.05
    train_samples = p["steps"] * p["batch"] * world_size * p.get("backward_passes_per_step", 1)
    # sklearn's split keeps ceil(fraction * n) for the test set: pick n so that exactly
    # train_samples remain, i.e. every step is a full batch (no 1-sample tail step).
    samples = train_samples
    while samples - int(np.ceil(test_fraction * samples)) < train_samples:
        samples += 1
    model = {"model": "cnn", "filters": tuple(p["filters"])} if p.get("model") == "cnn" else \
        {"hidden": tuple(p["hidden"]), "features": p["features"]}
    return TrainConfig(
        dataset="synthetic", samples=samples, classes=p["classes"], **model, epochs=p["epochs"],
        batch_size=p["batch"], lr=0.001,
        warmup_epochs=0, val_fraction=0.0, test_fraction=test_fraction, threads=p["threads"],
        fp16_allreduce=p.get("fp16_allreduce", False),
        backward_passes_per_step=p.get("backward_passes_per_step", 1),
        precision=p.get("precision", "float32"),
        output_dir=p["output_dir"], progress="none", seed=p.get("seed", 1),
        pin_cores=p.get("pin_cores", True), timeline=p.get("timeline"),
    )


def workload_data(p: Dict[str, Any], config):
    """The CNN workload's data, as Horovod's synthetic benchmark has it: random images (``image``:
    height, width, channels) and random labels, the same on every rank (seeded); None for the MLP,
    whose table is config.dataset."""
    if p.get("model") != "cnn":
        return None
    rng = np.random.default_rng(config.seed)
    x = rng.normal(size=(config.samples, *p["image"])).astype(np.float32)
    return x, rng.integers(0, config.classes, size=config.samples)


def _combine(samples_per_epoch: int, seconds: List[float]) -> Dict[str, float]:
    """Collective: total samples/s over all ranks, the job as slow as its slowest rank."""
    import horovod.tensorflow as hvd

    timed = seconds[1:] or seconds  # the first epoch traces and warms up
    local = np.array([samples_per_epoch * len(timed), sum(timed)], np.float64)
    # Horovod: every rank's count summed, every rank's time maxed: no rank-0-times-N shortcut.
    count = hvd.allreduce(local[:1], op=hvd.Sum, name="bench.count").numpy()[0]
    slowest = hvd.allreduce(local[1:], op=hvd.Max, name="bench.time").numpy()[0]
    return {"samples_per_second": count / slowest, "seconds": slowest, "samples": count}


def run_hvd_train(p: Dict[str, Any]) -> Dict[str, Any]:
    import horovod.tensorflow as hvd

    from ...training.session import horovod_env
    from ...training.trainer import train

    # Horovod settings train() would put in place before hvd.init() (the timeline), which runs here first.
    os.environ.update(horovod_env(workload_config(p, 1)))
    hvd.init()
    timer = EpochTimer.make()
    config = workload_config(p, hvd.size())
    result = train(config, data=workload_data(p, config), callbacks=[timer])
    samples = result.plan.train_samples_per_rank[hvd.rank()]
    out = _combine(samples, timer.seconds)
    out.update(world_size=hvd.size(), test_accuracy=result.metrics["test_accuracy"],
               train_samples=result.plan.train_samples,
               steps_per_epoch=result.plan.steps_per_epoch, epoch_seconds=timer.seconds)
    if p.get("measure_input"):
        out["input_ms"] = _input_ms(p, config, hvd.rank(), hvd.size())
    return out


def _input_ms(p: Dict[str, Any], config, rank: int, size: int) -> float:
    """Milliseconds to take one of this rank's batches from the input pipeline alone (what
    tf.data's thread does per step, beside the step)."""
    from ...data.pipeline import ShardedBatches, sharded_dataset

    splits = load_splits(config, workload_data(p, config))
    batches = ShardedBatches(splits.x_train, splits.y_train, rank, size, config.batch_size, config.seed,
                             config.shuffle)
    fed = iter(sharded_dataset(batches))
    next(fed)  # builds the pipeline
    start = time.perf_counter()
    for _ in range(len(batches)):
        next(fed)
    return 1e3 * (time.perf_counter() - start) / len(batches)


def fit_keras(config, splits, callbacks: List[Any], sequence: bool = False) -> None:
    """Plain Keras on one process: the same model, batches, input pipeline and optimizer, without
    Horovod. ``sequence``: the batches through a keras.utils.Sequence instead (Keras's enqueuer:
    what hvd_train's input was before its tf.data pipeline)."""

    from ...data.pipeline import ShardedBatches, sharded_dataset

    model = build(model_for(config), splits.model_inputs, splits.n_outputs, config.precision, seed=config.seed)
    compile_model(model, make_optimizer(config, config.lr), for_run(config, splits))
    batches = ShardedBatches(splits.x_train, splits.y_train, 0, 1, config.batch_size, config.seed, config.shuffle)
    if sequence:
        model.fit(_as_sequence(batches), epochs=config.epochs, shuffle=False, callbacks=callbacks, verbose=0)
    else:
        model.fit(sharded_dataset(batches), epochs=config.epochs, steps_per_epoch=len(batches), shuffle=False,
                  callbacks=callbacks, verbose=0)


def _as_sequence(batches):
    import keras

    class Batches(keras.utils.Sequence):
        def __len__(self):
            return len(batches)

        def __getitem__(self, step):
            return batches[step]

        def on_epoch_end(self):
            batches.set_epoch(batches.epoch + 1)

    return Batches()


def run_keras(p: Dict[str, Any]) -> Dict[str, Any]:
    """fit_keras on the workload, timed by epoch."""
    runtime.set_threads(p["threads"])
    config = workload_config(p, 1)
    splits = load_splits(config, workload_data(p, config))
    timer = EpochTimer.make()
    fit_keras(config, splits, [timer])
    timed = timer.seconds[1:] or timer.seconds
    n = len(splits.y_train)
    return {"samples_per_second": n * len(timed) / sum(timed), "seconds": sum(timed), "samples": n * len(timed),
            "world_size": 1, "epoch_seconds": timer.seconds}


def run_mwms(p: Dict[str, Any]) -> Dict[str, Any]:
    """MultiWorkerMirroredStrategy: TF_CONFIG names the workers; same model and global batch."""
    import tensorflow as tf

    runtime.set_threads(p["threads"])
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    workers = strategy.num_replicas_in_sync
    config = workload_config(p, workers)
    splits = load_splits(config, workload_data(p, config))
    global_batch = config.batch_size * workers
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    dataset = (tf.data.Dataset.from_tensor_slices((splits.x_train, splits.y_train))
               .batch(global_batch, drop_remainder=True).with_options(options).prefetch(2))
    with strategy.scope():
        model = build(model_for(config), splits.model_inputs, splits.n_outputs, config.precision, seed=config.seed)
        compile_model(model, make_optimizer(config, config.lr), for_run(config, splits))
    timer = EpochTimer.make()
    model.fit(dataset, epochs=config.epochs, callbacks=[timer], verbose=0)
    timed = timer.seconds[1:] or timer.seconds
    steps = len(splits.y_train) // global_batch
    total = steps * global_batch * len(timed)
    seconds = sum(timed)
    return {"samples_per_second": total / seconds, "seconds": seconds, "samples": total,
            "world_size": workers, "epoch_seconds": timer.seconds}


def run_wire(p: Dict[str, Any]) -> Dict[str, Any]:
    import horovod.tensorflow as hvd
    import tensorflow as tf

    hvd.init()
    n = hvd.size()
    rows = []
    for size in p["sizes"]:
        x = tf.constant(np.ones(size // 4, np.float32))
        for compression in ("none", "fp16"):
            comp = hvd.Compression.fp16 if compression == "fp16" else hvd.Compression.none
            name = f"wire.{size}.{compression}"
            for _ in range(2):  # warm up: negotiation, buffers
                hvd.allreduce(x, op=hvd.Sum, compression=comp, name=name)
            # Rank 0 sizes the timed loop from a probe, so every rank runs the same iterations and
            # no extra collective sits inside the timed loop.
            start = time.perf_counter()
            hvd.allreduce(x, op=hvd.Sum, compression=comp, name=name)
            probe = time.perf_counter() - start
            iters = hvd.broadcast_object(max(p["min_iters"], int(p["min_seconds"] / max(probe, 1e-6))),
                                         root_rank=0, name=f"{name}.iters")
            start = time.perf_counter()
            for _ in range(iters):
                hvd.allreduce(x, op=hvd.Sum, compression=comp, name=name)
            seconds = hvd.allreduce(np.array([(time.perf_counter() - start) / iters]), op=hvd.Max,
                                    name=f"{name}.t").numpy()[0]
            # Bus bandwidth (NCCL-tests' convention): what each link carries in a ring allreduce.
            rows.append({"bytes": size, "compression": compression, "seconds": seconds,
                         "bus_gbps": size * 2 * (n - 1) / n / seconds / 1e9 if n > 1 else 0.0,
                         "algo_gbps": size / seconds / 1e9})
    copies = []
    for size in p["sizes"]:
        src, dst = np.ones(size // 4, np.float32), np.empty(size // 4, np.float32)
        iters, start = 0, time.perf_counter()
        while iters < p["min_iters"] or time.perf_counter() - start < p["min_seconds"] / 2:
            np.copyto(dst, src)
            iters += 1
        seconds = (time.perf_counter() - start) / iters
        copies.append({"bytes": size, "seconds": seconds, "gbps": size / seconds / 1e9})
    return {"world_size": n, "allreduce": rows, "memcpy": copies}


def run_profile(p: Dict[str, Any]) -> Dict[str, Any]:
    """In one np=1 process: ``repeats`` x (fit_keras, hvd_train.train()) on the workload, each
    epoch cut into its parts (profile.py)."""
    import horovod.tensorflow as hvd

    from ...training import loop
    from ...training.trainer import train
    from .profile import Clock, boundaries, summarize, time_hooks, time_steps

    hvd.init()
    runtime.set_threads(p["threads"])
    config = workload_config(p, 1)
    data = workload_data(p, config)
    splits = load_splits(config, data)
    clock = Clock()
    undo = time_steps(clock)
    run_callbacks = loop.run_callbacks
    # hvd_train's callbacks, each hook timed where it is (the loop's own list, unchanged).
    loop.run_callbacks = lambda *a, **k: time_hooks(run_callbacks(*a, **k), clock)
    variants = {"keras_sequence": lambda: fit_keras(config, splits, [boundaries(clock)], sequence=True),
                "keras": lambda: fit_keras(config, splits, [boundaries(clock)]),
                "hvd_train": lambda: train(config, data=data, callbacks=[boundaries(clock)])}
    runs: Dict[str, List[List[Dict[str, float]]]] = {name: [] for name in variants}
    try:
        for _ in range(p["repeats"]):
            for name, fit in variants.items():
                clock.reset()
                fit()
                runs[name].append(clock.epochs[1:])  # the first epoch traces the graph
    finally:
        undo()
        loop.run_callbacks = run_callbacks
    return {"steps_per_epoch": p["steps"], "batch": p["batch"], "repeats": p["repeats"], "epochs": p["epochs"],
            "variants": {name: summarize(epochs, p["steps"]) for name, epochs in runs.items()}}


TASKS = {"hvd_train": run_hvd_train, "keras": run_keras, "mwms": run_mwms, "wire": run_wire, "profile": run_profile}


def main(argv=None) -> int:
    task, params, result_file = (argv or sys.argv[1:])[:3]
    p = json.loads(params)
    result = TASKS[task](p)
    # MultiWorkerMirroredStrategy's workers have no launcher: TF_CONFIG numbers them.
    rank = json.loads(os.environ["TF_CONFIG"])["task"]["index"] if task == "mwms" else runtime.launcher_rank()
    if rank == 0:
        storage.write_text(result_file, json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
