"""Data, checkpoints and runs in object storage, against a real S3 server (SeaweedFS, started by
the ``s3`` fixture): Parquet and CSV folders in a bucket at np=2 train exactly as one process with
N times the batch, with exact metrics and every output in the bucket; a run writing to the bucket
stopped by Ctrl-C resumes from the bucket alone (--resume auto) to the uninterrupted run; TensorBoard
and pruned checkpoints reach the bucket; predict reads a run and an input from the bucket and
writes there; no secret appears in any file or output. Faults at the storage, on every rank:
tests/parallel/test_storage_faults.py."""
import re
import signal

import numpy as np
import pytest
from conftest import BIN, OUTPUT_FILES, REPO, Background, _descendants, max_weight_difference, read_json, run_many
from files import make_data, make_images, samples_by_split

from hvd_train.outputs import events
from hvd_train.tools.s3server import BUCKET, SECRET
from hvd_train.training import checkpoint

pytestmark = pytest.mark.integration

ROWS = [3000, 0, 1100, 1900]  # uneven files, one empty: ~4200 training rows, 140 steps of 30 per epoch
GLOBAL_BATCH = 30
TRAIN = ["--label-column", "label", "--lr-scaling", "none", "--warmup-epochs", "0", "--seed", "7", "--epochs", "5",
         "--optimizer", "sgd", "--lr", "0.05", "--shuffle-buffer", "500", "--progress", "epoch"]
IMAGES = ["--image-size", "12x12", "--image-channels", "3", "--model", "cnn", "--filters", "8", "--sync-batchnorm",
          "--seed", "7", "--lr-scaling", "none", "--warmup-epochs", "0", "--optimizer", "sgd", "--lr", "0.05",
          "--epochs", "2", "--shuffle-buffer", "64", "--progress", "none"]


@pytest.fixture(scope="module")
def bucket(s3, tmp_path_factory):
    """The test files in the bucket: s3://BUCKET/objstore/{csv,parquet}/part-*.{csv,parquet}."""
    local = tmp_path_factory.mktemp("objstore-data")
    for kind in ("csv", "parquet"):
        make_data(local / kind, kind, n_rows=ROWS)
    make_images(local / "images", {"circle": 70, "square": 50, "stripes": 40})
    s3.put_tree(local, "objstore/data")
    return {kind: f"{kind}:s3://{BUCKET}/objstore/data/{kind}/" for kind in ("csv", "parquet", "images")}


def uri(*parts) -> str:
    return "/".join([f"s3://{BUCKET}/objstore", *parts])


@pytest.fixture(scope="module")
def stopped(s3, bucket):
    """A run writing to the bucket (data, outputs, checkpoints), stopped by SIGINT in its third
    epoch: launch/local.sh, 2 processes, with the same training as the uninterrupted run below."""
    args = ["--dataset", bucket["parquet"], *TRAIN, "--batch-size", str(GLOBAL_BATCH // 2),
            "--checkpoint-dir", uri("ckpt"), "--output-dir", uri("stopped")]
    job = Background([REPO / "launch" / "local.sh", "-n", "2", "--gloo", "--", *args],
                     env={"VENV": str(BIN.parent), **s3.env()})
    job.wait_until(lambda: re.search(r"epoch +2/", job.output), 240, "epoch 2")
    # horovodrun (Gloo) forwards its environment on each rank's `sh -c env ...` command line: the
    # secret stays off those on this machine (the ranks inherit it; they read the bucket with it).
    lines = {}
    for pid in [job.proc.pid, *_descendants(job.proc.pid)]:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                lines[pid] = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            pass
    job.proc.send_signal(signal.SIGINT)
    return job.wait(60), job.output, lines


@pytest.fixture(scope="module")
def runs(s3, bucket, stopped, tmp_path_factory):
    """np=2 (data and outputs in the bucket; the stopped run resumed from the bucket) and np=1
    (N*b, the same bucket data), each one job."""
    work = tmp_path_factory.mktemp("objstore-runs")
    two = {
        "parquet": ["--dataset", bucket["parquet"], *TRAIN, "--batch-size", "15", "--output-dir", uri("parquet"),
                    "--checkpoint-dir", uri("ckpt-whole"), "--keep-checkpoints", "2", "--tensorboard"],
        "csv": ["--dataset", bucket["csv"], *TRAIN, "--batch-size", "15", "--output-dir", uri("csv")],
        "resumed": ["--dataset", bucket["parquet"], *TRAIN, "--batch-size", "15", "--checkpoint-dir", uri("ckpt"),
                    "--resume", "auto", "--output-dir", uri("resumed")],
    }
    one = {kind: ["--dataset", bucket[kind], *TRAIN, "--batch-size", str(GLOBAL_BATCH)] for kind in ("csv", "parquet")}
    # An image folder in the bucket: its images fetched by the read-ahead threads, decoded in the reader processes.
    two["images"] = ["--dataset", bucket["images"], *IMAGES, "--batch-size", "12"]
    one["images"] = ["--dataset", bucket["images"], *IMAGES, "--batch-size", "24"]
    # CSV's runs take 3 epochs (their own comparison); Parquet's 5, as the stopped run.
    for runs in (two, one):
        runs["csv"] += ["--epochs", "3"]
    return run_many(2, two, work / "np2", env=s3.env()), run_many(1, one, work / "np1", env=s3.env())


def fetched(s3, tmp_path, name=""):
    return s3.fetch("/".join(filter(None, ["objstore", name])), tmp_path / (name or "all"))


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_n_processes_on_the_bucket_equal_one_process_with_n_times_the_batch(s3, runs, kind, tmp_path):
    two, one = runs
    assert two[kind].ok and one[kind].ok, (two[kind], one[kind])
    out = fetched(s3, tmp_path, kind)
    assert OUTPUT_FILES <= {p.name for p in out.iterdir()}, sorted(p.name for p in out.iterdir())
    m, ref = read_json(out / "metrics.json"), read_json(one[kind].out / "metrics.json")
    assert m["replicas_identical"] and m["global_batch_size"] == GLOBAL_BATCH == ref["global_batch_size"]
    diff = max_weight_difference(one[kind].out, out)
    print(f"{kind} from s3, np=2 vs np=1: max |w_2 - w_1| = {diff:.2e}")
    assert diff <= 1e-5
    # Exact test metrics: the same test rows, scored by models equal to 1e-5.
    assert m["test_samples"] == ref["test_samples"]
    assert m["test_loss"] == pytest.approx(ref["test_loss"], rel=1e-4)
    assert abs(m["test_accuracy"] - ref["test_accuracy"]) <= 1 / m["test_samples"]
    done = [e["event"] for e in events.read(out / "events.jsonl")]
    assert done[0] == "run_start" and done.count("epoch") == (3 if kind == "csv" else 5) and done[-1] == "run_end"
    assert "training rows stream each epoch" in two[kind].stdout and f"outputs in {uri(kind)}" in two[kind].job_stdout


def test_checkpoints_tensorboard_and_pruning_in_the_bucket(s3, runs):
    assert runs[0]["parquet"].ok
    ckpts = s3.listing("objstore/ckpt-whole")
    assert sorted(ckpts) == [checkpoint.file_name(4), checkpoint.file_name(5)], "--keep-checkpoints 2 pruned"
    tensorboard = [k for k in s3.listing("objstore/parquet") if k.startswith("tensorboard/")]
    assert {k.split("/")[1] for k in tensorboard} == {"train", "validation"}, tensorboard
    assert all(ckpt > 0 for ckpt in ckpts.values())


def test_a_stopped_run_resumes_from_the_bucket_to_the_uninterrupted_run(s3, stopped, runs, tmp_path):
    code, output, _ = stopped
    assert code == 128 + signal.SIGINT, output[-3000:]
    out = fetched(s3, tmp_path, "stopped")
    (stop,) = [e for e in events.read(out / "events.jsonl") if e["event"] == "run_stopped"]
    assert stop["checkpoint"] == uri("ckpt", checkpoint.file_name(stop["epoch"], stop["position"]))
    assert not (out / "metrics.json").exists(), "a stopped run writes no results"
    # Every finished epoch's event reached the bucket before the stop.
    assert [e["epoch"] for e in events.read(out / "events.jsonl") if e["event"] == "epoch"] == \
        list(range(1, stop["epoch"] + 1))

    two, _ = runs
    assert two["resumed"].ok, two["resumed"]
    assert f"resuming from {stop['checkpoint']}" in two["resumed"].stdout
    resumed, whole = fetched(s3, tmp_path, "resumed"), fetched(s3, tmp_path, "parquet")
    a, b = read_json(resumed / "metrics.json"), read_json(whole / "metrics.json")
    assert a["replica_weight_digests"] == b["replica_weight_digests"], "bit for bit the uninterrupted run"
    assert (a["test_loss"], a["test_accuracy"]) == (b["test_loss"], b["test_accuracy"])


def test_predict_reads_a_run_and_an_input_in_the_bucket_and_writes_there(s3, runs, tmp_path):
    from conftest import run

    assert runs[0]["csv"].ok
    make_data(tmp_path / "new", "parquet", n_rows=[70], seed=5)
    s3.put_tree(tmp_path / "new", "objstore/new")
    proc = run([BIN / "hvd-train", "predict", "--model-dir", uri("csv"), "--input",
                f"s3://{BUCKET}/objstore/new/part-0.parquet"], env=s3.env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = s3.get("objstore/new/part-0.predictions.csv").decode().splitlines()
    assert rows[0].startswith("predicted_class,prob_") and len(rows) == 71
    assert "wrote 70 predictions to s3://" in proc.stdout


def test_no_secret_in_any_file_or_output(s3, stopped, runs, tmp_path):
    """The secret key reaches the ranks only through the environment (the AWS SDK's chain):
    never a log line, an event, config.json, config.toml or any other file of a run."""
    _, output, command_lines = stopped
    two, one = runs
    assert any("HOROVOD_RANK=1" in c for c in command_lines.values()), "the ranks' command lines were seen"
    assert not [c for c in command_lines.values() if SECRET in c], "no command line shows the secret"
    texts = {"stopped run's output": output, "np=2 job's output": two["csv"].job_stdout,
             "np=1 job's output": one["csv"].job_stdout}
    everything = fetched(s3, tmp_path)
    files = [p for p in everything.rglob("*") if p.is_file()]
    assert len(files) > 30 and any(p.name == "config.toml" for p in files)
    for name, text in texts.items():
        assert SECRET not in text, name
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), path
    for path in [p for p in one["csv"].out.rglob("*") if p.is_file()]:
        assert SECRET.encode() not in path.read_bytes(), path
    # The access key id is no secret, and may appear; the check would find the secret if written.
    assert np.any([b"objstore" in p.read_bytes() for p in files if p.name == "config.json"])


def test_the_event_log_in_the_bucket_loses_no_line_when_the_store_does_not_answer(s3, monkeypatch):
    # An object has no append: events.jsonl is uploaded whole after each line. A line whose
    # upload (or, for a resumed run's log, whose first read of the earlier lines) failed is
    # carried by the next upload; nothing is lost, nothing is duplicated.
    from hvd_train import storage

    for name, value in {**s3.env(), "HVD_TRAIN_STORAGE_TIMEOUT": "1", "HVD_TRAIN_STORAGE_ATTEMPTS": "1"}.items():
        monkeypatch.setenv(name, value)
    location = uri("appender", "events.jsonl")
    storage.write_text(location, "earlier\n")  # a resumed run's log
    log = storage.Appender(location)
    for first in (True, False):  # the first read fails; later, an upload fails
        s3.freeze()
        try:
            with pytest.raises(storage.StorageError):
                log.add("a\n" if first else "c\n")
        finally:
            s3.thaw()
        log.add("b\n" if first else "d\n")
    assert s3.get("objstore/appender/events.jsonl").decode() == "earlier\na\nb\nc\nd\n"


def test_an_image_folder_in_the_bucket_trains_as_one_process_with_exact_metrics(s3, bucket, runs, monkeypatch):
    import keras

    from hvd_train.data import stream
    from hvd_train.data.interface import Standardizer

    two, one = runs
    assert two["images"].ok and one["images"].ok, (two["images"], one["images"])
    m = read_json(two["images"].out / "metrics.json")
    assert m["replicas_identical"] and m["steps_per_epoch"] == read_json(one["images"].out / "metrics.json")[
        "steps_per_epoch"]
    diff = max_weight_difference(one["images"].out, two["images"].out)
    print(f"images from s3, np=2 vs np=1: max |w_2 - w_1| = {diff:.2e}")
    assert diff <= 1e-5
    for name, value in s3.env().items():  # this process reads the bucket as the run did
        monkeypatch.setenv(name, value)
    x, labels, split = samples_by_split(bucket["images"], "class", image_size=(12, 12), image_channels=3)
    prep = read_json(two["images"].out / "preprocessing.json")
    test = split == stream.TEST
    scores = keras.models.load_model(two["images"].out / "model.keras")(
        Standardizer.from_dict(prep["scaler"]).transform32(x[test]), training=False).numpy()
    codes = np.array([prep["class_names"].index(v) for v in labels[test]])
    loss = float(np.mean(keras.losses.sparse_categorical_crossentropy(codes, scores).numpy()))
    assert m["test_samples"] == int(test.sum()) and m["test_loss"] == pytest.approx(loss, rel=1e-5)
