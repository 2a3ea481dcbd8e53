"""Rank consensus: before the first training collective, every rank proves it runs the same job.

Ranks that silently disagree (a different CSV on one host, another hvd_train or TensorFlow
version, a different argument) would otherwise hang in mismatched collectives or train on
different problems. Each rank sends a fingerprint; any difference stops every rank with one
message naming the rank and what differs.
"""
from __future__ import annotations

import hashlib
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .. import runtime
from ..data.interface import Dataset

# Which config fields are rank 0's alone: the output directory is chosen by rank 0 and broadcast.
_NOT_FINGERPRINTED = ("output_dir",)


def array_digest(*arrays: np.ndarray) -> str:
    """SHA-256 over dtypes, shapes and bytes: equal only for identical arrays."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def weights_digest(arrays: Sequence[np.ndarray]) -> str:
    """SHA-256 over the bytes of a model's weights (``model.get_weights()``), in order: every rank
    reports it at the end of a run, and a saved model can be checked against it."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def fingerprint(config, splits: Dataset, plan, versions: Dict[str, str]) -> Dict[str, Any]:
    """Everything that must be identical on every rank, flattened to comparable values."""
    fp: Dict[str, Any] = {f"config.{k}": v for k, v in config.to_dict().items() if k not in _NOT_FINGERPRINTED}
    fp.update(splits.fingerprint())  # data.Splits / stream.StreamSplits
    fp["plan.steps_per_epoch"] = plan.steps_per_epoch
    fp["plan.train_samples_per_rank"] = plan.train_samples_per_rank
    fp.update({f"version.{k}": v for k, v in versions.items() if k != "python"})
    return fp


def differences(fingerprints: List[Dict[str, Any]]) -> Optional[str]:
    """None if every rank matches rank 0, else one message naming each differing rank and key."""
    reference = fingerprints[0]
    problems = []
    for rank, fp in enumerate(fingerprints[1:], start=1):
        keys = sorted(k for k in set(reference) | set(fp) if reference.get(k) != fp.get(k))
        if keys:
            what = "; ".join(f"{k}: {_show(fp.get(k))} (rank 0: {_show(reference.get(k))})" for k in keys)
            problems.append(f"rank {rank} differs from rank 0 in {what}")
    if not problems:
        return None
    return "ranks disagree, stopping before training: " + " | ".join(problems)


def check(fp: Dict[str, Any]) -> None:
    """Collective: every rank calls this; raises AgreedFailure on every rank if any differs."""
    # Horovod: one allgather of every rank's fingerprint; each rank compares the same list.
    problem = differences(runtime.allgather(fp, "fingerprint"))
    if problem:
        raise runtime.AgreedFailure(problem)


def _show(value: Any) -> str:
    return "missing" if value is None else str(value)
