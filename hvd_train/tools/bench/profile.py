"""hvd-bench section ``profile``: where an epoch's time goes in hvd_train against plain Keras, at np=1.

One process (launched as ``hvd-horovodrun -np 1``, so Horovod's world is real; workers.py's
run_profile) runs the same workload repeatedly, plain Keras and hvd_train.train() alternated,
and times with the tools here, per epoch after the first (which traces the graph):

- the epoch: from one epoch's begin to the next's (or the fit's end), so every epoch-end hook of
  every callback is inside it;
- the step: the time inside Keras's train function (the compiled step, and the input it pulls);
- each callback hook (hvd_train's own, by class and hook), timed in place, and only the hooks a
  callback already has, so Keras calls the same hooks as without the profile (a batch hook
  makes Keras turn the step's logs into numbers after every batch);
- the rest: the epoch minus the step minus the hooks (Keras's own loop, the input's queue).

The variants run in the same process, with the same threads, data, model, batches and input
pipeline (data/pipeline.py's tf.data), so the difference is hvd_train's: its optimizer wrapper
(Horovod's DistributedOptimizer at np=1) and its callbacks. A third variant, plain Keras fed the
same batches through a keras.utils.Sequence, measures what the input pipeline changed. The
medians over the repeats are the breakdown docs/performance.md reports.
"""
from __future__ import annotations

import statistics
import time
from collections import defaultdict
from typing import Any, Callable, Dict, List, Optional

HOOKS = ("on_epoch_begin", "on_epoch_end", "on_train_batch_begin", "on_train_batch_end", "on_batch_begin",
         "on_batch_end", "on_train_begin", "on_train_end", "on_test_begin", "on_test_end", "on_test_batch_end")


class Clock:
    """Per-epoch seconds: the step function, each timed hook; the epoch boundaries."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        """A new fit: no epochs yet."""
        self.epochs: List[Dict[str, float]] = []
        self.current: Dict[str, float] = defaultdict(float)
        self.mark = None

    def add(self, key: str, seconds: float) -> None:
        self.current[key] += seconds

    def boundary(self) -> None:
        """An epoch begins (or the fit ends): close the epoch that was running."""
        now = time.perf_counter()
        if self.mark is not None:
            self.epochs.append({**self.current, "epoch": now - self.mark})
        self.current, self.mark = defaultdict(float), now


def _timed(method: Callable, clock: Clock, key: str) -> Callable:
    def hook(*args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            clock.add(key, time.perf_counter() - start)

    return hook


def time_hooks(callbacks: List[Any], clock: Clock) -> List[Any]:
    """Time each hook a callback overrides (Keras's defaults carry ``_is_default``), in place."""
    for cb in callbacks:
        if getattr(cb, "profiler", False):  # the profile's own
            continue
        for name in HOOKS:
            method = getattr(cb, name, None)
            if method is not None and not getattr(method, "_is_default", False):
                setattr(cb, name, _timed(method, clock, f"{type(cb).__name__}.{name}"))
    return callbacks


def boundaries(clock: Clock):
    """A Keras callback (no batch hooks) that marks epoch boundaries."""
    import keras

    class Boundaries(keras.callbacks.Callback):
        profiler = True

        def on_epoch_begin(self, epoch, logs=None):
            clock.boundary()

        def on_train_end(self, logs=None):
            clock.boundary()

    return Boundaries()


def time_steps(clock: Clock) -> Callable[[], None]:
    """Every model's train function timed (the step); returns the undo."""
    import keras

    original = keras.Model.make_train_function

    def make_train_function(model, force=False):
        original(model, force)
        fn = model.train_function  # Keras 3 sets it (and returns nothing when it makes one)
        if getattr(fn, "_profiled", False):
            return fn
        timed = _timed(fn, clock, "step")
        timed._profiled = True
        model.train_function = timed
        return timed

    keras.Model.make_train_function = make_train_function
    return lambda: setattr(keras.Model, "make_train_function", original)


def summarize(repeats: List[List[Dict[str, float]]], steps: int) -> Dict[str, Any]:
    """Milliseconds per epoch: the median over repeats of each repeat's mean over its epochs."""
    def per_repeat(key: str) -> List[float]:
        return [1e3 * statistics.mean(e.get(key, 0.0) for e in epochs) for epochs in repeats if epochs]

    keys = sorted({k for epochs in repeats for e in epochs for k in e} - {"epoch", "step"})
    epoch = statistics.median(per_repeat("epoch"))
    step = statistics.median(per_repeat("step"))
    hooks = {k: statistics.median(per_repeat(k)) for k in keys}
    return {"epoch_ms": epoch, "step_ms": step / steps, "steps_ms": step, "hooks_ms": hooks,
            "rest_ms": epoch - step - sum(hooks.values()),
            "epochs_ms_per_repeat": per_repeat("epoch")}


def profile_section(runner, p: Dict[str, Any], cnn: Dict[str, Any], repeats: int, log,
                    epochs: Optional[int] = None) -> Dict[str, Any]:
    """The MLP and the CNN workloads, each in its own np=1 process; ``epochs`` per run (more
    timed epochs per repeat than the scaling section's, for a steadier split)."""
    out = {}
    for name, workload in (("mlp", p), ("cnn", {**p, **cnn})):
        workload = {**workload, "threads": 1, "repeats": repeats, "epochs": epochs or workload["epochs"]}
        result = runner.horovod("profile", 1, workload)
        keras, ours = result["variants"]["keras"], result["variants"]["hvd_train"]
        sequence = result["variants"]["keras_sequence"]
        result["overhead"] = ours["epoch_ms"] / keras["epoch_ms"] - 1
        result["tf_data_gain"] = sequence["epoch_ms"] / keras["epoch_ms"] - 1
        out[name] = result
        log(f"profile {name}: epoch {keras['epoch_ms']:.1f} ms Keras, {ours['epoch_ms']:.1f} ms hvd_train "
            f"({result['overhead']:+.1%}); step {keras['step_ms']:.2f} vs {ours['step_ms']:.2f} ms; "
            f"Keras through a Sequence {sequence['epoch_ms']:.1f} ms")
    return out


def lines(r: Dict[str, Any]) -> List[str]:
    """results.md: the profile tables."""
    out = ["## Profile: an epoch at np=1, hvd_train against plain Keras (ms per epoch, medians)", "",
           "Plain Keras is fed by the same tf.data pipeline as hvd_train; \"Keras, Sequence\" is plain Keras "
           "fed the same batches through a keras.utils.Sequence (Keras's enqueuer).", ""]
    for name, result in r.items():
        variants = result["variants"]
        keras, ours = variants["keras"], variants["hvd_train"]
        sequence = variants.get("keras_sequence", {"epoch_ms": float("nan"), "steps_ms": float("nan"),
                                                   "rest_ms": float("nan"), "hooks_ms": {}})
        out += [f"{name.upper()}: {result['steps_per_epoch']} steps of {result['batch']} per epoch, "
                f"{result['epochs'] - 1} timed epochs per run, {result['repeats']} interleaved repeats; overhead "
                f"{result['overhead']:+.1%}", "",
                "| part | Keras, Sequence | plain Keras | hvd_train | hvd_train - Keras |",
                "|---|---:|---:|---:|---:|"]
        rows = [("epoch", sequence["epoch_ms"], keras["epoch_ms"], ours["epoch_ms"]),
                ("steps (train function)", sequence["steps_ms"], keras["steps_ms"], ours["steps_ms"]),
                ("rest (Keras loop, input queue)", sequence["rest_ms"], keras["rest_ms"], ours["rest_ms"])]
        hooks = set(keras["hooks_ms"]) | set(ours["hooks_ms"])
        rows += [(hook, sequence["hooks_ms"].get(hook, 0.0), keras["hooks_ms"].get(hook, 0.0),
                  ours["hooks_ms"].get(hook, 0.0)) for hook in sorted(hooks)
                 if max(keras["hooks_ms"].get(hook, 0.0), ours["hooks_ms"].get(hook, 0.0)) >= 0.005]
        out += [f"| {part} | {s:.2f} | {a:.2f} | {b:.2f} | {b - a:+.2f} |" for part, s, a, b in rows] + [""]
    return out
