"""Command line: argparse -> TrainConfig -> trainer.train. Nothing here that the API lacks."""
from __future__ import annotations

import argparse
import sys
from typing import Any, Dict, List, NoReturn, Optional, Tuple

from . import configfile, runtime
from .config import (ACTIVATIONS, DATASETS, EARLY_STOPPING_METRICS, LR_SCALINGS, LR_SCHEDULES, OPTIMIZERS,
                     PROGRESS, ConfigError, TrainConfig)

DEFAULTS = TrainConfig()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # Every rank parses the same argv: one usage message (rank 0's), every rank exits 2.
        if runtime.launcher_rank() == 0:
            self.print_usage(sys.stderr)
        runtime.fail(message)


def _hidden(text: str) -> tuple:
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 64,32, got {text!r}") from None
    if not sizes:
        raise argparse.ArgumentTypeError("expected at least one hidden layer size")
    return sizes


def train_parser(plan: bool = False) -> argparse.ArgumentParser:
    if plan:
        p = _Parser(prog="hvd-train plan", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                    description="Print the resolved run without training: world size, per-process and global "
                                "batch, scaled learning rate and warmup, steps per epoch, samples per shard and "
                                "what each rank sees. Same set-up code as a real run. Takes every training option.")
        g = p.add_argument_group("plan")
        g.add_argument("--np", type=int, default=None,
                       help="plan for this many processes (alone; under a launcher the world is the launcher's)")
        g.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    else:
        p = _Parser(
            prog="hvd-train",
            description="Train a Keras classifier data-parallel with Horovod. Launch it with "
                        "horovodrun/mpirun (e.g. horovodrun -np 2 hvd-train ...); alone it runs one process. "
                        "'hvd-train plan --help' shows the resolved run without training; "
                        "'hvd-train predict --help' for predictions from a saved run; "
                        "'hvd-train versions' prints the installed versions.",
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        p.add_argument("--dry-run", action="store_true", help="print the plan (as 'hvd-train plan') and exit")
    p.add_argument("--config", default=None, metavar="FILE.toml",
                   help="read options from a TOML file (keys: these options with _ for -); "
                        "options on the command line override it")
    d = DEFAULTS
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=d.dataset, help=f"{', '.join(DATASETS)}, or csv:PATH (header row)")
    g.add_argument("--label-column", default=d.label_column, help="label column of a csv: dataset")
    g.add_argument("--samples", type=int, default=d.samples, help="synthetic: number of samples")
    g.add_argument("--features", type=int, default=d.features, help="synthetic: number of features")
    g.add_argument("--classes", type=int, default=d.classes, help="synthetic: number of classes")
    g.add_argument("--val-fraction", type=float, default=d.val_fraction, help="share of all samples for validation")
    g.add_argument("--test-fraction", type=float, default=d.test_fraction, help="share of all samples for test")
    g.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=d.shuffle,
                   help="reshuffle the training order every epoch (same order on every rank)")
    g.add_argument("--seed", type=int, default=d.seed, help="seed for splits, shuffling and initial weights")
    g = p.add_argument_group("model")
    g.add_argument("--hidden", type=_hidden, default=d.hidden, help="hidden layer sizes, e.g. 64,32")
    g.add_argument("--activation", choices=ACTIVATIONS, default=d.activation)
    g.add_argument("--dropout", type=float, default=d.dropout)
    g.add_argument("--logits", action=argparse.BooleanOptionalAction, default=d.logits,
                   help="output logits instead of softmax probabilities")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="per process; the global batch is this times the number of processes")
    g.add_argument("--lr", type=float, default=d.lr, help="base learning rate for one process")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer)
    g.add_argument("--momentum", type=float, default=d.momentum, help="sgd momentum")
    g.add_argument("--lr-scaling", choices=LR_SCALINGS, default=d.lr_scaling,
                   help="scale the base learning rate by world size (linear), its square root, or not")
    g.add_argument("--warmup-epochs", type=int, default=d.warmup_epochs,
                   help="Horovod LR warmup from scaled_lr/size to scaled_lr (0 = off)")
    g.add_argument("--fp16-allreduce", action=argparse.BooleanOptionalAction, default=d.fp16_allreduce,
                   help="Horovod: compress gradients to float16 for the allreduce (half the bytes on the wire)")
    g.add_argument("--backward-passes-per-step", type=int, default=d.backward_passes_per_step,
                   help="Horovod: accumulate this many local gradients before each allreduce "
                        "(fewer allreduces; the effective global batch grows by this factor)")
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=d.lr_schedule,
                   help="after warmup: keep the LR, multiply it by --lr-decay-factor every --lr-decay-epochs "
                        "(step), or decay it along half a cosine to 0 at the last step (cosine)")
    g.add_argument("--lr-decay-epochs", type=int, default=d.lr_decay_epochs, help="step schedule period")
    g.add_argument("--lr-decay-factor", type=float, default=d.lr_decay_factor, help="step schedule multiplier")
    g.add_argument("--early-stopping-patience", type=int, default=d.early_stopping_patience,
                   help="stop after this many epochs without improvement of the global validation metric (0 = off)")
    g.add_argument("--early-stopping-metric", choices=EARLY_STOPPING_METRICS, default=d.early_stopping_metric)
    g.add_argument("--early-stopping-min-delta", type=float, default=d.early_stopping_min_delta,
                   help="smallest change that counts as an improvement")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--checkpoint-dir", default=d.checkpoint_dir,
                   help="rank 0 writes ckpt-epoch-NNNNNN.npz here; None = no checkpoints")
    g.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="epochs between checkpoints; the last epoch is always saved")
    g.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints, help="how many of the newest to keep")
    g.add_argument("--resume", nargs="?", const="auto", default=d.resume, metavar="auto|FILE",
                   help="continue from the newest valid checkpoint in --checkpoint-dir (auto; starts afresh "
                        "if there is none) or from FILE")
    g = p.add_argument_group("run")
    g.add_argument("--threads", type=int, default=d.threads,
                   help="TF intra-op threads per process; None = cores // processes on the host")
    g.add_argument("--output-dir", default=d.output_dir, help="where outputs go; None = runs/<timestamp>")
    g.add_argument("--progress", choices=PROGRESS, default=d.progress, help="rank 0's progress: auto = live bar on a terminal without a launcher, else one line per epoch")
    g.add_argument("--verbose-ranks", action=argparse.BooleanOptionalAction, default=d.verbose_ranks,
                   help="ranks other than 0 print their log lines and TensorFlow/Horovod warnings too "
                        "(default: errors only)")
    g = p.add_argument_group("observability")
    g.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=d.tensorboard,
                   help="rank 0 writes per-epoch TensorBoard scalars to <output-dir>/tensorboard")
    g.add_argument("--timeline", "--timeline-file", default=d.timeline, metavar="FILE",
                   help="Horovod timeline of every collective (rank 0 writes it): open in chrome://tracing "
                        "or https://ui.perfetto.dev. Under horovodrun spell it --timeline-file: horovodrun "
                        "rejects --timeline anywhere on its command line as an ambiguous abbreviation of its "
                        "own --timeline-filename")
    g.add_argument("--autotune", action=argparse.BooleanOptionalAction, default=d.autotune,
                   help="Horovod autotuning of fusion threshold, cycle time, ... while training")
    g.add_argument("--autotune-log", default=d.autotune_log, metavar="FILE",
                   help="Horovod's autotune log; None = <output-dir>/autotune.csv")
    return p


def predict_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hvd-train predict", description="Predict classes for a CSV with a saved run (one process).",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-dir", required=True, help="output directory of a finished training run")
    p.add_argument("--input", required=True, help="CSV with a header holding the training feature columns")
    p.add_argument("--output", default=None, help="predictions CSV (default: <input stem>.predictions.csv)")
    return p


RUN_ONLY = ("dry_run", "np", "json", "config")  # options of the command, not of the run


def parse(argv: Optional[List[str]] = None, plan: bool = False) -> Tuple[TrainConfig, Dict[str, Any]]:
    """argv (and its --config file, which argv overrides) -> (TrainConfig, the command's own options)."""
    parser = train_parser(plan)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    config_file = pre.parse_known_args(argv)[0].config
    if config_file:
        parser.set_defaults(**configfile.load(config_file))
    args = vars(parser.parse_args(argv))
    command = {k: args.pop(k) for k in RUN_ONLY if k in args}
    return TrainConfig(**args), command


def config_from_args(argv: Optional[List[str]] = None) -> TrainConfig:
    return parse(argv)[0]


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["predict"]:
        from .predict import predict_file

        args = predict_parser().parse_args(argv[1:])
        return _run(lambda: predict_file(args.model_dir, args.input, args.output))
    if argv[:1] == ["versions"]:
        # Fast (no TensorFlow import): launch/hosts.sh compares this line across hosts.
        runtime.write_line(versions_line())
        return 0
    plan = argv[:1] == ["plan"]
    if argv[:1] in (["train"], ["plan"]):
        argv = argv[1:]
    try:
        config, command = parse(argv, plan)
        if command.get("np") is not None and command["np"] < 1:
            raise ConfigError(f"--np must be >= 1 (got {command['np']})")
    except ConfigError as err:
        runtime.fail(str(err))
    # Before TensorFlow is imported: ranks other than 0 keep to errors unless --verbose-ranks.
    runtime.quiet_other_ranks(config.verbose_ranks)
    from .trainer import dry_run, train

    if plan or command.get("dry_run"):
        return _run(lambda: dry_run(config, world_size=command.get("np"), as_json=command.get("json", False)))
    return _run(lambda: train(config))


def versions_line() -> str:
    from importlib import metadata

    def version(*names: str) -> str:
        for name in names:
            try:
                return metadata.version(name)
            except metadata.PackageNotFoundError:
                continue
        return "missing"

    return (f"hvd_train {version('hvd_train')} tensorflow {version('tensorflow', 'tensorflow-cpu')} "
            f"horovod {version('horovod')} python {sys.version.split()[0]}")


def _run(action) -> int:
    from .data import DataError
    from .outputs import OutputError

    # Agreed failures, and config errors found after hvd.init() (the same on every rank, e.g.
    # plan --np against the launcher's world): every rank exits together.
    try:
        action()
    except (runtime.AgreedFailure, ConfigError) as err:
        runtime.fail_together(str(err))
    except (DataError, OutputError) as err:  # predict: one process, nothing to agree on
        runtime.fail(str(err))
    return 0
