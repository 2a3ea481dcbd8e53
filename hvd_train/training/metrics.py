"""Exact global evaluation: per-rank sums combined by sample count, never a mean of means."""
from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Tuple

import numpy as np

from .. import watchdog


def local_sums(model, x: np.ndarray, y: np.ndarray, task, batch_size: int = 4096) -> np.ndarray:
    """The task's evaluation sums (tasks.py: loss, correct or squared errors, count, ...) on this
    rank's rows; they add up over ranks."""
    totals = np.zeros(task.width(), np.float64)
    for start in range(0, len(y), batch_size):
        # The tensor, not .numpy(): a softmax output carries its logits, from which Keras computes the
        # cross-entropy exactly, as in training (from probabilities it clips them at 1e-7).
        scores = model(x[start:start + batch_size], training=False)
        totals += task.sums(scores, y[start:start + batch_size])
    return totals


def evaluate(model, pieces: Iterable[Tuple[np.ndarray, np.ndarray]], task) -> Dict[str, Any]:
    """Collective: every rank scores its share of the rows (``pieces``: (x, y) pairs, e.g.
    ``splits.eval_pieces("test", rank, size)``), then one sum-allreduce of the totals: the whole
    set's figures (task.result: loss, accuracy and confusion matrix, or MSE, MAE, R^2 and the
    residual histogram), identical on every rank."""
    import horovod.tensorflow as hvd

    from ..data.interface import DataError, agree_failure

    totals = np.zeros(task.width() + 1, np.float64)  # and a last element: did this rank's read fail
    problem = None
    try:
        for x, y in pieces:
            totals[:-1] += local_sums(model, x, y, task)
    except DataError as err:  # a file or object that went bad: every rank learns it below
        problem, totals[-1] = str(err), 1.0
    # Horovod: sum (not average) so ranks with more samples weigh more: exact whole-set metrics.
    with watchdog.waiting("the sums of an evaluation"):
        totals = hvd.allreduce(totals, op=hvd.Sum, name="eval_sums").numpy()
    if totals[-1]:
        agree_failure(problem, "eval")
    return task.result(totals[:-1])


def gather_predictions(model, pieces: Iterable[Tuple[np.ndarray, np.ndarray]], world_size: int,
                       limit: int) -> np.ndarray:
    """Collective: up to ``limit`` (true, predicted) pairs from the rows the ranks score, each
    rank's first ``limit / world_size`` of its share (the rows of a strided share are spread over
    the whole set). Model units; identical on every rank."""
    from .. import runtime

    mine, want = [], -(-limit // world_size)
    for x, y in pieces:
        if want <= 0:
            break
        x, y = x[:want], y[:want]
        if len(y):
            mine.append(np.stack([y.astype(np.float64), model(x, training=False).numpy().reshape(-1)], axis=1))
        want -= len(y)
    # Horovod: every rank's pairs, on every rank (one allgather, a few kB).
    parts = runtime.allgather(np.concatenate(mine) if mine else np.zeros((0, 2)), "predictions")
    return np.concatenate(parts)


def global_sums(values: Dict[str, float], count: int, what: str,
                carried: Optional[Dict[str, float]] = None) -> Dict[str, float]:
    """Collective: per-rank means over ``count`` samples -> sums over all ranks' samples and
    their ``"count"`` (divided, means exact over every sample, never a mean of rank means), plus
    ``carried`` sums of the same form (the part of an epoch trained before an elastic reset).
    Every rank must pass the same keys."""
    import horovod.tensorflow as hvd

    keys = sorted(values)
    local = np.array([float(values[k]) * count for k in keys] + [count], np.float64)
    # Horovod: sum of count-weighted values, divided later by the total count; not a mean of rank means.
    with watchdog.waiting(f"the metric sums ({what})"):
        total = hvd.allreduce(local, op=hvd.Sum, name=f"combine.{what}").numpy()
    sums = dict(zip([*keys, "count"], (float(v) for v in total)))
    for key, value in (carried or {}).items():
        sums[key] = sums.get(key, 0.0) + value
    return sums


def classification_report(counts: np.ndarray, class_names) -> Dict[str, object]:
    """Per-class precision, recall, F1 and support from a confusion matrix (rows: true classes),
    with accuracy and macro/weighted averages. A 0/0 ratio is reported as 0.0, as scikit-learn does."""
    counts = np.asarray(counts, np.float64)
    true_pos = np.diag(counts)
    support, predicted = counts.sum(axis=1), counts.sum(axis=0)
    precision = np.divide(true_pos, predicted, out=np.zeros_like(true_pos), where=predicted > 0)
    recall = np.divide(true_pos, support, out=np.zeros_like(true_pos), where=support > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(true_pos), where=both > 0)
    total = counts.sum()
    per_class = {str(name): {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                 for name, p, r, f, s in zip(class_names, precision, recall, f1, support)}

    def average(weights: np.ndarray) -> Dict[str, float]:
        w = weights / weights.sum() if weights.sum() else weights
        return {"precision": float(w @ precision), "recall": float(w @ recall), "f1": float(w @ f1),
                "support": int(total)}

    return {
        "classes": [str(name) for name in class_names],
        "confusion_matrix": counts.astype(np.int64).tolist(),
        "per_class": per_class,
        "accuracy": float(true_pos.sum() / total) if total else float("nan"),
        "macro_avg": average(np.ones_like(support)),
        "weighted_avg": average(support),
        "samples": int(total),
    }
