"""Streamed training input read off the training process: a reader process per rank.

A file dataset's batches (stream.TrainStream.epochs: parsing, the split's selection, scaling,
the shuffle windows) are made by a process of this rank's own, started with ``spawn`` (it
imports numpy and pyarrow, never TensorFlow or Horovod), and handed over through shared memory:
``slots`` slots of CHUNK_STEPS batches each, filled by the reader and copied out by the training
process, then given back. In a thread of the training process the same reading held the GIL and a core
the step needed (bench: an in-memory epoch 28% slower beside a thread reading); in a process it
runs on whatever core is free, and the training process only copies each chunk out.

Messages go through two pipes, a few bytes each, no pickling and no feeder thread (a
multiprocessing.Queue's cost the training process would pay per batch): the reader sends
(BATCH, slot, batches, rows) for a filled slot, (END, 0, 0, length) and the text of a DataError
(length -1: none) when the stream ended, or (RAISE, 0, 0, length) and a pickled exception for
anything else;
the training process sends back each slot it has copied out. Closing its end of that pipe stops
the reader at its next wait (it is killed if it is inside a window's read), and so does the
training process's death (the pipe closes; and Linux's parent-death signal). The reader ignores
SIGINT and SIGTERM: stopping is the training process's decision.
"""
from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import struct
from typing import Any, Dict, Iterator, List, Tuple

import numpy as np

# What every reader of this process used, appended as it closes: {"cpu_s", "peak_rss_mb"} (the
# bench's data section reads it; a reader's peak is its own, from /proc, since exec).
USAGE: List[Dict[str, float]] = []

STOP_SECONDS = 0.2  # a reader asked to stop gets this long to see it before it is killed
CHUNK_STEPS = 16  # batches per slot: one message and one Python hand-over per 16 steps
BATCH, END, RAISE = 0, 1, 2
_HEADER = struct.Struct("<iiii")  # kind, slot, batches, rows (or a payload's length)
_SLOT = struct.Struct("<i")


class _Slots:
    """``count`` slots in one shared block, each up to ``steps`` batches of up to ``rows`` rows:
    (samples of ``shape`` in ``dtype``, labels, loss weights) of all its batches' rows end to end,
    and each batch's row count."""

    def __init__(self, block, count: int, steps: int, rows: int, shape: Tuple[int, ...], dtype: str, label_dtype):
        self.label_dtype, self.dtype = np.dtype(label_dtype), np.dtype(dtype)
        sizes = self._parts(steps, rows, shape, dtype, label_dtype)
        self.slot_bytes = sum(sizes)
        self.block, self.steps, self.rows, self.shape = block, steps, steps * rows, tuple(shape)
        self.offsets = np.cumsum((0,) + sizes[:-1])

    @staticmethod
    def _parts(steps: int, rows: int, shape: Tuple[int, ...], dtype: str, label_dtype) -> Tuple[int, int, int, int]:
        """A slot's bytes: samples, labels, loss weights (``steps`` x ``rows`` rows), row counts."""
        most = steps * rows
        sample = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return most * sample, most * np.dtype(label_dtype).itemsize, most * 4, steps * 8

    @staticmethod
    def bytes_for(count: int, steps: int, rows: int, shape: Tuple[int, ...], dtype: str, label_dtype) -> int:
        return count * sum(_Slots._parts(steps, rows, shape, dtype, label_dtype))

    def views(self, slot: int, rows: int, steps: int) -> Tuple[np.ndarray, ...]:
        base, buf = slot * self.slot_bytes, self.block.buf
        return (np.ndarray((rows, *self.shape), self.dtype, buf, base + self.offsets[0]),
                np.ndarray((rows,), self.label_dtype, buf, base + self.offsets[1]),
                np.ndarray((rows,), np.float32, buf, base + self.offsets[2]),
                np.ndarray((steps,), np.int64, buf, base + self.offsets[3]))


def _slot_rows_per_batch(stream) -> int:
    """A slot's rows per batch, on average: b + 1 (a rank's slice of a step is b rows, or b + 1
    when the tail was folded in; a window shared by units gives a few rows more or fewer). A
    slot takes batches until the next would overflow it, and holds any single step whole: a
    step has fewer than N * (b + 1) rows."""
    return (stream.batch_size + 1) * max(1, -(-stream.size // CHUNK_STEPS))


def slot_bytes(stream) -> int:
    """The bytes of one slot (CHUNK_STEPS batches) for a stream's batches."""
    splits = stream.splits
    return _Slots.bytes_for(1, CHUNK_STEPS, _slot_rows_per_batch(stream), splits.input_shape, splits.sample_dtype.str,
                            splits.label_dtype)


def _die_with_parent() -> None:
    """Linux: SIGKILL to this process when the process that started it dies (even by SIGKILL)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # elsewhere: the free pipe's end of file when the training process is gone


def _serve(stream, start: int, position: int, name: str, layout: Tuple[Any, ...], free,
           filled) -> None:
    """The reader process: the stream's batches into free slots, until its end or a stop."""
    _die_with_parent()
    # A Ctrl-C, or a SIGTERM sent to the whole process group (Slurm's scancel, a terminal's
    # hang-up), is the training process's to handle: it stops after an agreed batch and then
    # closes this reader. The reader must not die first and leave it without batches.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    from multiprocessing import shared_memory

    block = shared_memory.SharedMemory(name=name)
    slots = _Slots(block, *layout)
    pending: List[Tuple[np.ndarray, ...]] = []

    def hand_over() -> None:
        """The pending batches into the next free slot (EOFError: the training process stopped
        the reader, or is gone)."""
        if not pending:
            return
        (slot,) = _SLOT.unpack(free.recv_bytes())
        rows = sum(len(w) for _, _, w in pending)
        sx, sy, sw, sn = slots.views(slot, rows, len(pending))
        at = 0
        for k, (x, y, w) in enumerate(pending):
            n = len(w)
            sx[at:at + n], sy[at:at + n], sw[at:at + n], sn[k] = x, y, w, n
            at += n
        del sx, sy, sw, sn
        filled.send_bytes(_HEADER.pack(BATCH, slot, len(pending), rows))
        pending.clear()

    # Before the stream blocks to read a window, what it made so far goes: the training process
    # is not kept waiting for a slot's last batches while a whole window is read.
    stream.before_read = hand_over
    try:
        for batch in stream.epochs(start, position):
            if sum(len(w) for _, _, w in pending) + len(batch[2]) > slots.rows:
                hand_over()  # the slot's rows are full before its batches
            if len(batch[2]) > slots.rows:
                raise RuntimeError(f"a batch of {len(batch[2])} rows does not fit a reader slot")
            pending.append(batch)
            if len(pending) == slots.steps:
                hand_over()
        hand_over()  # the stream ended early (a DataError): its last batches
        text = None if stream.error is None else stream.error.encode()
        filled.send_bytes(_HEADER.pack(END, 0, 0, -1 if text is None else len(text)))
        if text is not None:
            filled.send_bytes(text)
    except (BrokenPipeError, EOFError):
        return  # the training process is gone
    except BaseException as err:  # handed to the training process
        try:
            payload = pickle.dumps(err)
        except Exception:  # noqa: BLE001 - not picklable: its text then
            payload = pickle.dumps(RuntimeError(f"{type(err).__name__}: {err}"))
        try:
            filled.send_bytes(_HEADER.pack(RAISE, 0, 0, len(payload)))
            filled.send_bytes(payload)
        except OSError:
            pass
    finally:
        block.close()


class Reader:
    """One reader process of a stream, from ``start`` (after ``position`` samples of it): iterate
    for chunks (x, y, w, rows per batch) of up to CHUNK_STEPS batches end to end, the batches
    stream.epochs gives (stream.TrainStream.dataset splits them again, inside TensorFlow). What
    it used goes to USAGE when it closes."""

    def __init__(self, stream, start: int, position: int, slots: int):
        from multiprocessing import shared_memory

        ctx = multiprocessing.get_context("spawn")  # not fork: TensorFlow's threads and locks stay here
        self.stream = stream
        rows = _slot_rows_per_batch(stream)
        splits = stream.splits
        self.layout = (slots, CHUNK_STEPS, rows, tuple(splits.input_shape), splits.sample_dtype.str,
                       np.dtype(splits.label_dtype).str)
        self.block = shared_memory.SharedMemory(create=True, size=max(1, _Slots.bytes_for(*self.layout)))
        self.slots = _Slots(self.block, *self.layout)
        free_out, self.free = ctx.Pipe(duplex=False)  # slots copied out: training -> reader
        self.filled, filled_in = ctx.Pipe(duplex=False)  # slots filled: reader -> training
        self.process = ctx.Process(target=_serve, name="hvd_train-reader", daemon=True,
                                   args=(stream, start, position, self.block.name, self.layout, free_out, filled_in))
        self.process.start()
        free_out.close()  # the reader's ends: closed here, so each side sees the other go
        filled_in.close()
        for slot in range(slots):
            self.free.send_bytes(_SLOT.pack(slot))

    def __iter__(self) -> Iterator[Tuple[np.ndarray, ...]]:
        try:
            while True:
                try:
                    kind, slot, steps, n = _HEADER.unpack(self.filled.recv_bytes())
                    payload = self.filled.recv_bytes() if kind != BATCH and n >= 0 else None
                except EOFError:
                    self.process.join(STOP_SECONDS)
                    raise RuntimeError(f"the reader process ended (exit status {self.process.exitcode}) "
                                       "without finishing its stream") from None
                if kind == BATCH:
                    # A copy: TensorFlow may keep what it is given, and the slot is refilled.
                    chunk = tuple(v.copy() for v in self.slots.views(slot, n, steps))
                    try:
                        self.free.send_bytes(_SLOT.pack(slot))
                    except BrokenPipeError:
                        pass  # the reader is gone: the next message is the end of the pipe
                    yield chunk
                elif kind == END:
                    self.stream.error = None if payload is None else payload.decode()
                    if self.stream.error:
                        # Idle steps until the ranks agree to stop (stream.TrainStream.idle).
                        yield from self.stream.idle(CHUNK_STEPS)
                    return
                else:
                    raise pickle.loads(payload)
        finally:
            self.close()

    def close(self) -> None:
        """Stop the reader (if it still runs), then free the shared block. Idempotent."""
        if self.block is None:
            return
        self.free.close()  # the reader's next wait ends
        USAGE.append({"cpu_s": _proc_cpu(self.process.pid), "peak_rss_mb": _proc_peak_mb(self.process.pid)})
        self.process.join(STOP_SECONDS)  # it sees the stop between batches; mid-window it is ended
        if self.process.is_alive():
            self.process.kill()  # it ignores SIGTERM (above); it holds nothing the training process needs
            self.process.join()
        self.filled.close()
        self.block.close()
        self.block.unlink()
        self.block = None


def _proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a running process (Linux /proc; 0.0 where there is none)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _proc_peak_mb(pid: int) -> float:
    """Peak resident memory (VmHWM, MB) of a running process since its exec (Linux; 0.0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0.0
