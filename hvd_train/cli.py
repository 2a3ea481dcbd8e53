"""Command line: argparse -> TrainConfig -> trainer.train. Nothing here that the API lacks."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Dict, List, NoReturn, Optional, Tuple

from . import runtime
from .config import configfile
from .config.options import GROUPS, ConfigError, TrainConfig


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # Every rank parses the same argv: one usage message (rank 0's), every rank exits 2.
        if runtime.launcher_rank() == 0:
            self.print_usage(sys.stderr)
        runtime.fail(message)


def _int_list(text: str) -> tuple:
    try:
        sizes = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())  # 64,32 or 64x64
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 64,32, got {text!r}") from None
    if not sizes:
        raise argparse.ArgumentTypeError("expected at least one size, e.g. 64,32")
    return sizes


def _add_option(group, field: dataclasses.Field, value_type: Any) -> None:
    """One TrainConfig field as --its-name, from its type and metadata (config._option).
    Tuple fields (hidden sizes, filters) are written as comma-separated integers: 64,32."""
    meta = dict(field.metadata)
    kwargs: Dict[str, Any] = {"default": field.default, "help": meta.pop("help") or None}
    meta.pop("group")
    flags = [f"--{field.name.replace('_', '-')}", *meta.pop("aliases", ())]
    if value_type is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif value_type is tuple:
        kwargs["type"] = _int_list
    elif "choices" not in meta:
        kwargs["type"] = value_type
    group.add_argument(*flags, **kwargs, **meta)


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
            description="Train a Keras classifier or regressor data-parallel with Horovod. Launch it with "
                        "horovodrun/mpirun (e.g. horovodrun -np 2 hvd-train ...); alone it runs one process. "
                        "'hvd-train plan --help' shows the resolved run without training; "
                        "'hvd-train predict --help' for predictions from a saved run; "
                        "'hvd-train sweep --help' for hyperparameter search; "
                        "'hvd-train versions' prints the installed versions.",
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        p.add_argument("--dry-run", action="store_true", help="print the plan (as 'hvd-train plan') and exit")
    p.add_argument("--config", default=None, metavar="FILE.toml",
                   help="read options from a TOML file (keys: these options with _ for -); "
                        "options on the command line override it")
    types = configfile.value_types()
    groups = {name: p.add_argument_group(name) for name in GROUPS}
    for field in dataclasses.fields(TrainConfig):
        _add_option(groups[field.metadata["group"]], field, types[field.name])
    return p


def predict_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hvd-train predict",
                description="Predict classes (or values) for CSV or Parquet rows with a saved run (one process, "
                            "streamed).")
    p.add_argument("--model-dir", required=True, help="output directory of a finished training run")
    p.add_argument("--input", required=True, help="a CSV or Parquet file (or csv:PATH / parquet:PATH, "
                   "PATH a directory or glob) holding the training feature columns")
    p.add_argument("--output", default=None, help="predictions CSV (default: <input stem>.predictions.csv)")
    return p


COMMAND_OPTIONS = ("dry_run", "np", "json", "config")  # options of the command itself, not TrainConfig fields


def parse(argv: Optional[List[str]] = None, plan: bool = False) -> Tuple[TrainConfig, Dict[str, Any]]:
    """argv (and its --config file, which argv overrides) -> (TrainConfig, the command's own options)."""
    parser = train_parser(plan)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    config_file = pre.parse_known_args(argv)[0].config
    if config_file:
        parser.set_defaults(**configfile.load(config_file))
    args = vars(parser.parse_args(argv))
    command = {k: args.pop(k) for k in COMMAND_OPTIONS if k in args}
    return TrainConfig(**args), command


def config_from_args(argv: Optional[List[str]] = None) -> TrainConfig:
    return parse(argv)[0]


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["predict"]:
        from .outputs.predict import predict_file
        from .training.legacy import load_run_model

        args = predict_parser().parse_args(argv[1:])
        return _run(lambda: predict_file(args.model_dir, args.input, args.output, load_run_model))
    if argv[:1] == ["sweep"]:  # a driver of launchers: no TensorFlow, no Horovod in this process
        from .tools.sweep.cli import main as sweep_main

        return sweep_main(argv[1:])
    if argv[:1] == ["versions"]:
        # Fast (no TensorFlow import): launch/hosts.sh compares this line across hosts.
        runtime.write_line(runtime.versions_line())
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
    from .training.trainer import dry_run, train

    if plan or command.get("dry_run"):
        return _run(lambda: dry_run(config, world_size=command.get("np"), as_json=command.get("json", False)))
    return _run(lambda: train(config))


@dataclasses.dataclass(frozen=True)
class Failure:
    """How a run ends on an error it expects: the one place that sorts them (this command line,
    and launch/ray.py's workers, which return it to the driver instead of exiting)."""

    message: str
    code: int = 2
    label: str = "error: "  # printed after "hvd-train: "
    together: bool = False  # the ranks agreed on it: all leave through a barrier after rank 0 said it
    grace: bool = True  # alone: the other ranks give rank 0 a moment to print first

    def exit(self) -> NoReturn:
        if self.together:
            runtime.fail_together(self.message, self.code, label=self.label)
        runtime.fail(self.message, self.code, grace=self.grace)


def known_failure(err: BaseException) -> Optional[Failure]:
    """The Failure an expected error means, or None for an unexpected one (a bug: traceback)."""
    from .data.interface import DataError, StreamError
    from .outputs.run_dir import OutputError
    from .training.stopping import Diverged, Stopped

    if isinstance(err, (runtime.AgreedFailure, ConfigError, Diverged)):
        # Agreed failures, and config errors found after hvd.init() (the same on every rank, e.g.
        # plan --np against the launcher's world): every rank exits together.
        return Failure(str(err), together=True)
    if isinstance(err, Stopped):  # every rank stopped after the same batch: leave together, 128 + signal
        return Failure(str(err), err.exit_code, label="", together=True)
    if isinstance(err, StreamError):  # mid-run: rank 0 reports; the others with it when they agreed, else at once
        return Failure(str(err), together=True) if getattr(err, "agreed", False) else Failure(str(err), grace=False)
    if isinstance(err, (DataError, OutputError)):  # predict: one process, nothing to agree on
        return Failure(str(err))
    return collective_failure(err)


# What a collective that failed under Horovod says: its shutdown (a rank ended, or its stall
# inspector ended a stall), or Gloo's timeout or lost connection.
_COLLECTIVE_FAILED = ("Horovod has been shut down", "Timed out waiting", "gloo", "Gloo", "Connection reset",
                      "Connection closed")


def collective_failure(err: BaseException) -> Optional[Failure]:
    """A collective that failed (another rank ended, a stall Horovod's inspector or Gloo's timeout
    ended): one line, with what the watchdog last heard from the others, instead of TensorFlow's
    traceback. None for anything else."""
    from . import watchdog

    module = type(err).__module__
    if not (module.startswith("tensorflow") or module.startswith("horovod")):
        return None
    text = str(err)
    if not any(word in text for word in _COLLECTIVE_FAILED):
        return None
    if "Horovod has been shut down" in text:
        cause = ("Horovod shut down: another rank ended, or Horovod's stall inspector ended a stall (its lines "
                 "above name the missing ranks)")
    else:
        cause = next((line.strip() for line in text.splitlines() if line.strip()), type(err).__name__)[:300]
    heard = watchdog.last_heard()
    watchdog.stop()  # the others hear that this rank is done, not silent
    return Failure(f"a collective failed during {watchdog.phase()}: {cause}"
                   + (f"; last heard: {heard}" if heard else ""), grace=False)


def _run(action) -> int:
    try:
        action()
    except Exception as err:  # noqa: BLE001 - sorted by known_failure, the rest re-raised
        failure = known_failure(err)
        if failure is None:
            raise
        failure.exit()
    return 0
