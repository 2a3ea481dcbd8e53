"""What was asked: one frozen, validated run configuration."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

DATASETS = ("iris", "wine", "breast_cancer", "digits", "synthetic")
OPTIMIZERS = ("adam", "sgd")
LR_SCALINGS = ("linear", "sqrt", "none")
ACTIVATIONS = ("relu", "tanh", "sigmoid", "elu", "gelu", "selu", "swish")
PROGRESS = ("auto", "bar", "epoch", "none")
LR_SCHEDULES = ("constant", "step", "cosine")
EARLY_STOPPING_METRICS = ("val_loss", "val_accuracy")

# Fields that define the model, its optimizer state and the data: a checkpoint only resumes a run
# that agrees on all of them. Everything else (epochs, batch size, learning rate, world size, ...)
# may change between the interrupted run and the resumed one.
RESUME_FIXED_FIELDS = ("dataset", "label_column", "samples", "features", "classes", "optimizer",
                       "hidden", "activation", "dropout", "logits", "seed", "val_fraction", "test_fraction")


class ConfigError(ValueError):
    """A configuration value is invalid. Same on every rank, so no collective is needed."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs, resolved before Horovod starts. Never mutated."""

    dataset: str = "iris"
    label_column: Optional[str] = None
    samples: int = 1000
    features: int = 20
    classes: int = 3
    epochs: int = 100
    batch_size: int = 32  # per process; the global batch is batch_size * world size
    lr: float = 0.01  # base learning rate for one process; scaled by --lr-scaling
    optimizer: str = "adam"
    momentum: float = 0.9  # sgd only
    lr_scaling: str = "linear"
    warmup_epochs: int = 3
    hidden: Tuple[int, ...] = (64, 32)
    activation: str = "relu"
    dropout: float = 0.0
    logits: bool = False  # output raw logits instead of softmax probabilities
    seed: int = 42
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    shuffle: bool = True
    threads: Optional[int] = None  # TF intra-op threads per process; None = cores // local size
    output_dir: Optional[str] = None  # None = runs/<timestamp>, chosen by rank 0
    progress: str = "auto"  # live bar when run alone on a terminal, else one line per epoch
    lr_schedule: str = "constant"  # after warmup: constant, step (x lr_decay_factor), cosine (to 0)
    lr_decay_epochs: int = 30  # step schedule: epochs between decays
    lr_decay_factor: float = 0.1  # step schedule: multiplier per decay
    early_stopping_patience: int = 0  # epochs without improvement before stopping (0 = off)
    early_stopping_metric: str = "val_loss"
    early_stopping_min_delta: float = 0.0
    fp16_allreduce: bool = False  # Horovod fp16 compression of gradients on the wire
    backward_passes_per_step: int = 1  # Horovod local gradient accumulation before each allreduce
    checkpoint_dir: Optional[str] = None  # None = no checkpoints
    checkpoint_every: int = 1  # epochs between checkpoints (the last epoch is always saved)
    keep_checkpoints: int = 3
    resume: Optional[str] = None  # None, "auto" (newest valid checkpoint, if any) or a checkpoint file
    tensorboard: bool = False  # rank 0 writes TensorBoard scalars to <output_dir>/tensorboard
    timeline: Optional[str] = None  # Horovod timeline file (rank 0 writes it; chrome://tracing, Perfetto)
    autotune: bool = False  # Horovod autotuning of fusion threshold, cycle time, ...
    autotune_log: Optional[str] = None  # its log; None = <output_dir>/autotune.csv
    verbose_ranks: bool = False  # ranks other than 0 also print their log lines and library warnings

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not (self.dataset in DATASETS or self.dataset.startswith("csv:")):
            raise ConfigError(
                f"unknown dataset {self.dataset!r}: choose one of {', '.join(DATASETS)} or csv:PATH"
            )
        if self.dataset.startswith("csv:"):
            if not self.dataset[4:]:
                raise ConfigError("dataset csv: needs a path, e.g. csv:data/train.csv")
            if not self.label_column:
                raise ConfigError(f"dataset {self.dataset} needs --label-column NAME")
        _require(self.epochs >= 1, f"epochs must be >= 1 (got {self.epochs})")
        _require(self.batch_size >= 1, f"batch size must be >= 1 (got {self.batch_size})")
        _require(math.isfinite(self.lr) and self.lr > 0, f"learning rate must be > 0 (got {self.lr})")
        _require(0.0 <= self.momentum < 1.0, f"momentum must be in [0, 1) (got {self.momentum})")
        _require(self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS} (got {self.optimizer!r})")
        _require(self.lr_scaling in LR_SCALINGS, f"lr scaling must be one of {LR_SCALINGS} (got {self.lr_scaling!r})")
        _require(self.warmup_epochs >= 0, f"warmup epochs must be >= 0 (got {self.warmup_epochs})")
        _require(len(self.hidden) >= 1 and all(h >= 1 for h in self.hidden),
                 f"hidden sizes must be positive integers (got {list(self.hidden)})")
        _require(self.activation in ACTIVATIONS, f"activation must be one of {ACTIVATIONS} (got {self.activation!r})")
        _require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1) (got {self.dropout})")
        _require(0.0 <= self.val_fraction < 1.0, f"val fraction must be in [0, 1) (got {self.val_fraction})")
        _require(0.0 < self.test_fraction < 1.0, f"test fraction must be in (0, 1) (got {self.test_fraction})")
        _require(self.val_fraction + self.test_fraction < 0.9,
                 f"val + test fractions must leave at least 10% for training "
                 f"(got {self.val_fraction} + {self.test_fraction})")
        _require(self.samples >= 1, f"samples must be >= 1 (got {self.samples})")
        _require(self.features >= 2, f"features must be >= 2 (got {self.features})")
        _require(self.classes >= 2, f"classes must be >= 2 (got {self.classes})")
        _require(self.threads is None or self.threads >= 1, f"threads must be >= 1 (got {self.threads})")
        _require(self.progress in PROGRESS, f"progress must be one of {PROGRESS} (got {self.progress!r})")
        _require(self.lr_schedule in LR_SCHEDULES,
                 f"lr schedule must be one of {LR_SCHEDULES} (got {self.lr_schedule!r})")
        _require(self.lr_decay_epochs >= 1, f"lr decay epochs must be >= 1 (got {self.lr_decay_epochs})")
        _require(0.0 < self.lr_decay_factor <= 1.0, f"lr decay factor must be in (0, 1] (got {self.lr_decay_factor})")
        _require(self.lr_schedule == "constant" or self.warmup_epochs < self.epochs,
                 f"an lr schedule needs epochs after the warmup (epochs {self.epochs}, warmup {self.warmup_epochs})")
        _require(self.early_stopping_patience >= 0,
                 f"early stopping patience must be >= 0 (got {self.early_stopping_patience})")
        _require(self.early_stopping_metric in EARLY_STOPPING_METRICS,
                 f"early stopping metric must be one of {EARLY_STOPPING_METRICS} (got {self.early_stopping_metric!r})")
        _require(self.early_stopping_min_delta >= 0,
                 f"early stopping min delta must be >= 0 (got {self.early_stopping_min_delta})")
        _require(self.early_stopping_patience == 0 or self.val_fraction > 0,
                 "early stopping watches a validation metric: it needs --val-fraction > 0")
        _require(self.backward_passes_per_step >= 1,
                 f"backward passes per step must be >= 1 (got {self.backward_passes_per_step})")
        _require(self.checkpoint_every >= 1, f"checkpoint every must be >= 1 (got {self.checkpoint_every})")
        _require(self.keep_checkpoints >= 1, f"keep checkpoints must be >= 1 (got {self.keep_checkpoints})")
        _require(self.resume is None or self.resume == "auto" or self.resume.endswith(".npz"),
                 f"resume must be 'auto' or a checkpoint file (*.npz) (got {self.resume!r})")
        _require(self.resume != "auto" or bool(self.checkpoint_dir),
                 "--resume auto looks in --checkpoint-dir: give one")
        _require(self.autotune_log is None or self.autotune,
                 "--autotune-log is the log of --autotune: give both")
        _require(self.timeline is None or (bool(self.timeline) and not self.timeline.endswith("/")),
                 f"timeline must be a file path (got {self.timeline!r})")

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "TrainConfig":
        """Inverse of to_dict (config.json's "config"); unknown keys are an error."""
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(sorted(unknown))}")
        values = dict(values)
        if "hidden" in values:
            values["hidden"] = tuple(values["hidden"])
        return cls(**values)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        return d


def scaled_learning_rate(base_lr: float, world_size: int, scaling: str) -> float:
    """Horovod: larger global batch, larger step (Goyal et al. 2017 for linear)."""
    if scaling == "linear":
        return base_lr * world_size
    if scaling == "sqrt":
        return base_lr * math.sqrt(world_size)
    if scaling == "none":
        return base_lr
    raise ConfigError(f"lr scaling must be one of {LR_SCALINGS} (got {scaling!r})")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
