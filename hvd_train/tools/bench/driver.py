"""hvd-bench: scaling, overhead, the peer (MultiWorkerMirroredStrategy), the wire and the knobs;
the scaling figures for an MLP on a table and for a CNN on images (section ``cnn``).

Every figure is a ratio of runs made in this one invocation, with the variants interleaved
repeat by repeat (a noisy neighbour slows all of them, not one) and medians taken. Each run is
a fresh set of processes started by the real launcher. Writes results.json, results.md,
scaling.png, scaling_cnn.png and wire.png into --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ...launchers.horovodrun import local_command
from . import report

BIN = Path(sys.executable).parent

# Compute-bound default: one step is ~0.1 s of matrix products on one core.
FULL = {"features": 256, "hidden": [1024, 1024], "classes": 10, "batch": 1024, "steps": 12, "epochs": 4,
        "sizes": [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20],
        "min_iters": 5, "min_seconds": 0.3, "repeats": 3}
# For the test suite: the same code paths at toy sizes.
# Every code path once, not every combination: the knobs that change what runs, the CNN and the
# wire over one controller (the scaling section runs both), the data section at its baseline size.
QUICK = {"features": 16, "hidden": [32], "classes": 3, "batch": 32, "steps": 3, "epochs": 2,
         "sizes": [4 << 10, 64 << 10], "min_iters": 2, "min_seconds": 0.0, "repeats": 1,
         "quick_knobs": ["baseline", "fp16_allreduce", "backward_passes_2"]}


# The CNN workload (section "cnn"), as Horovod's tensorflow2_synthetic_benchmark: random images and
# labels, images/s. A ResNet-50 at 224x224 takes seconds per image on a 2-core VM; --model cnn on
# 32x32x3 (CIFAR's size) keeps one step near 0.1-0.2 s, like the MLP's.
CNN_FULL = {"model": "cnn", "image": [32, 32, 3], "filters": [32, 64, 128], "classes": 10, "batch": 64,
            "steps": 8, "epochs": 4}
CNN_QUICK = {"model": "cnn", "image": [8, 8, 1], "filters": [4], "classes": 2, "batch": 8, "steps": 3, "epochs": 2}


PROFILE_EPOCHS = 9  # section "profile": 8 timed epochs per run


MPI_YIELD = {"OMPI_MCA_mpi_yield_when_idle": "1"}
# The peer on Keras 3: TensorFlow's multi-worker strategy cannot fit a Keras 3 model (open upstream).
MWMS_KERAS3 = ("MultiWorkerMirroredStrategy cannot fit a Keras 3 model (keras-team/keras#20585: \"Attempt to "
               "convert a value (PerReplica...) with an unsupported type ... to a Tensor\")")


class BenchError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


class Runner:
    def __init__(self, workdir: Path, timeout: int):
        self.workdir, self.timeout = workdir, timeout
        self.count = 0

    def _job(self, task: str, params: Dict[str, Any]) -> Tuple[Path, List[str]]:
        """A fresh result file and output directory, and the worker command that fills them."""
        self.count += 1
        result = self.workdir / f"result-{self.count}.json"
        params = {**params, "output_dir": str(self.workdir / f"run-{self.count}")}
        return result, [str(BIN / "python"), "-m", "hvd_train.tools.bench.workers", task, json.dumps(params),
                        str(result)]

    @staticmethod
    def _start(cmd: List[str], env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
        return subprocess.Popen(cmd, env=_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def _finish(self, procs: List[subprocess.Popen], result: Path, what: str) -> Dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        outputs = []
        for proc in procs:
            try:
                out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for p in procs:
                    p.kill()
                raise BenchError(f"{what}: no result within {self.timeout}s") from None
            outputs.append(out)
        if any(p.returncode for p in procs) or not result.exists():
            raise BenchError(f"{what} failed:\n" + "\n".join(o[-2000:] for o in outputs))
        return json.loads(result.read_text())

    def horovod(self, task: str, np_: int, params: Dict[str, Any], controller: str = "gloo",
                env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
        result, worker = self._job(task, params)
        return self._finish([self._start(local_command(np_, controller) + worker, env)], result,
                            f"{task} np={np_} {controller}")

    def independent(self, copies: int, params: Dict[str, Any]) -> Dict[str, Any]:
        """``copies`` separate np=1 hvd_train jobs at once: the machine's ceiling without any communication."""
        jobs = [self._job("hvd_train", params) for _ in range(copies)]
        procs = [self._start(local_command(1) + worker) for _, worker in jobs]
        results = [self._finish([proc], result, f"independent copy {i}") for i, (proc, (result, _)) in
                   enumerate(zip(procs, jobs))]
        return {"samples_per_second": sum(r["samples_per_second"] for r in results), "copies": results}

    def single(self, task: str, params: Dict[str, Any]) -> Dict[str, Any]:
        result, worker = self._job(task, params)
        return self._finish([self._start(worker)], result, task)

    def mwms(self, workers: int, params: Dict[str, Any]) -> Dict[str, Any]:
        """MultiWorkerMirroredStrategy on localhost: one process per worker, told apart by TF_CONFIG.
        Keras 3's fit cannot run under it (MWMS_KERAS3): then the run is recorded, with NaN figures."""
        result, worker = self._job("mwms", params)
        hosts = [f"localhost:{_free_port()}" for _ in range(workers)]
        procs = [self._start(worker, {"TF_CONFIG": json.dumps({"cluster": {"worker": hosts},
                                                               "task": {"type": "worker", "index": index}})})
                 for index in range(workers)]
        try:
            return self._finish(procs, result, f"mwms x{workers}")
        except BenchError as err:
            if "PerReplica" not in str(err):
                raise
            return {"samples_per_second": float("nan"), "world_size": workers, "error": MWMS_KERAS3}


def _median(runs: List[Dict[str, Any]], key: str = "samples_per_second") -> float:
    return statistics.median(r[key] for r in runs)


def scaling_section(runner: Runner, p: Dict[str, Any], controllers: List[str], repeats: int, log) -> Dict[str, Any]:
    """Sections 1-3 interleaved: hvd_train np=1/np=2 (each controller), two independent np=1 jobs
    (the ceiling: same cores, no communication), one process on both cores, plain Keras, MWMS."""
    one = {**p, "threads": 1}
    variants = {
        "hvd_np1": lambda: runner.horovod("hvd_train", 1, one),
        "hvd_np2": lambda: runner.horovod("hvd_train", 2, one),
    }
    if "mpi" in controllers:
        # As launch/local.sh and make train run it: Open MPI yields instead of busy-polling.
        variants["hvd_np2_mpi"] = lambda: runner.horovod("hvd_train", 2, one, controller="mpi", env=MPI_YIELD)
    variants.update({
        "independent_np1_x2": lambda: runner.independent(2, one),
        "hvd_np1_2threads": lambda: runner.horovod("hvd_train", 1, {**p, "threads": 2}),
        "keras_np1": lambda: runner.single("keras", one),
        "mwms_np2": lambda: runner.mwms(2, one),
    })
    runs: Dict[str, List[Dict[str, Any]]] = {k: [] for k in variants}
    for repeat in range(repeats):
        for name, launch in variants.items():
            runs[name].append(launch())
            log(f"repeat {repeat + 1}/{repeats} {name}: {runs[name][-1]['samples_per_second']:.0f} samples/s")
    med = {k: _median(v) for k, v in runs.items()}
    best = max(("hvd_np2", "hvd_np2_mpi"), key=lambda k: med.get(k, 0.0))
    np2 = {"gloo": "hvd_np2", "mpi": "hvd_np2_mpi"}
    # Per controller: the bars the issue sets (the ceiling, 1 process on every core, the peer).
    per_controller = {c: {"samples_per_second": med[np2[c]],
                          "vs_ceiling": med[np2[c]] / med["independent_np1_x2"],
                          "vs_one_process_all_cores": med[np2[c]] / med["hvd_np1_2threads"],
                          "vs_mwms": med[np2[c]] / med["mwms_np2"],
                          "scaling_efficiency": med[np2[c]] / (2 * med["hvd_np1"])}
                      for c in controllers}
    return {
        "throughput": med,
        "runs": runs,
        "best_np2": best,
        "controllers": per_controller,
        "breakdown": breakdown_section(runner, one, controllers, med, log),
        "scaling_efficiency_np2": med[best] / (2 * med["hvd_np1"]),
        "scaling_efficiency_np2_gloo": med["hvd_np2"] / (2 * med["hvd_np1"]),
        "ceiling_efficiency_np2": med["independent_np1_x2"] / (2 * med["hvd_np1"]),
        "np2_vs_ceiling": med[best] / med["independent_np1_x2"],
        "np2_vs_one_process_two_threads": med[best] / med["hvd_np1_2threads"],
        "overhead_np1_vs_keras": 1 - med["hvd_np1"] / med["keras_np1"],
        "hvd_vs_mwms_np2": med[best] / med["mwms_np2"],
    }


def breakdown_section(runner: Runner, one: Dict[str, Any], controllers: List[str], med: Dict[str, float],
                      log) -> Dict[str, Any]:
    """Where an np=2 step's time goes, per controller: one more run each with Horovod's timeline.

    compute: a step alone on the machine (np=1); sharing: what two processes that never talk lose
    to each other (the ceiling's step minus that); waiting and allreduce: from the timeline (rank
    0's view); other: the rest (negotiation rounds, thread wake-ups, the optimizer's apply waiting
    on them). Input is the cost of assembling one batch, paid in a thread beside the step.
    """
    from . import timeline

    compute = 1e3 * one["batch"] / med["hvd_np1"]
    ceiling = 1e3 * 2 * one["batch"] / med["independent_np1_x2"]
    out = {}
    for controller in controllers:
        trace = runner.workdir / f"timeline-{controller}.json"
        run = runner.horovod("hvd_train", 2, {**one, "timeline": str(trace), "measure_input": True},
                             controller=controller, env=MPI_YIELD if controller == "mpi" else None)
        steps = run["steps_per_epoch"]
        step = 1e3 * statistics.median(run["epoch_seconds"][1:] or run["epoch_seconds"]) / steps
        found = timeline.breakdown(str(trace), skip=steps) or {"wait_ms": float("nan"), "allreduce_ms": float("nan"),
                                                               "allreduce_total_ms": float("nan"), "steps": 0}
        out[controller] = {
            "step_ms": step, "compute_ms": compute, "sharing_ms": ceiling - compute,
            "wait_ms": found["wait_ms"], "allreduce_ms": found["allreduce_ms"],
            "allreduce_total_ms": found["allreduce_total_ms"], "input_ms": run["input_ms"],
            "other_ms": step - ceiling - found["wait_ms"] - found["allreduce_ms"], "timeline_steps": found["steps"],
        }
        log(f"breakdown {controller}: step {step:.1f} ms, wait {found['wait_ms']:.1f} ms, "
            f"allreduce {found['allreduce_ms']:.1f} ms exposed")
    return out


def wire_section(runner: Runner, p: Dict[str, Any], controllers: List[str], log) -> Dict[str, Any]:
    out = {}
    for controller in controllers:
        out[controller] = runner.horovod("wire", 2, p, controller=controller)
        log(f"wire {controller}: {len(out[controller]['allreduce'])} points")
    return out


def knobs_section(runner: Runner, p: Dict[str, Any], controllers: List[str], repeats: int, log) -> Dict[str, Any]:
    """np=2 variants of the scaling workload; each is compared with the baseline of its repeat."""
    one = {**p, "threads": 1}
    variants = {
        "baseline": (one, "gloo", None),
        "batch_x4": ({**one, "batch": p["batch"] * 4, "steps": max(1, p["steps"] // 4)}, "gloo", None),
        "fp16_allreduce": ({**one, "fp16_allreduce": True}, "gloo", None),
        "backward_passes_2": ({**one, "backward_passes_per_step": 2, "steps": max(1, p["steps"] // 2)}, "gloo", None),
        # The default since issue 14 pins each process to its own cores; this is the run without.
        "no_core_pinning": ({**one, "pin_cores": False}, "gloo", None),
        "cycle_time_10ms": (one, "gloo", {"HOROVOD_CYCLE_TIME": "10"}),
    }
    if "mpi" in controllers:
        # (MPI with yield, the default of the launchers, is the scaling section's hvd_np2_mpi.)
        # Open MPI's default busy-polls while waiting; on a host whose cores all compute, that steals cycles.
        variants["mpi_busy_poll"] = (one, "mpi", {"OMPI_MCA_mpi_yield_when_idle": "0"})
    if p.get("quick_knobs"):
        variants = {k: v for k, v in variants.items() if k in p["quick_knobs"]}
    runs: Dict[str, List[Dict[str, Any]]] = {k: [] for k in variants}
    for repeat in range(repeats):
        for name, (params, controller, env) in variants.items():
            runs[name].append(runner.horovod("hvd_train", 2, params, controller=controller, env=env))
            log(f"knobs {repeat + 1}/{repeats} {name}: {runs[name][-1]['samples_per_second']:.0f} samples/s")
    base = _median(runs["baseline"])
    return {name: {"samples_per_second": _median(r), "vs_baseline": _median(r) / base, "runs": len(r),
                   "test_accuracy": statistics.median(x["test_accuracy"] for x in r)}
            for name, r in runs.items()}


PRECISIONS = ("float32", "mixed_bfloat16")


def precision_section(runner: Runner, p: Dict[str, Any], cnn: Optional[Dict[str, Any]], repeats: int,
                      log) -> Dict[str, Any]:
    """float32 against mixed_bfloat16 (Keras's policy: bfloat16 compute, float32 variables) on
    the MLP and the CNN workloads (``cnn`` None: the MLP's alone) at np=1 and np=2, the four runs
    of a workload interleaved."""
    out = {}
    workloads = [("mlp", {**p, "threads": 1})] + ([("cnn", {**p, **cnn, "threads": 1})] if cnn else [])
    for name, workload in workloads:
        variants = {f"{policy}_np{n}": (n, {**workload, "precision": policy}) for n in (1, 2) for policy in PRECISIONS}
        runs: Dict[str, List[Dict[str, Any]]] = {k: [] for k in variants}
        for repeat in range(repeats):
            for key, (n, params) in variants.items():
                runs[key].append(runner.horovod("hvd_train", n, params))
                log(f"precision {name} {repeat + 1}/{repeats} {key}: {runs[key][-1]['samples_per_second']:.0f}/s")
        med = {k: _median(v) for k, v in runs.items()}
        out[name] = {"throughput": med,
                     "test_accuracy": {k: statistics.median(x["test_accuracy"] for x in v) for k, v in runs.items()},
                     **{f"bf16_speedup_np{n}": med[f"mixed_bfloat16_np{n}"] / med[f"float32_np{n}"] for n in (1, 2)}}
    return out


def machine() -> Dict[str, Any]:
    from ...runtime import cores, versions

    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    v = versions()
    return {"cores": cores(), "cpu": cpu, "python": v["python"], "tensorflow": v["tensorflow"],
            "horovod": v["horovod"], "platform": platform.platform(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="hvd-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/latest", help="directory for results.json, results.md and PNGs")
    parser.add_argument("--quick", action="store_true", help="toy sizes (for tests): checks the machinery only")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats per variant (default 3)")
    parser.add_argument("--sections", default="scaling,cnn,wire,knobs,precision",
                        help="comma-separated subset of scaling,cnn,wire,knobs,data,startup (cnn: the scaling "
                        "figures for a CNN on images; data: the file-data path, not in the default set, see "
                        "--data-rows; startup: where a launch's seconds go before the first step, not in the "
                        "default set; profile: an epoch's time at np=1, hvd_train against plain Keras, part by part, "
                        "not in the default set; precision: float32 against mixed_bfloat16, MLP and CNN at np=1 "
                        "and np=2; storage: the data path from s3:// (a local SeaweedFS) against local disk, not "
                        "in the default set, see --storage-rows; images: image folders, TFRecord and in memory, "
                        "the CNN and ResNet50 against plain Keras, not in the default set, see --image-count)")
    parser.add_argument("--data-rows", default="400000,1600000", help="data section: rows of the generated files")
    parser.add_argument("--storage-rows", type=int, default=400000, help="storage section: rows of the files")
    parser.add_argument("--image-count", type=int, default=3000, help="images section: JPEGs generated")
    parser.add_argument("--image-size", type=int, default=32, help="images section: the side images are resized to")
    parser.add_argument("--image-models", default="cnn,resnet50", help="images section: the models measured")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per launched run")
    args = parser.parse_args(argv)
    p = dict(QUICK if args.quick else FULL)
    repeats = args.repeats or p.pop("repeats")
    p.pop("repeats", None)
    sections = set(args.sections.split(","))
    unknown = sections - {"scaling", "cnn", "wire", "knobs", "data", "startup", "profile", "precision", "storage",
                          "images"}
    if unknown or repeats < 1:
        parser.error(f"unknown sections {sorted(unknown)}" if unknown else "--repeats must be >= 1")
    controllers = ["gloo"] + (["mpi"] if shutil.which("mpirun") else [])
    # --quick: the scaling section runs every controller; the sections after it, one.
    more_controllers = controllers[:1] if args.quick else controllers
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    def log(message: str) -> None:
        sys.stdout.write(f"[hvd-bench {time.monotonic() - started:6.1f}s] {message}\n")
        sys.stdout.flush()

    results: Dict[str, Any] = {"machine": machine(), "workload": p, "repeats": repeats, "quick": args.quick}
    with tempfile.TemporaryDirectory(prefix="hvd-bench-") as work:
        runner = Runner(Path(work), args.timeout)
        try:
            if "scaling" in sections:
                results["scaling"] = scaling_section(runner, p, controllers, repeats, log)
            if "cnn" in sections:
                cnn = dict(CNN_QUICK if args.quick else CNN_FULL)
                results["cnn"] = {"workload": cnn, **scaling_section(runner, {**p, **cnn}, more_controllers, repeats,
                                                                     lambda m: log(f"cnn: {m}"))}
            if "wire" in sections:
                results["wire"] = wire_section(runner, p, more_controllers, log)
            if "knobs" in sections:
                results["knobs"] = knobs_section(runner, p, controllers, max(1, repeats - 2), log)
            if "precision" in sections:
                # --quick: the MLP's runs alone (the CNN's are the same code path).
                results["precision"] = precision_section(runner, p, None if args.quick else CNN_FULL, repeats, log)
            if "data" in sections:
                from .datapath import TINY_ROWS, data_section

                rows = [TINY_ROWS] if args.quick else [int(r) for r in args.data_rows.split(",")]
                results["data"] = data_section(Path(work), rows, args.timeout, log)
            if "storage" in sections:
                from .datapath import TINY_ROWS
                from .storage import storage_section

                # --quick: Parquet alone (CSV takes the same storage calls), on the data section's tiny file,
                # from local disk at np=1 only.
                results["storage"] = storage_section(
                    Path(work), TINY_ROWS if args.quick else args.storage_rows, args.timeout, log,
                    **({"kinds": ("parquet",), "local_worlds": (1,)} if args.quick else {}))
            if "images" in sections:
                from .imagepath import images_section

                results["images"] = images_section(Path(work), 96 if args.quick else args.image_count,
                                                   32 if args.quick else args.image_size, args.timeout, log,
                                                   repeats=1 if args.quick else max(1, repeats - 1), quick=args.quick,
                                                   models=tuple(args.image_models.split(",")))
            if "startup" in sections:
                from .startup import startup_section

                results["startup"] = startup_section(Path(work), repeats, args.timeout, log)
            if "profile" in sections:
                from .profile import profile_section

                results["profile"] = profile_section(runner, p, CNN_QUICK if args.quick else CNN_FULL,
                                                     repeats if args.quick else max(3, repeats), log,
                                                     epochs=None if args.quick else PROFILE_EPOCHS)
        except (BenchError, RuntimeError) as err:
            sys.stderr.write(f"hvd-bench: error: {err}\n")
            return 1
    results["seconds"] = time.monotonic() - started
    report.write_all(results, out)
    log(f"wrote {out}/results.json, results.md, " + ", ".join(sorted(p.name for p in out.glob("*.png"))))
    sys.stdout.write((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
