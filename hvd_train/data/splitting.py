"""Which split a file dataset's sample is in, and the moments its facts pass adds up.

A sample is identified by (file, unit, place in the unit) (a format's units: data/formats.py);
its split (TRAIN, VAL, TEST) is a hash of that identity and the seed mapped to [0, 1), below
``--test-fraction`` test, then validation: the same for every world size and every reader.
Moments: count, mean and sum of squared deviations per feature (per channel of an image),
merged exactly over the ranks (Chan et al.).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .sources import Unit

TRAIN, VAL, TEST = 0, 1, 2
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, vectorised over uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def row_splits(seed: int, file: int, unit: int, first: int, rows: int, val_fraction: float,
               test_fraction: float) -> np.ndarray:
    """The split (TRAIN, VAL, TEST) of rows [first, first + rows) of a unit: a hash of (seed, file,
    unit, row) mapped to [0, 1); below test_fraction is test, then validation. World-size free."""
    with np.errstate(over="ignore"):
        key = _mix(np.uint64(seed % (1 << 64)) ^ _mix(np.uint64(file) * _GOLDEN + np.uint64(unit)))
        row = np.arange(first, first + rows, dtype=np.uint64)
        u = (_mix(key + row * _GOLDEN) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    out = np.full(rows, TRAIN, np.int8)
    out[u < test_fraction + val_fraction] = VAL
    out[u < test_fraction] = TEST
    return out


@dataclass
class Moments:
    """Count, mean and sum of squared deviations per feature (float64), mergeable exactly."""

    n: int = 0
    mean: Optional[np.ndarray] = None
    m2: Optional[np.ndarray] = None

    def add(self, x: np.ndarray) -> None:
        if not len(x):
            return
        other = Moments(len(x), x.mean(axis=0), ((x - x.mean(axis=0)) ** 2).sum(axis=0))
        self.merge(other)

    def merge(self, o: "Moments") -> None:
        if not o.n:
            return
        if not self.n:
            self.n, self.mean, self.m2 = o.n, o.mean.copy(), o.m2.copy()
            return
        n = self.n + o.n
        delta = o.mean - self.mean
        self.mean = self.mean + delta * (o.n / n)
        self.m2 = self.m2 + o.m2 + delta ** 2 * (self.n * o.n / n)
        self.n = n



def rows_of(config, split: int, unit: Unit, offset: int, rows: int) -> np.ndarray:
    """Which rows [offset, offset + rows) of a unit are in ``split`` (a format's ``select``)."""
    return unit_splits(config, unit, offset, rows) == split


def unit_splits(config, unit: Unit, offset: int, rows: int) -> np.ndarray:
    """Splits of rows [offset, offset + rows) of a unit (a unit may arrive in pieces); ``config``:
    anything with seed, val_fraction and test_fraction."""
    return row_splits(config.seed, unit.file, unit.index, offset, rows, config.val_fraction, config.test_fraction)
