"""What a run learns and how it is scored: classification or regression.

One object per run (``for_run(config, splits)``) answers every question that depends on the task:
the size and activation of the output layer, the loss and metrics the model is compiled with, the
exact evaluation sums that ranks add up (metrics.evaluate), the validation numbers, the report.

Exactness: every number is a ratio of sums over samples, and the sums are what ranks combine
(sum-allreduce), so N processes report what one process does; never a mean of rank means.
Regression trains on the target standardised with training-split statistics (``target``); its
errors are reported in the target's own units (MSE, RMSE, MAE) and R^2 = 1 - SSE / SST, with SST
from the sums of the (centred) targets.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List

import numpy as np

# The unweighted per-sample training loss (plus any regularisation of the step the sample trained
# in): callbacks.ExactTrainMetrics turns its global mean into the exact epoch "loss", then drops it.
EXACT_LOSS = "sample_loss"
# Residual histogram of a regression test set, bin edges in target standard deviations.
RESIDUAL_EDGES = (-3.0, -2.0, -1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0, 2.0, 3.0)
PLOT_POINTS = 2000  # predicted-vs-true points drawn, gathered from every rank's share


class Classification:
    name = "classification"
    val_metrics = ("val_loss", "val_accuracy")
    curve_metric = "accuracy"

    def __init__(self, class_names, logits: bool):
        self.class_names = tuple(class_names)
        self.logits = logits
        self.outputs = len(self.class_names)

    def loss(self):
        import keras

        return keras.losses.SparseCategoricalCrossentropy(from_logits=self.logits)

    def per_sample_loss(self, y_true, y_pred):
        import keras

        return keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=self.logits)

    def metrics(self) -> List[Any]:
        return ["accuracy"]

    def saved_metrics(self) -> List[Any]:
        """What a saved model is compiled with besides its loss: Keras's own, so it loads anywhere."""
        return ["accuracy"]

    def width(self) -> int:
        """Length of the evaluation sums: [loss, correct, count] + the confusion counts."""
        return 3 + self.outputs * self.outputs

    def sums(self, scores, y: np.ndarray) -> np.ndarray:
        """``scores``: the model's output tensor (a softmax's carries its logits: exact cross-entropy)."""
        import keras

        n = self.outputs
        totals = np.zeros(self.width(), np.float64)
        losses = keras.ops.convert_to_numpy(keras.losses.sparse_categorical_crossentropy(
            y, scores, from_logits=self.logits))
        predicted = np.argmax(np.asarray(scores), axis=1)
        totals[:3] = [np.sum(losses, dtype=np.float64), np.sum(predicted == y), len(y)]
        np.add.at(totals, 3 + y * n + predicted, 1)
        return totals

    def result(self, totals: np.ndarray) -> Dict[str, Any]:
        loss_sum, correct, count = (float(v) for v in totals[:3])
        n = self.outputs
        return {"loss": loss_sum / count if count else math.nan, "accuracy": correct / count if count else math.nan,
                "samples": int(count), "confusion": totals[3:].reshape(n, n).astype(np.int64)}

    def scores(self, result: Dict[str, Any]) -> Dict[str, float]:
        """The figures of an evaluation, by name (without a "val_"/"test_" prefix)."""
        return {"loss": result["loss"], "accuracy": result["accuracy"]}

    def derived(self, logs: Dict[str, float]) -> None:
        """Training figures that are not means over samples, from those that are (none here)."""

    def report(self, result: Dict[str, Any]) -> Dict[str, Any]:
        from .metrics import classification_report

        return classification_report(result["confusion"], self.class_names)

    def summary(self, result: Dict[str, Any]) -> str:
        return f"test loss {result['loss']:.4f}, test accuracy {result['accuracy']:.4f}"


class Regression:
    """A numeric target, standardised for training (``mean``, ``scale``: training-split statistics)."""

    name = "regression"
    val_metrics = ("val_loss", "val_mse", "val_rmse", "val_mae", "val_r2")
    curve_metric = "rmse"

    def __init__(self, loss_name: str, mean: float, scale: float):
        self.loss_name, self.mean, self.scale = loss_name, float(mean), float(scale)
        self.outputs = 1

    def loss(self):
        import keras

        if self.loss_name == "mae":
            return keras.losses.MeanAbsoluteError()
        if self.loss_name == "huber":
            return keras.losses.Huber(delta=1.0)
        return keras.losses.MeanSquaredError()

    @staticmethod
    def _error(y_true, y_pred):
        """Prediction minus target per sample, in standardised units (outputs [b, 1], targets [b])."""
        import tensorflow as tf

        # float32 whatever the precision policy made the output (a user's model may end in 16 bits).
        return tf.cast(tf.reshape(y_pred, [-1]), tf.float32) - tf.cast(tf.reshape(y_true, [-1]), tf.float32)

    def per_sample_loss(self, y_true, y_pred):
        import tensorflow as tf

        error = self._error(y_true, y_pred)
        if self.loss_name == "mae":
            return tf.abs(error)
        if self.loss_name == "huber":
            small = tf.abs(error) <= 1.0
            return tf.where(small, 0.5 * tf.square(error), tf.abs(error) - 0.5)
        return tf.square(error)

    def metrics(self) -> List[Any]:
        import keras
        import tensorflow as tf

        scale = self.scale

        def mae(y_true, y_pred):
            return tf.abs(self._error(y_true, y_pred)) * scale

        def mse(y_true, y_pred):
            return tf.square(self._error(y_true, y_pred)) * scale ** 2

        # Means over samples (so ranks combine them exactly), in the target's own units.
        return [keras.metrics.MeanMetricWrapper(mae, name="mae"),
                keras.metrics.MeanMetricWrapper(mse, name="mse")]

    def saved_metrics(self) -> List[Any]:
        """None besides the loss: the training metrics above are closures over the target's scale,
        which Keras 3 cannot load back (preprocessing.json holds the scale; predict applies it)."""
        return []

    def width(self) -> int:
        """[loss, count, squared errors, absolute errors, errors, targets, squared targets] summed, and
        the residual histogram; standardised units (scaled to the target's at the end)."""
        return 7 + len(RESIDUAL_EDGES) + 1

    def sums(self, scores, y: np.ndarray) -> np.ndarray:
        error = np.asarray(scores).reshape(-1).astype(np.float64) - y.astype(np.float64)
        losses = self.per_sample_loss(y, scores).numpy()  # the training metric's own formula
        target = y.astype(np.float64)
        totals = np.zeros(self.width(), np.float64)
        totals[:7] = [np.sum(losses, dtype=np.float64), len(y), np.sum(error ** 2), np.sum(np.abs(error)),
                      error.sum(), target.sum(), np.sum(target ** 2)]
        np.add.at(totals, 7 + np.searchsorted(RESIDUAL_EDGES, error, side="right"), 1)
        return totals

    def result(self, totals: np.ndarray) -> Dict[str, Any]:
        loss_sum, count, sse, sae, sum_e, sum_y, sum_y2 = (float(v) for v in totals[:7])
        histogram = totals[7:].astype(np.int64)
        if not count:
            return {**dict.fromkeys(("loss", "mse", "rmse", "mae", "r2", "residual_mean", "residual_std"), math.nan),
                    "samples": 0, "histogram": histogram}
        sst = sum_y2 - sum_y * sum_y / count  # standardised targets are centred near 0: no cancellation
        mse = sse / count * self.scale ** 2
        mean_e = sum_e / count
        return {"loss": loss_sum / count, "mse": mse, "rmse": math.sqrt(mse), "mae": sae / count * self.scale,
                "r2": 1.0 - sse / sst if sst > 0 else math.nan, "samples": int(count),
                "residual_mean": mean_e * self.scale,
                "residual_std": math.sqrt(max(sse / count - mean_e ** 2, 0.0)) * self.scale,
                "histogram": histogram}

    def scores(self, result: Dict[str, Any]) -> Dict[str, float]:
        return {k: result[k] for k in ("loss", "mse", "rmse", "mae", "r2")}

    def derived(self, logs: Dict[str, float]) -> None:
        if "mse" in logs:
            logs["rmse"] = math.sqrt(logs["mse"])

    def report(self, result: Dict[str, Any]) -> Dict[str, Any]:
        edges = [float(e * self.scale) for e in RESIDUAL_EDGES]
        labels = [f"< {edges[0]:.4g}"] + [f"[{a:.4g}, {b:.4g})" for a, b in zip(edges, edges[1:])] + \
                 [f">= {edges[-1]:.4g}"]
        return {
            "task": "regression",
            "samples": result["samples"],
            "mse": result["mse"], "rmse": result["rmse"], "mae": result["mae"], "r2": result["r2"],
            "target": {"mean": self.mean, "std": self.scale},
            "residuals": {
                "definition": "predicted - true, in the target's units",
                "mean": result["residual_mean"],
                "std": result["residual_std"],
                "histogram": {"edges": edges, "bins": labels,
                              "counts": [int(c) for c in result["histogram"]]},
            },
        }

    def summary(self, result: Dict[str, Any]) -> str:
        return (f"test RMSE {result['rmse']:.4g}, MAE {result['mae']:.4g}, R^2 {result['r2']:.4f} "
                f"(loss {result['loss']:.4f})")

    def to_units(self, standardised: np.ndarray) -> np.ndarray:
        return np.asarray(standardised, np.float64) * self.scale + self.mean


Task = Any  # Classification | Regression


def describe(config, splits, model_fn=None) -> str:
    """One line for the log: what is learned, from what, by which model."""
    shape = "x".join(map(str, splits.input_shape))
    model = "the model_fn given" if model_fn else f"--model {config.model}"
    if config.regression:
        what = f"regression of {splits.target_name} ({config.regression_loss} loss on the standardised target)"
    else:
        what = f"classification into {splits.n_classes} classes"
    return f"task: {what}; samples of shape {shape}; {model}"


def for_run(config, splits) -> Task:
    """The task of a run: the config's, with what the data says (class names, target statistics)."""
    if config.task == "regression":
        return Regression(config.regression_loss, splits.target.mean, splits.target.scale)
    return Classification(splits.class_names, config.logits)

