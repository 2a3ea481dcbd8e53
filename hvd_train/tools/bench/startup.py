"""hvd-bench section ``startup``: where a launch's seconds go before the first training step.

Each repeat launches 2 processes the way ``make train`` does (hvd-horovodrun, MPI when
installed, else Gloo) on the default run (iris) for one epoch; every rank stamps the wall clock at each
phase and the driver takes the slower rank's stamp:

- launch: from the driver starting the launcher to the rank's Python running this module (the
  launcher's own start-up and checks, its rendezvous, the interpreter's start);
- the imports: TensorFlow, Horovod's Keras module, then hvd_train's training modules (what
  they import on top: Keras, scikit-learn's split, pyarrow or matplotlib if they are imported);
- hvd.init;
- set-up: train() up to the fit (data loaded and split, agreement, plan, consensus, model built
  and compiled, weights broadcast);
- first step: the fit's start to the end of its first batch (the graph traced once).

Also the wall time of the whole short run as a user runs it (``launch/local.sh -n 2 -- --epochs
1``: start-up, one epoch, the final evaluation and every output file).
"""
from __future__ import annotations

import time

STARTED = time.time()  # this module's first line: the interpreter is up (a rank: its launch is done)

import json  # noqa: E402 - after the first stamp
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Dict, List  # noqa: E402

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[3]  # hvd_train/tools/bench/startup.py -> the repository
PHASES = ("launch", "import_tensorflow", "import_horovod", "hvd_init", "import_hvd_train", "setup", "first_step")


def worker(result_dir: str) -> None:
    """Under horovodrun: one epoch of the default run, every phase stamped; rank-<r>.json."""
    stamps = {"launched": float(os.environ["BENCH_LAUNCHED"]), "launch": STARTED}
    import keras
    import tensorflow  # noqa: F401 - the phase's import, timed

    stamps["import_tensorflow"] = time.time()
    import horovod.tensorflow as hvd

    stamps["import_horovod"] = time.time()
    hvd.init()
    stamps["hvd_init"] = time.time()
    from hvd_train import TrainConfig, train

    stamps["import_hvd_train"] = time.time()

    class Stamps(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            stamps.setdefault("setup", time.time())

        def on_train_batch_end(self, batch, logs=None):
            stamps.setdefault("first_step", time.time())

    train(TrainConfig(epochs=1, progress="none", output_dir=os.path.join(result_dir, "run")), callbacks=[Stamps()])
    with open(os.path.join(result_dir, f"rank-{hvd.rank()}.json"), "w") as f:
        json.dump(stamps, f)


def _controller() -> str:
    import shutil

    return "mpi" if shutil.which("mpirun") else "gloo"


def _env() -> Dict[str, str]:
    return dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", TF_CPP_MIN_LOG_LEVEL="2",
                BENCH_LAUNCHED=str(time.time()))


def one_launch(work: Path, timeout: int) -> Dict[str, float]:
    """Seconds of each phase (the slower rank's), from one launch of 2 processes."""
    from ...launchers.horovodrun import local_command  # the driver's side only: a rank's stamps stay its own

    result = Path(tempfile.mkdtemp(dir=work))
    controller = _controller()
    cmd = [*local_command(2, controller), str(BIN / "python"), "-m", "hvd_train.tools.bench.startup", "worker",
           str(result)]
    env = _env()
    if controller == "mpi":
        env["OMPI_MCA_mpi_yield_when_idle"] = "1"  # as launch/local.sh runs it
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"startup launch failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    ranks = [json.loads((result / f"rank-{r}.json").read_text()) for r in range(2)]
    out, before = {}, ranks[0]["launched"]
    for phase in PHASES:
        at = max(r[phase] for r in ranks)
        out[phase], before = at - before, at
    out["launch_to_first_step"] = before - ranks[0]["launched"]
    return out


def short_run(work: Path, timeout: int) -> float:
    """Wall seconds of ``launch/local.sh -n 2 -- --epochs 1`` (iris), outputs included."""
    out = Path(tempfile.mkdtemp(dir=work)) / "run"
    start = time.perf_counter()
    proc = subprocess.run([str(REPO / "launch" / "local.sh"), "-n", "2", "--", "--epochs", "1", "--progress", "none",
                           "--output-dir", str(out)], env=dict(_env(), VENV=str(BIN.parent)),
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"launch/local.sh failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def startup_section(work: Path, repeats: int, timeout: int, log: Callable[[str], None]) -> Dict[str, Any]:
    launches: List[Dict[str, float]] = []
    runs: List[float] = []
    for repeat in range(repeats):  # interleaved, as every section of the bench
        launches.append(one_launch(work, timeout))
        runs.append(short_run(work, timeout))
        log(f"startup {repeat + 1}/{repeats}: launch to first step {launches[-1]['launch_to_first_step']:.2f} s, "
            f"1-epoch run {runs[-1]:.2f} s")
    return {"controller": _controller(), "runs": launches, "short_runs": runs,
            "median": {k: statistics.median(r[k] for r in launches) for k in launches[0]},
            "short_run_s": statistics.median(runs)}


def lines(s: Dict[str, Any]) -> List[str]:
    m = s["median"]
    names = {"launch": "launcher and interpreter start", "import_tensorflow": "import tensorflow",
             "import_horovod": "import horovod.tensorflow", "hvd_init": "hvd.init()",
             "import_hvd_train": "import hvd_train's training modules",
             "setup": "set-up in train(): data, agreement, plan, consensus, model, broadcast",
             "first_step": "the fit's start to the end of its first step (tracing)"}
    out = ["## Start-up: launch to first step", "",
           f"2 processes through horovodrun ({s['controller']}), the default run (iris); the slower rank, "
           f"medians of {len(s['runs'])} launch(es).", "", "| phase | seconds |", "| --- | ---: |"]
    out += [f"| {names[p]} | {m[p]:.2f} |" for p in PHASES]
    out += [f"| **launch to first step** | **{m['launch_to_first_step']:.2f}** |",
            f"| `launch/local.sh -n 2 -- --epochs 1`, start to exit (outputs included) | {s['short_run_s']:.2f} |", ""]
    return out


if __name__ == "__main__":
    worker(sys.argv[2])
