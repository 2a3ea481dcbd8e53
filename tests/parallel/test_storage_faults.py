"""Faults at the object store, on every rank of one job (tests/test_parallel.py starts the real S3
server and passes its endpoint and credentials): wrong credentials, a missing bucket, an empty
prefix, an endpoint that does not answer, outputs the credentials may not write, and the server
frozen mid-epoch. Each ends on every rank with the same one message naming the object and the
cause, in bounded time, nothing written (or, mid-run, the last checkpoint intact); a freeze
shorter than the request timeout is ridden out by the retries."""
import io
import os
import signal
import socket
import threading
import time

import keras
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hvd_train import cli, runtime, storage, train
from hvd_train.training import checkpoint

pytestmark = pytest.mark.skipif("HVD_TRAIN_TEST_S3_PID" not in os.environ, reason="needs the S3 server of the job")

PREFIX = "s3://hvd/faults"
BOUND_S = 90  # from the fault to every rank's message: far above the ~attempts x timeout it takes


def _upload(path: str, table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=500)
    storage.write_bytes(path, buf.getvalue())


@pytest.fixture(scope="module")
def data(rt):
    """A Parquet folder in the bucket (rank 0 writes it), 20 000 rows in 40 row groups."""
    if rt.rank == 0:
        rng = np.random.default_rng(3)
        x = rng.normal(size=(20000, 4))
        y = np.where(x[:, 0] + x[:, 1] > 0, "a", "b")
        for k in range(2):
            part = slice(k * 10000, (k + 1) * 10000)
            _upload(f"{PREFIX}/data/part-{k}.parquet",
                    pa.table({**{f"f{i}": x[part, i] for i in range(4)}, "label": y[part]}))
    runtime.broadcast(None, "faults.data")
    return f"parquet:{PREFIX}/data/"


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _run(rt, args, env=None, during=None):
    """train() on every rank with ``env`` set; (every rank's "Type: message" or None, seconds)."""
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    started = time.monotonic()
    try:
        train(cli.parse([*args, "--progress", "none"])[0], callbacks=[during] if during else None)
        got = None
    except Exception as err:  # noqa: BLE001 - every rank's failure is compared
        got = f"{type(err).__name__}: {err}"
    finally:
        took = time.monotonic() - started
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return runtime.allgather(got, "faults.outcome"), took


def _read_only() -> dict:
    key, secret = os.environ["HVD_TRAIN_TEST_S3_READ"].split(":", 1)
    return {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}


CASES = {
    "wrong_secret": (lambda d, t: (["--dataset", d, "--label-column", "label"], {"AWS_SECRET_ACCESS_KEY": "wrong"}),
                     ["s3://hvd/faults/data/", "access denied: check the credentials"]),
    "missing_bucket": (lambda d, t: (["--dataset", "parquet:s3://no-such-bucket/x/", "--label-column", "label"], {}),
                       ["s3://no-such-bucket/x/", "no such bucket"]),
    "empty_prefix": (lambda d, t: (["--dataset", f"parquet:{PREFIX}/empty/", "--label-column", "label"], {}),
                     [f"cannot read Parquet {PREFIX}/empty/: no such file or directory"]),
    "endpoint_down": (lambda d, t: (["--dataset", d, "--label-column", "label"],
                                    {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{_closed_port()}"}),
                      ["s3://hvd/faults/data/", "cannot connect to the storage endpoint http://127.0.0.1:"]),
    "output_read_only": (lambda d, t: (["--output-dir", f"{PREFIX}/out"], _read_only()),
                         [f"output directory {PREFIX}/out is not writable: access denied"]),
    "output_missing_bucket": (lambda d, t: (["--output-dir", "s3://no-such-bucket/out"], {}),
                              ["output directory s3://no-such-bucket/out is not writable: no such bucket"]),
    "checkpoints_read_only": (lambda d, t: (["--output-dir", str(t / "out"), "--checkpoint-dir", f"{PREFIX}/ckpt"],
                                            _read_only()),
                              [f"checkpoint directory {PREFIX}/ckpt is not writable: access denied"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_storage_fault_before_training_is_one_message_on_every_rank(rt, shared_tmp, data, case):
    make, parts = CASES[case]
    args, env = make(data, shared_tmp)
    if "--output-dir" not in args:
        args = [*args, "--output-dir", str(shared_tmp / "out")]
    every, took = _run(rt, [*args, "--epochs", "1"], env)
    print(f"{case}: {took:.1f}s: {every[0]}")
    assert every[0] is not None and all(p in every[0] for p in parts), every
    assert every == [every[0]] * rt.size, "the same failure on every rank"
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in every[0]
    assert took < BOUND_S
    assert not (shared_tmp / "out").exists(), "nothing written"
    assert not storage.list_files(f"{PREFIX}/out") and not storage.list_files(f"{PREFIX}/ckpt")


class Freeze(keras.callbacks.Callback):
    """Rank 0, no collective: SIGSTOP the S3 server at the start of the second epoch, for
    ``seconds`` (then SIGCONT from a timer), or until thawed."""

    def __init__(self, rt, seconds=None, probe=None):
        super().__init__()
        self.rt, self.seconds, self.probe, self.at = rt, seconds, probe, None
        self.probed = None  # (bytes read, seconds): a request made while frozen

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1 and self.rt.rank == 0 and self.at is None:
            self.at = time.monotonic()
            os.kill(int(os.environ["HVD_TRAIN_TEST_S3_PID"]), signal.SIGSTOP)
            if self.seconds:
                threading.Timer(self.seconds, self.thaw).start()
            if self.probe:
                threading.Thread(target=self._probe).start()

    def _probe(self):
        started = time.monotonic()
        data = storage.read_bytes(self.probe)
        self.probed = (len(data), time.monotonic() - started)

    def thaw(self):
        os.kill(int(os.environ["HVD_TRAIN_TEST_S3_PID"]), signal.SIGCONT)


def _run_frozen(rt, args, timeout: str, attempts: str, freeze: Freeze) -> list:
    """_run with ``freeze`` and these request settings; the server always thawed after (rank 0)."""
    try:
        return _run(rt, args, {"HVD_TRAIN_STORAGE_TIMEOUT": timeout, "HVD_TRAIN_STORAGE_ATTEMPTS": attempts},
                    during=freeze)[0]
    finally:
        if rt.rank == 0:
            freeze.thaw()


def test_a_server_frozen_mid_epoch_stops_every_rank_with_one_message_and_the_checkpoint_intact(rt, shared_tmp, data):
    freeze = Freeze(rt)
    args = ["--dataset", data, "--label-column", "label", "--epochs", "4", "--batch-size", "50",
            "--output-dir", f"{PREFIX}/frozen", "--checkpoint-dir", f"{PREFIX}/frozen-ckpt"]
    every = _run_frozen(rt, args, "2", "2", freeze)
    since = runtime.broadcast(time.monotonic() - freeze.at if freeze.at else None, "faults.since")
    print(f"frozen server: every rank's message {since:.1f}s after the freeze: {every[0]}")
    # The reader's next request (or, if it had read ahead that far, the next checkpoint's upload)
    # is the one that times out: either way one message naming the object and the cause.
    assert every[0] is not None and "s3://hvd/faults/" in every[0], every
    assert "the storage did not answer (2 attempt(s), 2 s each" in every[0], every
    assert every == [every[0]] * rt.size
    assert since < BOUND_S
    # The checkpoint of the epoch before the freeze is there and whole; nothing of the failed epoch.
    names = [storage.basename(p) for p, _ in storage.list_files(f"{PREFIX}/frozen-ckpt")]
    assert names == [checkpoint.file_name(1)], names
    assert checkpoint.load(f"{PREFIX}/frozen-ckpt/{names[0]}").epoch == 1
    assert not storage.exists(f"{PREFIX}/frozen/metrics.json")


def test_a_freeze_shorter_than_the_timeout_is_retried_through(rt, shared_tmp, data):
    # Requests time out after 1.5 s and are tried 4 times; the server answers again after 2.5 s.
    # Besides the run's own requests, a probe made at the freeze proves a retry: it succeeds,
    # after longer than one attempt's timeout.
    freeze = Freeze(rt, seconds=2.5, probe=f"{PREFIX}/data/part-1.parquet")
    args = ["--dataset", data, "--label-column", "label", "--epochs", "3", "--batch-size", "50",
            "--output-dir", f"{PREFIX}/retried"]
    every = _run_frozen(rt, args, "1.5", "4", freeze)
    assert every == [None] * rt.size, every
    assert storage.exists(f"{PREFIX}/retried/metrics.json")
    if rt.rank == 0:
        for _ in range(100):
            if freeze.probed:
                break
            time.sleep(0.1)
        size, seconds = freeze.probed
        print(f"a request made at the freeze: {size} bytes after {seconds:.1f}s (timeout 1.5 s)")
        assert size == storage.size(f"{PREFIX}/data/part-1.parquet") and seconds > 1.5


class Kill(keras.callbacks.Callback):
    """Rank 0, no collective: SIGKILL a server at the start of the second epoch."""

    def __init__(self, rt, server):
        super().__init__()
        self.rt, self.server, self.at = rt, server, None

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1 and self.rt.rank == 0 and self.at is None:
            self.at = time.monotonic()
            os.killpg(self.server.process.pid, signal.SIGKILL)


def test_a_server_killed_mid_epoch_stops_every_rank_with_one_message(rt, shared_tmp):
    """A server of this test's own (rank 0 starts it, both ranks read from it), killed in the
    second epoch: the next request fails (nothing listens), every rank says so, once."""
    from hvd_train.tools.s3server import S3Server

    server = S3Server(shared_tmp / "own-server").start() if rt.rank == 0 else None
    env = runtime.broadcast(server.env() if server else None, "faults.own_server")
    if rt.rank == 0:
        rng = np.random.default_rng(5)
        x = rng.normal(size=(20000, 4))
        table = pa.table({**{f"f{i}": x[:, i] for i in range(4)}, "label": np.where(x[:, 0] > 0, "a", "b")})
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=500)
        with server.filesystem().open_output_stream("hvd/own/part-0.parquet") as f:
            f.write(buf.getvalue())
    runtime.broadcast(None, "faults.own_data")
    kill = Kill(rt, server)
    try:
        every, _ = _run(rt, ["--dataset", "parquet:s3://hvd/own/", "--label-column", "label", "--epochs", "4",
                             "--batch-size", "50", "--shuffle-buffer", "2000", "--output-dir", str(shared_tmp / "out")],
                        {**env, "HVD_TRAIN_STORAGE_TIMEOUT": "2", "HVD_TRAIN_STORAGE_ATTEMPTS": "2"}, during=kill)
    finally:
        if server:
            server.stop()
    since = runtime.broadcast(time.monotonic() - kill.at if kill.at else None, "faults.killed")
    print(f"killed server: every rank's message {since:.1f}s after the kill: {every[0]}")
    assert every[0] is not None and every[0].startswith("StreamError: s3://hvd/own/part-0.parquet"), every
    assert "cannot connect to the storage endpoint http://127.0.0.1:" in every[0], every
    assert every == [every[0]] * rt.size and since < BOUND_S
    assert not (shared_tmp / "out" / "metrics.json").exists()
