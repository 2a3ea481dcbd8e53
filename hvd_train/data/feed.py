"""What the training loop takes from a file dataset: the stream's batches handed over to
TensorFlow (a reader process of the rank's own, reader.py, or a thread of the training process,
read_ahead) as a tf.data pipeline (tf_dataset), and the feed object the loop holds (StreamFeed).
"""
from __future__ import annotations

from typing import Any, Iterator, List, Optional, Tuple

READ_AHEAD_STEPS = 16  # batches made ahead of training by the reader thread, at least


def read_ahead(items: Iterator[Any], depth: int) -> Iterator[Any]:
    """``items`` produced by a thread of our own, up to ``depth`` ahead of the consumer.

    tf.data runs a generator on TensorFlow's inter-op pool, which ``--threads`` sizes (one
    thread on a 2-core host with 2 ranks): there, reading and training took turns. Our own
    thread parses (pyarrow releases the GIL) while TensorFlow computes. An exception in the
    thread is raised here; closing this generator stops the thread.
    """
    import queue
    import threading

    out: "queue.Queue" = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def offer(entry: Tuple[bool, Any]) -> bool:
        """Queue an entry unless the consumer has gone; False if it has."""
        while not stop.is_set():
            try:
                out.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer((True, item)):
                    return
            offer((True, done))
        except BaseException as err:  # handed to the consumer
            offer((False, err))

    thread = threading.Thread(target=produce, name="hvd_train-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = out.get()
            if not ok:
                raise item
            if item is done:
                return
            yield item
    finally:
        stop.set()



def tf_dataset(stream, batches, chunked: bool = False):
    """A tf.data.Dataset of a stream's (x, y, loss weight) steps ``batches()`` makes (a generator
    function: read_ahead's thread), or with ``chunked`` of the steps in the chunks it makes
    (x, y, w of several steps end to end, and each step's rows: a reader.Reader), split
    inside TensorFlow so that Python hands over one chunk, not every step."""
    import tensorflow as tf

    s = stream.splits
    steps = (tf.TensorSpec((None, *s.input_shape), tf.as_dtype(s.sample_dtype)),
             tf.TensorSpec((None,), tf.as_dtype(s.label_dtype)), tf.TensorSpec((None,), tf.float32))
    if not chunked:
        made = tf.data.Dataset.from_generator(batches, output_signature=steps)
        if s.raw:
            made = made.map(lambda x, y, w: (s.standardise_tf(x), y, w))
        return made.prefetch(2)

    def split(x, y, w, rows):
        if s.raw:
            x = s.standardise_tf(x)  # a chunk at a time
        starts = tf.cumsum(rows, exclusive=True)
        return tf.data.Dataset.from_tensor_slices((starts, rows)).map(
            lambda at, n: (x[at:at + n], y[at:at + n], w[at:at + n]))

    chunks = (*steps, tf.TensorSpec((None,), tf.int64))
    return tf.data.Dataset.from_generator(batches, output_signature=chunks).flat_map(split).prefetch(2)


READER_SHARED_BYTES = 32 << 20  # a reader process's slots at most (a container's /dev/shm is often 64 MB)


class StreamFeed:
    """What the epoch loop (loop.py) trains on, for files: a TrainStream from ``epoch`` after
    ``position`` samples, read by a reader process of this rank (reader.py; ``reader="thread"``:
    by a thread of this process, read_ahead). ``steps``: of the first epoch. ``failure``: a file
    that went bad or could not be read on this rank (the stream then gives idle steps until the
    ranks agree to stop: training/stopping.agree_feed), or after another error, a file that vanished or
    changed under the run. ``close``: stops the reader (the loop calls it when a fit ends, also
    by a stop or an elastic reset)."""

    can_fail = True  # its reads may fail mid-run, on any rank at any step

    def __init__(self, stream, epoch: int, position: int = 0, reader: str = "process"):  # a stream.TrainStream
        self.stream, self.epoch, self.position, self.reader = stream, epoch, position, reader
        self.steps = len(stream.slices(position).steps)
        self.readers: List[Any] = []

    def keras_input(self):
        stream, depth = self.stream, self.stream.read_ahead_steps()
        if self.reader == "thread":
            # The queued batches are views of the window: ~2 windows / N in memory.
            return tf_dataset(stream, lambda: read_ahead(stream.epochs_then_idle(self.epoch, self.position), depth))
        from .reader import CHUNK_STEPS, Reader, slot_bytes

        slots = max(2, min(-(-depth // CHUNK_STEPS), READER_SHARED_BYTES // slot_bytes(stream)))

        def batches():
            reader = Reader(stream, self.epoch, self.position, slots)
            self.readers.append(reader)
            return iter(reader)

        return tf_dataset(stream, batches, chunked=True)

    def close(self) -> None:
        for r in self.readers:
            r.close()

    def failure(self, after_error: bool = False) -> Optional[str]:
        return self.stream.error or (self.stream.check_files() if after_error else None)
