"""File datasets at scale: each rank reads a share of the units, global facts by collectives,
training batches streamed from the files every epoch; no rank holds the dataset.

The facts pass (``load``, collective): the units of sources.py are dealt out round-robin
(unit u to rank u mod N). Each rank reads only its units and, for every row, decides its split
from the seed and the row's identity (file, unit, row in unit), so the split is the same for
every world size. From its training rows it keeps per-feature count/mean/M2 (combined over
ranks exactly, Chan et al.), and from every row the label (the vocabulary is the union); for
regression, the moments of the numeric target instead (its scaler).
Evaluation (``StreamSplits.eval_pieces``) reads the validation or test rows of the same units
again when needed: rank r scores its units' rows, and the exact metrics add per-rank sums.

The training stream (``TrainStream``): the global training order is the units in file order
(permuted per epoch when shuffling), grouped into windows of whole units holding at least
``--shuffle-buffer`` training rows (the epoch's remainder joins the last), each window's rows
in a stratified random order (every unit's rows spread evenly over the window), all seeded by
(seed, epoch): the same on every rank and for every world size. Step s takes the global
positions sharding.global_steps gives (the same rule as in memory). Who trains a row of a
window: when the window has at least N units, the rank that owns its unit (whole units dealt
out so that the ranks' shares are within SNAP of even, else the window cut into N equal runs),
so a rank reads only its units (the bytes per rank fall as 1/N) and, the order being
stratified, gets its share of each step give or take a few rows (a rank's loss weight
n_rank * N / n_step keeps the global mean exact, and its exact metrics count its rows:
step_rows); otherwise (no shuffling, or fewer units than ranks) every rank reads the window and
keeps its contiguous slice of each step. So, with or without shuffling, N processes x batch b
train on exactly the batches 1 process x batch N*b does. A rank's rows are chosen from row
numbers before parsing: CSV text is parsed for those rows alone, Parquet columns are decoded
whole and filtered. The memory (about two windows / N, one training and one read ahead, plus a
piece being read) falls with N and does not grow with the data.
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field, replace
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .. import runtime, watchdog
from ..runtime import AgreedFailure
from . import arrays, formats, sharding, sources
from .feed import READ_AHEAD_STEPS, StreamFeed
from .interface import DataError, Dataset, Standardizer
from .splitting import TEST, TRAIN, VAL, Moments, rows_of, unit_splits
from .windows import Share, Slices, Window, owned_runs, stratified, take


@dataclass(frozen=True)
class StreamSplits(Dataset):
    """A file dataset, the counterpart of arrays.Splits behind the same interface (interface.Dataset).
    Holds no rows: evaluation rows are read from this rank's units when needed, training rows
    are streamed (TrainStream)."""

    source: sources.Source
    scaler: Standardizer
    feature_names: Tuple[str, ...]
    class_names: Tuple[str, ...]  # empty for regression
    target: Optional[Standardizer]  # regression: the target's scaling (labels are standardised values)
    unit_train_rows: Tuple[int, ...]  # training rows per unit, global
    unit_rows: Tuple[int, ...]  # rows per unit, global
    n_train: int
    n_val: int
    n_test: int
    digest: str  # over every unit's content digest, in unit order
    counts: Tuple[Tuple[int, int, int], ...]  # classification: (train, val, test) rows of each class
    sample: str  # sources.Source.sample_digest, computed on this rank
    seed: int = 0
    val_fraction: float = 0.0
    test_fraction: float = 0.0
    _step_rows: Dict[Tuple, np.ndarray] = field(default_factory=dict, init=False, compare=False, repr=False)

    @property
    def input_shape(self) -> Tuple[int, ...]:
        return self.source.shape

    @property
    def raw(self) -> bool:
        """Samples stream as read (uint8 images) and are standardised inside TensorFlow."""
        return self.source.dtype != "float32"

    @property
    def sample_dtype(self):
        return np.dtype(self.source.dtype)

    def standardise(self, x: np.ndarray) -> np.ndarray:
        """Read samples as model input: what training does to them (tables in float64, then
        float32; images in float32, as standardise_tf)."""
        return self.scaler.transform32(x) if self.raw else self.scaler.transform(x)

    def standardise_tf(self, x):
        """Streamed raw samples standardised inside TensorFlow (float32: Standardizer.transform32's bits)."""
        import tensorflow as tf

        mean = tf.constant(self.scaler.mean.astype(np.float32))
        scale = tf.constant(self.scaler.scale.astype(np.float32))
        return (tf.cast(x, tf.float32) - mean) / scale

    @property
    def target_name(self) -> str:
        return self.source.label

    @property
    def label_dtype(self):
        return np.int64 if self.target is None else np.float32

    def train_feed(self, rank: int, size: int, config, epoch: int, position: int = 0) -> "StreamFeed":
        """This rank's training batches of ``epoch`` after its first ``position`` samples, then of
        the epochs after it, streamed from the files (StreamFeed)."""
        return StreamFeed(TrainStream(self, rank, size, config.batch_size, config.shuffle, config.shuffle_buffer),
                          epoch, position, config.reader)

    def step_rows(self, rank: int, size: int, config, epoch: int, position: int = 0) -> np.ndarray:
        """Windows shared by units give a rank a few rows more or fewer than its slice of a step
        (TrainStream.shares): counted from the windows' plans, as reading them gives."""
        key = (rank, size, config.batch_size, config.shuffle, config.shuffle_buffer, epoch, position)
        if key not in self._step_rows:
            stream = TrainStream(self, rank, size, config.batch_size, config.shuffle, config.shuffle_buffer)
            self._step_rows.clear()  # one epoch's at a time: a fit asks for it at its start and end
            self._step_rows[key] = stream.step_rows(epoch, position)
        return self._step_rows[key]

    def eval_pieces(self, which: str, rank: int, size: int) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        """This rank's share of the validation ("val") or test rows, standardised, in pieces: the
        rows of the units it read in the facts pass (unit u mod N), read again now."""
        wanted = VAL if which == "val" else TEST
        mine = [u for u in range(rank, len(self.source.units), size) if self.unit_rows[u] != self.unit_train_rows[u]]
        ahead = formats.read_ahead(self.source, mine)
        try:
            for i, u in enumerate(mine):
                unit = self.source.units[u]
                watchdog.progress(f"reading this rank's {which} rows (unit {i + 1} of {len(mine)})")
                for x, y in formats.read_unit(self.source, unit, select=functools.partial(rows_of, self, wanted, unit),
                                              ahead=ahead):
                    if len(y):
                        yield self.standardise(x), self.encode(y)
        finally:
            ahead.close()

    def encode(self, labels: np.ndarray) -> np.ndarray:
        """Label texts -> class codes: class_names is sorted, so a code is a sorted position;
        regression: the standardised numeric target."""
        if self.target is not None:
            return self.target.transform(numeric_target(labels, self.source))
        names = np.asarray(self.class_names)
        codes = np.minimum(np.searchsorted(names, labels), len(names) - 1)
        unknown = names[codes] != labels
        if unknown.any():  # the files changed since the facts pass
            raise DataError(f"{self.source.spec}: label {labels[unknown][0]!r} was not there when the run started")
        return codes.astype(np.int64)

    def window_rows(self, shuffle_buffer: int) -> int:
        """Training rows of one shuffle window, at most: whole units are added until the buffer
        is reached, so a window can overshoot it by one unit; the epoch's last window also holds
        the remainder after it (less than the buffer)."""
        biggest = max(self.unit_train_rows or (0,))
        return min(self.n_train, 2 * max(shuffle_buffer, biggest) + biggest)

    def plan_lines(self, size: int, shuffle_buffer: int) -> List[str]:
        """What each rank would read at this world size, and an estimate of its data memory."""
        src = self.source
        total_bytes = sum(src.sizes)
        what = "image" if src.kind == "images" else src.kind
        lines = [f"data: {len(src.files)} {what} file(s), {total_bytes / 1e6:.1f} MB, {len(src.units)} unit(s) "
                 f"({formats.unit_words(src)}), "
                 f"{sum(self.unit_rows)} rows; the {self.n_train} training rows stream each epoch: a shuffle "
                 f"window of at least {size} unit(s) read by unit (each rank its own), a smaller one or "
                 f"--no-shuffle by every rank"]
        f = int(np.prod(self.input_shape)) * self.sample_dtype.itemsize / 4  # a sample's bytes, in float32s
        piece = max(self.unit_rows or (0,)) if src.kind != "parquet" else min(sources.READ_BATCH_ROWS,
                                                                           max(self.unit_rows or (0,)))
        window = self.window_rows(shuffle_buffer)
        for rank in range(size):
            mine = range(rank, len(src.units), size)
            rows = sum(self.unit_rows[u] for u in mine)
            evaluation = sum(self.unit_rows[u] - self.unit_train_rows[u] for u in mine)
            files = sorted({src.units[u].file for u in mine})
            names = ", ".join(src.files[i].rsplit("/", 1)[-1] for i in files[:4]) + (", ..." if len(files) > 4 else "")
            # Two windows' own rows (float32 and a code; one training, one being read ahead), the
            # window's positions and permutation (3 int64 per row), and a piece being read (a few
            # float64 copies; Parquet: one decoded column of a row group, and the group's rows
            # this rank keeps, every column).
            group = max(self.unit_rows or (0,)) * 8 * (1 + f / size) if src.kind == "parquet" else 0
            memory = 2 * window / size * (4 * f + 8) + window * 24 + 4 * piece * 8 * f + group
            # A file per sample (an image folder): the unit count says it; file names would not.
            where = "" if src.file_labels else f" of {len(files)} file(s) ({names or 'none'})"
            lines.append(f"rank {rank} reads {len(mine)} unit(s){where}: "
                         f"{rows} rows, scores their {evaluation} validation/test rows; data memory ~"
                         f"{memory / 1e6:.1f} MB")
        return lines

    def class_counts(self) -> List[Tuple[int, int, int]]:
        return list(self.counts)

    def preprocessing(self) -> Dict[str, object]:
        """Dataset.preprocessing, and the format the run read (predict reads the same kind of input)."""
        return {**super().preprocessing(), "format": self.source.kind}

    def here(self, config) -> "StreamSplits":
        """These facts (another rank's facts pass) with this host's files: listed and sampled here,
        so the consensus check compares this host's view, not the sender's."""
        source = formats.open_source(config.dataset, formats.label_of(config), config)
        return replace(self, source=source, sample=source.sample_digest())

    def fingerprint(self) -> Dict[str, Any]:
        return {"data.source": f"{self.source.kind}:{self.source.spec}", "data.files": self.source.listing(),
                "data.rows": [self.n_train, self.n_val, self.n_test], "data.sha256": self.digest[:16],
                "data.sample": self.sample[:16],
                "data.class_names": list(self.class_names), "data.feature_names": list(self.feature_names),
                "data.target": None if self.target is None else self.target.to_dict()}


def load(config, rank: int, size: int, host: str = "") -> StreamSplits:
    """Collective: the facts pass (module doc). Raises AgreedFailure on every rank if any rank's
    read failed, with that rank's message."""
    # 1. One rank per host (its first) lists the files, reads their headers and samples their
    # edges; the host's other ranks take its view from one allgather (an object store is asked
    # once per host, not once per rank). A host that sees other files than the others is caught
    # by the consensus fingerprint later. The view is shared by the ranks that name the same
    # location (a local path made absolute: ranks in other working directories see other files).
    from .. import storage

    kind, _, spec = config.dataset.partition(":")
    try:
        where = storage.absolute(spec)
    except storage.StorageError:
        where = spec  # an unsupported scheme: open_source says so below
    opened, error = None, None
    keys = runtime.allgather((host, kind, where), "data.hosts")
    key = keys[rank]
    if keys.index(key) == rank:  # the first rank of this host to name this location
        try:
            source = formats.open_source(config.dataset, formats.label_of(config), config)
            opened = (source, source.sample_digest())
        except DataError as err:
            error = str(err)
    views = runtime.agree_gather(error, opened, "data.open")
    source, sample = views[keys.index(key)]

    # 2. This rank's units: split, moments of training rows, labels, evaluation rows, digests.
    mine = tuple(range(rank, len(source.units), size))
    local: Dict[str, Any] = {}
    try:
        local = _read_share(source, mine, config)
    except DataError as err:
        error = str(err)
    gathered = runtime.agree_gather(error, local, "data.facts")

    # 3. Global facts, computed alike on every rank from the gathered summaries.
    moments, target_moments = Moments(), Moments()
    for g in gathered:
        moments.merge(g["moments"])
        target_moments.merge(g["target"])
    unit_train = [0] * len(source.units)
    unit_rows = [0] * len(source.units)
    unit_digest = [""] * len(source.units)
    for g in gathered:
        for u, (rows, n, d) in g["units"].items():
            unit_rows[u], unit_train[u], unit_digest[u] = rows, n, d
    per_label: Dict[str, np.ndarray] = {}
    for g in gathered:
        for name, row in g["labels"].items():
            per_label[name] = per_label.get(name, 0) + row
    labels = sorted(per_label)
    n_val = sum(g["n_val"] for g in gathered)
    n_test = sum(g["n_test"] for g in gathered)
    n_train = sum(unit_train)
    if n_train == 0:
        raise AgreedFailure(f"{config.dataset}: no training rows (read {n_val + n_test} validation/test rows)")
    target = None
    if config.regression:
        target = _scaler(target_moments)
    elif "" in labels:
        raise AgreedFailure(f"{config.dataset}: some rows have an empty label")
    elif len(labels) < 2:
        raise AgreedFailure(f"{config.dataset}: need at least 2 classes, found {len(labels)}")
    scaler = _scaler(moments)
    if config.scale == "none":
        scaler = Standardizer(mean=np.zeros_like(scaler.mean), scale=np.ones_like(scaler.scale))
    digest = hashlib.sha256("".join(unit_digest).encode()).hexdigest()
    return StreamSplits(
        source=source, scaler=scaler, feature_names=source.features, class_names=tuple(labels), target=target,
        counts=tuple(tuple(int(v) for v in per_label[name]) for name in labels) if target is None else (),
        unit_train_rows=tuple(unit_train), unit_rows=tuple(unit_rows), n_train=n_train, n_val=n_val, n_test=n_test,
        digest=digest,
        sample=sample,
        seed=config.seed, val_fraction=config.val_fraction, test_fraction=config.test_fraction)


def _scaler(moments: Moments) -> Standardizer:
    std = np.sqrt(moments.m2 / moments.n)
    return Standardizer(mean=moments.mean, scale=np.where(std > 0, std, 1.0))


def numeric_target(labels: np.ndarray, source: sources.Source) -> np.ndarray:
    """Regression: the label texts as numbers (arrays.numeric_target), errors naming the source."""
    try:
        return arrays.numeric_target(labels, source.label)
    except DataError as err:
        raise DataError(f"{source.spec}: {err}") from None


def _read_share(source: sources.Source, units: Sequence[int], config) -> Dict[str, Any]:
    moments, target = Moments(), Moments()
    labels: Dict[str, np.ndarray] = {}  # classification: rows of each label per split (train, val, test)
    per_unit: Dict[int, Tuple[int, int, str]] = {}
    counts = np.zeros(3, np.int64)
    for i, u in enumerate(units):
        unit = source.units[u]
        watchdog.progress(f"reading this rank's share of the data's facts (unit {i + 1} of {len(units)})")
        h = hashlib.sha256()
        offset, n_train = 0, 0
        for x, y in formats.read_unit(source, unit):
            split = unit_splits(config, unit, offset, len(y))
            offset += len(y)
            h.update(x)  # contiguous: hashed in place
            h.update("\0".join(y).encode())
            kept = x[split == TRAIN]
            moments.add(kept.reshape(-1, kept.shape[-1]))  # per feature; per channel of an image
            n_train += int(np.sum(split == TRAIN))
            counts += np.bincount(split, minlength=3)
            if config.regression:
                target.add(numeric_target(y, source)[split == TRAIN])
            else:
                names, inverse = np.unique(y, return_inverse=True)
                per = np.zeros((len(names), 3), np.int64)
                np.add.at(per, (inverse, split), 1)
                for name, row in zip(names.tolist(), per):
                    labels[name] = labels.get(name, 0) + row
        per_unit[u] = (offset, n_train, h.hexdigest())
    return {"moments": moments, "target": target, "labels": labels, "units": per_unit, "n_val": int(counts[VAL]),
            "n_test": int(counts[TEST])}


class TrainStream:
    """This rank's training batches, streamed: (x, y, loss weight) per step, epoch after epoch.

    The global order (module doc) is cut into windows of whole units holding at least
    ``shuffle_buffer`` training rows (one unit per window without shuffling); a window's
    permutation is known before it is read, since the facts pass counted every unit's training
    rows. So each row's global position is known as it arrives, and a rank keeps only the rows
    that fall in its own slices: memory per rank ~ window / N.
    ``epochs(start, position)`` is an endless generator of steps from epoch ``start`` on (its
    first ``position`` samples already trained: the windows before them are not read): Keras
    takes the steps of each epoch from one iterator.
    """

    def __init__(self, splits: StreamSplits, rank: int, size: int, batch_size: int, shuffle: bool,
                 shuffle_buffer: int):
        self.splits, self.rank, self.size = splits, rank, size
        self.batch_size, self.shuffle, self.window = batch_size, shuffle, shuffle_buffer
        self.error: Optional[str] = None  # a DataError met while streaming (tf.data hides its type)
        self.before_read: Optional[Any] = None  # called before each window is read (reader.py hands over then)

    def slices(self, position: int = 0) -> Slices:
        return Slices(self.splits.n_train, self.rank, self.size, self.batch_size, position)

    def windows(self, epoch: int) -> List[List[int]]:
        """The epoch's units (those with training rows) in order, grouped into windows."""
        s = self.splits
        order = np.arange(len(s.source.units))
        if self.shuffle:
            order = np.random.default_rng([s.seed, epoch, 1]).permutation(order)
        out: List[List[int]] = []
        held = self.window  # start a new window at the first unit
        for u in (int(u) for u in order if s.unit_train_rows[u]):
            if held >= self.window or not self.shuffle:
                out.append([])
                held = 0
            out[-1].append(u)
            held += s.unit_train_rows[u]
        if self.shuffle and len(out) > 1 and held < self.window:
            # The epoch's remainder (often a unit or two) joins the window before it: a window of
            # one unit would be read by every rank (shares), and shuffled on its own.
            out[-2:] = [out[-2] + out[-1]]
        return out

    def shares(self, epoch: int, slices: Slices, plan_only: bool = False) -> Iterator[Share]:
        """The epoch's windows as this rank takes them, those wholly before the slices' position
        left out. Shuffled, a window of at least N units is shared by units (owned_runs): each
        rank owns whole units (or runs of the window's rows, when whole units cannot give even
        shares) and reads only those; the stratified order (stratified) gives every rank its
        share of each step, give or take a few rows. Otherwise (no shuffling: a window is one
        unit; or fewer units than ranks) every rank reads the window's units and owns its slice
        of each step. The order does not depend on N, only who owns a row does: N x b trains on
        the batches 1 x N*b does."""
        s = self.splits
        base = 0
        for k, units in enumerate(self.windows(epoch)):
            rows = np.array([s.unit_train_rows[u] for u in units], np.int64)
            total = int(rows.sum())
            if base + total > slices.position:
                yield self._share(epoch, k, units, rows, base, slices, plan_only)
            base += total

    def _share(self, epoch: int, k: int, units: List[int], rows: np.ndarray, base: int, slices: Slices,
               plan_only: bool = False) -> Share:
        """``plan_only``: which units to read, without the window's order (no ``target``, ``own``)."""
        s, total = self.splits, int(rows.sum())
        first = np.cumsum(rows) - rows
        by_unit = self.shuffle and self.size > 1 and len(units) >= self.size
        runs = owned_runs(rows, self.size)[self.rank] if by_unit else None
        # The units its runs touch (the window's first, when a resume's position falls in it, may
        # have none of its rows left: read and none kept).
        touched = range(len(units)) if runs is None else [
            i for i in range(len(units)) if any(lo < first[i] + rows[i] and first[i] < hi for lo, hi in runs)]
        share = Share(base, total, None, runs, np.empty(0, np.int64),
                       [(units[i], int(first[i]), int(rows[i])) for i in touched])
        if plan_only:
            return share
        if self.shuffle:
            share.target = stratified(np.random.default_rng([s.seed, epoch, 2, k]), rows)
        arrival = np.arange(total) if runs is None else np.concatenate([np.arange(lo, hi) for lo, hi in runs])
        share.own = np.sort(share.positions(arrival[share.mine(arrival, slices)]))
        return share

    def step_rows(self, epoch: int, position: int = 0) -> np.ndarray:
        """The rows this rank trains in each step of the epoch (or of its rest after
        ``position``), 0 where it has none (the step gives it one row of loss weight 0): what
        its exact metrics count (sharding.Cursor). Arithmetic only, the same as reading gives:
        slices of each step unless windows are shared by units (shuffled, N > 1)."""
        if self.size == 1 or not self.shuffle:
            return sharding.step_rows(self.splits.n_train, self.rank, self.size, self.batch_size, position)
        slices = self.slices(position)
        counts = np.zeros(len(slices.steps), np.int64)
        for share in self.shares(epoch, slices):
            counts += np.bincount(slices.step_of(share.own), minlength=len(counts))
        return counts

    def own_rows(self, epoch: int, slices: Slices) -> Iterator[Tuple[np.ndarray, np.ndarray, np.ndarray, int]]:
        """This rank's training rows of the epoch, in global order, one window at a time: x
        (standardised float32), class codes, their global positions, and the window's end (every
        position below it has arrived). Each row is written once, straight to its place."""
        # An object store's units fetched ahead, in this order (sources.ReadAhead).
        order = [u for share in self.shares(epoch, slices, plan_only=True) for u, _, _ in share.reads]
        ahead = formats.read_ahead(self.splits.source, order)
        try:
            yield from self._windows(self.shares(epoch, slices), slices, ahead)
        finally:
            ahead.close()

    def _windows(self, shares: Iterator[Share], slices: Slices, ahead):
        s = self.splits
        for share in shares:
            window = Window(s, slices, share)
            if share.reads and self.before_read is not None:
                self.before_read()
            for u, first, rows in share.reads:
                unit = s.source.units[u]
                window.arrived, window.limit = first, first + rows
                for x, y in formats.read_unit(s.source, unit, select=functools.partial(window.select, unit),
                                              ahead=ahead):
                    window.put(x, s.encode(y))
                if window.arrived != first + rows:
                    raise DataError(f"{s.source.spec}: the files changed since the run started "
                                    f"(a unit has {window.arrived - first} training rows where it had {rows})")
            yield window.x, window.y, share.own, share.base + share.total

    def epoch_batches(self, epoch: int, position: int = 0) -> Iterator[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """This rank's steps of an epoch, or of its rest after ``position`` samples."""
        s = self.splits
        slices = self.slices(position)
        rows = self.own_rows(epoch, slices)
        held_x: List[np.ndarray] = []  # windows (or what is left of them), oldest first
        held_y: List[np.ndarray] = []
        held_at: List[np.ndarray] = []  # their global positions
        arrived = position  # every position below this has arrived
        for start, stop in slices.steps:
            if arrived < stop:
                # What is left of the last window is less than a step: copy it, so the window
                # itself is freed before the next one is read.
                held_x, held_y = [x.copy() for x in held_x], [y.copy() for y in held_y]
                while arrived < stop:
                    x, y, at, arrived = next(rows)
                    held_x.append(x)
                    held_y.append(y)
                    held_at.append(at)
            need = sum(int(np.searchsorted(at, stop)) for at in held_at)  # this rank's rows of the step
            if need:
                take(held_at, need)
                yield take(held_x, need), take(held_y, need), np.full(need, need * self.size / (stop - start),
                                                                        np.float32)
            else:
                # No row of this step is this rank's (the rest of an epoch in a bigger world, or
                # a step whose rows all fell in other ranks' units): it runs the step on one row
                # of zeros with loss weight 0 (sharding.local_batches).
                yield (np.zeros((1, *s.input_shape), s.sample_dtype), np.zeros(1, s.label_dtype),
                       np.zeros(1, np.float32))

    def epochs(self, start: int, position: int = 0) -> Iterator[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
        epoch = start
        try:
            while True:
                yield from self.epoch_batches(epoch, position)
                epoch, position = epoch + 1, 0
        except DataError as err:
            # End the stream instead of raising through tf.data (which logs a traceback); the
            # feed then gives idle steps (``idle``) until the ranks agree to stop.
            self.error = f"{err} (epoch {epoch + 1})"

    def idle(self, chunk: int = 0) -> Iterator[Tuple[np.ndarray, ...]]:
        """After a read failed on this rank: steps of one zero row with loss weight 0, without
        end. A failure need not come at the same step on every rank (a storage timeout comes
        when it comes), so this rank keeps stepping with the others, its gradient zero, until
        the next agreement (stopping.StopCheck, callbacks.FeedGuard at the epoch's end) stops
        every rank together with its message. ``chunk``: that many steps per item, as the
        reader process's chunks (x, y, w, rows per step); else one step per item."""
        s = self.splits
        n = max(chunk, 1)
        item = (np.zeros((n, *s.input_shape), s.sample_dtype), np.zeros(n, s.label_dtype), np.zeros(n, np.float32))
        if chunk:
            item += (np.ones(n, np.int64),)
        while True:
            yield item

    def epochs_then_idle(self, start: int, position: int = 0) -> Iterator[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """``epochs``, then idle steps if it ended by a failure."""
        yield from self.epochs(start, position)
        if self.error:
            yield from self.idle()

    def check_files(self) -> Optional[str]:
        """After a failure: did a file vanish or change under the run? (Every rank finds the same.)"""
        from .. import storage

        for path, size in zip(self.splits.source.files, self.splits.source.sizes):
            try:
                found = storage.info(path)  # one request: what is there, and its size
            except storage.StorageError as err:
                return str(err)
            if not found.is_file:
                return f"{path} disappeared while being read"
            if found.size != size:
                return f"{path} changed while being read (size {size} -> {found.size} bytes)"
        return None

    def read_ahead_steps(self) -> int:
        """How many batches are made ahead of training. A window is read whole before its first
        batch (with shuffling, that batch may need its last row): read ahead up to a window's
        steps, so the next window is read while this one trains."""
        window = self.splits.window_rows(self.window) if self.shuffle else 0
        return max(READ_AHEAD_STEPS, window // (self.size * self.batch_size) + 2)

