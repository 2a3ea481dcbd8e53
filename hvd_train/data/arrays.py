"""Load a dataset, split it (seeded; stratified for classes), and standardise it with training statistics.

Every rank runs this on the same input and gets the same arrays; sharding happens later
(see sharding.py). Bad input raises DataError with a message meant for the user.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .interface import DataError, Dataset, Standardizer

BUNDLED = ("iris", "wine", "breast_cancer", "digits", "diabetes")
REGRESSION_ONLY = ("diabetes",)  # a numeric target, no classes


@dataclass(frozen=True)
class Table:
    """Samples and their labels, plus the names needed to read new data later."""

    x: np.ndarray  # float32 [n, features], or [n, ...] (images: [n, height, width, channels])
    y: np.ndarray  # classification: int64 [n], codes into class_names; regression: float64 [n] targets
    feature_names: Tuple[str, ...]  # one per value of a sample (N-d samples: flattened, row-major)
    class_names: Tuple[str, ...]  # empty for regression
    target_name: str = "target"

    @property
    def regression(self) -> bool:
        return not self.class_names


@dataclass(frozen=True)
class Splits(Dataset):
    """An in-memory dataset, split and standardised: the arrays every rank holds (Dataset)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    scaler: Standardizer
    feature_names: Tuple[str, ...]
    class_names: Tuple[str, ...]  # empty for regression
    target: Optional[Standardizer] = None  # regression: the target's scaling (y_* are standardised)
    target_name: str = "target"

    @property
    def n_train(self) -> int:
        return len(self.y_train)

    @property
    def n_val(self) -> int:
        return len(self.y_val)

    @property
    def n_test(self) -> int:
        return len(self.y_test)

    @property
    def input_shape(self) -> Tuple[int, ...]:
        """The shape of one sample: (features,) for a table, (height, width, channels) for images."""
        return tuple(self.x_train.shape[1:])

    @property
    def n_features(self) -> int:
        return int(np.prod(self.input_shape))

    def eval_pieces(self, which: str, rank: int, size: int):
        """This rank's share of the validation ("val") or test rows: r, r+N, r+2N, ... (may be empty)."""
        from .sharding import eval_shard

        x, y = (self.x_val, self.y_val) if which == "val" else (self.x_test, self.y_test)
        rows = eval_shard(len(y), rank, size)
        return [(x[rows], y[rows])]

    def train_feed(self, rank: int, size: int, config, epoch: int, position: int = 0):
        """This rank's training batches of ``epoch`` after its first ``position`` samples, then of
        the epochs after it (pipeline.ArrayFeed). ``config``: batch size, seed, shuffle."""
        from .pipeline import ArrayFeed

        return ArrayFeed(self, rank, size, config, epoch, position)

    def plan_lines(self, size: int, shuffle_buffer: int) -> None:
        """Nothing to say per rank: every rank holds the arrays."""
        return None

    def class_counts(self) -> List[Tuple[int, int, int]]:
        if self.target is not None:
            return []
        k = len(self.class_names)
        per = [np.bincount(y, minlength=k) for y in (self.y_train, self.y_val, self.y_test)]
        return [(int(a), int(b), int(c)) for a, b, c in zip(*per)]

    def fingerprint(self) -> Dict[str, Any]:
        """Shape and content hash of each split, and the label and feature names."""
        from ..training.consensus import array_digest

        out: Dict[str, Any] = {}
        for name in ("train", "val", "test"):
            x, y = getattr(self, f"x_{name}"), getattr(self, f"y_{name}")
            out[f"data.{name}"] = f"{list(x.shape)} sha256 {array_digest(x, y)[:16]}"
        out["data.class_names"] = [str(c) for c in self.class_names]
        out["data.feature_names"] = [str(c) for c in self.feature_names]
        return out




def load(dataset: str, label_column: Optional[str] = None, *, samples: int = 1000,
         features: int = 20, classes: int = 3, seed: int = 42, task: str = "classification",
         images: bool = False) -> Table:
    """Load a bundled or synthetic dataset by name (csv:/parquet: files are read by stream.py).
    ``images``: digits as 8x8x1 images (for --model cnn) instead of 64 features; the other
    bundled datasets are tables either way."""
    regression = task == "regression"
    if dataset in REGRESSION_ONLY and not regression:
        raise DataError(f"{dataset} has a numeric target, not classes: add --task regression")
    if dataset in BUNDLED:
        table = _load_bundled(dataset, regression)
    elif dataset == "synthetic":
        table = _synthetic_regression(samples, features, seed) if regression else \
            _synthetic(samples, features, classes, seed)
    else:
        raise DataError(f"unknown dataset {dataset!r}" + (" (file datasets are read in shares by stream.load)"
                                                          if ":" in dataset else ""))
    if images and dataset == "digits":  # other tables stay tables: model.check_inputs says why they won't do
        table = Table(x=table.x.reshape(-1, 8, 8, 1), y=table.y, feature_names=table.feature_names,
                      class_names=table.class_names, target_name=table.target_name)
    return table


DataArg = Union[None, Table, Tuple[Any, Any], Any]  # None = config.dataset; (x, y); finite tf.data


def load_splits(config, data: DataArg = None) -> "Splits":
    """The train/val/test splits a run trains on: ``config.dataset``, or the caller's data
    (a Table, ``(x, y)`` arrays or a finite tf.data.Dataset), split and standardised."""
    if data is None:
        table = load(config.dataset, config.label_column, samples=config.samples, features=config.features,
                     classes=config.classes, seed=config.seed, task=config.task, images=config.model == "cnn")
    elif isinstance(data, Table):
        table = data
    elif isinstance(data, tuple) and len(data) == 2:
        table = from_arrays(*data, task=config.task)
    else:
        table = _table_from_tf_data(data, config.task)
    if table.regression != config.regression:
        kind = "regression" if table.regression else "classification"
        raise DataError(f"the data is a {kind} table and the run is for {config.task}: give task={kind!r}")
    if config.model == "cnn" and table.x.ndim == 3:  # [n, h, w]: one channel
        table = Table(x=table.x[..., np.newaxis], y=table.y, feature_names=table.feature_names,
                      class_names=table.class_names, target_name=table.target_name)
    return split_and_scale(table, config.val_fraction, config.test_fraction, config.seed, config.scale)


def _table_from_tf_data(dataset, task: str = "classification") -> Table:
    """A finite tf.data.Dataset of (features, label) elements, materialised (tabular data fits)."""
    import tensorflow as tf

    if not isinstance(dataset, tf.data.Dataset):
        raise DataError(f"data must be None, (x, y) arrays, a Table or a tf.data.Dataset, not {type(dataset).__name__}")
    if dataset.cardinality() == tf.data.INFINITE_CARDINALITY:
        raise DataError("the tf.data.Dataset is infinite; pass a finite one (no .repeat())")
    spec = dataset.element_spec
    batched = isinstance(spec, tuple) and len(spec) == 2 and len(spec[1].shape) == 1  # a vector of labels
    xs, ys = [], []
    for element in dataset.unbatch() if batched else dataset:
        if not isinstance(element, tuple) or len(element) != 2:
            raise DataError("tf.data elements must be (features, label) pairs")
        xs.append(np.asarray(element[0]))
        ys.append(np.asarray(element[1]))
    if not xs:
        raise DataError("the tf.data.Dataset is empty")
    return from_arrays(np.stack(xs), np.stack(ys).reshape(-1), task=task)


def from_arrays(x: object, y: object, feature_names: Optional[Sequence[str]] = None,
                task: str = "classification", target_name: str = "target") -> Table:
    """A Table from user arrays: features [n, d] (or N-d samples [n, ...], e.g. images
    [n, height, width, channels]) and labels [n]: classes (numbers or strings), or numeric targets
    for ``task="regression"``."""
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim < 2:
        raise DataError(f"features must be an array [samples, features] (or [samples, ...] for images), "
                        f"got shape {x.shape}")
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"labels must be a 1-D array with one label per sample ({len(x)}), got shape {y.shape}")
    try:
        x = x.astype(np.float32)
    except (TypeError, ValueError) as err:
        raise DataError(f"features must be numeric: {err}") from None
    bad = np.argwhere(~np.isfinite(x))
    if len(bad):
        row, *where = bad[0]
        raise DataError(f"features contain NaN or inf ({len(bad)} values; first at row {row}, "
                        f"{'column ' + str(where[0]) if len(where) == 1 else 'position ' + str(tuple(where))})")
    width = int(np.prod(x.shape[1:]))
    names = tuple(feature_names) if feature_names is not None else tuple(f"x{i}" for i in range(width))
    if len(names) != width:
        raise DataError(f"{len(names)} feature names for {width} values per sample")
    if task == "regression":
        return Table(x=x, y=numeric_target(y, target_name), feature_names=names, class_names=(),
                     target_name=target_name)
    codes, class_names = _encode_labels(y)
    return Table(x=x, y=codes, feature_names=names, class_names=class_names)


def numeric_target(y: np.ndarray, name: str) -> np.ndarray:
    """A regression target (numbers, or texts of numbers such as a file's labels) as float64;
    anything else is one clear error naming ``name`` and a few of the values."""
    if y.dtype.kind not in "iuf":
        try:
            y = np.asarray(y, dtype=np.float64)
        except (TypeError, ValueError):
            examples: List[str] = []  # the first three different values that are not numbers
            for value in (str(v) for v in y if not _is_number(v)):
                if value not in examples:
                    examples.append(value)
                if len(examples) == 3:
                    break
            raise DataError(f"regression needs a numeric target, and {name} holds values such as "
                            f"{', '.join(repr(v) for v in examples)}: use --task classification for classes") from None
    y = y.astype(np.float64)
    if not np.all(np.isfinite(y)):
        raise DataError(f"the target {name} contains NaN or inf ({int(np.sum(~np.isfinite(y)))} values)")
    return y


def _is_number(value: object) -> bool:
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False


def split_and_scale(table: Table, val_fraction: float, test_fraction: float, seed: int,
                    scale: str = "standard") -> Splits:
    """Seeded train/val/test split, stratified by class (regression: plain); the scalers (features,
    and a regression target) see the training split only."""
    if table.regression:
        train, val, test = _split(len(table.y), val_fraction, test_fraction, seed, None)
        target = Standardizer.fit(table.y[train])
        y = target.transform(table.y)
    else:
        train, val, test = _stratified_split(table, val_fraction, test_fraction, seed)
        target, y = None, table.y
    x_train = table.x[train]
    scaler = Standardizer.fit(x_train) if scale == "standard" else Standardizer.identity(x_train)
    return Splits(
        x_train=scaler.transform(x_train), y_train=y[train],
        x_val=scaler.transform(table.x[val]), y_val=y[val],
        x_test=scaler.transform(table.x[test]), y_test=y[test],
        scaler=scaler, feature_names=table.feature_names, class_names=table.class_names,
        target=target, target_name=table.target_name,
    )


def _split(n: int, val_fraction: float, test_fraction: float, seed: int, labels: Optional[np.ndarray]):
    from sklearn.model_selection import train_test_split

    idx = np.arange(n)
    try:
        rest, test = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=labels)
        if val_fraction > 0:
            train, val = train_test_split(rest, test_size=val_fraction / (1.0 - test_fraction), random_state=seed,
                                          stratify=None if labels is None else labels[rest])
        else:
            train, val = rest, rest[:0]
    except ValueError as err:
        classes = "" if labels is None else f" of {len(np.unique(labels))} classes"
        raise DataError(f"cannot split {n} samples{classes} (val {val_fraction}, test {test_fraction}): "
                        f"{err}") from None
    return train, val, test


def _stratified_split(table: Table, val_fraction: float, test_fraction: float, seed: int):
    counts = np.bincount(table.y, minlength=len(table.class_names))
    if len(table.class_names) < 2:
        raise DataError(f"need at least 2 classes, found {len(table.class_names)}")
    n_splits = 3 if val_fraction > 0 else 2
    if counts.min() < n_splits:
        small = table.class_names[int(counts.argmin())]
        raise DataError(
            f"class {small!r} has {counts.min()} sample(s): too few for a stratified "
            f"{'train/val/test' if n_splits == 3 else 'train/test'} split (needs >= {n_splits})"
        )
    return _split(len(table.y), val_fraction, test_fraction, seed, table.y)


def _encode_labels(y: np.ndarray) -> Tuple[np.ndarray, Tuple[str, ...]]:
    if y.dtype.kind == "f" and not np.all(np.isfinite(y)):
        raise DataError("labels contain NaN or inf")
    if y.dtype.kind in "iuf":
        classes, codes = np.unique(y, return_inverse=True)
        names = tuple(str(int(c)) if float(c).is_integer() else str(c) for c in classes)
    else:
        y = np.asarray([str(v) for v in y])
        if np.any(y == ""):
            raise DataError(f"{int(np.sum(y == ''))} row(s) have an empty label")
        classes, codes = np.unique(y, return_inverse=True)
        names = tuple(str(c) for c in classes)
    return codes.astype(np.int64), names


def _load_bundled(name: str, regression: bool = False) -> Table:
    from sklearn import datasets

    bunch = getattr(datasets, f"load_{name}")()
    names = tuple(str(n) for n in bunch.target_names) if hasattr(bunch, "target_names") else None
    table = from_arrays(bunch.data, bunch.target, [str(f) for f in bunch.feature_names],
                        task="regression" if regression else "classification",
                        target_name="disease_progression" if name == "diabetes" else "target")
    if regression:
        return table
    if names is not None and len(names) == len(table.class_names):
        table = Table(x=table.x, y=table.y, feature_names=table.feature_names, class_names=names)
    return table


def _synthetic(samples: int, features: int, classes: int, seed: int) -> Table:
    from sklearn.datasets import make_classification

    informative = max(2, min(features, math.ceil(math.log2(classes)) + 2, features // 2 or 2))
    if classes > 2 ** informative:
        raise DataError(f"synthetic: {classes} classes need more than {features} features")
    x, y = make_classification(
        n_samples=samples, n_features=features, n_informative=informative, n_redundant=0,
        n_classes=classes, n_clusters_per_class=1, random_state=seed,
    )
    return from_arrays(x, y)


def _synthetic_regression(samples: int, features: int, seed: int) -> Table:
    """A linear target of half the features (at least 2) plus noise: R^2 near 0.9 is reachable."""
    from sklearn.datasets import make_regression

    x, y = make_regression(n_samples=samples, n_features=features, n_informative=max(2, features // 2),
                           noise=10.0, random_state=seed)
    return from_arrays(x, y, task="regression")
