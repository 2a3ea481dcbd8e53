"""Checkpoints, both directions: the file format, the meta record a run writes into it, and the
resume point a run reads back. Written by rank 0 only, atomically; read by rank 0 only, then broadcast.

One checkpoint is one ``ckpt-epoch-NNNNNN.npz`` holding the model weights, the optimizer state
(Keras 3's optimizer variables: iteration count, learning rate, slots, and the loss scale and
local gradient sums when used), rank 0's dropout random state (distributed.py: every rank's
follows from it) and a JSON ``meta`` record: the epochs completed, the config and
plan of the run that wrote it, its history so far, the early-stopping state and a data
fingerprint. A run stopped by a signal mid-epoch (stopping.py) writes
``ckpt-epoch-NNNNNN-at-PPPPPPPPP.npz``: NNNNNN epochs done and the first PPPPPPPPP samples of
the next epoch's order, with the global metric sums of those samples in the meta record. The
shuffle order is a pure function of (seed, epoch) (sharding.epoch_order), so the epoch number
(and that position) is all the RNG state needed to continue the same sample order.

A SHA-256 over every array and the meta record is stored beside them and checked on load, so
a truncated or corrupted file is detected, reported and skipped in favour of an older one.

The directory is a local folder or an ``s3://`` prefix (storage.py). A checkpoint is one file,
so one object: S3 shows an object only once its upload completed, so ``--resume auto`` never
sees part of one, and a run killed mid-upload leaves the previous checkpoints as they were (its
unfinished upload is invisible). Pruning removes the oldest first, in either place.

Format 2 (hvd_train 0.2, Keras 3). Format 1 (hvd_train 0.1, Keras 2 through tf_keras) still
resumes: legacy.py turns its optimizer state (tf_keras's legacy slots) into Keras 3's.
"""
from __future__ import annotations

import dataclasses
import io
import json
import re
import zipfile
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .. import runtime, storage
from ..config.options import RESUME_FIXED_FIELDS, TrainConfig
from ..config.plan import Plan
from ..data.interface import Dataset
from . import distributed, legacy
from .consensus import array_digest

FORMAT = 2
FORMATS = (1, 2)  # readable: 1 is converted on load (legacy.py)
_NAME = re.compile(r"^ckpt-epoch-(\d{6})(?:-at-(\d{9}))?\.npz$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (unreadable, corrupt, or from an incompatible run)."""


@dataclass(frozen=True)
class State:
    """What a checkpoint holds of a model and its optimizer, as arrays."""

    model: List[np.ndarray]  # model.get_weights(): every weight, trainable or not
    optimizer: List[np.ndarray]  # the optimizer's variables, in its order
    seeds: List[np.ndarray] = field(default_factory=list)  # dropout's random states, rank 0's form

    @classmethod
    def of(cls, model, optimizer) -> "State":
        """This rank's state; rank 0's is what a checkpoint keeps (its seeds are in rank 0's form)."""
        return cls(model=model.get_weights(), optimizer=distributed.optimizer_values(optimizer),
                   seeds=[np.asarray(v.numpy()) for v in distributed.seed_states(model)])

    def restore(self, model, optimizer, path: str) -> None:
        """Local: into ``model`` and ``optimizer`` (then seeds in rank 0's form, as the broadcast
        that follows expects); CheckpointError if they do not fit."""
        try:
            model.set_weights(self.model)
            distributed.set_optimizer_values(optimizer, self.optimizer, "the checkpoint")
            states = distributed.seed_states(model)
            if self.seeds and len(self.seeds) != len(states):
                raise ValueError(f"the checkpoint holds {len(self.seeds)} random states, the model {len(states)}")
            distributed.set_seed_rank(model, 0)
            for v, value in zip(states, self.seeds):
                v.assign(value)
        except ValueError as err:
            raise CheckpointError(f"{path} does not fit this model: {err}") from None


@dataclass(frozen=True)
class Checkpoint:
    path: str
    epoch: int  # epochs completed when it was written
    state: State
    meta: Dict[str, Any]


@dataclass(frozen=True)
class ResumePoint:
    """Where a run starts: ``ResumePoint()`` is a fresh start; else what a checkpoint said."""

    path: Optional[str] = None  # the checkpoint resumed from; None for a fresh start
    epoch: int = 0  # epochs already completed
    history: Dict[str, List[float]] = field(default_factory=dict)
    early_stopping: Optional[Dict[str, Any]] = None
    stopped_early: bool = False
    lr: Optional[float] = None  # the exact learning rate to carry over, when the world's scale is unchanged
    position: int = 0  # samples of epoch ``epoch + 1``'s order already trained (a mid-epoch stop)
    sums: Optional[Dict[str, float]] = None  # their global training-metric sums (metrics.global_sums)

    def initial_epoch(self, epochs: int) -> int:
        """The first epoch to train; a run that had already stopped early has nothing to add."""
        return epochs if self.stopped_early else self.epoch


def file_name(epoch: int, position: int = 0) -> str:
    return f"ckpt-epoch-{epoch:06d}{f'-at-{position:09d}' if position else ''}.npz"


def listed(directory: str) -> List[Tuple[int, str]]:
    """(epoch, path) of the complete-looking checkpoint files, newest first (temp files ignored)."""
    if not directory:
        return []
    found = [((int(m.group(1)), int(m.group(2) or 0)), path)
             for path, _ in storage.list_files(directory) if (m := _NAME.match(storage.basename(path)))]
    return [(epoch, path) for (epoch, _), path in sorted(found, reverse=True)]


def save(directory: str, epoch: int, state: State, meta: Dict[str, Any], keep: int) -> str:
    """Write the checkpoint for ``epoch`` (and ``meta["position"]`` into the next) atomically
    (temp file, fsync, rename), keep the newest ``keep`` (the oldest are removed first)."""
    storage.make_dirs(directory)
    meta = {**meta, "format": FORMAT, "epoch": epoch}
    meta_bytes = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    arrays = {f"model_{i:04d}": np.asarray(w) for i, w in enumerate(state.model)}
    arrays.update({f"optimizer_{i:04d}": np.asarray(w) for i, w in enumerate(state.optimizer)})
    arrays.update({f"seed_{i:04d}": np.asarray(w) for i, w in enumerate(state.seeds)})
    arrays["meta"] = meta_bytes
    digest = array_digest(*(arrays[k] for k in sorted(arrays)))
    path = storage.join(directory, file_name(epoch, meta.get("position", 0)))
    content = io.BytesIO()
    np.savez(content, digest=np.frombuffer(digest.encode(), dtype=np.uint8), **arrays)
    # Written whole first, the oldest removed after: a write that fails (a full disk, a folder
    # gone) leaves every earlier checkpoint, the newest still resumable. A kill between the two
    # leaves keep + 1 files until the next save.
    try:
        storage.write_bytes(path, content.getvalue(), durable=True)
    except OSError as err:
        raise CheckpointError(f"could not write the checkpoint {path}: {storage.cause(err)}; the earlier "
                              f"checkpoints in {directory} are kept") from None
    for _, old in [(e, p) for e, p in listed(directory) if p != path][keep - 1:]:
        storage.delete(old)
    return path


def load(path: str) -> Checkpoint:
    """Read and verify one checkpoint; CheckpointError says why it cannot be used."""
    try:
        with np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except storage.NotFound:
        raise CheckpointError(f"{path} does not exist") from None
    except storage.StorageError as err:
        raise CheckpointError(f"cannot read checkpoint {err}") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile) as err:
        raise CheckpointError(f"{path} is truncated or corrupt ({type(err).__name__}: {err})") from None
    if "digest" not in arrays or "meta" not in arrays:
        raise CheckpointError(f"{path} is not an hvd_train checkpoint (no digest or meta record)")
    stored = arrays.pop("digest").tobytes().decode(errors="replace")
    if array_digest(*(arrays[k] for k in sorted(arrays))) != stored:
        raise CheckpointError(f"{path} is corrupt (content does not match its SHA-256)")
    meta = json.loads(arrays.pop("meta").tobytes().decode())
    if meta.get("format") not in FORMATS:
        raise CheckpointError(f"{path} has checkpoint format {meta.get('format')}; this hvd_train reads "
                              f"{' and '.join(map(str, FORMATS))}")
    state = State(model=[arrays[k] for k in sorted(arrays) if k.startswith("model_")],
                  optimizer=[arrays[k] for k in sorted(arrays) if k.startswith("optimizer_")],
                  seeds=[arrays[k] for k in sorted(arrays) if k.startswith("seed_")])
    if meta["format"] == 1:
        try:
            state = dataclasses.replace(state, optimizer=legacy.optimizer_state(state.optimizer, meta))
        except legacy.LegacyError as err:
            raise CheckpointError(f"{path} (hvd_train 0.1, Keras 2): {err}") from None
    return Checkpoint(path=path, epoch=int(meta["epoch"]), state=state, meta=meta)


def newest_valid(directory: str) -> Tuple[Optional[Checkpoint], List[str]]:
    """The newest checkpoint that loads and verifies, and a note for each newer one skipped."""
    skipped = []
    try:
        found = listed(directory)
    except storage.StorageError as err:
        raise CheckpointError(f"cannot list checkpoints: {err}") from None
    for _, path in found:
        try:
            return load(path), skipped
        except CheckpointError as err:
            skipped.append(f"skipping checkpoint: {err}")
    return None, skipped


def check_writable(directory: str) -> None:
    """Fail before training, not at the first checkpoint, if the directory cannot be written."""
    try:
        storage.check_writable(directory, "checkpoint directory")
    except storage.StorageError as err:
        raise CheckpointError(str(err)) from None


def run_meta(config: TrainConfig, plan: Plan, data: Dict[str, Any], history: Dict[str, List[float]],
             early_stopping: Optional[Dict[str, Any]], stopped_early: bool, lr: float, position: int = 0,
             sums: Optional[Dict[str, float]] = None) -> Dict[str, Any]:
    """The meta record of a run's checkpoint, what load_resume_point checks and restores.
    ``data``: the splits' fingerprint(); ``position``, ``sums``: a stop mid-epoch."""
    return {"config": config.to_dict(), "plan": asdict(plan), "versions": runtime.versions(),
            "history": history, "data": data, "early_stopping": early_stopping,
            "stopped_early": stopped_early, "lr": lr, "position": position, "sums": sums}


def check_compatible(ckpt: Checkpoint, config: TrainConfig, splits: Dataset) -> None:
    """The checkpoint was written by a run of the same model on the same data, or CheckpointError."""
    # A field the writing version did not have holds its default.
    saved = {**TrainConfig().to_dict(), **ckpt.meta["config"]}
    now = config.to_dict()
    changed = [f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in RESUME_FIXED_FIELDS if saved.get(k) != now[k]]
    if changed:
        raise CheckpointError(f"{ckpt.path} was written by a different run ({', '.join(changed)}); "
                              f"resume with the same model and data settings or start afresh without --resume")
    if ckpt.meta.get("data") != splits.fingerprint():
        raise CheckpointError(f"{ckpt.path} was trained on different data than this run loads")


def resume(rt: runtime.Runtime, config: TrainConfig, plan: Plan, splits: Dataset, model, optimizer) -> ResumePoint:
    """Collective. Rank 0 finds, verifies and loads the checkpoint; every rank gets the decision.

    The weights themselves reach the other ranks by the broadcast that follows in the fit flow.
    """
    if not config.resume:
        return ResumePoint()
    point, error = runtime.on_rank0(rt, load_resume_point, rt, config, plan, splits, model, optimizer) or (None, None)
    runtime.agree(error, "resume")
    # Horovod: rank 0 decided where to resume; every rank follows (ranks never race on the files).
    point = runtime.broadcast(point, "resume")
    if point.lr is not None:
        optimizer.learning_rate = point.lr
    return point


def load_resume_point(rt: runtime.Runtime, config: TrainConfig, plan: Plan, splits: Dataset, model,
                      optimizer) -> Tuple[Optional[ResumePoint], Optional[str]]:
    """Rank 0 only (no collectives): choose the checkpoint, check it fits this run, load it."""
    try:
        if config.resume == "auto":
            ckpt, skipped = newest_valid(config.checkpoint_dir)
        else:
            ckpt, skipped = load(config.resume), []
        for note in skipped:
            runtime.log(rt, note)
        if ckpt is None:
            runtime.log(rt, f"no usable checkpoint in {config.checkpoint_dir}: starting at epoch 1")
            return ResumePoint(), None
        check_compatible(ckpt, config, splits)
        ckpt.state.restore(model, optimizer, ckpt.path)
        if ckpt.meta["format"] == 1:
            runtime.log(rt, f"{ckpt.path} was written by hvd_train 0.1 (Keras 2): its optimizer state converted "
                            "to Keras 3's")
    except CheckpointError as err:
        return None, str(err)
    meta = ckpt.meta
    was = meta["plan"]
    position = int(meta.get("position") or 0)
    runtime.log(
        rt, f"resuming from {ckpt.path}: {ckpt.epoch} of {config.epochs} epoch(s) done"
        + (f" and {position} of {splits.n_train} samples of epoch {ckpt.epoch + 1}" if position else "")
        + (" (that run had stopped early)" if meta.get("stopped_early") else ""))
    runtime.log(
        rt, f"it was written by {was['world_size']} process(es) (global batch {was['global_batch_size']}, "
        f"lr {was['scaled_lr']:g}); now {plan.world_size} process(es): global batch {plan.global_batch_size}, "
        f"lr {plan.scaled_lr:g}")
    same_world = was["world_size"] == plan.world_size and was["scaled_lr"] == plan.scaled_lr
    return ResumePoint(
        path=ckpt.path, epoch=ckpt.epoch, history=meta["history"], early_stopping=meta.get("early_stopping"),
        stopped_early=meta.get("stopped_early", False),
        # The learning rate schedules set next: carry the exact value only if the scale is unchanged.
        lr=meta.get("lr") if same_world else None, position=position, sums=meta.get("sums"),
    ), None
