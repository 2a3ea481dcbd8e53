"""The data interface: what every dataset gives a run, whatever holds it (Dataset), and what
both kinds share: the training split's scaling (Standardizer), preprocessing.json, the errors."""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from .. import runtime


class DataError(ValueError):
    """The data cannot be used; the message says why."""


class StreamError(DataError):
    """Data went bad while training read it (a file deleted, truncated, changed): rank 0 reports it."""


@dataclass(frozen=True)
class Standardizer:
    """Scaling fitted on the training split only (no leakage from val/test): per feature of a
    table, per channel (the last axis) of N-d samples such as images, or of a 1-D target."""

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> "Standardizer":
        axes = tuple(range(max(x.ndim - 1, 1)))  # all but the last (channel) axis; a 1-D target: axis 0
        mean = x.mean(axis=axes, dtype=np.float64)
        std = x.std(axis=axes, dtype=np.float64)
        return cls(mean=mean, scale=np.where(std > 0, std, 1.0))

    @classmethod
    def identity(cls, x: np.ndarray) -> "Standardizer":
        """``--scale none``: the inputs as they are (float32)."""
        channels = x.shape[-1] if x.ndim > 1 else ()
        return cls(mean=np.zeros(channels), scale=np.ones(channels))

    def transform(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.scale).astype(np.float32)

    def transform32(self, x: np.ndarray) -> np.ndarray:
        """``transform`` in float32 arithmetic, as TensorFlow applies it to streamed images
        (stream.StreamSplits.standardise_tf): the same operations, so the same bits."""
        return (x.astype(np.float32) - self.mean.astype(np.float32)) / self.scale.astype(np.float32)

    def inverse(self, z: np.ndarray) -> np.ndarray:
        return np.asarray(z, np.float64) * self.scale + self.mean

    def to_dict(self) -> Dict[str, list]:
        return {"mean": self.mean.tolist(), "scale": self.scale.tolist()}

    @classmethod
    def from_dict(cls, d: Dict[str, list]) -> "Standardizer":
        return cls(mean=np.asarray(d["mean"], np.float64), scale=np.asarray(d["scale"], np.float64))


class Dataset(abc.ABC):
    """The data interface: what a run (the training loop, the callbacks, the checks, the outputs)
    asks of its data, whatever holds it. arrays.Splits (arrays every rank holds) and
    stream.StreamSplits (files each rank reads a share of, any format: formats.py) implement it;
    nothing else asks which one it has. Its behaviours are abstract methods; its facts are what
    each implementation holds (dataclass fields or properties).

    - global facts: ``n_train``, ``n_val``, ``n_test``, ``input_shape``, ``feature_names``,
      ``class_names`` (empty for regression), ``scaler``, ``target`` (regression's scaling),
      ``target_name``;
    - ``train_feed(rank, size, config, epoch, position)``: this rank's training batches of an
      epoch after its first ``position`` samples (then of the epochs after it), for a world of
      ``size``: an object with ``steps`` (of that first epoch), ``keras_input()`` (what
      model.fit takes), ``failure(after_error=False)`` (data that went bad mid-run, or None) and
      ``close()`` (ends what reads beside training: the loop calls it when a fit ends);
    - ``step_rows(rank, size, config, epoch, position)``: the rows this rank trains in each step
      of that epoch (or of its rest), 0 for a padded step: what its exact metrics count;
    - ``eval_pieces(which, rank, size)``: this rank's share of the validation or test rows;
    - ``fingerprint()``: what the consensus check and a checkpoint record of the data, to prove
      every rank (and a resumed run) has the same;
    - ``plan_lines(size, shuffle_buffer)``: what each rank would read, or None;
    - ``class_counts()``: classification: (train, val, test) rows of each class, in
      ``class_names`` order (empty for regression), which ``check_splits`` holds to one rule;
    - ``here(config)``: the dataset as this host sees it, when its facts came from another rank
      (an elastic worker learns them from the state's sync): what the consensus check compares
      is this host's own. Raises DataError.
    """

    # The global facts, the same on every rank.
    n_train: int
    n_val: int
    n_test: int
    input_shape: Tuple[int, ...]
    feature_names: Tuple[str, ...]
    class_names: Tuple[str, ...]
    scaler: Standardizer
    target: Optional[Standardizer]
    target_name: str

    @abc.abstractmethod
    def train_feed(self, rank: int, size: int, config, epoch: int, position: int = 0) -> Any:
        """This rank's training batches from ``epoch`` after ``position`` samples (class doc)."""

    @abc.abstractmethod
    def eval_pieces(self, which: str, rank: int, size: int) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        """This rank's share of the "val" or "test" rows, model-ready, in pieces."""

    @abc.abstractmethod
    def fingerprint(self) -> Dict[str, Any]:
        """What the consensus check and a checkpoint record of the data."""

    @abc.abstractmethod
    def plan_lines(self, size: int, shuffle_buffer: int) -> Optional[List[str]]:
        """What each rank would read at this world size, or None."""

    @abc.abstractmethod
    def class_counts(self) -> List[Tuple[int, int, int]]:
        """Classification: (train, val, test) rows of each class, in class_names order."""

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def n_outputs(self) -> int:
        return self.n_classes or 1

    @property
    def model_inputs(self):
        """model_fn's first argument: the number of features of a table, else the sample shape."""
        return self.input_shape[0] if len(self.input_shape) == 1 else self.input_shape

    def step_rows(self, rank: int, size: int, config, epoch: int, position: int = 0) -> np.ndarray:
        """Each step's slice of the global batch (sharding.py), unless the data shares steps otherwise."""
        from . import sharding

        return sharding.step_rows(self.n_train, rank, size, config.batch_size, position)

    def here(self, config) -> "Dataset":
        return self  # rows every rank loaded itself

    def preprocessing(self) -> Dict[str, object]:
        """What predict needs to turn a raw row into model input and a class name or a value."""
        return preprocessing(self.feature_names, self.class_names, self.scaler, self.input_shape, self.target,
                             self.target_name)


def preprocessing(feature_names, class_names, scaler: Standardizer, input_shape, target: Optional[Standardizer],
                  target_name: str) -> Dict[str, object]:
    """preprocessing.json of a run (in-memory and streamed data alike)."""
    prep: Dict[str, object] = {"task": "regression" if target is not None else "classification",
                               "feature_names": list(feature_names), "class_names": list(class_names),
                               "scaler": scaler.to_dict(), "input_shape": [int(v) for v in input_shape]}
    if target is not None:
        prep.update(target=target.to_dict(), target_name=target_name)
    return prep


SPLITS = ("training", "validation", "test")


def check_splits(dataset: Dataset, val_fraction: float, test_fraction: float) -> Optional[str]:
    """The rule every dataset meets before training, in memory or from files: a split asked for
    is not empty, and (classification) every class has training samples. None, or one message
    naming the split or the class, with the counts. Arithmetic on global facts: every rank finds
    the same."""
    counts = (dataset.n_train, dataset.n_val, dataset.n_test)
    shown = "/".join(map(str, counts))
    options = ("", f"--val-fraction {val_fraction:g}", f"--test-fraction {test_fraction:g}")
    for name, n, fraction, option in zip(SPLITS, counts, (1.0, val_fraction, test_fraction), options):
        if fraction > 0 and n == 0:
            remedy = f" with {option}: more data or a larger fraction" if option else ""
            if name == "validation":
                remedy += " (or --val-fraction 0: no validation)"
            return f"the {name} split is empty: {sum(counts)} sample(s) gave train/val/test {shown}{remedy}"
    for name, per_split in zip(dataset.class_names, dataset.class_counts()):
        if per_split[0] == 0:
            return (f"class {name!r} has no training samples (train/val/test {'/'.join(map(str, per_split))}): "
                    f"a model cannot learn it; more data for it, or leave its rows out")
    return None


def agree_failure(problem: Optional[str], what: str, size: Optional[int] = None) -> None:
    """Collective: StreamError on every rank if ``problem`` is set on any (a read that failed
    mid-run), the first failing rank's message, naming the ranks when not all of them failed.
    ``size``: the world's, when the caller knows it (1: nothing to gather)."""
    # Horovod: every rank reaches this allgather, failed or not.
    found = [problem] if size == 1 else runtime.allgather(problem, what)
    failed = [(rank, msg) for rank, msg in enumerate(found) if msg]
    if not failed:
        return
    rank, message = failed[0]
    if len(failed) < len(found):
        message = f"{message} (read by rank(s) {', '.join(str(r) for r, _ in failed)})"
    err = StreamError(message)
    err.agreed = True  # every rank raises it: they leave together (cli.py)
    raise err
