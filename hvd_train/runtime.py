"""Horovod start-up, device and thread placement, rank-0 side effects, collective agreement,
and the facts of this process every part reports alike (launcher rank, host, versions)."""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import platform
import socket
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Dict, NoReturn, Optional, Tuple

import numpy as np

# Launchers tell each process its rank before Horovod starts (horovodrun, Open MPI, MPICH/PMI, Slurm).
_RANK_VARIABLES = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID")

EXIT_GRACE_SECONDS = 5.0


class AgreedFailure(RuntimeError):
    """Every rank raises this together after a collective check found an error on some rank."""


@dataclass(frozen=True)
class Runtime:
    rank: int
    size: int
    local_rank: int
    local_size: int
    intra_op_threads: int
    device: str
    simulated: bool = False  # a dry run's world of --np processes (simulated_world), not the launcher's
    cores: Optional[Tuple[int, ...]] = None  # the cores this process is bound to (pin_to_cores), None = not bound

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


def launcher_rank() -> int:
    """This process's global rank as the launcher announced it (0 when run alone)."""
    for name in _RANK_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def under_launcher() -> bool:
    """Whether a launcher (horovodrun, mpirun, srun) started this process."""
    return any(name in os.environ for name in _RANK_VARIABLES)


def host_name() -> str:
    """The host this rank runs on: horovodrun's -H name for it; else, for a rank started over
    ssh (mpirun's remote daemons), the address ssh reached; else the hostname."""
    ssh_server = os.environ.get("SSH_CONNECTION", "").split()[2:3]
    return os.environ.get("HOROVOD_HOSTNAME") or (ssh_server[0] if ssh_server else socket.gethostname())


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def threads_per_process(threads: Optional[int], local_size: int) -> int:
    # N processes share this host's cores; TF's default (all cores each) oversubscribes.
    return threads or max(1, cores() // local_size)


def pin_to_cores(local_rank: int, local_size: int) -> Optional[Tuple[int, ...]]:
    """Bind this process, every thread of it, to its own share of the host's cores.

    Several processes on a host otherwise float over all its cores: each brings a compute
    thread, the caller of the step and Horovod's background and transport threads, so the
    scheduler interleaves both ranks' work on both cores and one rank falls behind the other at
    every step (measured: rank 0 waited 49 ms per 160 ms step at np=2; 10 ms pinned,
    docs/performance.md). Only a process that may run on every online core is pinned: one a
    launcher, a container's cpuset or the user has already bound keeps its binding. Nothing is
    done with one process per host or fewer cores than processes. Returns the cores, or None.
    """
    if local_size < 2 or not hasattr(os, "sched_setaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    share = len(allowed) // local_size
    if share < 1 or len(allowed) != os.cpu_count():
        return None
    mine = tuple(allowed[local_rank * share:(local_rank + 1) * share])
    # Threads made before now (Horovod's background thread, Gloo's or MPI's transport) keep
    # their own affinity: set every one; threads made later (TensorFlow's pools) inherit it.
    for task in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(task), mine)
        except OSError:  # the thread ended meanwhile
            pass
    return mine


def set_threads(threads: int) -> None:
    """TensorFlow's intra- and inter-op pools of this process; raises RuntimeError once TF has run."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


def versions() -> Dict[str, str]:
    """The versions a run records and every rank must share. Read from package metadata, so it
    imports nothing (launch/hosts.sh compares versions_line() across hosts)."""
    return dict(_versions())


@functools.lru_cache(maxsize=None)
def _versions() -> Dict[str, str]:
    # About 8 ms of metadata lookups; asked for at set-up, at every checkpoint and at the end.
    from importlib import metadata

    from .version import __version__

    def version(*names: str) -> str:
        for name in names:
            try:
                return metadata.version(name)
            except metadata.PackageNotFoundError:
                continue
        return "missing"

    return {"hvd_train": __version__, "tensorflow": version("tensorflow", "tensorflow-cpu"),
            "keras": version("keras"), "horovod": version("horovod"), "numpy": version("numpy"),
            "scikit-learn": version("scikit-learn"),
            "python": platform.python_version()}


def versions_line() -> str:
    v = versions()
    return f"hvd_train {v['hvd_train']} tensorflow {v['tensorflow']} horovod {v['horovod']} python {v['python']}"


# Set by init(): whether ranks other than 0 print their log lines and library warnings.
_verbose_ranks = False


def quiet_other_ranks(verbose: bool) -> None:
    """Before TensorFlow is imported: ranks other than 0 print errors only, unless ``verbose``;
    then TensorFlow is imported (its import-time lines hidden as the log level asks).

    N copies of the same TensorFlow/Horovod warnings drown rank 0's lines; errors still show.
    """
    global _verbose_ranks
    _verbose_ranks = verbose
    if not verbose and launcher_rank() != 0:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"  # TensorFlow's C++ INFO and WARNING lines
        warnings.filterwarnings("ignore")
        for name in ("tensorflow", "absl", "horovod", "h5py", "matplotlib"):
            logging.getLogger(name).setLevel(logging.ERROR)
    _import_tensorflow_quietly()


def _import_tensorflow_quietly() -> None:
    """Import TensorFlow with its import-time INFO lines hidden when TF_CPP_MIN_LOG_LEVEL asks for
    that (hvd_train's default is 1). TensorFlow >= 2.16 prints two lines at import whatever the
    level says (absl's "All log messages before absl::InitializeLog() ..." and oneDNN's notice):
    once per process, so N times per launch. An import error still shows: it is raised after
    stderr is back."""
    import sys

    level = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0")
    if "tensorflow" in sys.modules or not level.isdigit() or int(level) < 1:
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def init(threads: Optional[int] = None, verbose_ranks: bool = False,
         horovod_env: Optional[Dict[str, str]] = None, pin_cores: bool = False) -> Runtime:
    """Start Horovod, pin one GPU per process or size the CPU thread pools. Call once, first.

    ``horovod_env``: Horovod settings read at hvd.init() (timeline, autotuning), put in the environment first.
    ``pin_cores``: bind each process on a host to its own share of the cores (pin_to_cores).
    """
    quiet_other_ranks(verbose_ranks)
    os.environ.update(horovod_env or {})
    import horovod.tensorflow as hvd
    import tensorflow as tf

    hvd.init()  # Horovod: must run before any other TensorFlow or Horovod call.
    device = "cpu"
    gpus = tf.config.list_physical_devices("GPU")
    intra = threads_per_process(threads, hvd.local_size())
    # Horovod: the local rank and size say which share of this host's cores is this process's.
    cores_used = pin_to_cores(hvd.local_rank(), hvd.local_size()) if pin_cores else None
    try:
        if gpus:
            # Horovod: one GPU per process, chosen by local rank; grow memory instead of grabbing it all.
            gpu = gpus[hvd.local_rank() % len(gpus)]
            tf.config.experimental.set_memory_growth(gpu, True)
            tf.config.set_visible_devices(gpu, "GPU")
            device = gpu.name
        set_threads(intra)
    except RuntimeError:
        # TensorFlow already ran in this process (e.g. a second train() call): placement is fixed.
        intra = tf.config.threading.get_intra_op_parallelism_threads() or intra
        device = next((d.name for d in tf.config.get_visible_devices("GPU")), "cpu")
    return Runtime(
        rank=hvd.rank(), size=hvd.size(), local_rank=hvd.local_rank(),
        local_size=hvd.local_size(), intra_op_threads=intra, device=device,
        cores=cores_used,
    )


def refresh(rt: Runtime) -> Runtime:
    """This process's place in the world again, after an elastic reset re-initialised Horovod."""
    import horovod.tensorflow as hvd

    return dataclasses.replace(rt, rank=hvd.rank(), size=hvd.size(), local_rank=hvd.local_rank(),
                               local_size=hvd.local_size())


def simulated_world(rt: Runtime, world_size: int, threads: Optional[int]) -> Runtime:
    """For a dry run alone: this process as rank 0 of ``world_size`` processes on this host."""
    return dataclasses.replace(rt, size=world_size, local_size=world_size,
                               intra_op_threads=threads_per_process(threads, world_size), simulated=True)


def write_line(text: str, stream=None) -> None:
    """One write per line: launchers prefix every chunk, and print() writes text and newline
    separately when unbuffered, which splits lines in the launcher's output."""
    stream = stream or sys.stdout
    stream.write(text + "\n")
    stream.flush()


def log(runtime: Runtime, message: str) -> None:
    """The one place rank-0-only console output goes through."""
    if runtime.is_rank0:
        write_line(f"[hvd_train] {message}")
    elif _verbose_ranks:
        write_line(f"[hvd_train rank {runtime.rank}] {message}")


def on_rank0(runtime: Runtime, action, *args: Any, **kwargs: Any) -> Any:
    """Run a side effect (file writes, printing) on rank 0 only. Never put a collective in it."""
    if runtime.is_rank0:
        return action(*args, **kwargs)
    return None


def agree(error: Optional[str], what: str) -> None:
    """Collective: every rank calls this, failed or not. If any rank failed, all raise together.

    The message names the ranks that failed when they are not all of them, so a problem on
    one host (a missing file, different data) is visible from rank 0's single message.
    """
    agree_gather(error, None, what)


def agree_gather(error: Optional[str], payload: Any, what: str) -> list:
    """Collective: ``agree``, and every rank's ``payload`` (rank order) when no rank failed, in
    the same single allgather."""
    # Horovod: every rank reaches this allgather; a rank that skipped it would hang the others.
    gathered = allgather((error, payload), f"agree.{what}", f"agreeing on {what}")
    failed = [(rank, msg) for rank, (msg, _) in enumerate(gathered) if msg]
    if not failed:
        return [p for _, p in gathered]
    if len(failed) == len(gathered) and len({msg for _, msg in failed}) == 1:
        raise AgreedFailure(failed[0][1])
    raise AgreedFailure("; ".join(f"rank {rank}: {msg}" for rank, msg in failed))


def broadcast(value: Any, what: str) -> Any:
    """Collective: rank 0's value on every rank (decisions such as the output directory)."""
    import horovod.tensorflow as hvd

    from . import watchdog

    with watchdog.waiting(f"the broadcast of {what}"):
        # Horovod: rank 0 decides, everyone follows; never let ranks decide independently.
        return hvd.broadcast_object(value, root_rank=0, name=f"bcast.{what}")


def allgather(value: Any, what: str, phase: Optional[str] = None) -> list:
    """Collective: every rank's value, in rank order, on every rank (``phase``: what the
    watchdog reports this rank waits in, default the gathering of ``what``)."""
    import horovod.tensorflow as hvd

    from . import watchdog

    with watchdog.waiting(phase or f"the gathering of {what}"):
        return hvd.allgather_object(value, name=f"gather.{what}")


def fail(message: str, code: int = 2, grace: bool = True) -> NoReturn:
    """Before Horovod starts (every rank hit the same bad argument): print once, exit on all ranks.

    Launchers kill the remaining ranks as soon as one exits non-zero, so the other ranks give
    rank 0 a moment to print before they exit; the launcher usually ends them sooner.
    """
    if launcher_rank() == 0:
        write_line(f"hvd-train: error: {message}", sys.stderr)
    elif grace:
        time.sleep(EXIT_GRACE_SECONDS)
    sys.exit(code)


def fail_together(message: str, code: int = 2, label: str = "error: ") -> NoReturn:
    """After Horovod started and ranks agreed on a failure (or a stop): rank 0 prints, then all exit."""
    import horovod.tensorflow as hvd

    from . import watchdog

    if hvd.rank() == 0:
        write_line(f"hvd-train: {label}{message}", sys.stderr)
    watchdog.mark("leaving after an error every rank agreed on", waiting=True)
    # Horovod: a barrier, so no rank exits (and gets the job torn down) before rank 0 has reported.
    hvd.allreduce(np.zeros(1), op=hvd.Sum, name="fail.barrier")
    sys.exit(code)
