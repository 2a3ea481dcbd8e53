"""Running a sweep: each trial a real distributed job through a launcher, one after another.

A trial lives in ``<sweep dir>/trials/<digest>/``: ``trial.toml`` (its options), ``output.log``
(the launcher's output), ``run/`` (the run's own output directory) and, once it ended,
``trial.json`` (status, metric, epochs, seconds, error, its validation curve). Resuming finds
trials by the digest of their resolved configuration: finished ones (ok, pruned, failed) are
kept, anything else is run again from scratch.

Stops: SIGINT or SIGTERM to the sweep goes on to the running trial's launcher, whose ranks stop
together (stopping.py); the trial is recorded as interrupted, the tables are written, and the
sweep exits 128 + the signal. If the sweep itself is killed (SIGKILL), the kernel sends the
launcher SIGTERM (PR_SET_PDEATHSIG), so no trial outlives it.
"""
from __future__ import annotations

import contextlib
import csv
import ctypes
import datetime
import fcntl
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from ... import storage
from ...config import configfile
from ...launchers import LAUNCH_DIR
from ...outputs import events
from ...outputs.run_dir import EVENTS_FILE
from ...training import pruning
from . import results
from .spec import Sweep, SweepError, Trial, show

TRIALS_DIR = "trials"
TRIAL_FILE = "trial.json"
FINISHED = ("ok", "pruned", "failed")  # a resumed sweep keeps these (failed: unless --retry-failed)
STOP_GRACE = 30  # seconds a stopped trial's launcher gets before it is killed (as launch/common.sh)


def log(message: str) -> None:
    sys.stdout.write(f"[sweep] {message}\n")
    sys.stdout.flush()


def launcher_command(sweep: Sweep, trial_dir: Path, prune_file: Optional[Path]) -> List[str]:
    """The trial's command line: launch/<launcher>.sh -n NP [launcher_args] -- <hvd-train options>."""
    script = LAUNCH_DIR / f"{sweep.settings.launcher}.sh"
    options = ["--config", str(trial_dir / "trial.toml"), "--output-dir", str(trial_dir / "run"), "--progress", "epoch"]
    if prune_file is not None:
        options += ["--prune-file", str(prune_file)]
    return [str(script), "-n", str(sweep.settings.np), *sweep.settings.launcher_args, "--", *options]


def trial_toml(trial: Trial, trial_dir: Path) -> str:
    """The trial's options: its resolved configuration; a checkpoint directory of its own."""
    config = trial.config
    if config.checkpoint_dir:
        config = config.replace(checkpoint_dir=str(trial_dir / "checkpoints"))
    return f"# sweep trial {trial.index}: {trial.label()}\n" + configfile.dumps(config)


def read_records(sweep_dir: Path) -> Dict[str, Dict[str, Any]]:
    """digest -> trial.json of every trial directory that has one."""
    found = {}
    for path in sorted((sweep_dir / TRIALS_DIR).glob(f"*/{TRIAL_FILE}")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        found[record.get("digest", path.parent.name)] = record
    return found


def plan_lines(sweep: Sweep, sweep_dir: Path, trials: List[Trial], retry_failed: bool) -> List[str]:
    """--plan: every trial, whether it would run, and the first command; nothing is written."""
    records = read_records(sweep_dir)
    s = sweep.settings
    lines = [f"{sweep_dir}: {len(trials)} trial(s) ({sweep.shape()}), metric {s.metric} ({sweep.mode}), "
             f"{s.np} process(es) each through launch/{s.launcher}.sh"
             + (f", pruning: median after epoch {s.prune_warmup_epochs} of {s.prune_startup_trials}+ trials"
                if s.prune == "median" else "")]
    rows = [["trial", *sweep.swept, "digest", "plan"]]
    for t in trials:
        rows.append([str(t.index), *(show(t.params[k]) for k in sweep.swept), t.digest,
                     _plan_status(t, records.get(t.digest), retry_failed)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    first = next((t for t in trials if t.config is not None), None)
    if first is not None:
        lines.append("trial command: " + shlex.join(launcher_command(sweep, sweep_dir / TRIALS_DIR / first.digest,
                                                                      None)))
    return lines


def _plan_status(trial: Trial, record: Optional[Dict[str, Any]], retry_failed: bool) -> str:
    if record and record["status"] in FINISHED and not (retry_failed and record["status"] == "failed"):
        return f"done ({record['status']})"
    if trial.error:
        return f"invalid: {trial.error}"
    return "run" if not record else f"run again ({record['status']})"


class _Signals:
    """While a sweep runs: SIGINT/SIGTERM recorded and passed on to the running trial's launcher."""

    def __init__(self):
        self.received, self.child = 0, None

    @contextlib.contextmanager
    def installed(self) -> Iterator["_Signals"]:
        def record(signum, frame):
            self.received = self.received or signum
            if self.child is not None and self.child.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.child.pid, signum)  # the launcher stops its ranks together

        previous = {sig: signal.signal(sig, record) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _die_with_parent() -> None:
    """In the launcher's process, before exec: SIGTERM when the sweep dies, even by SIGKILL."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run(sweep: Sweep, sweep_dir: Path, retry_failed: bool = False) -> int:
    """Run every trial not finished yet; write the tables after each. Returns the exit code."""
    trials = sweep.trials()
    if not LAUNCH_DIR.is_dir():
        raise SweepError(f"no launchers at {LAUNCH_DIR}: hvd-train sweep runs from a source checkout "
                         "(the launch/ scripts beside hvd_train/)")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with _locked(sweep_dir), _Signals().installed() as signals:
        kept = sweep_dir / "sweep.toml"
        if not (kept.exists() and os.path.samefile(sweep.path, kept)):  # resumed from the kept copy: as it is
            shutil.copyfile(sweep.path, kept)
        records = read_records(sweep_dir)
        s = sweep.settings
        log(f"{len(trials)} trial(s) ({sweep.shape()}), metric {s.metric} ({sweep.mode}), {s.np} process(es) "
            f"each through launch/{s.launcher}.sh; outputs in {sweep_dir}")
        start, done_now = time.monotonic(), 0
        for trial in trials:
            record = records.get(trial.digest)
            if record and record["status"] in FINISHED and not (retry_failed and record["status"] == "failed"):
                log(f"trial {trial.index}/{len(trials)} {trial.label()}: done earlier ({record['status']}: "
                    f"{_outcome(sweep, record)})")
                continue
            if signals.received:
                break
            if s.time_budget_minutes and time.monotonic() - start > 60 * s.time_budget_minutes:
                log(f"time budget of {s.time_budget_minutes:g} min spent: trial {trial.index} and later not started; "
                    "run the same command again to continue")
                break
            trial_dir = sweep_dir / TRIALS_DIR / trial.digest
            record = _run_trial(sweep, trial, trial_dir, len(trials), list(records.values()), signals)
            storage.write_text(str(trial_dir / TRIAL_FILE), json.dumps(record, indent=2) + "\n")
            records[trial.digest] = record
            done_now += 1
            best = results.write(sweep, sweep_dir, trials, records)
            log(f"trial {trial.index}/{len(trials)} {record['status']}: {_outcome(sweep, record)}"
                + (f"; best so far: trial {best[0].index} {s.metric} {best[1]['value']:.4g}" if best else ""))
        best = results.write(sweep, sweep_dir, trials, records)
        return _finish(sweep_dir, trials, records, best, sweep.settings.metric, signals.received)


def _finish(sweep_dir: Path, trials: List[Trial], records: Dict[str, Dict[str, Any]],
            best: Optional[Tuple[Trial, Dict[str, Any]]], metric: str, received: int) -> int:
    counts: Dict[str, int] = {}
    for t in trials:
        status = records.get(t.digest, {}).get("status", "pending")
        counts[status] = counts.get(status, 0) + 1
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    if best:
        trial, record = best
        log(f"best: trial {trial.index} {trial.label()}: {metric} {record['value']:.4g} "
            f"({summary}); {sweep_dir / results.RESULTS_MD}, re-run it with --config {sweep_dir / results.BEST_TOML}")
    else:
        log(f"no trial finished ({summary}); see {sweep_dir / results.TRIALS_CSV}")
    if received:
        log(f"stopped by {signal.Signals(received).name}: run the same command again to resume")
        return 128 + received
    return 0 if best else 1


def _outcome(sweep: Sweep, record: Dict[str, Any]) -> str:
    if record["status"] in ("ok", "pruned"):
        pruned = record["status"] == "pruned"
        where = f"pruned after epoch {record['epochs']}" if pruned else f"{record['epochs']} epochs"
        return f"{sweep.settings.metric} {record['value']:.4g}, {where}, {record['seconds']:.1f} s"
    return f"{record.get('error') or record['status']}"


@contextlib.contextmanager
def _locked(sweep_dir: Path) -> Iterator[None]:
    with open(sweep_dir / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise SweepError(f"another hvd-train sweep is running in {sweep_dir}") from None
        yield


def _run_trial(sweep: Sweep, trial: Trial, trial_dir: Path, total: int, earlier: List[Dict[str, Any]],
               signals: _Signals) -> Dict[str, Any]:
    s = sweep.settings
    record: Dict[str, Any] = {"index": trial.index, "digest": trial.digest, "params": trial.params,
                              "metric": s.metric, "status": "failed", "value": None, "epochs": None,
                              "seconds": 0.0, "error": None, "test": {}, "curve": [],
                              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    shutil.rmtree(trial_dir, ignore_errors=True)  # an unfinished earlier attempt starts afresh
    trial_dir.mkdir(parents=True)
    if trial.error:
        log(f"trial {trial.index}/{total} {trial.label()}: invalid, not run")
        return {**record, "error": f"invalid configuration: {trial.error}"}
    storage.write_text(str(trial_dir / "trial.toml"), trial_toml(trial, trial_dir))
    prune_file = None
    if s.prune == "median":
        curves = [r["curve"] for r in earlier if r["status"] == "ok" and r.get("curve")]
        prune_file = trial_dir / "prune.json"
        pruning.write(str(prune_file), s.metric, sweep.mode,
                      pruning.thresholds(curves, s.prune_warmup_epochs, s.prune_startup_trials), len(curves))
    command = launcher_command(sweep, trial_dir, prune_file)
    log(f"trial {trial.index}/{total} {trial.label()}: running ({trial_dir})")
    env = dict(os.environ, VENV=sys.prefix, PYTHONUNBUFFERED="1", STOP_GRACE=str(STOP_GRACE))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    begin = time.monotonic()
    with open(trial_dir / "output.log", "w") as out:
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                 start_new_session=True, preexec_fn=_die_with_parent)
        signals.child = child
        timed_out = _wait(child, s.trial_timeout_minutes)
        signals.child = None
    record["seconds"] = round(time.monotonic() - begin, 3)
    code = child.returncode
    if timed_out:
        return {**record, "error": f"timed out after {s.trial_timeout_minutes:g} min (stopped)", "exit_code": code}
    if code != 0:
        status = "interrupted" if signals.received and code in (128 + signals.received, -signals.received) else "failed"
        return {**record, "status": status, "exit_code": code,
                "error": "interrupted" if status == "interrupted" else _error_line(trial_dir / "output.log", code)}
    return _read_run(sweep, record, trial_dir / "run")


def _wait(child: subprocess.Popen, timeout_minutes: Optional[float]) -> bool:
    """Wait for the launcher; True if it was stopped for running out of time."""
    deadline = time.monotonic() + 60 * timeout_minutes if timeout_minutes else None
    while child.poll() is None:
        if deadline and time.monotonic() > deadline:
            child.send_signal(signal.SIGTERM)  # the launcher stops its ranks, then kills what is left
            try:
                child.wait(STOP_GRACE + 15)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
            return True
        time.sleep(0.2)
    return False


def _error_line(log_path: Path, code: int) -> str:
    """The trial's error as hvd-train or the launcher said it (the last such line), else the output's last line."""
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    said = [line for line in lines if "error:" in line or line.startswith(("local.sh:", "hosts.sh:", "mpirun.sh:"))]
    line = (said or lines or ["no output"])[-1]
    return f"exit {code}: {line[:500]}"


def _read_run(sweep: Sweep, record: Dict[str, Any], run_dir: Path) -> Dict[str, Any]:
    metric = sweep.settings.metric
    try:
        with open(run_dir / "metrics.json") as f:
            m = json.load(f)
        with open(run_dir / "history.csv", newline="") as f:
            curve = [float(row[metric]) for row in csv.DictReader(f) if row.get(metric) not in (None, "")]
        pruned = any(e.get("event") == "pruned" for e in events.read(str(run_dir / EVENTS_FILE)))
    except (OSError, ValueError) as err:
        return {**record, "error": f"the run ended without its outputs: {err}"}
    if m.get(metric) is None:
        return {**record, "error": f"the run has no {metric} (needs --val-fraction > 0)"}
    return {**record, "status": "pruned" if pruned else "ok", "value": float(m[metric]),
            "epochs": m["epochs_completed"], "curve": curve,
            "test": {k: v for k, v in m.items() if k.startswith("test_") and k != "test_samples"}}
