"""hvd-train sweep: the sweep file and its trials (no launcher), then real sweeps where every trial
is a horovodrun/mpirun job: results, the best config re-run, resume after SIGINT/SIGKILL, failed
trials, pruning on every rank."""
import csv
import json
import math
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import BIN, REPO, Background, check_run, png_size, read_json, requires_mpi, run

from hvd_train.config import configfile
from hvd_train.config.options import ConfigError
from hvd_train.tools.sweep import results, spec
from hvd_train.training import pruning

SWEEP = [BIN / "hvd-train", "sweep"]


def parse(text: str) -> spec.Sweep:
    return spec.parse(configfile.tomllib.loads(text), "s.toml")


def write(tmp_path, text: str, name: str = "s.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---- the sweep file and its trials -------------------------------------------------------------

def test_grid_is_every_combination_with_typed_values():
    sweep = parse("[base]\nepochs = 5\n[grid]\nlr = [0.01, 1]\nhidden = [[16], [64, 32]]\nbatch_size = [8, 16]\n")
    trials = sweep.trials()
    assert len(trials) == 8 and [t.index for t in trials] == list(range(1, 9))
    combos = {(t.params["lr"], t.params["hidden"], t.params["batch_size"]) for t in trials}
    assert len(combos) == 8
    t = trials[0]
    assert isinstance(t.params["lr"], float) and isinstance(t.params["batch_size"], int)
    assert isinstance(t.params["hidden"], tuple)
    assert t.config.epochs == 5 and t.config.lr == t.params["lr"] and t.error is None
    assert len({t.digest for t in trials}) == 8


def test_random_draws_are_reproducible_and_within_their_distributions():
    text = ("trials = 6\nseed = {seed}\n[random]\nlr = {{ distribution = \"loguniform\", low = 1e-4, high = 0.1 }}\n"
            "dropout = {{ distribution = \"uniform\", low = 0.0, high = 0.5 }}\n"
            "batch_size = {{ distribution = \"int\", low = 8, high = 12 }}\nactivation = [\"relu\", \"tanh\"]\n")
    first, again, other = (parse(text.format(seed=s)).trials() for s in (3, 3, 4))
    assert [t.params for t in first] == [t.params for t in again] and len(first) == 6
    assert [t.digest for t in first] == [t.digest for t in again]
    assert [t.params for t in first] != [t.params for t in other]
    for t in first + other:
        p = t.params
        assert 1e-4 <= p["lr"] <= 0.1 and 0.0 <= p["dropout"] <= 0.5 and p["activation"] in ("relu", "tanh")
        assert isinstance(p["batch_size"], int) and 8 <= p["batch_size"] <= 12


def test_grid_and_random_together_combine_every_point_with_every_draw():
    sweep = parse("trials = 3\n[grid]\nbatch_size = [16, 32]\n[random]\nlr = { distribution = \"uniform\", "
                  "low = 0.001, high = 0.01 }\n")
    trials = sweep.trials()
    assert len(trials) == 6 and sweep.shape() == "grid 2 x 3 random draw(s), seed 0"
    assert [t.params["lr"] for t in trials[:3]] == [t.params["lr"] for t in trials[3:]]


def test_a_trial_is_found_by_its_configuration_not_by_how_the_file_said_it():
    searched = parse("[base]\nepochs = 4\n[grid]\nlr = [0.01, 0.02]\n").trials()[0]
    fixed = parse("[base]\nepochs = 4\nlr = 0.01\n[grid]\nbatch_size = [32]\n").trials()[0]
    assert searched.digest == fixed.digest, "lr 0.01 with the default batch 32: the same trial"
    other_np = parse("np = 4\n[base]\nepochs = 4\n[grid]\nlr = [0.01]\n").trials()[0]
    assert other_np.digest != searched.digest, "the number of processes changes the run"


def test_a_bad_value_makes_one_invalid_trial_not_a_bad_sweep():
    trials = parse("[grid]\ndropout = [0.1, 1.5]\n").trials()
    assert trials[0].config is not None and trials[0].error is None
    assert trials[1].config is None and "dropout must be in [0, 1)" in trials[1].error


@pytest.mark.parametrize("text,message", [
    ("[base]\nlrr = 0.1\n[grid]\nepochs = [1]\n", "s.toml [base]: unknown key 'lrr' (did you mean 'lr'?)"),
    ("[grid]\nbatchsize = [8]\n", "s.toml [grid]: unknown key 'batchsize' (did you mean 'batch_size'?)"),
    ("trails = 3\n[grid]\nlr = [0.1]\n", "s.toml: unknown key 'trails' (did you mean 'trials'?)"),
    ("[base]\nepochs = 3\n[grid]\n", "nothing to search: [grid] and [random] are empty"),
    ("[base]\nepochs = 3\n", "nothing to search: [grid] and [random] are missing"),
    ("[grid]\nlr = []\n", "s.toml [grid]: lr is an empty array"),
    ("[grid]\nlr = 0.1\n", "s.toml [grid]: lr must be an array of the values to try"),
    ("[grid]\nlr = [0.1, \"fast\"]\n", "s.toml [grid]: lr[1] must be a number, got string \"fast\""),
    ("[grid]\nhidden = [64, 32]\n", "hidden[0] must be a non-empty array of integers"),
    ("[grid]\nshuffle = [1]\n", "shuffle[0] must be a boolean"),
    ("[random]\nlr = { distribution = \"normal\", low = 0, high = 1 }\n", "lr needs exactly distribution"),
    ("[random]\nlr = { distribution = \"loguniform\", low = 0.0, high = 1 }\n",
     "loguniform distribution needs low > 0"),
    ("[random]\nlr = { distribution = \"uniform\", low = 1, high = 0.5 }\n", "lr needs low < high"),
    ("[random]\nepochs = { distribution = \"uniform\", low = 1, high = 5 }\n", "epochs is an integer option"),
    ("[random]\nactivation = { distribution = \"uniform\", low = 1, high = 5 }\n", "activation is not a number"),
    ("[random]\nlr = 0.1\n", "lr must be an array of choices or a distribution table"),
    ("metric = \"val_r2\"\n[grid]\nlr = [0.1]\n", "metric 'val_r2' is not a validation metric of classification"),
    ("mode = \"up\"\n[grid]\nlr = [0.1]\n", "mode must be min or max"),
    ("np = 0\n[grid]\nlr = [0.1]\n", "s.toml: np must be > 0, got 0"),
    ("np = \"two\"\n[grid]\nlr = [0.1]\n", "s.toml: np must be an integer, got string \"two\""),
    ("launcher = \"ray\"\n[grid]\nlr = [0.1]\n", "launcher must be one of local, hosts, mpirun"),
    ("launcher = \"hosts\"\n[grid]\nlr = [0.1]\n", "launcher \"hosts\" needs launcher_args"),
    ("prune = \"mean\"\n[grid]\nlr = [0.1]\n", "prune must be one of none, median"),
    ("[base]\nlr = 0.1\n[grid]\nlr = [0.1]\n", "lr is in [base] and is searched"),
    ("[grid]\nlr = [0.1]\n[random]\nlr = [0.2]\n", "lr is in both [grid] and [random]"),
    ("[base]\noutput_dir = \"x\"\n[grid]\nlr = [0.1]\n", "output_dir cannot be set in a sweep file"),
    ("[grid]\ntask = [\"classification\", \"regression\"]\n", "task cannot be searched"),
    ("grid = 3\n", "grid must be a table"),
])
def test_bad_sweep_files_give_one_clear_error(text, message):
    with pytest.raises(spec.SweepError) as err:
        parse(text)
    assert message in str(err.value)


def test_the_command_reports_a_bad_sweep_file_in_one_line_and_writes_nothing(tmp_path):
    path = write(tmp_path, "[base]\nepochs = 2\n[grid]\nlearning_rate = [0.1]\n")
    proc = run([*SWEEP, "--config", path, "--output-dir", tmp_path / "out"], timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [f"hvd-train sweep: error: {path} [grid]: unknown key 'learning_rate'; keys "
                                        "are hvd-train's long options, e.g. batch_size = 32"]
    assert not (tmp_path / "out").exists()
    missing = run([*SWEEP, "--config", tmp_path / "none.toml"], timeout=60)
    assert missing.returncode == 2 and "cannot read sweep file" in missing.stderr


def test_plan_lists_the_trials_the_same_way_twice_and_runs_nothing(tmp_path):
    path = write(tmp_path, "trials = 4\nseed = 7\n[base]\nepochs = 3\n[grid]\nbatch_size = [16, 32]\n"
                           "[random]\nlr = { distribution = \"loguniform\", low = 1e-3, high = 0.1 }\n"
                           "dropout = [0.0, 2.0]\n")
    first, second = (run([*SWEEP, "--config", path, "--output-dir", tmp_path / "out", "--plan"], timeout=60)
                     for _ in range(2))
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    lines = first.stdout.splitlines()
    assert "8 trial(s) (grid 2 x 4 random draw(s), seed 7)" in lines[0]
    assert sum(line.split()[1].isdigit() for line in lines[2:10]) == 8
    assert "invalid: dropout must be in [0, 1)" in first.stdout
    assert "trial command: " in lines[-1] and "launch/local.sh -n 2 -- --config" in lines[-1]
    assert not (tmp_path / "out").exists()


# ---- the pruning rule ---------------------------------------------------------------------------

def test_median_thresholds_need_enough_trials_and_skip_the_warmup():
    curves = [[1.0, 0.5, 0.4], [0.8, 0.6], [0.9, math.nan]]
    assert pruning.thresholds(curves, warmup_epochs=1, startup_trials=2) == {1: 0.9, 2: 0.55}
    assert pruning.thresholds(curves, warmup_epochs=2, startup_trials=1) == {2: 0.55, 3: 0.4}
    assert pruning.thresholds([], 1, 1) == {}


def test_the_rule_prunes_a_best_so_far_worse_than_the_median():
    rule = {"metric": "val_loss", "mode": "min", "trials": 3, "thresholds": {2: 0.55}}
    assert pruning.decide(rule, 1, [9.0]) is None, "no median at epoch 1"
    assert pruning.decide(rule, 2, [1.0, 0.5]) is None
    assert pruning.decide(rule, 2, [0.55, 0.9]) is None, "equal to the median is not worse"
    assert pruning.decide(rule, 2, [1.0, 0.7]) == {"epoch": 2, "metric": "val_loss", "best": 0.7, "median": 0.55,
                                                   "trials": 3}
    assert pruning.decide(rule, 2, [math.nan, math.nan])["best"] != 0.0, "a diverged trial is pruned"
    up = {"metric": "val_accuracy", "mode": "max", "trials": 2, "thresholds": {3: 0.9}}
    assert pruning.decide(up, 3, [0.5, 0.95, 0.8]) is None and pruning.decide(up, 3, [0.5, 0.8])


def test_a_prune_file_is_checked(tmp_path):
    good = tmp_path / "p.json"
    pruning.write(str(good), "val_accuracy", "max", {3: 0.9}, 2)
    assert pruning.read(str(good), "classification")["thresholds"] == {3: 0.9}
    with pytest.raises(ConfigError, match="not a validation metric of regression"):
        pruning.read(str(good), "regression")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError, match="is not a prune file"):
        pruning.read(str(tmp_path / "bad.json"), "classification")
    with pytest.raises(ConfigError, match="cannot read the prune file"):
        pruning.read(str(tmp_path / "none.json"), "classification")


def test_results_rank_finished_trials_first_and_list_errors(tmp_path):
    sweep = parse("mode = \"max\"\nmetric = \"val_accuracy\"\n[grid]\nlr = [0.1, 0.2, 0.3, 0.4]\n")
    trials = sweep.trials()
    rec = lambda status, value, error=None: {"status": status, "value": value, "epochs": 3, "seconds": 1.0,  # noqa: E731
                                             "error": error, "test": {"test_accuracy": 0.5}, "curve": [value] * 3}
    records = {trials[0].digest: rec("ok", 0.8), trials[1].digest: rec("failed", None, "exit 2: boom"),
               trials[2].digest: rec("ok", 0.9)}
    best = results.best(sweep, trials, records)
    assert best[0] is trials[2]
    text = results.markdown(sweep, tmp_path, results.rows(sweep, trials, records), best)
    table = [line for line in text.splitlines() if line.startswith("| ") and "trial" not in line]
    assert [row.split("|")[1].strip() for row in table] == ["3", "1", "2", "4"]
    assert "| pending |" in table[3] and "- trial 2: exit 2: boom" in text


# ---- real sweeps ---------------------------------------------------------------------------------

SWEEP_TIMEOUT = 420
GRID = "[base]\nepochs = {epochs}\nwarmup_epochs = 1\n[grid]\nlr = [0.01, 0.03]\nhidden = [[16], [32, 16]]\n"


def trial_rows(sweep_dir: Path) -> list:
    with open(sweep_dir / "trials.csv", newline="") as f:
        return list(csv.DictReader(f))


def trial_dirs(sweep_dir: Path) -> dict:
    """digest -> trial.json, of every trial that ended."""
    return {p.parent.name: read_json(p) for p in (sweep_dir / "trials").glob("*/trial.json")}


def as_proc(trial_dir: Path) -> SimpleNamespace:
    """A finished trial as conftest.check_run expects a launch: exit 0 and its output."""
    return SimpleNamespace(returncode=0, stdout=(trial_dir / "output.log").read_text(), stderr="")


@pytest.mark.integration
def test_grid_sweep_writes_results_and_its_best_config_reproduces(tmp_path):
    path = write(tmp_path, GRID.format(epochs=5))
    out = tmp_path / "sweep"
    proc = run([*SWEEP, "--config", path, "--output-dir", out], timeout=SWEEP_TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = trial_rows(out)
    assert [r["status"] for r in rows] == ["ok"] * 4 and [r["trial"] for r in rows] == ["1", "2", "3", "4"]
    assert {(r["lr"], r["hidden"]) for r in rows} == {("0.01", "16"), ("0.03", "16"), ("0.01", "32,16"),
                                                      ("0.03", "32,16")}
    assert all(r["epochs"] == "5" and float(r["seconds"]) > 0 and r["test_accuracy"] for r in rows)
    for line in ("trial 1/4", "trial 4/4", "best so far: trial"):
        assert line in proc.stdout
    best = read_json(out / "best.json")
    values = [float(r["val_loss"]) for r in rows]
    assert best["value"] == pytest.approx(min(values), rel=1e-12) and best["metric"] == "val_loss"
    assert best["trial"] == 1 + values.index(min(values))
    table = (out / "results.md").read_text()
    assert table.count("| ok |") == 4 and f"Best: trial {best['trial']}" in table
    assert png_size(out / "params.png")[0] > 0 and png_size(out / "curves.png")[0] > 0
    # Each trial is a whole run: the best one passes every check of a launch.
    run_dir = Path(best["run_dir"])
    m = check_run(run_dir, as_proc(run_dir.parent), world_size=2)
    assert m["val_loss"] == best["value"]
    # best.toml is a --config file: the same options give the same metric.
    assert configfile.load(str(out / "best.toml"))["lr"] == best["params"]["lr"]
    rerun = run([REPO / "launch" / "local.sh", "-n", "2", "--", "--config", out / "best.toml",
                 "--output-dir", tmp_path / "rerun"], env={"VENV": str(BIN.parent)})
    again = check_run(tmp_path / "rerun", rerun, world_size=2)
    assert again["val_loss"] == pytest.approx(best["value"], rel=1e-6)
    assert again["test_accuracy"] == best["test"]["test_accuracy"]
    # The same command again: every trial is found finished, none runs.
    before = {d: os.stat(out / "trials" / d / "trial.json").st_mtime_ns for d in trial_dirs(out)}
    resumed = run([*SWEEP, "--config", path, "--output-dir", out], timeout=120)
    assert resumed.returncode == 0 and resumed.stdout.count("done earlier (ok") == 4 and "running" not in resumed.stdout
    assert before == {d: os.stat(out / "trials" / d / "trial.json").st_mtime_ns for d in trial_dirs(out)}


def _training_processes(marker: str) -> list:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


@pytest.mark.integration
@pytest.mark.parametrize("sig", [pytest.param(signal.SIGINT, marks=pytest.mark.slow), signal.SIGKILL],
                         ids=["SIGINT", "SIGKILL"])
def test_an_interrupted_sweep_resumes_with_the_unfinished_trials(tmp_path, sig):
    # Three trials: one finished, one interrupted while its ranks train, one never started.
    path = write(tmp_path, "[base]\nepochs = 30\nwarmup_epochs = 1\n[grid]\nlr = [0.01, 0.02, 0.03]\n")
    out = tmp_path / "sweep"
    cmd = [*SWEEP, "--config", path, "--output-dir", out]
    sweep = Background(cmd)
    # Interrupt the second trial once its ranks train (its run directory has an event log).
    sweep.wait_until(lambda: "trial 2/3" in sweep.output and
                     len(list((out / "trials").glob("*/run/events.jsonl"))) == 2, SWEEP_TIMEOUT,
                     "the second trial training")
    finished = trial_dirs(out)
    assert [r["status"] for r in finished.values()] == ["ok"]
    second = next(p.parent.parent.name for p in (out / "trials").glob("*/run/events.jsonl")
                  if p.parent.parent.name not in finished)
    os.kill(sweep.proc.pid, sig)
    if sig == signal.SIGINT:
        assert sweep.wait(90) == 130, sweep.output[-3000:]
        assert "stopped by SIGINT: run the same command again to resume" in sweep.output
        assert read_json(out / "trials" / second / "trial.json")["status"] == "interrupted"
        assert [r["status"] for r in trial_rows(out)].count("pending") == 1
    else:
        sweep.wait(30)
    # No process of the interrupted trial outlives the sweep (SIGKILL: the launcher got SIGTERM).
    deadline = time.monotonic() + 60
    while _training_processes(second) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _training_processes(second), "a trial's process outlived the sweep"
    kept = {d: os.stat(out / "trials" / d / "run" / "metrics.json").st_mtime_ns for d in finished}
    resumed = run(cmd, timeout=SWEEP_TIMEOUT)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert resumed.stdout.count("done earlier (ok") == 1 and resumed.stdout.count(": running (") == 2
    assert [r["status"] for r in trial_rows(out)] == ["ok"] * 3
    assert kept == {d: os.stat(out / "trials" / d / "run" / "metrics.json").st_mtime_ns for d in finished}
    check_run(out / "trials" / second / "run", as_proc(out / "trials" / second), world_size=2)


@pytest.mark.integration
@requires_mpi
def test_failed_trials_are_recorded_and_the_others_run(tmp_path):
    # Through launch/mpirun.sh: one missing file (fails inside the job), one invalid value (never launched).
    path = write(tmp_path, "launcher = \"mpirun\"\n[base]\nepochs = 3\nlabel_column = \"species\"\n[grid]\n"
                           f"dataset = [\"iris\", \"csv:{tmp_path}/missing.csv\"]\ndropout = [0.0, 1.5]\n")
    out = tmp_path / "sweep"
    proc = run([*SWEEP, "--config", path, "--output-dir", out], timeout=SWEEP_TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {(r["dataset"], r["dropout"]): r for r in trial_rows(out)}
    assert rows[("iris", "0")]["status"] == "ok"
    missing = rows[(f"csv:{tmp_path}/missing.csv", "0")]
    assert missing["status"] == "failed" and missing["error"].startswith("exit 2: ")
    assert "missing.csv" in missing["error"] and "hvd-train: error:" in missing["error"]
    for dataset in ("iris", f"csv:{tmp_path}/missing.csv"):
        invalid = rows[(dataset, "1.5")]
        assert invalid["status"] == "failed" and "invalid configuration: dropout must be in [0, 1)" in invalid["error"]
    assert not (out / "trials" / missing["digest"] / "run" / "metrics.json").exists()
    assert "- trial" in (out / "results.md").read_text() and read_json(out / "best.json")["params"]["dropout"] == 0.0
    assert "launch/mpirun.sh -n 2 --" in proc.stdout or "mpirun.sh" in proc.stdout


@pytest.mark.integration
def test_pruning_stops_a_hopeless_trial_on_every_rank(tmp_path):
    path = write(tmp_path, "prune_startup_trials = 1\nprune_warmup_epochs = 2\n[base]\nepochs = 6\n"
                           "[grid]\nlr = [0.01, 0.00001]\n")
    out = tmp_path / "sweep"
    proc = run([*SWEEP, "--config", path, "--output-dir", out, "--prune", "median"], timeout=SWEEP_TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    good, hopeless = trial_rows(out)
    assert good["status"] == "ok" and good["epochs"] == "6"
    assert hopeless["status"] == "pruned" and hopeless["epochs"] == "2"
    trial_dir = out / "trials" / hopeless["digest"]
    rule = read_json(trial_dir / "prune.json")
    assert rule["trials"] == 1 and set(rule["thresholds"]) == {"2", "3", "4", "5", "6"}
    # Every rank stopped after epoch 2: the job ended by itself, its replicas identical, its outputs whole.
    m = check_run(trial_dir / "run", as_proc(trial_dir), world_size=2)
    assert m["epochs_completed"] == 2 and m["stopped_early"] is True
    events = [json.loads(line) for line in (trial_dir / "run" / "events.jsonl").read_text().splitlines()]
    pruned = [e for e in events if e["event"] == "pruned"]
    assert len(pruned) == 1 and pruned[0]["epoch"] == 2 and pruned[0]["median"] == rule["thresholds"]["2"]
    assert pruned[0]["best"] > pruned[0]["median"]
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [1, 2]
    assert as_proc(trial_dir).stdout.count("pruned after epoch 2") == 1, "rank 0 alone says it"
    assert read_json(out / "best.json")["trial"] == 1, "a pruned trial is not ranked"


@pytest.mark.integration
def test_a_trial_out_of_time_is_stopped_and_the_budget_ends_the_sweep(tmp_path):
    path = write(tmp_path, "trial_timeout_minutes = 0.25\ntime_budget_minutes = 0.1\n[base]\nepochs = 2000\n"
                           "[grid]\nlr = [0.01, 0.02]\n")
    out = tmp_path / "sweep"
    proc = run([*SWEEP, "--config", path, "--output-dir", out], timeout=SWEEP_TIMEOUT)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # no trial finished
    first, second = trial_rows(out)
    assert first["status"] == "failed" and first["error"] == "timed out after 0.25 min (stopped)"
    assert second["status"] == "pending"
    assert "time budget of 0.1 min spent: trial 2 and later not started" in proc.stdout
    assert not _training_processes(first["digest"]), "the stopped trial left no process"
    assert not (out / "best.json").exists() and "no trial finished (1 failed, 1 pending)" in proc.stdout
