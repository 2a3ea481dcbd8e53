"""Who trains which row of a shuffle window (stream.TrainStream's windows), decided from row
numbers before anything is read.

The steps of an epoch (or of its rest from a position) and each rank's slice of every step
(Slices); a window's order (stratified: every unit's rows spread evenly over it); who owns a
window's rows (owned_runs: whole units dealt out when the ranks' shares stay within SNAP of
even, so each unit is read by one rank; else the window cut into equal runs); one window as
one rank takes it (Share), and read into place (Window). No format and no I/O here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np

from . import sharding
from .interface import DataError
from .sources import Unit
from .splitting import TRAIN, unit_splits


class Slices:
    """The steps of an epoch, or of its rest from ``position`` (sharding.remaining_steps: the
    rule the in-memory path follows), and this rank's contiguous slice of each step's positions
    (the owner of a position in a window taken by slices)."""

    def __init__(self, n: int, rank: int, size: int, batch_size: int, position: int = 0):
        self.steps = sharding.remaining_steps(n, position, size, batch_size)
        self.position, self.size = position, size
        lo, hi = [], []
        for start, stop in self.steps:
            sizes = sharding.split_evenly(stop - start, size)
            lo.append(start + sum(sizes[:rank]))
            hi.append(lo[-1] + sizes[rank])
        self.starts = np.array([start for start, _ in self.steps], np.int64)
        self.lo, self.hi = np.array(lo, np.int64), np.array(hi, np.int64)

    def step_of(self, positions: np.ndarray) -> np.ndarray:
        """The step (index into ``steps``) of each position at or after ``position``."""
        return np.searchsorted(self.starts, positions, side="right") - 1

    def mine(self, positions: np.ndarray) -> np.ndarray:
        if not self.steps:
            return np.zeros(len(positions), bool)
        step = self.step_of(positions)
        inside = step >= 0  # positions before ``position`` were trained before
        step = np.maximum(step, 0)
        return inside & (positions >= self.lo[step]) & (positions < self.hi[step])


def stratified(rng: np.random.Generator, rows: np.ndarray) -> np.ndarray:
    """A window's order, as ``target``: arrival index (the window's training rows in unit order,
    row order within a unit) -> place in the window. Each unit's rows are spread evenly over the
    window (row j of a unit of t rows, j a random rank among them, at key (j + U[0, 1)) / t; the
    window sorted by key): every stretch of the window, a step's global batch too, holds each
    unit's rows in proportion to its size, give or take one. So a rank that owns some units of
    the window gets its share of every step, give or take a few rows."""
    total = int(rows.sum())
    unit = np.repeat(np.arange(len(rows)), rows)
    rank = np.concatenate([rng.permutation(int(t)) for t in rows])  # each row's random rank in its unit
    order = np.argsort((rank + rng.random(total)) / rows[unit], kind="stable")
    target = np.empty(total, np.int64)
    target[order] = np.arange(total)
    return target


SNAP = 0.1  # a rank's share of a window may differ from an even one by this much, to read fewer units


def owned_runs(rows: np.ndarray, size: int) -> List[List[Tuple[int, int]]]:
    """Which arrival indices of a window (units of ``rows`` training rows, end to end) each of
    ``size`` ranks owns, as runs [lo, hi). Whole units, the biggest first to the least loaded
    rank, when every rank's share is then within SNAP of an even one: each unit read by one
    rank. Otherwise the window is cut into ``size`` runs of equal length (a cut within SNAP of a
    unit's edge moved to it), and a unit a cut falls in is read by the ranks on both sides."""
    total = int(rows.sum())
    first = np.cumsum(rows) - rows
    even = total / size
    load, owned = [0] * size, [[] for _ in range(size)]
    for i in sorted(range(len(rows)), key=lambda i: (-rows[i], i)):
        r = min(range(size), key=lambda r: (load[r], r))
        load[r] += int(rows[i])
        owned[r].append((int(first[i]), int(first[i] + rows[i])))
    if max(load) - even <= SNAP * even and even - min(load) <= SNAP * even:
        merged: List[List[Tuple[int, int]]] = []
        for runs in owned:  # adjacent units as one run
            merged.append([])
            for lo, hi in sorted(runs):
                if merged[-1] and merged[-1][-1][1] == lo:
                    lo = merged[-1].pop()[0]
                merged[-1].append((lo, hi))
        return merged
    cuts = [total * r // size for r in range(size + 1)]
    edges = np.append(first, total)
    for r in range(1, size):
        edge = int(edges[np.argmin(np.abs(edges - cuts[r]))])
        if abs(edge - cuts[r]) <= SNAP * even:
            cuts[r] = edge
    return [[(cuts[r], cuts[r + 1])] for r in range(size)]


@dataclass
class Share:
    """One window of an epoch as one rank takes it (TrainStream.shares). The window's training
    rows arrive in unit order (arrival index a); ``target`` maps a to its place in the window's
    order (None: no shuffling, the window is one unit in file order). ``runs``: the arrival
    indices [lo, hi) this rank owns when the window is shared by units (owned_runs), else None:
    it owns the positions of its slices of each step. ``own``: its global positions, sorted; ``reads``:
    (unit index, its first arrival index, its training rows) of the units it must read."""

    base: int
    total: int
    target: Optional[np.ndarray]
    runs: Optional[List[Tuple[int, int]]]
    own: np.ndarray
    reads: List[Tuple[int, int, int]]

    def positions(self, arrival: np.ndarray) -> np.ndarray:
        return self.base + (arrival if self.target is None else self.target[arrival])

    def mine(self, arrival: np.ndarray, slices: Slices) -> np.ndarray:
        """Which arrival indices are this rank's rows still to train."""
        positions = self.positions(arrival)
        if self.runs is None:
            return slices.mine(positions)
        owned = np.zeros(len(arrival), bool)
        for lo, hi in self.runs:
            owned |= (arrival >= lo) & (arrival < hi)
        return owned & (positions >= slices.position)


class Window:
    """A window being read by one rank (its Share): the rank's own rows written to x, y in global order."""

    def __init__(self, splits, slices: Slices, share: Share):  # a stream.StreamSplits
        self.splits, self.slices, self.share = splits, slices, share
        self.x = np.empty((len(share.own), *splits.input_shape), splits.sample_dtype)
        self.y = np.empty(len(share.own), splits.label_dtype)
        self.arrived = self.limit = 0  # arrival indices so far; the end of the unit being read
        self.places: List[np.ndarray] = []

    def select(self, unit: Unit, offset: int, n: int) -> np.ndarray:
        """Which rows of a piece are this rank's (decided from row numbers, before the text is parsed)."""
        train = np.flatnonzero(unit_splits(self.splits, unit, offset, n) == TRAIN)
        arrival = np.arange(self.arrived, self.arrived + len(train))
        self.arrived += len(train)
        if self.arrived > self.limit:
            raise DataError(f"{self.splits.source.spec}: the files changed since the run started "
                            f"(a unit has more training rows than it had)")
        mine = self.share.mine(arrival, self.slices)
        self.places.append(np.searchsorted(self.share.own, self.share.positions(arrival[mine])))
        keep = np.zeros(n, bool)
        keep[train[mine]] = True
        return keep

    def put(self, x: np.ndarray, codes: np.ndarray) -> None:
        """The next rows the ``select`` calls chose, once read (in their order; the rows one
        selection chose may arrive in several pieces)."""
        if not len(codes):
            return
        at = take(self.places, len(codes))
        # Standardised as the in-memory path does it: raw values to float32, then the scaler
        # (images: as read, standardised inside TensorFlow).
        self.x[at] = x if self.splits.raw else self.splits.scaler.transform(x.astype(np.float32))
        self.y[at] = codes


def take(held: List[np.ndarray], n: int) -> np.ndarray:
    """The first n > 0 rows of the arrays in ``held``, removed from it (a view where one array has them)."""
    parts, got = [], 0
    while got < n:
        k = min(n - got, len(held[0]))
        parts.append(held[0][:k])
        got += k
        if k == len(held[0]):
            held.pop(0)
        else:
            held[0] = held[0][k:]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)
