"""Which rank sees which sample, and when. Pure numpy: every rank computes the same plan.

Training policy (the same on every rank, derived only from global quantities):
- Each epoch has a global order of the n training samples (a permutation seeded by
  (seed, epoch), or 0..n-1 without shuffling).
- Step s consumes the global batch order[s*N*b : (s+1)*N*b] (N ranks, b per process), so
  ``steps = ceil(n / (N*b))`` on every rank, exactly what one process with batch N*b runs.
- Each global batch is split between the ranks in contiguous slices whose sizes differ by at
  most one. If the last global batch has fewer than N samples (some rank would get an empty
  batch) it is merged into the step before it.
- So the shards are disjoint and together cover every training sample every epoch, and every
  rank runs the same number of steps: the two things uneven shards break in Horovod.
- A rank's loss in a step is weighted by ``n_rank * N / n_step`` so that Horovod's average of
  the per-rank mean gradients equals the mean gradient over the whole global batch, even when
  the slices are uneven (the weight is exactly 1 whenever the step is full).

Resuming an epoch at position p of its order (an elastic reset, elastic.py): the remaining
samples order[p:] are planned by the same rule for the new world. When fewer remain than there
are ranks (the world grew at the end of an epoch), the ranks without a sample get one with loss
weight 0 (no gradient, and counted as zero samples in the exact metrics), so that every rank
still runs the step.

Evaluation policy: rank r takes samples r, r+N, r+2N, ... (any sizes, including zero); the
results are combined by sample count, so no equal-steps constraint applies.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np


def split_evenly(count: int, parts: int) -> List[int]:
    """Sizes of ``parts`` contiguous pieces of ``count`` items that differ by at most one."""
    base, extra = divmod(count, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def global_steps(n: int, world_size: int, batch_size: int) -> List[Tuple[int, int]]:
    """(start, stop) of each step's global batch within the epoch order."""
    if n < world_size:
        raise ValueError(f"{n} training samples cannot be shared by {world_size} processes")
    global_batch = world_size * batch_size
    bounds = [(s, min(s + global_batch, n)) for s in range(0, n, global_batch)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < world_size:
        # The remainder cannot give every rank a sample: fold it into the previous step.
        (start, _), (_, stop) = bounds[-2], bounds[-1]
        bounds[-2:] = [(start, stop)]
    return bounds


def steps_per_epoch(n: int, world_size: int, batch_size: int) -> int:
    return len(global_steps(n, world_size, batch_size))


def epoch_order(n: int, epoch: int, seed: int, shuffle: bool) -> np.ndarray:
    """The global sample order for one epoch: identical on every rank."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


def remaining_steps(n: int, position: int, world_size: int, batch_size: int) -> List[Tuple[int, int]]:
    """(start, stop) in the epoch order of each step after the first ``position`` samples."""
    left = n - position
    if left <= 0:
        return []
    if left < world_size:  # too few for every rank: one step, some ranks padded (local_batches)
        return [(position, n)]
    return [(position + start, position + stop) for start, stop in global_steps(left, world_size, batch_size)]


def local_batches(
    n: int, rank: int, world_size: int, batch_size: int, order: np.ndarray, position: int = 0
) -> List[Tuple[np.ndarray, float]]:
    """This rank's (sample indices, loss weight) for each step of an epoch, or of its rest from
    ``position``. A rank left without a sample gets order[position] with weight 0 (see above)."""
    batches = []
    for start, stop in remaining_steps(n, position, world_size, batch_size):
        sizes = split_evenly(stop - start, world_size)
        lo = start + sum(sizes[:rank])
        weight = sizes[rank] * world_size / (stop - start)
        rows = order[lo:lo + sizes[rank]] if sizes[rank] else order[position:position + 1]
        batches.append((rows, weight))
    return batches


def eval_shard(n: int, rank: int, world_size: int) -> np.ndarray:
    """Indices of the evaluation samples this rank scores (strided; may be empty)."""
    return np.arange(rank, n, world_size)


def step_rows(n: int, rank: int, world_size: int, batch_size: int, position: int = 0) -> np.ndarray:
    """This rank's real samples in each step of an epoch (or of its rest from ``position``)."""
    mine = local_batches(n, rank, world_size, batch_size, np.arange(n), position)
    return np.array([len(rows) if weight > 0 else 0 for rows, weight in mine], np.int64)


class Cursor:
    """Where an epoch (or its rest from ``position``) stands after ``done`` of its steps: the
    position in the epoch's order, and this rank's real samples so far. Pure arithmetic, the
    same on every rank: what a commit or a stop records mid-epoch. ``rows``: this rank's samples
    per step when its data shares steps otherwise than in slices (interface.Dataset.step_rows)."""

    def __init__(self, n: int, rank: int, world_size: int, batch_size: int, position: int = 0,
                 rows: Optional[np.ndarray] = None):
        self.start = position
        self.bounds = remaining_steps(n, position, world_size, batch_size)
        if rows is None:
            rows = step_rows(n, rank, world_size, batch_size, position)
        self.samples_after = np.cumsum(rows)

    @property
    def steps(self) -> int:
        return len(self.bounds)

    def position(self, done: int) -> int:
        return self.bounds[done - 1][1] if done else self.start

    def samples(self, done: int) -> int:
        return int(self.samples_after[done - 1]) if done else 0
