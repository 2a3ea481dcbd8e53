"""The epoch loop: the one place a run calls model.fit, plain or elastic.

From a starting point (epoch, position into its order, the carried metric sums, the history
so far) to the requested number of epochs: the rest of an epoch a stop or an elastic reset
interrupted (a fit of its own, with that rest's number of steps), then every remaining epoch.
What it trains on comes from the data interface (``run.data.train_feed``: arrays or files alike);
what happens around each epoch, from the callbacks (callbacks.run_callbacks), with the run
context's ``extra_callbacks`` at the end (an elastic run's commit). It logs a stop or a failure
to the event log and re-raises; errors the context calls resets (elastic) pass through unlogged.
"""
from __future__ import annotations

import weakref
from typing import Dict, List

from .. import runtime
from ..config.plan import execution_steps
from ..data.interface import StreamError
from . import stopping
from .callbacks import EarlyStopping, FeedGuard, progress_mode, run_callbacks
from .checkpoint import ResumePoint
from .context import RunContext


def fit_epochs(run: RunContext, start: ResumePoint) -> ResumePoint:
    """Collective: train from ``start`` (its ``epoch`` is the first to train, ``stopped_early``
    means nothing is left) until the last epoch or an early stop; returns where training ended."""
    config, model = run.config, run.model
    live_bar = progress_mode(config, run.rt) == "bar" and run.rt.is_rank0
    point, feed = start, None
    try:
        with stopping.handlers():
            while point.epoch < config.epochs and not point.stopped_early:
                callbacks = run_callbacks(run, point)
                stopper = next((c for c in callbacks if isinstance(c, EarlyStopping)), None)
                callbacks += run.extra_callbacks(stopper)
                feed = run.data.train_feed(run.rt.rank, run.rt.size, config, point.epoch, point.position)
                whole = not point.position  # else the rest of one epoch, alone
                steps = run.plan.steps_per_epoch if whole else feed.steps
                use_steps_per_execution(model, execution_steps(steps, config.steps_per_execution))
                for c in callbacks:
                    if isinstance(c, stopping.StopCheck):  # a failed read stops every rank too
                        c.feed = feed
                try:
                    fitted = model.fit(feed.keras_input(), epochs=config.epochs if whole else point.epoch + 1,
                                       initial_epoch=point.epoch, shuffle=False, steps_per_epoch=steps,
                                       callbacks=[FeedGuard(run.rt, feed), *callbacks], verbose=int(live_bar))
                finally:
                    feed.close()  # a stream's reader process ends with its fit (also by a stop or a reset)
                problem = feed.failure()
                if problem:  # the data ran out without an epoch's end (FeedGuard saw none)
                    raise StreamError(problem)
                # Early stopping, pruning or a user's callback: every rank stopped after the same epoch.
                point = ResumePoint(epoch=point.epoch + len(fitted.epoch),
                                    history=_concat_history(point.history, fitted.history),
                                    early_stopping=stopper.state if stopper else None,
                                    stopped_early=bool(model.stop_training))
    except stopping.Stopped as stop:
        run.log.emit("run_stopped", **stop.fields())
        raise
    except (StreamError, stopping.Diverged, runtime.AgreedFailure) as err:  # agreed by every rank: its message
        run.log.emit("run_failed", error=str(err))
        raise
    except Exception as err:
        if run.is_reset(err):
            raise
        # Data that went bad mid-run: the rank that read it first stops, and the others see a
        # collective fail; every rank can tell why, and rank 0 says it (cli.py).
        problem = feed and feed.failure(after_error=True)
        if problem:
            run.log.emit("run_failed", error=problem)
            raise StreamError(problem) from None
        run.log.emit("run_failed", error=f"{type(err).__name__}: {err}")
        raise
    return point


# Each model's compiled train functions by steps per execution (Keras traces one per value).
_train_functions: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def use_steps_per_execution(model, k: int) -> None:
    """Keras runs ``k`` training steps per call of the compiled step from the next fit on.

    Keras runs whole executions: with an epoch of steps that ``k`` does not divide, the last one
    would train on the next epoch's batches (the input runs across epochs), so each fit asks for
    a divisor of its steps (plan.execution_steps). Keras traces its train function with the value
    built in; one function per value is kept, so switching back costs no second trace."""
    if model.steps_per_execution == k:
        return
    kept = _train_functions.setdefault(model, {})
    kept[model.steps_per_execution] = model.train_function
    model.steps_per_execution = k
    model.train_function = kept.get(k)  # None: Keras traces it at the next fit


def _concat_history(before: Dict[str, List[float]], after: Dict[str, List[float]]) -> Dict[str, List[float]]:
    keys = list(dict.fromkeys([*before, *after]))
    return {k: [float(v) for v in before.get(k, [])] + [float(v) for v in after.get(k, [])] for k in keys}
