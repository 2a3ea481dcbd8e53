"""Exact global evaluation: per-rank sums combined by sample count, never a mean of means."""
from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Tuple

import numpy as np

from .runtime import Runtime


def local_sums(model, x: np.ndarray, y: np.ndarray, from_logits: bool, n_classes: int = 0,
               batch_size: int = 4096) -> np.ndarray:
    """[sum of per-sample losses, number correct, number of samples] on this rank's rows, followed,
    if ``n_classes``, by the confusion counts [true class, predicted class] flattened row by row."""
    import tensorflow as tf

    totals = np.zeros(3 + n_classes * n_classes, np.float64)
    for start in range(0, len(y), batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        scores = model(xb, training=False)
        losses = tf.keras.losses.sparse_categorical_crossentropy(yb, scores, from_logits=from_logits)
        predicted = np.argmax(scores.numpy(), axis=1)
        totals[:3] += [np.sum(losses.numpy(), dtype=np.float64), np.sum(predicted == yb), len(yb)]
        if n_classes:
            np.add.at(totals, 3 + yb * n_classes + predicted, 1)
    return totals


def from_sums(totals: np.ndarray) -> Dict[str, float]:
    loss_sum, correct, count = (float(v) for v in totals[:3])
    if count == 0:
        return {"loss": float("nan"), "accuracy": float("nan"), "samples": 0}
    return {"loss": loss_sum / count, "accuracy": correct / count, "samples": int(count)}


def evaluate(model, pieces: Iterable[Tuple[np.ndarray, np.ndarray]], runtime: Runtime, from_logits: bool,
             n_classes: int = 0) -> Dict[str, Any]:
    """Collective: every rank scores its share of the rows (``pieces``: (x, y) pairs, e.g.
    ``splits.eval_pieces("test", rank, size)``), then one sum-allreduce of the totals.

    With ``n_classes``, the same pass and allreduce also give the whole set's confusion matrix
    (``"confusion"``, rows: true class), identical on every rank.
    """
    import horovod.tensorflow as hvd

    totals = np.zeros(3 + n_classes * n_classes, np.float64)
    for x, y in pieces:
        totals += local_sums(model, x, y, from_logits, n_classes)
    # Horovod: sum (not average) so ranks with more samples weigh more: exact whole-set metrics.
    totals = hvd.allreduce(totals, op=hvd.Sum, name="eval_sums").numpy()
    result: Dict[str, Any] = from_sums(totals)
    if n_classes:
        result["confusion"] = totals[3:].reshape(n_classes, n_classes).astype(np.int64)
    return result


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
