"""What was asked: one frozen, validated run configuration."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from ..data import formats

DATASETS = ("iris", "wine", "breast_cancer", "digits", "diabetes", "synthetic")
FILE_KINDS = formats.kinds()  # dataset "KIND:PATH": files, read by the format's module (data/formats.py)
OPTIMIZERS = ("adam", "sgd")
LR_SCALINGS = ("linear", "sqrt", "none")
ACTIVATIONS = ("relu", "tanh", "sigmoid", "elu", "gelu", "selu", "swish")
PROGRESS = ("auto", "bar", "epoch", "none")
LR_SCHEDULES = ("constant", "step", "cosine")
TASKS = ("classification", "regression")
REGRESSION_LOSSES = ("mse", "mae", "huber")
MODELS = ("mlp", "cnn", "resnet50", "mobilenetv2")
KERAS_APPLICATIONS = ("resnet50", "mobilenetv2")  # Keras's own architectures, built with weights=None
AUGMENTATIONS = ("none", "flip", "crop", "flip-crop")
IMAGE_CHANNELS = (0, 1, 3)
SCALINGS = ("standard", "none")
READERS = ("process", "thread")
# Keras's dtype policies: variables stay float32; mixed_* compute in 16 bits (mixed_float16 with
# loss scaling). Evaluation and the saved model are float32 whatever the policy.
NONFINITE = ("stop", "warn")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
# Validation metrics early stopping may watch, per task; "loss" is the training objective.
TASK_METRICS = {"classification": ("val_loss", "val_accuracy"),
                "regression": ("val_loss", "val_mse", "val_rmse", "val_mae", "val_r2")}
# Regression's default dropout. diabetes (442 samples, 10 features), defaults otherwise, np=2:
# test R^2 0.11 without dropout (the MLP memorises the 308 training rows), 0.49 with 0.2.
REGRESSION_DROPOUT = 0.2
EARLY_STOPPING_METRICS = tuple(dict.fromkeys(m for names in TASK_METRICS.values() for m in names))

# Fields that define the model, its optimizer state and the data: a checkpoint only resumes a run
# that agrees on all of them. Everything else (epochs, batch size, learning rate, world size, ...)
# may change between the interrupted run and the resumed one.
# precision (mixed_float16 adds the loss scale's state) and backward_passes_per_step (the local
# gradient sums) change what the optimizer's state holds. A checkpoint from before a field existed
# holds the field's default.
RESUME_FIXED_FIELDS = ("task", "dataset", "label_column", "samples", "features", "classes", "scale", "optimizer",
                       "model", "hidden", "filters", "activation", "dropout", "batch_norm", "logits", "seed",
                       "val_fraction", "test_fraction", "precision", "backward_passes_per_step", "image_feature",
                       "image_size", "image_channels", "augment")


class ConfigError(ValueError):
    """A configuration value is invalid. Same on every rank, so no collective is needed."""


def _option(default: Any, help: str = "", group: str = "run", **cli: Any) -> Any:
    """A TrainConfig field and its command-line option (cli.py builds the parser from these):
    ``help`` and ``group`` for --help; ``cli`` holds argparse extras (choices, metavar, nargs,
    const, aliases: more flags for the same option)."""
    return dataclasses.field(default=default, metadata={"help": help, "group": group, **cli})


# The --help sections, in order.
GROUPS = ("data", "model", "optimisation", "checkpoints", "run", "observability")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs, resolved before Horovod starts. Never mutated.

    The same vocabulary everywhere: these fields are the API's keywords, the TOML config keys
    and the command line's long options (``_`` as ``-``).
    """

    task: str = _option("classification", "classification (class labels, cross-entropy) or regression (a "
                        "numeric target, standardised with training-split statistics)", "data", choices=TASKS)
    dataset: str = _option("iris", f"{', '.join(DATASETS)}, or csv:PATH or parquet:PATH (PATH: a file, a "
                           "directory or a glob; read in shares by the ranks and streamed), or images:DIR (one "
                           "folder of JPEG/PNG/BMP/GIF images per class), or tfrecord:PATH (tf.train.Example "
                           "records: a table, or images with --image-feature), streamed the same way", "data")
    label_column: Optional[str] = _option(None, "label column of a csv: or parquet: dataset", "data")
    image_feature: Optional[str] = _option(None, "tfrecord: datasets: the bytes feature holding an encoded image "
                                           "(JPEG/PNG); without it the records' int64/float features are a table",
                                           "data", metavar="NAME")
    image_size: Tuple[int, ...] = _option((64, 64), "images: (and tfrecord: with --image-feature) datasets: every "
                                          "image is resized to HxW, e.g. 224x224", "data", metavar="HxW")
    image_channels: int = _option(0, "images: datasets: 3 (RGB), 1 (grayscale), 0: the first image's", "data")
    image_cache: int = _option(256, "images: datasets: MB of decoded images each process keeps (a rank's reader "
                               "decodes an image once while its share fits); 0 = decode every epoch", "data",
                               metavar="MB")
    samples: int = _option(1000, "synthetic: number of samples", "data")
    features: int = _option(20, "synthetic: number of features", "data")
    classes: int = _option(3, "synthetic: number of classes (classification)", "data")
    scale: str = _option("standard", "standardise each feature (each channel of N-d inputs such as images) with "
                         "training-split statistics, or leave the inputs as they are", "data", choices=SCALINGS)
    val_fraction: float = _option(0.1, "share of all samples for validation", "data")
    test_fraction: float = _option(0.2, "share of all samples for test", "data")
    shuffle: bool = _option(True, "reshuffle the training order every epoch (same order on every rank)", "data")
    seed: int = _option(42, "seed for splits, shuffling and initial weights", "data")
    shuffle_buffer: int = _option(65536, "csv:/parquet: datasets: training rows are shuffled within windows of "
                                  "this many rows (and the files' units in a new order) every epoch", "data")
    reader: str = _option("process", "csv:/parquet: datasets: read the training stream in a process of each rank's "
                          "own, batches handed over in shared memory (process), or in a thread of the training "
                          "process (thread)", "data", choices=READERS)

    model: str = _option("mlp", "mlp: Dense layers on feature tables (N-d inputs are flattened); cnn: a small "
                         "conv net with batch normalization for images [n, height, width, channels]; resnet50, "
                         "mobilenetv2: Keras's architectures for images, initialised randomly (weights=None)",
                         "model", choices=MODELS)
    augment: str = _option("none", "images: random horizontal flips and/or crops (4 pixels of padding, cropped back "
                           "to the size) while training; off at evaluation and in the saved model", "model",
                           choices=AUGMENTATIONS)
    hidden: Tuple[int, ...] = _option((64, 32), "hidden layer sizes, e.g. 64,32 (mlp)", "model")
    filters: Tuple[int, ...] = _option((32, 64), "cnn: filters of each 3x3 conv block (each: conv, batch norm, "
                                       "activation, 2x2 average pool while the image is at least 2x2), e.g. 32,64",
                                       "model")
    activation: str = _option("relu", group="model", choices=ACTIVATIONS)
    dropout: Optional[float] = _option(
        None, f"dropout rate after each hidden layer; default 0 for classification, {REGRESSION_DROPOUT} for "
        "regression (small numeric tables overfit fast: see the README)", "model")
    batch_norm: bool = _option(False, "batch normalization after each hidden Dense layer; its moving statistics "
                               "are averaged over ranks before every evaluation and save", "model")
    sync_batchnorm: bool = _option(
        False, "Horovod: batch normalization in training uses the statistics of the global batch, not each "
        "process's slice (SyncBatchNormalization: one allreduce per layer and step); needs --batch-norm", "model")
    logits: bool = _option(False, "classification: output logits instead of softmax probabilities", "model")
    l2: float = _option(0.0, "weight decay: L2 penalty factor on every Dense/Conv kernel, added to the loss as "
                        "Keras does (0 = off)", "model")

    epochs: int = _option(100, group="optimisation")
    batch_size: int = _option(32, "per process; the global batch is this times the number of processes",
                              "optimisation")
    loss: Optional[str] = _option(None, "regression: mse (default), mae or huber (delta 1 target standard "
                                  "deviation); classification: sparse cross-entropy, always", "optimisation",
                                  choices=REGRESSION_LOSSES)
    lr: float = _option(0.01, "base learning rate for one process", "optimisation")
    optimizer: str = _option("adam", group="optimisation", choices=OPTIMIZERS)
    momentum: float = _option(0.9, "sgd momentum", "optimisation")
    lr_scaling: str = _option("linear", "scale the base learning rate by world size (linear), its square root, "
                              "or not", "optimisation", choices=LR_SCALINGS)
    warmup_epochs: int = _option(3, "Horovod LR warmup from scaled_lr/size to scaled_lr (0 = off)", "optimisation")
    precision: str = _option(
        "float32", "Keras dtype policy: float32, or mixed_bfloat16 / mixed_float16 (16-bit compute, float32 "
        "variables; mixed_float16 adds loss scaling, and every rank skips the same steps on a non-finite "
        "gradient); validation, test metrics and the saved model are float32", "optimisation", choices=PRECISIONS)
    steps_per_execution: int = _option(
        1, "Keras: training steps per call of the compiled step function (fewer Python round trips for small "
        "models); callbacks, stop checks and learning-rate updates then act every that many steps; a fit whose "
        "steps it does not divide uses the largest divisor below it (the plan says)", "optimisation")
    fp16_allreduce: bool = _option(
        False, "Horovod: compress gradients to float16 for the allreduce (half the bytes on the wire)", "optimisation")
    backward_passes_per_step: int = _option(
        1, "Horovod: accumulate this many local gradients before each allreduce "
        "(fewer allreduces; the effective global batch grows by this factor)", "optimisation")
    lr_schedule: str = _option(
        "constant", "after warmup: keep the LR, multiply it by --lr-decay-factor every --lr-decay-epochs (step), "
        "or decay it along half a cosine to 0 at the last step (cosine)", "optimisation", choices=LR_SCHEDULES)
    lr_decay_epochs: int = _option(30, "step schedule period", "optimisation")
    lr_decay_factor: float = _option(0.1, "step schedule multiplier", "optimisation")
    early_stopping_patience: int = _option(
        0, "stop after this many epochs without improvement of the global validation metric (0 = off)",
        "optimisation")
    early_stopping_metric: str = _option("val_loss", group="optimisation", choices=EARLY_STOPPING_METRICS)
    early_stopping_min_delta: float = _option(0.0, "smallest change that counts as an improvement", "optimisation")
    on_nonfinite: str = _option(
        "stop", "a non-finite loss or averaged gradient: stop every rank at that batch, the update skipped "
        "(stop), or say so once and go on (warn)", "optimisation", choices=NONFINITE)
    prune_file: Optional[str] = _option(
        None, "sweep trials: stop after an epoch when the best value so far of FILE's validation metric is worse "
        "than FILE's median of earlier trials at that epoch (hvd-train sweep --prune median writes it)",
        "optimisation", metavar="FILE.json")

    checkpoint_dir: Optional[str] = _option(None, "rank 0 writes ckpt-epoch-NNNNNN.npz here; None = no checkpoints",
                                            "checkpoints")
    checkpoint_every: int = _option(1, "epochs between checkpoints; the last epoch is always saved", "checkpoints")
    keep_checkpoints: int = _option(3, "how many of the newest to keep", "checkpoints")
    resume: Optional[str] = _option(
        None, "continue from the newest valid checkpoint in --checkpoint-dir (auto; starts afresh if there is "
        "none) or from FILE", "checkpoints", nargs="?", const="auto", metavar="auto|FILE")
    commit_every: int = _option(
        0, "elastic runs (horovodrun --min-np/--max-np): also commit the training state in memory every N "
        "batches, not only at each epoch end (0); a lost worker costs at most N batches", "checkpoints")

    threads: Optional[int] = _option(None, "TF intra-op threads per process; None = cores // processes on the host")
    pin_cores: bool = _option(
        True, "bind each process on a host, all its threads, to its own share of the cores (off: let them "
        "float); a process already bound to some cores (launcher, cpuset, taskset) keeps its binding")
    output_dir: Optional[str] = _option(None, "where outputs go; None = runs/<timestamp>")
    progress: str = _option("auto", "rank 0's progress: auto = live bar on a terminal without a launcher, "
                            "else one line per epoch", choices=PROGRESS)
    verbose_ranks: bool = _option(False, "ranks other than 0 print their log lines and TensorFlow/Horovod "
                                  "warnings too (default: errors only)")
    stall_timeout: float = _option(
        60.0, "end the job with one message naming the rank when a rank stops answering, or makes no progress "
        "while the others wait for it, for this many seconds (0: wait for ever, as Horovod does)", metavar="SECONDS")

    tensorboard: bool = _option(False, "rank 0 writes per-epoch TensorBoard scalars to <output-dir>/tensorboard",
                                "observability")
    timeline: Optional[str] = _option(
        None, "Horovod timeline of every collective (rank 0 writes it): open in chrome://tracing or "
        "https://ui.perfetto.dev. Under horovodrun spell it --timeline-file: horovodrun rejects --timeline "
        "anywhere on its command line as an ambiguous abbreviation of its own --timeline-filename",
        "observability", aliases=("--timeline-file",), metavar="FILE")
    autotune: bool = _option(False, "Horovod autotuning of fusion threshold, cycle time, ... while training",
                             "observability")
    autotune_log: Optional[str] = _option(None, "Horovod's autotune log; None = <output-dir>/autotune.csv",
                                          "observability", metavar="FILE")

    def __post_init__(self) -> None:
        if self.dropout is None:  # the task's default, resolved once: the config holds a number
            object.__setattr__(self, "dropout", REGRESSION_DROPOUT if self.task == "regression" else 0.0)
        self.validate()

    def validate(self) -> None:
        kind, colon, path = self.dataset.partition(":")
        if not (self.dataset in DATASETS or (colon and kind in FILE_KINDS)):
            raise ConfigError(
                f"unknown dataset {self.dataset!r}: choose one of {', '.join(DATASETS)}, csv:PATH or parquet:PATH"
            )
        if colon:
            fmt = formats.format_of(kind)
            if not path:
                raise ConfigError(f"dataset {kind}: needs a path, e.g. {kind}:{fmt.EXAMPLE}")
            if not self.label_column and not fmt.LABEL:
                raise ConfigError(f"dataset {self.dataset} needs --label-column NAME")
            if self.image_feature and kind != "tfrecord":
                raise ConfigError("--image-feature names a feature of tfrecord: records")
            if (fmt.LABEL or self.image_feature) and self.task == "regression":
                raise ConfigError(f"dataset {self.dataset}: images train classification only (--task regression "
                                  "needs a table with a numeric target)")
        _require(len(self.image_size) == 2 and all(v >= 1 for v in self.image_size),
                 f"image size must be HEIGHTxWIDTH, e.g. 64x64 (got {'x'.join(map(str, self.image_size))})")
        _require(self.image_channels in IMAGE_CHANNELS,
                 f"image channels must be one of {IMAGE_CHANNELS} (got {self.image_channels})")
        _require(self.image_cache >= 0, f"image cache must be >= 0 MB (got {self.image_cache})")
        _require(self.augment in AUGMENTATIONS, f"augment must be one of {AUGMENTATIONS} (got {self.augment!r})")
        _require(self.task in TASKS, f"task must be one of {TASKS} (got {self.task!r})")
        _require(self.model in MODELS, f"model must be one of {MODELS} (got {self.model!r})")
        _require(self.scale in SCALINGS, f"scale must be one of {SCALINGS} (got {self.scale!r})")
        _require(self.reader in READERS, f"reader must be one of {READERS} (got {self.reader!r})")
        _require(self.loss is None or self.task == "regression",
                 f"--loss {self.loss} is a regression loss: add --task regression (classification trains on "
                 "cross-entropy)")
        _require(self.loss is None or self.loss in REGRESSION_LOSSES,
                 f"loss must be one of {REGRESSION_LOSSES} (got {self.loss!r})")
        _require(not (self.task == "regression" and self.logits),
                 "--logits is for classification: a regression model outputs its value directly")
        _require(math.isfinite(self.l2) and self.l2 >= 0, f"l2 must be >= 0 (got {self.l2})")
        _require(len(self.filters) >= 1 and all(f >= 1 for f in self.filters),
                 f"filters must be positive integers (got {list(self.filters)})")
        _require(self.early_stopping_metric in TASK_METRICS[self.task] or self.early_stopping_metric not in
                 EARLY_STOPPING_METRICS,
                 f"early stopping metric {self.early_stopping_metric} is not a {self.task} metric: choose one of "
                 f"{', '.join(TASK_METRICS[self.task])}")
        _require(math.isfinite(self.stall_timeout) and self.stall_timeout >= 0,
                 f"stall timeout must be >= 0 seconds (got {self.stall_timeout})")
        _require(self.stall_timeout == 0 or self.stall_timeout >= 5,
                 f"stall timeout must be 0 (off) or at least 5 seconds (got {self.stall_timeout})")
        _require(self.on_nonfinite in NONFINITE, f"on nonfinite must be one of {NONFINITE} (got {self.on_nonfinite!r})")
        _require(self.commit_every >= 0, f"commit every must be >= 0 batches (got {self.commit_every})")
        _require(self.shuffle_buffer >= 1, f"shuffle buffer must be >= 1 (got {self.shuffle_buffer})")
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
        _require(self.batch_norm or self.model != "mlp" or not self.sync_batchnorm,
                 "--sync-batchnorm synchronises batch normalization layers and the MLP has none: add --batch-norm")
        _require(self.model not in KERAS_APPLICATIONS or not self.sync_batchnorm,
                 f"--sync-batchnorm is for hvd_train's own models (cnn, mlp --batch-norm), not --model {self.model}")
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
        _require(self.prune_file is None or self.val_fraction > 0,
                 "pruning watches a validation metric: it needs --val-fraction > 0")
        _require(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS} (got {self.precision!r})")
        _require(self.steps_per_execution >= 1, f"steps per execution must be >= 1 (got {self.steps_per_execution})")
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
        from .. import storage

        for what, location in (("output directory", self.output_dir), ("checkpoint directory", self.checkpoint_dir),
                               ("resume", None if self.resume == "auto" else self.resume)):
            try:
                if location:
                    storage.check(location, what)
            except storage.StorageError as err:
                raise ConfigError(str(err)) from None
        for what, location in (("timeline", self.timeline), ("autotune log", self.autotune_log)):
            _require(not storage.is_remote(location), f"{what} {location}: Horovod writes it, to a local file only")

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "TrainConfig":
        """Inverse of to_dict (config.json's "config"); unknown keys are an error."""
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(sorted(unknown))}")
        values = dict(values)
        for key, value in values.items():  # JSON's lists back to the tuples the fields hold
            if isinstance(value, list):
                values[key] = tuple(value)
        return cls(**values)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        for name, value in d.items():  # tuples as JSON has them (a checkpoint's meta compares equal)
            if isinstance(value, tuple):
                d[name] = list(value)
        return d

    @property
    def regression(self) -> bool:
        return self.task == "regression"

    @property
    def regression_loss(self) -> str:
        return self.loss or "mse"


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
