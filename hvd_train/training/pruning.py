"""Median pruning of sweep trials: the rule, and the file a sweep hands each trial.

Before each trial the sweep driver (sweep/runner.py) writes the median, at every epoch, of the
validation metric of the trials that finished earlier. The trial (callbacks.Pruner, every rank)
stops after epoch k when its best value so far is worse than that median at k: Optuna's
MedianPruner rule, applied after ``warmup_epochs`` and once ``startup_trials`` trials reached k.
Rank 0 decides and broadcasts, so every rank stops after the same epoch. No TensorFlow here:
the driver imports it.
"""
from __future__ import annotations

import json
import math
import statistics
from typing import Any, Dict, List, Optional, Sequence

from ..config.options import TASK_METRICS, ConfigError

RULES = ("none", "median")
MODES = ("min", "max")
HIGHER_IS_BETTER = ("val_accuracy", "val_r2")


def default_mode(metric: str) -> str:
    return "max" if metric in HIGHER_IS_BETTER else "min"


def best(values: Sequence[float], mode: str) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return math.nan
    return max(finite) if mode == "max" else min(finite)


def better(a: float, b: float, mode: str) -> bool:
    """Is ``a`` strictly better than ``b``? NaN is never better, and anything beats NaN."""
    if math.isnan(a):
        return False
    if math.isnan(b):
        return True
    return a > b if mode == "max" else a < b


def thresholds(curves: Sequence[Sequence[float]], warmup_epochs: int, startup_trials: int) -> Dict[int, float]:
    """Epoch (1-based) -> the median of the curves' values at that epoch, from ``warmup_epochs``
    on, where at least ``startup_trials`` curves reached it (finite values only)."""
    out: Dict[int, float] = {}
    longest = max((len(c) for c in curves), default=0)
    for epoch in range(max(1, warmup_epochs), longest + 1):
        values = [c[epoch - 1] for c in curves if len(c) >= epoch and math.isfinite(c[epoch - 1])]
        if values and len(values) >= startup_trials:
            out[epoch] = float(statistics.median(values))
    return out


def write(path: str, metric: str, mode: str, medians: Dict[int, float], trials: int) -> None:
    from .. import storage

    storage.write_text(path, json.dumps({"rule": "median", "metric": metric, "mode": mode, "trials": trials,
                                       "thresholds": {str(k): v for k, v in sorted(medians.items())}},
                                      indent=2) + "\n")


def read(path: str, task: str) -> Dict[str, Any]:
    """The prune file, checked: {"metric", "mode", "trials", "thresholds": {epoch: value}}."""
    try:
        with open(path) as f:
            rule = json.load(f)
        metric, mode, trials = rule["metric"], rule["mode"], int(rule["trials"])
        limits = {int(k): float(v) for k, v in rule["thresholds"].items()}
    except OSError as err:
        raise ConfigError(f"cannot read the prune file {path}: {err.strerror or err}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ConfigError(f"{path} is not a prune file (hvd-train sweep writes them): {err}") from None
    if metric not in TASK_METRICS[task] or mode not in MODES:
        raise ConfigError(f"{path}: prunes on {metric} ({mode}), not a validation metric of {task} "
                          f"({', '.join(TASK_METRICS[task])}) with mode min or max")
    return {"metric": metric, "mode": mode, "trials": trials, "thresholds": limits}


def decide(rule: Dict[str, Any], epoch: int, values: List[float]) -> Optional[Dict[str, Any]]:
    """After ``epoch`` (1-based) with the metric's ``values`` so far: None (go on), or why to stop."""
    threshold = rule["thresholds"].get(epoch)
    if threshold is None:
        return None
    so_far = best(values, rule["mode"])
    if not better(threshold, so_far, rule["mode"]):
        return None
    return {"epoch": epoch, "metric": rule["metric"], "best": so_far, "median": threshold, "trials": rule["trials"]}
