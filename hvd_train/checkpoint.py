"""Checkpoint files: written by rank 0 only, atomically; read by rank 0 only, then broadcast.

One checkpoint is one ``ckpt-epoch-NNNNNN.npz`` holding the model weights, the optimizer state
(iteration count and slots) and a JSON ``meta`` record: the epochs completed, the config and
plan of the run that wrote it, its history so far, the early-stopping state and a data
fingerprint. The shuffle order is a pure function of (seed, epoch) (sharding.epoch_order), so
the epoch number is all the RNG state needed to continue the same sample order.

A SHA-256 over every array and the meta record is stored beside them and checked on load, so
a truncated or corrupted file is detected, reported and skipped in favour of an older one.
"""
from __future__ import annotations

import json
import os
import re
import zipfile
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .consensus import array_digest

FORMAT = 1
_NAME = re.compile(r"^ckpt-epoch-(\d{6})\.npz$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (unreadable, corrupt, or from an incompatible run)."""


@dataclass(frozen=True)
class Checkpoint:
    path: str
    epoch: int  # epochs completed when it was written
    model_weights: List[np.ndarray]
    optimizer_weights: List[np.ndarray]
    meta: Dict[str, Any]


def file_name(epoch: int) -> str:
    return f"ckpt-epoch-{epoch:06d}.npz"


def listed(directory: str) -> List[Tuple[int, str]]:
    """(epoch, path) of the complete-looking checkpoint files, newest first (temp files ignored)."""
    if not directory or not os.path.isdir(directory):
        return []
    found = [(int(m.group(1)), os.path.join(directory, name))
             for name in os.listdir(directory) if (m := _NAME.match(name))]
    return sorted(found, reverse=True)


def save(directory: str, epoch: int, model_weights: List[np.ndarray], optimizer_weights: List[np.ndarray],
         meta: Dict[str, Any], keep: int) -> str:
    """Write the checkpoint for ``epoch`` atomically (temp file, fsync, rename), keep the newest ``keep``."""
    os.makedirs(directory, exist_ok=True)
    meta = {**meta, "format": FORMAT, "epoch": epoch}
    meta_bytes = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    arrays = {f"model_{i:04d}": np.asarray(w) for i, w in enumerate(model_weights)}
    arrays.update({f"optimizer_{i:04d}": np.asarray(w) for i, w in enumerate(optimizer_weights)})
    arrays["meta"] = meta_bytes
    digest = array_digest(*(arrays[k] for k in sorted(arrays)))
    path = os.path.join(directory, file_name(epoch))
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.savez(f, digest=np.frombuffer(digest.encode(), dtype=np.uint8), **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(directory)
    for _, old in listed(directory)[keep:]:
        os.remove(old)
    return path


def load(path: str) -> Checkpoint:
    """Read and verify one checkpoint; CheckpointError says why it cannot be used."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile) as err:
        raise CheckpointError(f"{path} is truncated or corrupt ({type(err).__name__}: {err})") from None
    if "digest" not in arrays or "meta" not in arrays:
        raise CheckpointError(f"{path} is not an hvd_train checkpoint (no digest or meta record)")
    stored = arrays.pop("digest").tobytes().decode(errors="replace")
    if array_digest(*(arrays[k] for k in sorted(arrays))) != stored:
        raise CheckpointError(f"{path} is corrupt (content does not match its SHA-256)")
    meta = json.loads(arrays.pop("meta").tobytes().decode())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {meta.get('format')}, expected {FORMAT}")
    model = [arrays[k] for k in sorted(arrays) if k.startswith("model_")]
    optimizer = [arrays[k] for k in sorted(arrays) if k.startswith("optimizer_")]
    return Checkpoint(path=path, epoch=int(meta["epoch"]), model_weights=model,
                      optimizer_weights=optimizer, meta=meta)


def newest_valid(directory: str) -> Tuple[Optional[Checkpoint], List[str]]:
    """The newest checkpoint that loads and verifies, and a note for each newer one skipped."""
    skipped = []
    for _, path in listed(directory):
        try:
            return load(path), skipped
        except CheckpointError as err:
            skipped.append(f"skipping checkpoint: {err}")
    return None, skipped


def check_writable(directory: str) -> None:
    """Fail before training, not at the first checkpoint, if the directory cannot be written."""
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".write-check-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as err:
        raise CheckpointError(f"checkpoint directory {directory} is not writable: {err.strerror or err}") from None


def _fsync_dir(directory: str) -> None:
    # The rename is durable only once the directory entry is on disk.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
