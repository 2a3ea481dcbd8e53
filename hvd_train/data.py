"""Load a dataset, split it (seeded, stratified), and standardise it with training statistics.

Every rank runs this on the same input and gets the same arrays; sharding happens later
(see sharding.py). Bad input raises DataError with a message meant for the user.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np

BUNDLED = ("iris", "wine", "breast_cancer", "digits")


class DataError(ValueError):
    """The data cannot be used; the message says why."""


@dataclass(frozen=True)
class Table:
    """Features and integer class codes, plus the names needed to read new data later."""

    x: np.ndarray  # float32 [n, features]
    y: np.ndarray  # int64 [n], codes into class_names
    feature_names: Tuple[str, ...]
    class_names: Tuple[str, ...]


@dataclass(frozen=True)
class Standardizer:
    """Feature scaling fitted on the training split only (no leakage from val/test)."""

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> "Standardizer":
        mean = x.mean(axis=0, dtype=np.float64)
        std = x.std(axis=0, dtype=np.float64)
        return cls(mean=mean, scale=np.where(std > 0, std, 1.0))

    def transform(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.scale).astype(np.float32)

    def to_dict(self) -> Dict[str, list]:
        return {"mean": self.mean.tolist(), "scale": self.scale.tolist()}

    @classmethod
    def from_dict(cls, d: Dict[str, list]) -> "Standardizer":
        return cls(mean=np.asarray(d["mean"], np.float64), scale=np.asarray(d["scale"], np.float64))


@dataclass(frozen=True)
class Splits:
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    scaler: Standardizer
    feature_names: Tuple[str, ...]
    class_names: Tuple[str, ...]

    streamed = False  # training batches from memory (stream.StreamSplits: from the files)

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
    def n_features(self) -> int:
        return self.x_train.shape[1]

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def eval_pieces(self, which: str, rank: int, size: int):
        """This rank's share of the validation ("val") or test rows: r, r+N, r+2N, ... (may be empty)."""
        from .sharding import eval_shard

        x, y = (self.x_val, self.y_val) if which == "val" else (self.x_test, self.y_test)
        rows = eval_shard(len(y), rank, size)
        return [(x[rows], y[rows])]

    def preprocessing(self) -> Dict[str, object]:
        """What predict needs to turn a raw CSV row into model input and a class name."""
        return {
            "feature_names": list(self.feature_names),
            "class_names": list(self.class_names),
            "scaler": self.scaler.to_dict(),
        }


def load(dataset: str, label_column: Optional[str] = None, *, samples: int = 1000,
         features: int = 20, classes: int = 3, seed: int = 42) -> Table:
    """Load a bundled or synthetic dataset by name (csv:/parquet: files are read by stream.py)."""
    if dataset in BUNDLED:
        return _load_bundled(dataset)
    if dataset == "synthetic":
        return _synthetic(samples, features, classes, seed)
    raise DataError(f"unknown dataset {dataset!r}" + (" (file datasets are read in shares by stream.load)"
                                                      if ":" in dataset else ""))


DataArg = Union[None, Table, Tuple[Any, Any], Any]  # None = config.dataset; (x, y); finite tf.data


def load_splits(config, data: DataArg = None) -> "Splits":
    """The train/val/test splits a run trains on: ``config.dataset``, or the caller's data
    (a Table, ``(x, y)`` arrays or a finite tf.data.Dataset), split and standardised."""
    if data is None:
        table = load(config.dataset, config.label_column, samples=config.samples,
                     features=config.features, classes=config.classes, seed=config.seed)
    elif isinstance(data, Table):
        table = data
    elif isinstance(data, tuple) and len(data) == 2:
        table = from_arrays(*data)
    else:
        table = _table_from_tf_data(data)
    return split_and_scale(table, config.val_fraction, config.test_fraction, config.seed)


def _table_from_tf_data(dataset) -> Table:
    """A finite tf.data.Dataset of (features, label) elements, materialised (tabular data fits)."""
    import tensorflow as tf

    if not isinstance(dataset, tf.data.Dataset):
        raise DataError(f"data must be None, (x, y) arrays, a Table or a tf.data.Dataset, not {type(dataset).__name__}")
    if dataset.cardinality() == tf.data.INFINITE_CARDINALITY:
        raise DataError("the tf.data.Dataset is infinite; pass a finite one (no .repeat())")
    spec = dataset.element_spec
    batched = isinstance(spec, tuple) and len(spec[0].shape) == 2
    xs, ys = [], []
    for element in dataset.unbatch() if batched else dataset:
        if not isinstance(element, tuple) or len(element) != 2:
            raise DataError("tf.data elements must be (features, label) pairs")
        xs.append(np.asarray(element[0]))
        ys.append(np.asarray(element[1]))
    if not xs:
        raise DataError("the tf.data.Dataset is empty")
    return from_arrays(np.stack(xs), np.stack(ys).reshape(-1))


def from_arrays(x: object, y: object, feature_names: Optional[Sequence[str]] = None) -> Table:
    """A Table from user arrays: features [n, d] and labels [n] (numbers or strings)."""
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim != 2:
        raise DataError(f"features must be a 2-D array [samples, features], got shape {x.shape}")
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"labels must be a 1-D array with one label per row ({len(x)}), got shape {y.shape}")
    try:
        x = x.astype(np.float32)
    except (TypeError, ValueError) as err:
        raise DataError(f"features must be numeric: {err}") from None
    bad = np.argwhere(~np.isfinite(x))
    if len(bad):
        row, col = bad[0]
        raise DataError(f"features contain NaN or inf ({len(bad)} values; first at row {row}, column {col})")
    names = tuple(feature_names) if feature_names is not None else tuple(f"x{i}" for i in range(x.shape[1]))
    if len(names) != x.shape[1]:
        raise DataError(f"{len(names)} feature names for {x.shape[1]} feature columns")
    codes, class_names = _encode_labels(y)
    return Table(x=x, y=codes, feature_names=names, class_names=class_names)


def split_and_scale(table: Table, val_fraction: float, test_fraction: float, seed: int) -> Splits:
    """Seeded, stratified train/val/test split; the scaler sees the training split only."""
    from sklearn.model_selection import train_test_split

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
    idx = np.arange(len(table.y))
    try:
        rest, test = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=table.y)
        if val_fraction > 0:
            train, val = train_test_split(
                rest, test_size=val_fraction / (1.0 - test_fraction), random_state=seed, stratify=table.y[rest]
            )
        else:
            train, val = rest, rest[:0]
    except ValueError as err:
        raise DataError(f"cannot split {len(idx)} samples of {len(counts)} classes "
                        f"(val {val_fraction}, test {test_fraction}): {err}") from None
    scaler = Standardizer.fit(table.x[train])
    return Splits(
        x_train=scaler.transform(table.x[train]), y_train=table.y[train],
        x_val=scaler.transform(table.x[val]), y_val=table.y[val],
        x_test=scaler.transform(table.x[test]), y_test=table.y[test],
        scaler=scaler, feature_names=table.feature_names, class_names=table.class_names,
    )


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


def _load_bundled(name: str) -> Table:
    from sklearn import datasets

    bunch = getattr(datasets, f"load_{name}")()
    names = tuple(str(n) for n in bunch.target_names) if hasattr(bunch, "target_names") else None
    table = from_arrays(bunch.data, bunch.target, [str(f) for f in bunch.feature_names])
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
