"""The epoch loop: the one place a run calls model.fit, plain or elastic.

From a starting point (epoch, position into its order, the carried metric sums, the history
so far) to the requested number of epochs: the rest of an epoch a stop or an elastic reset
interrupted (a fit of its own, with that rest's number of steps), then every remaining epoch.
What it trains on comes from the data interface (``splits.train_feed``: arrays or files alike);
what happens around each epoch, from the callbacks (callbacks.run_callbacks), with
``extra(early_stopping)``'s at the end (elastic.py adds its commit there). It logs a stop or a
failure to the event log and re-raises; ``is_reset`` names errors that are not failures (an
elastic reset).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

from .. import runtime
from ..config.options import TrainConfig
from ..config.plan import Plan
from ..data.interface import StreamError
from ..outputs.events import EventLog
from . import stopping
from .callbacks import EarlyStopping, FeedGuard, progress_mode, run_callbacks
from .checkpoint import ResumePoint


def fit_epochs(rt: runtime.Runtime, config: TrainConfig, plan: Plan, splits, model, log: EventLog,
               start: ResumePoint, user_callbacks: List[Any],
               extra: Callable[[Optional[EarlyStopping]], List[Any]] = lambda early_stopping: [],
               is_reset: Callable[[BaseException], bool] = lambda err: False) -> ResumePoint:
    """Collective: train from ``start`` (its ``epoch`` is the first to train, ``stopped_early``
    means nothing is left) until the last epoch or an early stop; returns where training ended."""
    live_bar = progress_mode(config, rt) == "bar" and rt.is_rank0
    point, feed = start, None
    try:
        with stopping.handlers():
            while point.epoch < config.epochs and not point.stopped_early:
                callbacks = run_callbacks(rt, config, plan, splits, model, log, point, user_callbacks)
                stopper = next((c for c in callbacks if isinstance(c, EarlyStopping)), None)
                callbacks += extra(stopper)
                feed = splits.train_feed(rt.rank, rt.size, config, point.epoch, point.position)
                whole = not point.position  # else the rest of one epoch, alone
                try:
                    fitted = model.fit(feed.keras_input(), epochs=config.epochs if whole else point.epoch + 1,
                                       initial_epoch=point.epoch, shuffle=False,
                                       steps_per_epoch=plan.steps_per_epoch if whole else feed.steps,
                                       callbacks=[FeedGuard(feed), *callbacks], verbose=int(live_bar))
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
        log.emit("run_stopped", **stop.fields())
        raise
    except Exception as err:
        if is_reset(err):
            raise
        # Data that went bad mid-run: the rank that read it first stops, and the others see a
        # collective fail; every rank can tell why, and rank 0 says it (cli.py).
        problem = feed and feed.failure(after_error=True)
        if problem:
            log.emit("run_failed", error=problem)
            raise StreamError(problem) from None
        log.emit("run_failed", error=f"{type(err).__name__}: {err}")
        raise
    return point


def _concat_history(before: Dict[str, List[float]], after: Dict[str, List[float]]) -> Dict[str, List[float]]:
    keys = list(dict.fromkeys([*before, *after]))
    return {k: [float(v) for v in before.get(k, [])] + [float(v) for v in after.get(k, [])] for k in keys}
