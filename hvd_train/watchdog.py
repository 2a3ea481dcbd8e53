"""A rank that stops answering ends the job with one message naming it (``--stall-timeout``).

Horovod's collectives wait for every rank. Under MPI they wait for ever: a rank stopped (SIGSTOP,
a swapped-out or frozen host, a network partition) leaves the others blocked with nothing
printed. Under Gloo they fail after Gloo's timeout, with a traceback on a healthy rank and a
launcher line naming it. Horovod's stall inspector cannot help there: it runs in rank 0's
background loop, which is blocked in the same transport. So each rank runs a watchdog thread
on a side channel of its own (UDP, independent of MPI and Gloo), started by one collective at
set-up (``start``):

- every rank sends rank 0 a heartbeat about once a second: its phase, which the main thread
  marks as it goes (``mark``, ``waiting``: a training step, the stop check, evaluation, the
  consensus check, a checkpoint's agreement, ...) and whether that phase waits for the others
  (a collective) or works (computes, reads, writes);
- rank 0 answers each one and judges: a rank not heard from for the limit is *silent* (its
  process is not running: stopped, frozen, cut off); a rank still heard from that stays in a
  working phase for the limit while another waits in a collective for the limit is *stuck* (a
  deadlock in user code, a read from a hung mount); ranks that all wait, in different
  collectives, for the limit are in a *mismatch* (a bug). A long step is none of these: every
  rank is in it, working, and nobody waits (the limit counts from the last change of phase).
- the verdict goes back in rank 0's answers; every rank that hears it ends: rank 0 prints the
  one message and records it in the event log, all exit 2 (launchers then stop the silent
  rank). A rank that hears nothing from rank 0 for the limit decides rank 0 is silent and
  prints that itself.

Inside a compiled training step Python marks nothing: a rank alive but stuck in its step (its
input pipeline waiting on a hung read) looks like a long step here. Horovod's stall inspector
sees that case (it runs, rank 0's loop is not blocked): its warning at the limit is turned on
(HOROVOD_STALL_CHECK_TIME_SECONDS), and its shutdown one limit later, which fails the step on
every rank (``horovod_env``).

Under an elastic launch a silent rank is a lost worker: rank 0 kills it when it runs on this
host, so Horovod's elastic driver replaces it as it does a dead one; elsewhere Gloo's timeout
makes the survivors reset. The watchdog starts again with each new world.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import sys
import threading
import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple

DEFAULT_LIMIT = 60.0
EXIT_CODE = 2  # hvd-train explained the failure (launchers pass it on as such)

# What the main thread is doing: (count of marks, phase, waits for the others, since when).
_mark: Tuple[int, str, bool, float] = (0, "set-up", False, time.monotonic())
_dog: Optional["Watchdog"] = None
_last: Optional["Watchdog"] = None  # the one stopped last (what it heard, for a failure's message)
_on_verdict: List[Callable[[str], None]] = []


# The longest training step this rank has finished, and whether it is in one now (``step``).
_steps = {"longest": 0.0, "in_step": False}
SLOW_STEP_FACTOR = 10  # a step this many times the longest so far (and over the limit) is stuck


def mark(phase: str, waiting: bool = False, step: bool = False) -> None:
    """The main thread's phase from now on (cheap: one tuple; no-op cost without a watchdog).
    ``step``: the phase is a compiled training step (its length is recorded when it ends)."""
    global _mark
    now = time.monotonic()
    if _steps["in_step"]:
        _steps["longest"] = max(_steps["longest"], now - _mark[3])
    _steps["in_step"] = step
    _mark = (_mark[0] + 1, phase, waiting, now)


def progress(phase: str) -> None:
    """Local work that moves on (a unit of this rank's share read): the phase and its clock, not
    the count of marks, since ranks do different amounts of it (every rank must pass the same
    marks for a rank behind the others to be told from one ahead)."""
    global _mark
    _mark = (_mark[0], phase, False, time.monotonic())


def phase() -> str:
    return _mark[1]


@contextlib.contextmanager
def waiting(what: str) -> Iterator[None]:
    """Around a collective: this rank waits for the others in ``what``; then back to the phase before."""
    before = _mark
    mark(what, True)
    try:
        yield
    finally:
        mark(before[1], before[2])


def on_verdict(action: Callable[[str], None]) -> None:
    """Run ``action(message)`` on rank 0 before the job ends on a verdict (the event log's record)."""
    _on_verdict[:] = [action]


def horovod_env(limit: float, elastic: bool) -> Dict[str, str]:
    """Horovod's stall inspector at the same limit: a warning, then a shutdown one limit later.
    Gloo's own timeout (Horovod's default 30 s), unless the user set it: past the limit in a
    fixed world, so the watchdog, which names the rank, speaks first; an elastic world keeps it
    (it is how the survivors notice a lost worker, and launch/elastic.sh sets it)."""
    if not limit:
        return {}
    env = {"HOROVOD_STALL_CHECK_TIME_SECONDS": str(max(1, int(limit))),
           "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": str(max(2, int(2 * limit)))}
    if not elastic and "HOROVOD_GLOO_TIMEOUT_SECONDS" not in os.environ:
        env["HOROVOD_GLOO_TIMEOUT_SECONDS"] = str(int(limit) + 30)
    return env


def _addresses() -> List[str]:
    """This host's IPv4 addresses, loopback last."""
    found: List[str] = []
    try:
        import psutil  # Horovod's dependency

        for addrs in psutil.net_if_addrs().values():
            found += [a.address for a in addrs if a.family == socket.AF_INET]
    except Exception:  # noqa: BLE001 - then the host name's
        with contextlib.suppress(OSError):
            found.append(socket.gethostbyname(socket.gethostname()))
    found = list(dict.fromkeys(found))
    return sorted(found, key=lambda a: a.startswith("127.")) or ["127.0.0.1"]


def _write_line(text: str, stream=None) -> None:
    """One write per line (as runtime.write_line; this module imports nothing of the package)."""
    stream = stream or sys.stdout
    stream.write(text + "\n")
    stream.flush()


def _hush() -> None:
    """After the one message: what Horovod's threads print as the ranks leave (a peer's
    connection reset) is a consequence, not news; stderr goes to /dev/null."""
    with contextlib.suppress(Exception):
        sys.stderr.flush()
        quiet = os.open(os.devnull, os.O_WRONLY)
        os.dup2(quiet, 2)


def _machine() -> str:
    """This machine, whatever name a launcher gave it (ranks on 127.0.0.1 and 127.0.0.2 share it)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


class Watchdog:
    def __init__(self, rank: int, size: int, limit: float, peers: List[dict], sock: Optional[socket.socket],
                 elastic: bool, token: str):
        self.rank, self.size, self.limit, self.elastic, self.token = rank, size, limit, elastic, token
        self.peers = peers  # every rank's {"host", "pid"}; rank 0's also "port", "addresses"
        self.beat = min(1.0, limit / 5)
        self.sock = sock or socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(self.beat)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve if rank == 0 else self._report,
                                       name="hvd_train-watchdog", daemon=True)
        self.killed: set = set()
        self.base = _mark[0]  # marks before this world's start do not count (elastic: newcomers)
        self.doomed: List[int] = []  # silent ranks' processes on this machine, killed as the job ends
        self.where: Dict[int, tuple] = {}  # rank 0: each rank's address, as its heartbeats come
        now = time.monotonic()  # rank 0: each rank's last heartbeat, and when it came
        self.heard: Dict[int, Tuple[float, dict]] = {r: (now, {"phase": "set-up", "waiting": False, "for": 0.0})
                                                     for r in range(1, size)}

    # --- rank 0 -------------------------------------------------------------------------------

    def _serve(self) -> None:
        heard, where = self.heard, self.where
        gone: set = set()
        verdict = None
        while not self.stopped.is_set():
            # Every heartbeat that arrived (after a pause of this thread too), then the judgment:
            # one up to a beat's wait, then whatever else is queued.
            wait = self.beat
            while True:
                try:
                    self.sock.settimeout(wait)
                    data, addr = self.sock.recvfrom(65536)
                    beat = json.loads(data)
                except (socket.timeout, BlockingIOError):
                    break
                except ValueError:  # not ours
                    continue
                except OSError:  # closed (stop)
                    break
                wait = 0
                if beat.get("token") == self.token and 0 < beat.get("rank", -1) < self.size:
                    r = beat["rank"]
                    heard[r], where[r] = (time.monotonic(), beat), addr
                    if beat.get("bye"):
                        gone.add(r)
                    self._send({"token": self.token, "verdict": verdict}, addr)
            if self.stopped.is_set():
                return
            verdict = verdict or self._judge(heard, gone)
            if verdict:
                self._say(verdict)  # first: the other ranks exit when they hear it
                _hush()
                for _ in range(3):  # datagrams may be lost: say it a few times
                    for addr in where.values():
                        self._send({"token": self.token, "verdict": verdict}, addr)
                self._end()

    def _judge(self, heard: Dict[int, Tuple[float, dict]], gone: set) -> Optional[str]:
        now = time.monotonic()
        count, own_phase, own_waiting, own_since = _mark
        # Each rank's (phase, waits, seconds in it, marks since start): every rank passes the same
        # marks in the same order (the same callbacks, steps and collectives), so a rank with
        # fewer is behind the others.
        states = {0: (own_phase, own_waiting, now - own_since, count - self.base)}
        silent = []
        for r, (at, beat) in heard.items():
            if r in gone:
                continue
            if now - at > self.limit:
                silent.append((r, now - at))
            states[r] = (beat.get("phase", "?"), bool(beat.get("waiting")), float(beat.get("for", 0.0)) + now - at,
                         int(beat.get("count", -1)))
        others = {r: s for r, s in states.items() if r not in dict(silent) and r not in gone}
        still = {r: s for r, s in others.items() if s[2] > self.limit}  # no new mark for the limit
        if silent:
            if self.elastic and self._drop(silent):
                return None
            self._doom(r for r, _ in silent)
            names = ", ".join(f"rank {r} ({self._where(r)})" for r, _ in silent)
            return (f"{names} stopped answering: nothing heard from {'it' if len(silent) == 1 else 'them'} for "
                    f"{min(s for _, s in silent):.0f} s{self._waits(others)} (--stall-timeout {self.limit:g})")
        ahead = max((s[3] for s in still.values()), default=-1)
        stuck = {r: s for r, s in still.items() if 0 <= s[3] < ahead}
        if stuck:  # alive, but behind ranks that wait for it, and nothing new from either for the limit
            waiting = {r: s for r, s in still.items() if r not in stuck}
            self._doom(r for r in stuck if r != 0)
            names = "; ".join(f"rank {r} ({self._where(r)}) in {s[0]} for {s[2]:.0f} s" for r, s in stuck.items())
            return (f"{names}: no progress{self._waits(waiting)} (--stall-timeout {self.limit:g}; raise it if that "
                    "phase may take longer)")
        if len(still) == len(others) and all(s[1] for s in still.values()) and \
                len({s[0] for s in still.values()}) > 1:
            names = "; ".join(f"rank {r} in {s[0]}" for r, s in still.items())
            return (f"the ranks wait for each other in different collectives for more than {self.limit:g} s: "
                    f"{names} (a bug: every rank must reach the same collectives in the same order)")
        # Every rank in the same compiled step for the limit and for many times the longest step so
        # far: one is stuck inside it (its input pipeline on a hung read, an op that never returns),
        # which Python cannot see; Horovod's stall inspector names it under MPI (not under Gloo).
        longest, first = _steps["longest"], next(iter(others.values()))
        if _steps["in_step"] and longest > 0 and len(still) == len(others) and \
                all(s[0] == first[0] and s[3] == first[3] and not s[1] for s in still.values()) and \
                min(s[2] for s in still.values()) > SLOW_STEP_FACTOR * longest:
            return (f"no rank finished {first[0]} for {min(s[2] for s in still.values()):.0f} s, where every step so "
                    f"far took at most {longest:.2g} s; every rank still answers, so one is stuck inside the step "
                    f"(its input pipeline on a hung read, an op that never returns) (--stall-timeout "
                    f"{self.limit:g}; raise it if a step may take that long)")
        return None

    def _doom(self, ranks) -> None:
        """These ranks' processes, when on this machine, are killed as the job ends (_end)."""
        self.doomed = [int(self.peers[r]["pid"]) for r in ranks if self.peers[r].get("machine") == _machine()]

    def _waits(self, states: Dict[int, tuple]) -> str:
        """What the other ranks were in: ' while rank 0 was in X; ranks 2,3 in Y'."""
        if not states:
            return ""
        by_phase: Dict[str, List[int]] = {}
        for r, s in sorted(states.items()):
            by_phase.setdefault(s[0], []).append(r)
        parts = [f"rank{'s' if len(rs) > 1 else ''} {','.join(map(str, rs))} {'were' if len(rs) > 1 else 'was'} "
                 f"in {ph}" for ph, rs in by_phase.items()]
        return " while " + "; ".join(parts)

    def _where(self, r: int) -> str:
        peer = self.peers[r] if r < len(self.peers) else {}
        return f"host {peer.get('host', '?')}, pid {peer.get('pid', '?')}"

    def _drop(self, silent: List[Tuple[int, float]]) -> bool:
        """Elastic: kill the silent ranks on this machine, True if every one was; Horovod then
        replaces them as lost workers. Silent ranks elsewhere are left to Gloo's timeout, which
        resets the survivors."""
        dropped = True
        for r, _ in silent:
            peer = self.peers[r]
            if peer.get("machine") != _machine():
                dropped = False
                continue
            if r not in self.killed:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(int(peer["pid"]), signal.SIGKILL)
                self.killed.add(r)
                _write_line(f"[hvd_train] rank {r} ({self._where(r)}) stopped answering for {self.limit:g} s: "
                            "killed, so the elastic job goes on without it")
        return dropped

    # --- other ranks --------------------------------------------------------------------------

    def _report(self) -> None:
        zero = self.peers[0]
        here = zero.get("machine") == _machine()
        targets = [("127.0.0.1", zero["port"])] if here else [(a, zero["port"]) for a in zero["addresses"]]
        answered = time.monotonic()
        while not self.stopped.is_set():
            count, ph, wait, since = _mark
            beat = {"token": self.token, "rank": self.rank, "phase": ph, "waiting": wait,
                    "for": time.monotonic() - since, "count": count - self.base}
            for target in targets:
                self._send(beat, target)
            deadline = time.monotonic() + self.beat
            while time.monotonic() < deadline and not self.stopped.is_set():
                try:
                    data, addr = self.sock.recvfrom(65536)
                    reply = json.loads(data)
                except (socket.timeout, ValueError, OSError):
                    continue
                if reply.get("token") != self.token:
                    continue
                answered, targets = time.monotonic(), [addr]
                if reply.get("bye"):  # rank 0 is done with collectives: nothing left to wait for
                    return
                if reply.get("verdict"):
                    self._end()
            if self.stopped.is_set():
                return
            if time.monotonic() - answered > self.limit:
                if self.elastic:  # rank 0 dropped like a lost worker (when on this machine); Gloo's
                    self._drop([(0, time.monotonic() - answered)])  # timeout then resets this world
                    answered = time.monotonic()
                    continue
                if zero.get("machine") == _machine():
                    self.doomed = [int(zero["pid"])]
                self._say(f"rank 0 ({self._where(0)}) stopped answering: nothing heard from it for "
                          f"{time.monotonic() - answered:.0f} s while this rank ({self.rank}) was in "
                          f"{_mark[1]} (--stall-timeout {self.limit:g})")
                self._end()

    # --- both -----------------------------------------------------------------------------------

    def _send(self, message: dict, addr) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendto(json.dumps(message).encode(), addr)

    def _say(self, message: str) -> None:
        """The job's one message (rank 0, or the rank that found rank 0 silent), and on rank 0 the
        event log's ``run_failed``."""
        _write_line(f"hvd-train: error: {message}", sys.stderr)
        for action in _on_verdict if self.rank == 0 else ():
            with contextlib.suppress(Exception):
                action(message)

    def _end(self) -> None:
        """The job ends here, on every rank that can still act: exit without waiting for the
        blocked main thread (its collective never returns)."""
        _hush()
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        if self.doomed and os.environ.get("HOROVOD_CONTROLLER") == "gloo" and "ray" not in sys.modules:
            # horovodrun (Gloo): this exit first, status 2, which hvd-horovodrun reports as said
            # (the message above); the stopped process, which ignores the launcher's SIGTERM and
            # would outlive the job, is killed a moment later by a helper of its own.
            import subprocess

            with contextlib.suppress(OSError):
                subprocess.Popen(["/bin/sh", "-c", f"sleep 1; kill -KILL {' '.join(map(str, self.doomed))}"],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True)
        elif self.doomed:
            # MPI, Slurm, Ray: the stopped process is killed first, so the launcher's own summary
            # names it ("mpirun noticed that process rank 1 ... exited on signal 9", "Ray worker
            # of rank 1 died"), not this rank.
            for pid in self.doomed:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        os._exit(EXIT_CODE)

    def stop(self) -> None:
        if self.rank == 0:
            for addr in list(self.where.values()):
                self._send({"token": self.token, "verdict": None, "bye": True}, addr)
        else:  # rank 0 may still work alone (its outputs): not silent, gone
            beat = {"token": self.token, "rank": self.rank, "bye": True, "phase": "done", "waiting": False, "for": 0}
            zero = self.peers[0]
            here = zero.get("machine") == _machine()
            for a in (["127.0.0.1"] if here else zero["addresses"]):
                self._send(beat, (a, zero["port"]))
        self.stopped.set()
        self.thread.join(2 * self.beat + 1)
        self.sock.close()


def start(rank: int, size: int, limit: float, host: str, elastic: bool = False) -> None:
    """Collective (one allgather): the watchdog of this world. Nothing when ``limit`` is 0 or alone."""
    global _dog
    stop()
    if size < 2 or not limit:
        return
    import horovod.tensorflow as hvd

    sock, mine = None, {"host": host, "pid": os.getpid(), "machine": _machine()}
    if rank == 0:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("0.0.0.0", 0))
        mine.update(port=sock.getsockname()[1], addresses=_addresses(), token=secrets.token_hex(8))
    # Horovod: every rank reaches this allgather (rank 0's address and port, every rank's host and pid).
    with waiting("the watchdog's start"):
        peers = hvd.allgather_object(mine, name="gather.watchdog")
    _dog = Watchdog(rank, size, limit, peers, sock, elastic, peers[0]["token"])
    _dog.thread.start()


def last_heard() -> str:
    """Rank 0: what the other ranks said last (for a collective's failure): 'rank 1 in X, 12 s
    ago'; '' elsewhere or without a watchdog."""
    dog = _dog or _last
    if dog is None or dog.rank != 0:
        return ""
    now = time.monotonic()
    return "; ".join(f"rank {r} ({dog._where(r)}) in {beat.get('phase', '?')}, {now - at:.0f} s ago"
                     for r, (at, beat) in sorted(dog.heard.items()))


def stop() -> None:
    """This rank leaves the watchdog (its part of the run is over, or the world changes)."""
    global _dog, _last
    dog, _dog = _dog, None
    if dog is not None:
        dog.stop()
        _last = dog
    _on_verdict.clear()
