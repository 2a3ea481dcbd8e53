"""Collectives and in-process properties, on the real ranks of one job (see conftest.py): agreement
on failures, consensus, replica state, exact metric sums, sharding, stopping after the same batch,
checkpoints written once, and ranks whose data or arguments differ. Collectives first, asserts after."""
import os
import signal

import keras
import numpy as np
import pytest

from hvd_train import TrainConfig, runtime, train
from hvd_train.data import sharding
from hvd_train.data.pipeline import ShardedBatches, sharded_dataset
from hvd_train.data.sharding import eval_shard
from hvd_train.training import checkpoint, consensus, distributed, metrics, replicas, tasks
from hvd_train.training.model import build_mlp
from hvd_train.training.stopping import Stopped


def outcome(action):
    """What ``action`` raised on this rank ("Type: message"), or None."""
    try:
        action()
    except Exception as err:  # noqa: BLE001 - the test compares every rank's
        return f"{type(err).__name__}: {err}"
    return None


# --- agreement ------------------------------------------------------------------------------------

def test_agree_passes_when_no_rank_failed_and_gathers_in_rank_order(rt):
    runtime.agree(None, "test.none")
    assert runtime.agree_gather(None, {"rank": rt.rank}, "test.payload") == [{"rank": r} for r in range(rt.size)]
    assert runtime.broadcast(f"from {rt.rank}", "test.bcast") == "from 0"
    assert runtime.allgather(rt.rank * 10, "test.gather") == [r * 10 for r in range(rt.size)]


def test_mpi4py_and_horovod_agree_on_the_ranks(rt):
    import horovod.tensorflow as hvd

    if not hvd.mpi_enabled():
        pytest.skip("the job runs over Gloo (no MPI on this machine)")
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    assert (world.Get_rank(), world.Get_size()) == (hvd.rank(), hvd.size()) == (rt.rank, rt.size)


def test_a_failure_on_one_rank_fails_every_rank_naming_it(rt):
    got = outcome(lambda: runtime.agree("disk full" if rt.rank == 1 else None, "test.one"))
    assert got == "AgreedFailure: rank 1: disk full"


def test_the_same_failure_on_every_rank_is_one_message(rt):
    got = outcome(lambda: runtime.agree("bad value", "test.all"))
    assert got == "AgreedFailure: bad value"
    different = outcome(lambda: runtime.agree(f"problem {rt.rank}", "test.each"))
    assert different == "AgreedFailure: " + "; ".join(f"rank {r}: problem {r}" for r in range(rt.size))


def test_consensus_names_the_rank_and_the_key_that_differ(rt):
    same = outcome(lambda: consensus.check({"config.epochs": 3, "data.train": "x"}))
    differ = outcome(lambda: consensus.check({"config.epochs": 3 + rt.rank, "data.train": "x"}))
    assert same is None
    assert differ == ("AgreedFailure: ranks disagree, stopping before training: "
                      "rank 1 differs from rank 0 in config.epochs: 4 (rank 0: 3)")


# --- replica state ----------------------------------------------------------------------------------

def _bn_model():
    inputs = keras.Input(shape=(3,))
    x = keras.layers.BatchNormalization(name="bn")(inputs)
    frozen = keras.layers.Dense(2, name="frozen")
    frozen.trainable = False
    return keras.Model(inputs, frozen(x))


def test_sync_state_averages_batchnorm_statistics_and_broadcasts_the_rest(rt):
    model = _bn_model()
    bn, frozen = model.get_layer("bn"), model.get_layer("frozen")
    bn.moving_mean.assign(np.full(3, rt.rank + 1.0, np.float32))
    bn.moving_variance.assign(np.full(3, 2.0 * (rt.rank + 1), np.float32))
    frozen.kernel.assign(np.full((3, 2), float(rt.rank), np.float32))
    distributed.sync_state(model)
    before = [v.numpy().copy() for v in model.weights]
    distributed.sync_state(model)  # replicas that agree: no bit changes
    digests, problem = replicas.check(model)
    mean_of_ranks = np.mean(np.arange(1, rt.size + 1))
    np.testing.assert_array_equal(bn.moving_mean.numpy(), np.full(3, mean_of_ranks, np.float32))
    np.testing.assert_array_equal(bn.moving_variance.numpy(), np.full(3, 2 * mean_of_ranks, np.float32))
    np.testing.assert_array_equal(frozen.kernel.numpy(), np.zeros((3, 2), np.float32))
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(before, model.weights))
    assert problem is None and len(set(digests)) == 1 and len(digests) == rt.size


def test_replicas_check_names_the_first_variable_that_differs(rt):
    keras.utils.set_random_seed(0)
    model = build_mlp(4, 3, hidden=(5,))
    if rt.rank == 1:
        kernel = model.weights[2]
        kernel.assign(kernel + 1.0)
    digests, problem = replicas.check(model)
    assert digests[0] != digests[1]
    assert problem.startswith(f"replicas differ after training, first in variable {model.weights[2].path} "
                              f"(3 of {len(model.weights)}): rank(s) 1 hold another value than rank 0")


# --- exact metrics ----------------------------------------------------------------------------------

def test_evaluation_over_uneven_shares_equals_the_whole_set(rt):
    keras.utils.set_random_seed(0)
    model = build_mlp(5, 3, hidden=(8,))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(23, 5)).astype(np.float32)
    y = rng.integers(0, 3, size=23)
    task = tasks.Classification(("a", "b", "c"), logits=False)
    mine = eval_shard(23, rt.rank, rt.size)  # 12 and 11 rows
    combined = metrics.evaluate(model, [(x[mine], y[mine])], task)
    rank_means = runtime.allgather(task.result(metrics.local_sums(model, x[mine], y[mine], task))["loss"], "means")
    whole = task.result(metrics.local_sums(model, x, y, task))  # this rank, every row
    assert combined["samples"] == 23
    assert combined["loss"] == pytest.approx(whole["loss"], rel=1e-12)
    assert combined["accuracy"] == whole["accuracy"]
    assert combined["confusion"].tolist() == whole["confusion"].tolist()
    assert abs(np.mean(rank_means) - whole["loss"]) > 1e-6, "a mean of rank means would differ"


def test_global_sums_weigh_each_rank_by_its_sample_count(rt):
    count = 3 if rt.rank == 0 else 1
    sums = metrics.global_sums({"loss": 1.0 + 2 * rt.rank, "accuracy": 0.5}, count, "test",
                               carried={"loss": 10.0, "count": 5.0})
    # rank 0: 3 samples at mean 1, rank 1: 1 sample at mean 3, plus the carried part of the epoch.
    assert sums == {"loss": 3 * 1.0 + 1 * 3.0 + 10.0, "accuracy": 2.0, "count": 4.0 + 5.0}


# --- sharding ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, batch, position", [(107, 8, 0), (150, 32, 0), (3, 1, 0), (107, 8, 50)])
def test_each_epoch_every_sample_once_in_equal_steps(rt, n, batch, position):
    """What Keras is fed (the tf.data pipeline, one iterator across epochs, as fit reads it):
    from ``position`` into epoch 0 to its end, then the whole of epoch 1."""
    x = np.arange(n, dtype=np.float32).reshape(n, 1)
    plan = ShardedBatches(x, np.zeros(n), rt.rank, rt.size, batch, seed=5, shuffle=True, position=position)
    first = len(plan)
    whole = sharding.steps_per_epoch(n, rt.size, batch)
    fed = iter(sharded_dataset(plan))
    seen = []
    for epoch, steps in enumerate((first, whole)):
        batches = [next(fed) for _ in range(steps)]
        rows = [xb.numpy()[:, 0].astype(int).tolist() for xb, _, _ in batches]
        weights = [float(w.numpy()[0]) for _, _, w in batches]
        assert all(len(set(w.numpy().tolist())) == 1 for _, _, w in batches), "one loss weight per step"
        seen.append((runtime.allgather(rows, f"shards.{n}.{position}.{epoch}"),
                     runtime.allgather(weights, f"weights.{n}.{position}.{epoch}")))
    order = sharding.epoch_order(n, 0, 5, True)
    for epoch, (steps, weights) in enumerate(seen):
        assert len({len(s) for s in steps}) == 1, "equal steps on every rank"
        every = sorted(i for s in steps for step in s for i in step)
        expected = sorted(order[position:].tolist()) if epoch == 0 else list(range(n))
        assert every == expected, "disjoint and complete"
        for k in range(len(steps[0])):  # the loss weights: each rank's share of the step, times N
            sizes = [len(s[k]) for s in steps]
            assert [w[k] for w in weights] == pytest.approx([m * rt.size / sum(sizes) for m in sizes])
    assert [i for s in seen[0][0] for step in s for i in step] != \
        [i for s in seen[1][0] for step in s for i in step], "each epoch its own order"


# --- whole runs through the API ---------------------------------------------------------------------

def _csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("a,b,label\n" + "".join(f"{i % 7},{(i * 3) % 5},{'yes' if i % 2 else 'no'}\n"
                                            for i in range(rows)))
    return f"csv:{path}"


def test_a_file_missing_on_one_rank_stops_every_rank_and_rank_0_writes_nothing(rt, shared_tmp):
    data = shared_tmp / f"rank{rt.rank}.csv"
    if rt.rank == 0:
        _csv(data, 30)
    out = shared_tmp / "out"
    got = outcome(lambda: train(TrainConfig(dataset=f"csv:{data}", label_column="label", output_dir=str(out))))
    assert got.startswith(f"AgreedFailure: rank 1: cannot read CSV {shared_tmp}/rank1.csv")
    assert not out.exists()


def test_different_data_on_one_rank_is_found_before_training(rt, shared_tmp):
    # The same relative path on each "host" (here: a working directory per rank), other contents.
    _csv(shared_tmp / f"host{rt.rank}" / "data.csv", 40 + rt.rank)  # rank 1's has a row more
    out, cwd = shared_tmp / "out", os.getcwd()
    os.chdir(shared_tmp / f"host{rt.rank}")
    try:
        got = outcome(lambda: train(TrainConfig(dataset="csv:data.csv", label_column="label", epochs=2,
                                                output_dir=str(out))))
    finally:
        os.chdir(cwd)
    assert got.startswith("AgreedFailure: ranks disagree, stopping before training: rank 1 differs from rank 0 in ")
    assert "data.files: ['data.csv:" in got and "data.sample" in got and "config." not in got, got
    assert not out.exists()


def test_a_different_argument_on_one_rank_is_found_before_training(rt, shared_tmp):
    got = outcome(lambda: train(TrainConfig(epochs=3 + rt.rank, output_dir=str(shared_tmp / "out"))))
    assert got == ("AgreedFailure: ranks disagree, stopping before training: "
                   "rank 1 differs from rank 0 in config.epochs: 4 (rank 0: 3)")


def test_fewer_training_samples_than_processes(rt, shared_tmp):
    # 4 rows, 3 of them for test: 1 training sample cannot be shared by 2 processes.
    x, y = np.arange(8, dtype=np.float32).reshape(4, 2), np.arange(4, dtype=np.float64)
    out = shared_tmp / "out"
    got = outcome(lambda: train(TrainConfig(task="regression", val_fraction=0.0, test_fraction=0.75,
                                            output_dir=str(out)), data=(x, y)))
    assert got == "AgreedFailure: 1 training samples are fewer than the 2 processes"
    assert not out.exists()


def test_small_and_skewed_arrays_end_in_one_message_on_every_rank(rt, shared_tmp):
    """The in-memory side of the small-data rule (the file side: tests/bad_inputs.py's cases)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3))
    skewed = np.array(["a", "b"] * 19 + ["rare", "rare"])
    tiny = np.array(["a", "b"] * 2)
    got = [outcome(lambda y=y: train(TrainConfig(output_dir=str(shared_tmp / "out")), data=(x[:len(y)], y)))
           for y in (skewed, tiny)]
    every = runtime.allgather(got, "small_data")
    assert every == [every[0]] * rt.size, "the same failure on every rank"
    assert every[0][0] == ("AgreedFailure: class 'rare' has 2 sample(s): too few for a stratified "
                           "train/val/test split (needs >= 3)"), every
    assert every[0][1].startswith("AgreedFailure: class 'a' has 2 sample(s)"), every
    assert not (shared_tmp / "out").exists()


def test_dry_run_for_another_world_than_the_launchers_is_refused(rt):
    from hvd_train import dry_run

    got = outcome(lambda: dry_run(TrainConfig(), world_size=3))
    assert got == "ConfigError: --np 3 disagrees with the launcher, which started 2 processes"


class _SignalAt(keras.callbacks.Callback):
    """Sends this process SIGTERM after ``batch`` of epoch 2, as a scheduler does to one rank."""

    def __init__(self, batch):
        super().__init__()
        self.batch, self.epoch = batch, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.epoch == 1 and batch == self.batch:
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_batch_with_one_checkpoint(rt, shared_tmp):
    ckpt, out = shared_tmp / "ckpt", shared_tmp / "out"
    config = TrainConfig(dataset="synthetic", samples=2000, batch_size=16, epochs=4, optimizer="sgd",
                         progress="none", checkpoint_dir=str(ckpt), output_dir=str(out))
    stops, handler = [], signal.getsignal(signal.SIGTERM)
    try:
        train(config, callbacks=[_SignalAt(5)] if rt.rank == 1 else [])
    except Stopped as stop:
        stops.append(stop)
    every = runtime.allgather([(s.epoch, s.position, s.checkpoint) for s in stops], "stops")
    assert all(len(s) == 1 for s in every), f"every rank stopped: {every}"
    (epoch, position, path), = every[0]
    assert every == [[(epoch, position, path)]] * rt.size, "after the same batch, the same checkpoint"
    assert 1 <= epoch <= 2 and 0 <= position < 1400, "in epoch 2, or at its end"
    assert [p for _, p in checkpoint.listed(str(ckpt))][0] == path, "rank 0 wrote it, the newest"
    assert signal.getsignal(signal.SIGTERM) == handler, "the handler of before the run is back"
    assert not (out / "metrics.json").exists()


class _SignalAtBatch(keras.callbacks.Callback):
    """Sends this process and its children (a file dataset's reader process) SIGTERM after
    ``batch`` of epoch ``epoch`` (0-based), as Slurm's scancel signals every process of a step."""

    def __init__(self, epoch, batch):
        super().__init__()
        self.at, self.epoch, self.children = (epoch, batch), 0, []

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            import multiprocessing

            for child in multiprocessing.active_children():
                os.kill(child.pid, signal.SIGTERM)
                self.children.append(child)
            os.kill(os.getpid(), signal.SIGTERM)


def _image_folder(folder, count=600):
    """``count`` PNGs of 8x8 in 3 class folders (10 units of 64 images but the last)."""
    from PIL import Image

    rng = np.random.default_rng(3)
    for i in range(count):
        c = i % 3
        (folder / f"class{c}").mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 90, (8, 8, 3)).astype(np.uint8)
        pixels[:, c * 2:c * 2 + 3] += 120  # the class is a bright band
        Image.fromarray(pixels).save(folder / f"class{c}" / f"{i:04d}.png")


@pytest.mark.parametrize("kind", ["csv", "images"])
def test_a_file_folder_stopped_mid_epoch_resumes_to_the_uninterrupted_run(rt, shared_tmp, monkeypatch, kind):
    from hvd_train.training import stopping

    # Ten files of 60 rows (or 600 images: units of 64), windows of two units (--shuffle-buffer
    # 64): the stop falls in a later window of epoch 2, so the resumed stream skips whole
    # windows and starts inside one. Images: decoded in the reader processes, streamed as uint8.
    if rt.rank == 0:
        (shared_tmp / "folder").mkdir(exist_ok=True)
        if kind == "images":
            _image_folder(shared_tmp / "folder")
        for f in range(10 if kind == "csv" else 0):
            (shared_tmp / "folder" / f"part-{f:02d}.csv").write_text("a,b,c,label\n" + "".join(
                f"{(i * 7 + f) % 11 / 3:.3f},{(i * 5 + 2 * f) % 13 / 4:.3f},{(i * f) % 5},{(i + f) % 3}\n"
                for i in range(60)))
    runtime.broadcast(None, "folder.written")
    monkeypatch.setattr(stopping, "CHECK_SECONDS", 0.0)  # the ranks agree after every batch: a known stop
    config = TrainConfig(dataset=f"{kind}:{shared_tmp / 'folder'}", label_column="label" if kind == "csv" else None,
                         batch_size=8, epochs=3, optimizer="adam", shuffle_buffer=64, progress="none", seed=7,
                         image_size=(8, 8))
    ckpt = shared_tmp / "ckpt"
    stopped = config.replace(checkpoint_dir=str(ckpt), output_dir=str(shared_tmp / "stopped"))
    signaller = _SignalAtBatch(1, 17)
    got = outcome(lambda: train(stopped, callbacks=[signaller] if rt.rank == 1 else []))
    (epoch, path), = checkpoint.listed(str(ckpt))[:1]  # the newest, before the resumed run adds its own
    resumed = train(stopped.replace(resume="auto", output_dir=str(shared_tmp / "resumed")))
    whole = train(config.replace(output_dir=str(shared_tmp / "whole")))
    # 16 samples a step: the stop after step 18 of epoch 2 is at position 288.
    assert got.startswith("Stopped: stopped by SIGTERM after 288 of ") and " samples of epoch 2" in got, got
    # The stream was read by a reader process, which the signal reached too and did not end: the
    # run closed it (stopped, or killed inside a read), after the agreed batch.
    assert rt.rank != 1 or [c.exitcode in (0, -signal.SIGKILL) for c in signaller.children] == [True]
    assert path.endswith(checkpoint.file_name(1, 288)) and epoch == 1
    differences = [float(np.max(np.abs(a - b))) for a, b in zip(resumed.model.get_weights(),
                                                                 whole.model.get_weights())]
    assert max(differences) <= 1e-6, differences
    assert resumed.metrics["replica_weight_digests"] == whole.metrics["replica_weight_digests"]
    assert resumed.metrics["test_loss"] == whole.metrics["test_loss"]
    assert resumed.metrics["resumed_from_epoch"] == 1 and resumed.metrics["epochs_trained_this_run"] == 2
    for key, values in whole.history.items():
        assert resumed.history[key] == pytest.approx(values, rel=1e-5), key
