"""hvd-train sweep: argparse -> spec.load -> runner.run (or --plan). No TensorFlow in this process."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import List, NoReturn

from ...training import pruning
from . import runner, spec


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        _fail(message)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hvd-train sweep", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                description="Hyperparameter search: every trial is a real distributed run (launch/<launcher>.sh) "
                            "in its own directory; a sweep started again skips finished trials. The sweep file: "
                            "top-level settings (metric, mode, np, launcher, launcher_args, trials, seed, "
                            "time_budget_minutes, trial_timeout_minutes, prune, prune_warmup_epochs, "
                            "prune_startup_trials), [base] options for every trial, [grid] value lists, [random] "
                            "choices or distributions (uniform, loguniform, int). See docs/sweeps.md.")
    p.add_argument("--config", required=True, metavar="SWEEP.toml", help="the sweep file")
    p.add_argument("--output-dir", default=None, help="the sweep directory (default: sweeps/<sweep file name>); "
                   "the same directory resumes")
    p.add_argument("--plan", action="store_true", help="list the trials and what would run, run nothing")
    p.add_argument("--prune", choices=pruning.RULES, default=None,
                   help="stop trials worse than the median of finished trials at the same epoch "
                        "(default: the file's prune setting, else none)")
    p.add_argument("--retry-failed", action="store_true", help="run failed trials again (default: keep them)")
    return p


def _fail(message: str) -> NoReturn:
    sys.stderr.write(f"hvd-train sweep: error: {message}\n")
    sys.exit(2)


def main(argv: List[str]) -> int:
    args = parser().parse_args(argv)
    try:
        sweep = spec.load(args.config)
        if args.prune:
            sweep = dataclasses.replace(sweep, settings=dataclasses.replace(sweep.settings, prune=args.prune))
        sweep_dir = Path(args.output_dir or Path("sweeps") / Path(args.config).stem).absolute()
        if args.plan:
            for line in runner.plan_lines(sweep, sweep_dir, sweep.trials(), args.retry_failed):
                runner.log(line)
            return 0
        return runner.run(sweep, sweep_dir, args.retry_failed)
    except spec.SweepError as err:
        _fail(str(err))
    except OSError as err:  # the sweep directory cannot be written (a full disk, permissions)
        _fail(f"{err.filename or 'sweep directory'}: {err.strerror or err}")
