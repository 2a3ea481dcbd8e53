"""``hvd-horovodrun``: Horovod's launcher, horovodrun, as launch/ starts it; the same arguments.

Before every launch horovodrun checks that Horovod was built with Gloo (or MPI) by importing
horovod.tensorflow, and with it TensorFlow, in a child process: 3.7 s here, before any rank
starts, and every rank then imports TensorFlow again (docs/testing.md, "Start-up"). The two
facts are in Horovod's compiled library: with TensorFlow's two C++ libraries loaded (not its
Python), Horovod's TensorFlow op library answers horovod_gloo_built() and horovod_mpi_built()
in about 0.4 s. That is asked in a child process too, so the launcher stays small, and anything
unexpected (another layout, a library missing) leaves horovodrun's own check in place.
Everything else is horovodrun's: options, controllers, elastic mode, its messages.
"""
from __future__ import annotations

import ctypes
import glob
import importlib.util
import multiprocessing
import os
import sys
from typing import Dict, List, Optional

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


def main() -> int:
    from horovod.runner import launch

    facts = built()
    if facts is not None:
        # Horovod: the answers of its build check, from its own library, for this launch.
        launch.gloo_built = lambda verbose=False: facts["gloo"]
        launch.mpi_built = lambda verbose=False: facts["mpi"]
    sys.argv[0] = "horovodrun"  # its usage and messages name itself
    return launch.run_commandline()


if __name__ == "__main__":
    sys.exit(main())
