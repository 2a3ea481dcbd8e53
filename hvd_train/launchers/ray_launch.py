"""Training on a Ray cluster through Horovod's Ray integration (``launch/ray.py`` is the script).

The driver (this process) checks the hvd-train options first, so a bad one ends with one message
before Ray starts; then it connects to a running cluster (``--address``) or starts a local Ray
instance, places N workers with ``horovod.ray.RayExecutor`` (Gloo, one actor per rank, world rank
= the actor's place in the executor's list) and runs ``train_worker`` on each with the same
options: the same ``trainer.train`` as under horovodrun.

Workers return an outcome instead of exiting, so every result reaches the driver: success with
rank 0's metrics (and, with ``--fetch-to``, its output directory as a tar), or the failure rank 0
would have printed under horovodrun. A worker that dies (killed, out of memory, its node lost)
or raises something unexpected leaves the others blocked in a collective: they get ``--grace``
seconds to come back, then the job is shut down. The driver prints one ``hvd-train: error:``
line in every failed case and exits non-zero (the agreed exit code, or 1).

Ray forwards the workers' output to the driver asynchronously (prefixed with the actor's pid), so
the driver prints the lines a run is judged by itself, from the outcomes: the ``[hvd_train] ray:``
lines below.

Elastic (``--min-workers/--max-workers``): Horovod's elastic Ray executor starts, replaces and adds
the workers, each with ``HOROVOD_ELASTIC=1``, so ``train()`` takes hvd_train/training/elastic.py's path as
under ``launch/elastic.sh``; the driver reports the outcomes of the workers alive at the end.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import signal
import socket
import sys
import tarfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from .. import cli, runtime, storage
from ..config.options import ConfigError

DEFAULT_GRACE_SECONDS = 30.0
DEFAULT_START_TIMEOUT_SECONDS = 100.0  # horovod.ray's own default for placing the workers
CONNECT_TIMEOUT_SECONDS = 10.0
WAIT_SLICE_SECONDS = 1.0
WAIT_REPORT_SECONDS = float(os.environ.get("RAY_WAIT_REPORT_SECONDS", 5))  # elastic: "waiting for room" lines
HOST_PORT = re.compile(r"[^\s:]+:\d+")  # a cluster address as `ray start --head` prints it
# Ray's log monitor forwards worker output about every half second: give the last lines a moment.
LOG_FLUSH_SECONDS = 1.0


@dataclass
class Outcome:
    """What one worker returned (or what became of it)."""

    rank: int
    ok: bool = False
    message: str = ""  # the one line hvd-train would print, without "hvd-train: "
    code: int = 1
    died: bool = False  # the actor is gone (killed, crashed, its node lost)
    unexpected: bool = False  # raised something hvd-train does not report as one line (a bug)
    traceback: str = ""  # of the unexpected error, printed when it is the job's failure
    stalled: bool = False  # still running when the grace after another worker's failure ended
    output_dir: str = ""
    host: str = ""
    metrics: Dict[str, Any] = field(default_factory=dict)
    archive: Optional[bytes] = None  # rank 0's output directory as a gzipped tar (--fetch-to)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/ray.py",
        usage="launch/ray.py [--address ADDR] --num-workers N [options] -- HVD_TRAIN_ARGS...",
        description="Run hvd-train on N Ray workers through horovod.ray.RayExecutor (Gloo). "
                    "Everything after -- goes to hvd-train (see: hvd-train --help).",
        epilog="Example: launch/ray.py --address 10.0.0.1:6379 --num-workers 4 --fetch-to runs/iris -- "
               "--dataset iris --epochs 50")
    p.add_argument("--address", default=None,
                   help="a running cluster's address (ray start --head prints it); default: start a local "
                        "Ray instance for this job")
    p.add_argument("--num-workers", type=int, default=None, help="Horovod processes (one Ray actor each)")
    p.add_argument("--min-workers", type=int, default=None,
                   help="elastic: train on while at least this many workers are alive (instead of --num-workers)")
    p.add_argument("--max-workers", type=int, default=None,
                   help="elastic: add workers up to this many as the cluster has room (default: --min-workers)")
    p.add_argument("--network-interface", default=None, metavar="IFACE",
                   help="elastic: the interface Gloo uses (default: found by Horovod across two or more nodes; "
                        "the loopback on a one-node cluster)")
    p.add_argument("--cpus-per-worker", type=int, default=1, help="CPUs Ray reserves for each worker")
    p.add_argument("--gpus-per-worker", type=int, default=0, help="GPUs for each worker (0: CPU only)")
    p.add_argument("--fetch-to", default=None, metavar="DIR",
                   help="copy rank 0's output directory back to DIR on this machine (must not exist or be "
                        "empty); without it the outputs stay where rank 0 wrote them (a shared filesystem)")
    p.add_argument("--grace", type=float, default=DEFAULT_GRACE_SECONDS,
                   help="seconds the other workers get to finish after one died or failed")
    p.add_argument("--start-timeout", type=float, default=DEFAULT_START_TIMEOUT_SECONDS,
                   help="seconds to wait for the cluster to have room for every worker")
    return p


@dataclass(frozen=True)
class Options:
    address: Optional[str]
    num_workers: int  # elastic: the workers to start with (--min-workers)
    cpus_per_worker: int
    gpus_per_worker: int
    fetch_to: Optional[str]
    grace: float
    start_timeout: float
    train_argv: List[str]
    max_workers: Optional[int] = None  # set: elastic
    network_interface: Optional[str] = None

    @property
    def elastic(self) -> bool:
        return self.max_workers is not None


def parse(argv: Sequence[str]) -> Options:
    """The driver's options and the hvd-train options after --; exits 2 with one message when either is bad."""
    argv = list(argv)
    own, train_argv = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = parser()
    args = p.parse_args(own)
    elastic = args.min_workers is not None or args.max_workers is not None
    if elastic == (args.num_workers is not None):
        p.error("give --num-workers N, or --min-workers A [--max-workers B] for an elastic job")
    if elastic and args.min_workers is None:
        p.error("--max-workers needs --min-workers")
    if elastic and args.max_workers is None:
        args.max_workers = args.min_workers
    if not elastic and args.network_interface:
        p.error("--network-interface is for elastic jobs (--min-workers)")
    for name in ("num_workers", "min_workers", "cpus_per_worker"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    if elastic and args.max_workers < args.min_workers:
        p.error(f"need --min-workers <= --max-workers (got {args.min_workers} > {args.max_workers})")
    if args.gpus_per_worker < 0:
        p.error(f"--gpus-per-worker must be >= 0 (got {args.gpus_per_worker})")
    for name in ("grace", "start_timeout"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(args, name)})")
    if args.address and not args.address.startswith("ray://") and args.address != "auto" \
            and not HOST_PORT.fullmatch(args.address):
        p.error(f"--address {args.address!r}: want HOST:PORT (what ray start --head prints), auto or ray://...")
    if args.fetch_to and os.path.exists(args.fetch_to) and (not os.path.isdir(args.fetch_to)
                                                           or os.listdir(args.fetch_to)):
        p.error(f"--fetch-to {args.fetch_to} exists and is not an empty directory")
    try:
        # The same parsing every worker does: a bad option fails here, before Ray starts.
        _, command = cli.parse(train_argv)
    except ConfigError as err:
        runtime.fail(str(err))
    if command.get("dry_run"):
        p.error("--dry-run: run 'hvd-train plan --np N ...' instead (no workers needed)")
    return Options(args.address, args.min_workers if elastic else args.num_workers, args.cpus_per_worker,
                   args.gpus_per_worker, args.fetch_to, args.grace, args.start_timeout, train_argv,
                   args.max_workers if elastic else None, args.network_interface)


def train_worker(train_argv: List[str], cwd: str, fetch: bool) -> Outcome:
    """On every Ray worker: hvd-train's training with these options. Returns, never exits."""
    rank = runtime.launcher_rank()  # horovod.ray sets HOROVOD_RANK on each worker before this runs
    outcome = Outcome(rank=rank, host=runtime.host_name())
    if os.path.isdir(cwd):  # relative paths mean what they mean on the driver (a shared filesystem)
        os.chdir(cwd)
    try:
        config, _ = cli.parse(train_argv)
        runtime.quiet_other_ranks(config.verbose_ranks)
        from ..training.trainer import train

        result = train(config)
    except SystemExit as ex:  # cli.parse on a worker whose --config file differs from the driver's
        outcome.message, outcome.code = "error: the options were rejected on this worker", int(ex.code or 2)
        return outcome
    except Exception as err:  # noqa: BLE001 - as the command line sorts them (cli.known_failure)
        failure = cli.known_failure(err)
        if failure is None:
            raise
        outcome.message, outcome.code = failure.label + failure.message, failure.code
        return outcome
    import horovod.tensorflow as hvd

    # Horovod: the rank at the end, which an elastic reset may have changed (rank 0 fetches).
    rank = outcome.rank = hvd.rank()
    outcome.ok, outcome.code = True, 0
    outcome.output_dir = os.path.abspath(result.output_dir)
    outcome.metrics = {k: v for k, v in result.metrics.items() if k.startswith("test_") or k == "world_size"}
    if fetch and rank == 0:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            tar.add(outcome.output_dir, arcname=".")
        outcome.archive = buffer.getvalue()
    return outcome


def wait(refs: list, grace: float) -> List[Outcome]:
    """Every worker's outcome in rank order. Once one has died, raised or failed, the others get
    ``grace`` seconds; a worker still running then is reported as stopped."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    outcomes: List[Optional[Outcome]] = [None] * len(refs)
    rank_of = {ref: rank for rank, ref in enumerate(refs)}
    pending, deadline = list(refs), None
    while pending:
        _check_signals()  # a signal is acted on here, between waits of at most a second
        timeout = WAIT_SLICE_SECONDS if deadline is None else min(WAIT_SLICE_SECONDS, deadline - time.monotonic())
        done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, timeout))
        if not done:
            if deadline is not None and time.monotonic() >= deadline:
                break
            continue
        rank = rank_of[done[0]]
        try:
            outcomes[rank] = ray.get(done[0])
        except RayActorError as err:
            outcomes[rank] = Outcome(rank=rank, died=True,
                                     message=f"error: Ray worker of rank {rank} died ({_first_line(err)})")
        except RayTaskError as err:
            cause = err.cause if isinstance(err.cause, BaseException) else err
            outcomes[rank] = Outcome(rank=rank, unexpected=True, traceback=str(err), message=(
                f"error: rank {rank} raised {type(cause).__name__}: {_first_line(cause)}"))
        if deadline is None and not outcomes[rank].ok:
            deadline = time.monotonic() + grace
    for rank, outcome in enumerate(outcomes):
        if outcome is None:
            outcomes[rank] = Outcome(rank=rank, stalled=True,
                                     message=f"error: rank {rank} still running {grace:g} s after another failed")
    return outcomes


def verdict(outcomes: List[Outcome]) -> Optional[Outcome]:
    """The failure the driver reports, or None when every worker succeeded. The cause before its
    consequences: a dead worker (the others then fail in a collective), then a failure hvd-train
    reports (rank 0's first: ranks agree on those), then an unexpected error, then a worker that
    was still running when the grace ended."""
    def order(o: Outcome) -> tuple:
        kind = 0 if o.died else 3 if o.stalled else 2 if o.unexpected else 1
        return kind, o.rank
    failed = [o for o in outcomes if not o.ok]
    return min(failed, key=order) if failed else None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _fetch(archive: bytes, target: str) -> None:
    """Unpack rank 0's outputs into ``target`` whole or not at all (a temporary sibling, then a rename)."""
    partial = f"{target.rstrip(os.sep)}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
            tar.extractall(partial, filter="data")  # "data": no member may land outside ``partial``
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if os.path.isdir(target):
        os.rmdir(target)  # empty (checked before the run)
    os.replace(partial, target)


class _Signalled(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_received: List[int] = []  # signals the driver got; acted on between waits (never inside Ray's C++ calls)


def _record_signal(signum, _frame):
    _received.append(signum)


def _check_signals() -> None:
    if _received:
        raise _Signalled(_received[0])


def unreachable(address: Optional[str]) -> Optional[str]:
    """Why a HOST:PORT cluster address cannot be reached, or None. Checked before ray.init, which
    retries an address where nothing listens for minutes."""
    if not address or not HOST_PORT.fullmatch(address):
        return None  # a local instance, "auto", or Ray Client's ray://: Ray's own checks
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_SECONDS).close()
    except OSError as err:
        return f"cannot reach the Ray cluster at {address} ({err}); is 'ray start --head' running there?"
    return None


def token_auth_default(address: Optional[str], environ=os.environ) -> None:
    """Before Ray is imported: token mode for a driver joining a cluster when a token is at hand
    and RAY_AUTH_MODE is unset, as `ray start` decides on this machine.

    Ray 2.60 starts a cluster with token authentication whenever its machine has a token (and
    ray.init's own local cluster always), but a driver joining by address sends the token only in
    token mode, so the same token file that turned a head's authentication on made this driver
    fail ("Authentication token is missing"). In token mode a driver joins a cluster without
    authentication too. An explicit RAY_AUTH_MODE is left alone."""
    if not address or "RAY_AUTH_MODE" in environ:
        return
    token_file = environ.get("RAY_AUTH_TOKEN_PATH") or os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    if environ.get("RAY_AUTH_TOKEN") or os.path.isfile(token_file):
        environ["RAY_AUTH_MODE"] = "token"


def main(argv: Optional[Sequence[str]] = None) -> int:
    options = parse(sys.argv[1:] if argv is None else argv)
    problem = unreachable(options.address)
    if problem:
        runtime.fail(problem, code=1)
    token_auth_default(options.address)
    try:
        import ray
        from horovod.ray import RayExecutor
        from horovod.runner.common.util.timeout import TimeoutException
    except ImportError as err:
        runtime.fail(f"Ray is not installed in this environment ({err}); run 'make setup RAY=1'", code=1)

    write = runtime.write_line
    executor = None
    try:
        # Ray's own settings (RAY_AUTH_MODE, its token, ...) come from the environment; the object
        # store's endpoint and credentials go to every worker in the job's runtime environment.
        ray.init(address=options.address or "local", log_to_driver=True,
                 runtime_env={"env_vars": storage.environment()})
        # After ray.init, which sets handlers of its own: SIGTERM as Ctrl-C, both leave through the
        # clean-up below, which ends every worker.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _record_signal)
        resources = dict(cpus_per_worker=options.cpus_per_worker, use_gpu=options.gpus_per_worker > 0,
                         gpus_per_worker=options.gpus_per_worker or None)
        work = [options.train_argv, os.getcwd(), bool(options.fetch_to)]
        where = options.address or "a local Ray instance"
        if options.elastic:
            nics = _elastic_interfaces(ray, options.network_interface)
            if nics == {"lo"} and not options.network_interface:
                write("[hvd_train] ray: the cluster is one node: Gloo uses the loopback interface (lo)")
            executor = RayExecutor(
                RayExecutor.create_settings(timeout_s=60, nics=nics),
                min_workers=options.num_workers, max_workers=options.max_workers,
                elastic_timeout=int(options.start_timeout), **resources)
            write(f"[hvd_train] ray: elastic, {options.num_workers} to {options.max_workers} worker(s) on {where}")
        else:
            settings = RayExecutor.create_settings(timeout_s=60, placement_group_timeout_s=options.start_timeout)
            executor = RayExecutor(settings, num_workers=options.num_workers, **resources)
            write(f"[hvd_train] ray: starting {options.num_workers} worker(s) on {where}")
        with reporting(lambda: _waiting(ray, options) if options.elastic else None):
            try:
                executor.start()
            except (TimeoutError, TimeoutException):  # the cluster lacks room for every worker (elastic: min)
                write(
                    f"hvd-train: error: Ray could not place {options.num_workers} worker(s) of "
                    f"{options.cpus_per_worker} CPU(s) and {options.gpus_per_worker} GPU(s) within "
                    f"{options.start_timeout:g} s; the cluster has {_resources(ray)}", sys.stderr)
                return 1
            _check_signals()
            if options.elastic:
                outcomes = run_elastic(executor, work)
            else:
                outcomes = wait(executor.run_remote(train_worker, args=work), options.grace)
        time.sleep(LOG_FLUSH_SECONDS)
    except _Signalled as stop:
        write(f"hvd-train: stopped by {stop}; every worker was ended (--checkpoint-dir and --resume "
              "continue from the last checkpoint)", sys.stderr)
        return 128 + stop.signum
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):  # the clean-up is not interrupted
            signal.signal(signum, signal.SIG_IGN)
        if executor is not None:
            # A worker still blocked in a collective ends now, not at Gloo's timeout. (Removing the
            # placement group in shutdown() ends its actors too; this does not wait for that.)
            adapter = getattr(executor, "adapter", None)
            for worker in getattr(adapter, "workers", None) or []:
                ray.kill(worker)
            if getattr(adapter, "driver", None) is not None:  # elastic: its driver kills the workers it runs
                adapter.driver.stop()
            else:
                executor.shutdown()
        ray.shutdown()  # and every actor this job still owns ends with it
    failure = verdict(outcomes)
    if failure:
        if failure.unexpected:  # a bug: its traceback first, as a crash under horovodrun shows it
            sys.stderr.write(failure.traceback + "\n")
        write(f"hvd-train: {failure.message}", sys.stderr)
        return failure.code
    chief = outcomes[0]
    scores = ", ".join(f"{k} {v:.4f}" for k, v in chief.metrics.items() if isinstance(v, float))
    write(f"[hvd_train] ray: {len(outcomes)} worker(s) finished; {scores}")
    write(f"[hvd_train] ray: outputs in {chief.output_dir} (rank 0, host {chief.host})")
    if options.fetch_to:
        try:
            _fetch(chief.archive, options.fetch_to)
        except (OSError, tarfile.TarError) as err:
            write(f"hvd-train: error: could not copy rank 0's outputs to {options.fetch_to}: {err}", sys.stderr)
            return 1
        write(f"[hvd_train] ray: outputs copied to {os.path.abspath(options.fetch_to)}")
    return 0


def _elastic_interfaces(ray, given: Optional[str]):
    """Horovod's elastic start finds the interface Gloo uses by comparing two or more hosts, and
    waits for a second host otherwise (on a one-node cluster: until its timeout). One node talks
    to itself over the loopback."""
    if given:
        return {given}
    alive = [n for n in ray.nodes() if n.get("Alive", n.get("alive"))]
    return {"lo"} if len(alive) == 1 else None


def _waiting(ray, options: Options) -> Optional[str]:
    """What an elastic job waits for, if the alive nodes lack room for --min-workers, counted as
    Horovod's Ray discovery counts it (per node: its CPUs (and GPUs) // a worker's); else None."""
    room = 0
    for node in ray.nodes():
        if node.get("Alive", node.get("alive")):
            have = node.get("Resources", {})
            slots = have.get("CPU", 0) // options.cpus_per_worker
            if options.gpus_per_worker:
                slots = min(slots, have.get("GPU", 0) // options.gpus_per_worker)
            room += int(slots)
    if room >= options.num_workers:
        return None
    return (f"[hvd_train] ray: waiting for room: --min-workers {options.num_workers} needs {options.num_workers} "
            f"worker(s) of {options.cpus_per_worker} CPU(s) and {options.gpus_per_worker} GPU(s), the alive nodes "
            f"hold {room}; the job gives up after --start-timeout {options.start_timeout:g} s")


@contextlib.contextmanager
def reporting(waiting: Callable[[], Optional[str]]):
    """While the block runs, ``waiting()``'s line every WAIT_REPORT_SECONDS when it has one: an
    elastic job is never silent while Horovod waits for room (at the start, or after a loss)."""
    import threading

    done = threading.Event()

    def report():
        while not done.wait(WAIT_REPORT_SECONDS):
            try:
                line = waiting()
            except Exception:  # noqa: BLE001 - the cluster's state is unknown for now: say nothing
                continue
            if line:
                runtime.write_line(line)

    thread = threading.Thread(target=report, name="hvd_train-waiting", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()


def run_elastic(executor, work: list) -> List[Outcome]:
    """An elastic job to its end: the outcomes of the workers alive at the end, in rank order.
    Horovod's driver replaces lost workers and adds new ones; a job that fails (below
    --min-workers for its timeout, or every worker failing) is one outcome with Horovod's reason."""
    import threading

    done: Dict[str, Any] = {}

    def target():
        try:
            done["outcomes"] = executor.run(train_worker, args=work)
        except Exception as err:  # noqa: BLE001 - reported as the job's one message
            done["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    while thread.is_alive():
        _check_signals()  # between joins of at most a second, as in wait()
        thread.join(WAIT_SLICE_SECONDS)
    if "error" in done:
        err = done["error"]
        return [Outcome(rank=0, unexpected=True, traceback=f"{type(err).__name__}: {err}",
                        message=f"error: the elastic job failed: {_first_line(err)}")]
    return sorted(done["outcomes"], key=lambda o: o.rank)


def _resources(ray) -> str:
    free = ray.available_resources()
    return ", ".join(f"{free.get(k, 0):g} {k}" for k in ("CPU", "GPU")) + " free"
