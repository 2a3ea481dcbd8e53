"""``hvd-horovodrun``: Horovod's launcher, horovodrun, as launch/ starts it; the same arguments.

Before every launch horovodrun checks that Horovod was built with Gloo (or MPI) by importing
horovod.tensorflow, and with it TensorFlow, in a child process: 3.7 s here, before any rank
starts, and every rank then imports TensorFlow again (docs/testing.md, "Start-up"). The two
facts are in Horovod's compiled library: with TensorFlow's two C++ libraries loaded (not its
Python), Horovod's TensorFlow op library answers horovod_gloo_built() and horovod_mpi_built()
in about 0.4 s. That is asked in a child process too, so the launcher stays small, and anything
unexpected (another layout, a library missing) leaves horovodrun's own check in place.
Everything else is horovodrun's: options, controllers, elastic mode, its messages, with one
exception: how a job ends when its processes agreed to fail. hvd-train's ranks exit 2 after a
bad input (rank 0 printed the one message) and 128 + N after a stop by SIGTERM or SIGINT (rank
0 said so); horovodrun then narrates each exit and raises its RuntimeError with a traceback. Here
that narration and the traceback are left out and the job exits with the processes' status
(``Ending``); any other exit keeps horovodrun's lines, and one line replaces its traceback.
"""
from __future__ import annotations

import ctypes
import glob
import importlib.util
import multiprocessing
import os
import re
import signal
import sys
import threading
from typing import Dict, List, Optional, Set

TENSORFLOW_LIBRARIES = ("libtensorflow_framework.so.2", "libtensorflow_cc.so.2")


def _ask_library(answer) -> None:
    """In the child: load the libraries, send {"gloo": ..., "mpi": ...} or None."""
    quiet = os.open(os.devnull, os.O_WRONLY)
    os.dup2(quiet, 1)  # TensorFlow's libraries log as they load (oneDNN, CPU features): not here
    os.dup2(quiet, 2)
    try:
        tensorflow = os.path.dirname(importlib.util.find_spec("tensorflow").origin)
        for name in TENSORFLOW_LIBRARIES:
            ctypes.CDLL(os.path.join(tensorflow, name), mode=ctypes.RTLD_GLOBAL)
        horovod = os.path.dirname(importlib.util.find_spec("horovod").origin)
        (path,) = glob.glob(os.path.join(horovod, "tensorflow", "mpi_lib*.so"))
        library = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        answer.send({"gloo": bool(library.horovod_gloo_built()), "mpi": bool(library.horovod_mpi_built())})
    except Exception:  # noqa: BLE001 - any surprise: horovodrun asks in its own way
        answer.send(None)


def built() -> Optional[Dict[str, bool]]:
    """Whether Horovod's TensorFlow library was built with Gloo and with MPI; None if unknown."""
    receive, send = multiprocessing.Pipe(duplex=False)
    child = multiprocessing.get_context("fork").Process(target=_ask_library, args=(send,), daemon=True)
    child.start()
    send.close()
    try:
        return receive.recv() if receive.poll(60) else None
    except EOFError:  # the child died before answering
        return None
    finally:
        child.join(5)


def local_command(np_: int, controller: str = "gloo") -> List[str]:
    """hvd-horovodrun (the one beside this Python) starting ``np_`` processes on this machine over
    ``controller`` ("gloo" or "mpi"); the program to run follows."""
    launcher = os.path.join(os.path.dirname(sys.executable), "hvd-horovodrun")
    return [launcher, "-np", str(np_), "-H", f"localhost:{np_}", f"--{controller}"]


def said_why(code: int) -> bool:
    """Whether a rank's exit status means hvd-train's rank 0 already said why (see module doc):
    2, or a stop by one of the signals training stops on (a SIGKILL, 137, is not one)."""
    return code == 2 or code - 128 in (signal.SIGTERM, signal.SIGINT)


# What Horovod's driver prints as workers exit (gloo_run, elastic registration), and the error
# horovodrun raises after a worker's non-zero exit (static and elastic runs alike).
_EXITED = re.compile(r"Process (\S+) exit with status code (-?\d+)\.")
_TERMINATING = re.compile(r"Terminating remaining workers after failure of Process (\S+)\.")
_FAILURE_COUNT = re.compile(r"(ERROR:root:)?failure count == \d+ -> stop running")
_TERMINATED = re.compile(r"\[\d+\]<stderr>:(Terminated|Killed)")  # a worker's shell, as Horovod stops the rest
_JOB_FAILED = re.compile(r"exited with non-zero status.*Process name: (?P<name>.*)\nExit code: (?P<code>-?\d+)", re.S)


class Ending:
    """A text stream for the launcher's own stdout/stderr: workers' lines pass through whole
    (a line at a time, per thread); the driver's narration of exits that said_why() covers is
    left out, and so is the "Terminated" of the workers Horovod then stops. Horovod writes a
    worker's forwarded line at once, and print() a line then "\n": each thread's partial line
    waits for its end."""

    def __init__(self, stream, statuses: Dict[str, int], stopped_for: Set[str]):
        # Shared by stdout's and stderr's Ending: each process's exit status, and the processes
        # whose failure made Horovod stop the others.
        self.stream, self.statuses, self.stopped_for = stream, statuses, stopped_for
        self._lock, self._local = threading.Lock(), threading.local()

    def write(self, text: str) -> int:
        *lines, self._local.pending = (getattr(self._local, "pending", "") + text).split("\n")
        kept = [line for line in lines if not self._narration(line)]
        if kept:
            with self._lock:
                self.stream.write("\n".join(kept) + "\n")
        return len(text)

    def _narration(self, line: str) -> bool:
        exited = _EXITED.fullmatch(line)
        if exited:
            # After Horovod began stopping the rest for a process that said why, each exit is a
            # consequence (a rank still tearing down is killed after Horovod's grace: 137).
            stopping = any(said_why(code) for name, code in self.statuses.items() if name in self.stopped_for)
            self.statuses[exited.group(1)] = int(exited.group(2))
            return stopping or said_why(int(exited.group(2)))
        terminating = _TERMINATING.fullmatch(line)
        if terminating:
            self.stopped_for.add(terminating.group(1))
            return said_why(self.statuses.get(terminating.group(1), 0))
        if _TERMINATED.fullmatch(line):  # stopped by Horovod after a process that said why
            return any(map(said_why, self.statuses.values()))
        return bool(_FAILURE_COUNT.fullmatch(line)) and all(map(said_why, self.statuses.values()))

    def flush(self) -> None:
        pending = getattr(self._local, "pending", "")
        if pending:
            self._local.pending = ""
            with self._lock:
                self.stream.write(pending)
        self.stream.flush()

    def __getattr__(self, name):  # fileno, isatty, encoding, ...
        return getattr(self.stream, name)


# Variables whose values are secrets: horovodrun (Gloo) writes every variable it forwards on each
# rank's `sh -c env NAME=value ...` command line, which `ps` shows for the job's life. A rank on
# this machine inherits them from horovodrun's own environment instead; a rank on another host
# (ssh) still gets them on its command line (docs/storage.md: prefer roles or profiles there).
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def _keep_secrets_off_local_command_lines() -> None:
    from horovod.runner import gloo_run
    from horovod.runner.util import network

    make = gloo_run._slot_info_to_command_fn
    if getattr(make, "hvd_train", False):
        return

    def slot_commands(run_command, env):
        everywhere = make(run_command, env)
        here = make(run_command, {k: v for k, v in env.items() if k not in SECRET_ENV})
        local = set(network.get_local_host_addresses())

        def command(slot_info):
            try:
                on_this_machine = network.resolve_host_address(slot_info.hostname) in local
            except Exception:  # noqa: BLE001 - unresolvable: as horovodrun itself treats it, remote
                on_this_machine = False
            return (here if on_this_machine else everywhere)(slot_info)

        return command

    slot_commands.hvd_train = True
    gloo_run._slot_info_to_command_fn = slot_commands


def main() -> int:
    from horovod.runner import launch

    # Horovod: a secret in the environment stays off local ranks' command lines (see SECRET_ENV).
    _keep_secrets_off_local_command_lines()
    facts = built()
    if facts is not None:
        # Horovod: the answers of its build check, from its own library, for this launch.
        launch.gloo_built = lambda verbose=False: facts["gloo"]
        launch.mpi_built = lambda verbose=False: facts["mpi"]
    sys.argv[0] = "horovodrun"  # its usage and messages name itself
    statuses: Dict[str, int] = {}
    stopped_for: Set[str] = set()
    sys.stdout, sys.stderr = Ending(sys.stdout, statuses, stopped_for), Ending(sys.stderr, statuses, stopped_for)
    try:
        return launch.run_commandline()
    except RuntimeError as err:
        failed = _JOB_FAILED.search(str(err))
        if not failed:
            raise
        code = int(failed.group("code"))
        if not said_why(code):
            print(f"horovodrun: the job failed: process {failed.group('name')} exited with status {code}",
                  file=sys.stderr)
        return code if 0 < code < 256 else 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
