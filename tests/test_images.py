"""images:DIR datasets: a folder per class, listed, split per image, decoded in the reader
processes and streamed in shares with the guarantees of every other path (disjoint and complete
shares, equal steps, exact facts and metrics, N x b == 1 x N*b, stop and resume bit for bit),
Keras's ResNet50 behind augmentation, predict on image files, and one message for a bad image."""
import itertools
import os
import shutil
import signal
from types import SimpleNamespace

import keras
import numpy as np
import pytest
from conftest import REPO, BIN, Background, Jobs, max_weight_difference, read_json
from files import IMAGE_CLASSES, images_by_split, make_images

from hvd_train import cli
from hvd_train.config.options import ConfigError, TrainConfig
from hvd_train.data import images, stream
from hvd_train.data.interface import DataError, Standardizer
from hvd_train.outputs import events
from hvd_train.training import checkpoint

SIZE = (16, 16)


def options(**kw):
    return SimpleNamespace(image_size=kw.get("size", SIZE), image_channels=kw.get("channels", 0))


def test_a_folder_lists_by_class_and_bad_layouts_are_one_message(tmp_path):
    files = make_images(tmp_path / "d", {"a": 5, "b": 3})
    (tmp_path / "d" / "a" / "notes.txt").write_text("not an image")  # other files are left out, as Keras does
    (tmp_path / "d" / "a" / ".hidden.png").write_bytes(files[0].read_bytes())
    (tmp_path / "d" / "b" / "deeper").mkdir()
    shutil.copy(files[0], tmp_path / "d" / "b" / "deeper" / "x.PNG")  # any depth, any case of extension
    src = images.source_of("images", str(tmp_path / "d"), "class", options())
    assert len(src.files) == 9 and src.file_labels == ("a",) * 5 + ("b",) * 4
    assert src.shape == (16, 16, 3) and src.dtype == "uint8" and [u.stop - u.start for u in src.units] == [9]
    (x, y), = images.read_unit(src, src.units[0], select=lambda o, n: np.arange(n) % 2 == 0)
    assert x.shape == (5, 16, 16, 3) and x.dtype == np.uint8 and y.tolist() == ["a", "a", "a", "b", "b"]
    assert images.source_of("images", str(tmp_path / "d"), "class", options(channels=1)).shape == (16, 16, 1)
    gray = tmp_path / "g" / "only"
    gray.mkdir(parents=True)
    from PIL import Image

    Image.new("L", (5, 7), 9).save(gray / "a.png")
    assert images.source_of("images", str(tmp_path / "g"), "class", options()).shape[-1] == 1, "the first image's"

    def message(spec, label="class"):
        with pytest.raises(DataError) as err:
            images.source_of("images", spec, label, options())
        return str(err.value)

    shutil.copy(files[0], tmp_path / "d" / "loose.jpg")
    assert "holds 1 image(s) outside a class folder (e.g. loose.jpg)" in message(str(tmp_path / "d"))
    (tmp_path / "empty" / "a").mkdir(parents=True)
    assert "holds no images" in message(str(tmp_path / "empty"))
    assert "no such directory" in message(str(tmp_path / "nowhere"))
    assert "a glob has no class folders" in message(str(tmp_path / "d" / "*" / "*.png"))
    # A corrupt or truncated image: one message naming the file.
    bad = tmp_path / "d" / "a" / "img-001.png"
    bad.write_bytes(bad.read_bytes()[:60])
    jpeg = tmp_path / "d" / "b" / "img-000.jpg"
    jpeg.write_bytes(b"not a jpeg at all")
    os.remove(tmp_path / "d" / "loose.jpg")
    src = images.source_of("images", str(tmp_path / "d"), "class", options(channels=3))
    with pytest.raises(DataError, match=f"cannot read image {bad}: "):
        list(images.read_unit(src, src.units[0]))
    with pytest.raises(DataError, match=f"cannot read image {jpeg}: not an image Pillow can decode"):
        list(images.read_unit(src, src.units[0], select=lambda o, n: np.arange(n) >= 5))
    # Options: images are classification; the size is HxW.
    with pytest.raises(ConfigError, match="trains classification only"):
        TrainConfig(dataset=f"images:{tmp_path}", task="regression")
    with pytest.raises(ConfigError, match="image size must be HEIGHTxWIDTH"):
        TrainConfig(dataset=f"images:{tmp_path}", image_size=(3, 4, 5))
    assert cli.parse(["--dataset", "images:x", "--image-size", "24x32"])[0].image_size == (24, 32)


def test_facts_shares_and_the_reader_in_one_process(tmp_path):
    """stream.load of an image folder at world size 1 without a launcher; the shares of 2 and 3
    ranks computed from it (as test_sources' table test does for Parquet)."""
    import horovod.tensorflow as hvd

    hvd.init()
    make_images(tmp_path / "d")
    config = TrainConfig(dataset=f"images:{tmp_path / 'd'}", image_size=SIZE, seed=7, batch_size=24,
                         shuffle_buffer=64)
    s = stream.load(config, 0, 1)
    x, labels, split = images_by_split(tmp_path / "d")
    train = split == stream.TRAIN
    assert s.class_names == tuple(sorted(IMAGE_CLASSES)) and s.input_shape == (16, 16, 3)
    assert (s.n_train, s.n_val, s.n_test) == tuple(int((split == k).sum()) for k in (0, 1, 2))
    assert [c[0] for c in s.class_counts()] == [int((labels[train] == c).sum()) for c in s.class_names]
    # Per channel, over every training pixel (moments combined exactly).
    pixels = x[train].reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(s.scaler.mean, pixels.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(s.scaler.scale, pixels.std(axis=0), rtol=1e-12)
    # Evaluation rows: standardised in float32, as TensorFlow does it to the training stream.
    test_x = np.concatenate([xb for xb, _ in s.eval_pieces("test", 0, 1)])
    np.testing.assert_array_equal(test_x, Standardizer.transform32(s.scaler, x[split == stream.TEST]))
    import tensorflow as tf

    np.testing.assert_array_equal(s.standardise_tf(tf.constant(x[:5])).numpy(), s.standardise(x[:5]))

    def key(b):  # a step's images as a set of byte strings
        return sorted(row.tobytes() for row in b)

    one = [xb for xb, _, _ in stream.TrainStream(s, 0, 1, 24, shuffle=True, shuffle_buffer=64).epoch_batches(0)]
    assert all(b.dtype == np.uint8 for b in one) and key(np.concatenate(one)) == key(x[train]), "every image once"
    for size in (2, 3):
        b = 24 // size
        streams = [stream.TrainStream(s, r, size, b, shuffle=True, shuffle_buffer=64) for r in range(size)]
        ranks = [list(t.epoch_batches(0)) for t in streams]
        assert len({len(steps) for steps in ranks}) == 1 == len({len(one)} | {len(r) for r in ranks}), "equal steps"
        for k, batch in enumerate(one):  # disjoint, complete, and N x b the global batches of 1 x N*b
            together = np.concatenate([ranks[r][k][0][ranks[r][k][2] > 0] for r in range(size)])
            assert key(together) == key(batch)
        for r, t in enumerate(streams):
            assert [int((w > 0).sum()) for _, _, w in ranks[r]] == t.step_rows(0).tolist()
    # From a position (a stop; a resume in another world), and through the reader process.
    from hvd_train.data.reader import Reader

    train = stream.TrainStream(s, 1, 2, 12, shuffle=True, shuffle_buffer=64)
    count = len(train.slices(50).steps) + len(train.slices(0).steps)
    direct = list(itertools.islice(train.epochs(0, 50), count))
    chunks = iter(Reader(train, 0, 50, slots=2))
    fed = []
    for xc, yc, wc, rows in chunks:
        ends = np.cumsum(rows)
        fed += [(xc[a:e], yc[a:e], wc[a:e]) for a, e in zip(ends - rows, ends)]
        if len(fed) >= count:
            break
    chunks.close()
    for a, b in zip(direct, fed[:count], strict=True):
        for u, v in zip(a, b, strict=True):
            np.testing.assert_array_equal(u, v)
    assert fed[0][0].dtype == np.uint8


GLOBAL_BATCH = 24
# --sync-batchnorm: the CNN's batch statistics over the global batch, as one process computes them.
COMMON = ["--image-size", "16x16", "--model", "cnn", "--filters", "8,8", "--sync-batchnorm", "--seed", "7", "--lr-scaling", "none",
          "--warmup-epochs", "0", "--optimizer", "sgd", "--lr", "0.05", "--progress", "epoch",
          "--shuffle-buffer", "64"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("images")
    make_images(base / "d")
    make_images(base / "corrupt", {"a": 40, "b": 30})
    (base / "corrupt" / "b" / "img-013.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    make_images(base / "lonely", {"a": 60, "b": 37, "c": 1})  # c's image falls in test (seed 7)
    return base


@pytest.fixture(scope="module")
def stopped(folders, tmp_path_factory):
    """A run on the images stopped by SIGINT to its launcher after its first epoch (its checkpoint)."""
    base = tmp_path_factory.mktemp("stop")
    args = ["--dataset", f"images:{folders / 'd'}", *COMMON, "--batch-size", "12", "--epochs", "5",
            "--checkpoint-dir", base / "ckpt"]
    job = Background([REPO / "launch" / "local.sh", "-n", "2", "--gloo", "--", *args, "--output-dir", base / "out",
                      "--stall-timeout", "0"], env={"VENV": str(BIN.parent)})
    job.wait_until(lambda: "epoch 1/5" in job.output, 240, "epoch 1")
    job.proc.send_signal(signal.SIGINT)
    return job.wait(60), job.output, base, args


@pytest.fixture(scope="module")
def runs(folders, stopped, tmp_path_factory):
    d = f"images:{folders / 'd'}"
    _, _, base, stop_args = stopped

    def run(world, *extra, batch=None):
        return ["--dataset", d, *COMMON, "--epochs", "3", *extra, "--batch-size", str(batch or GLOBAL_BATCH // world)]

    plans = {1: {"images": run(1)},
             2: {"images": run(2), "batch_8": run(2, batch=8),
                 "resumed": [*stop_args, "--resume"], "whole": stop_args[:-2],
                 "resnet": ["--dataset", d, "--image-size", "32x32", "--model", "resnet50", "--augment", "flip-crop",
                            "--epochs", "1", "--batch-size", "8", "--progress", "none"],
                 "corrupt": {"args": ["--dataset", f"images:{folders / 'corrupt'}", *COMMON, "--epochs", "1"]},
                 "lonely": {"args": ["--dataset", f"images:{folders / 'lonely'}", *COMMON, "--epochs", "1"]}}}
    return Jobs(tmp_path_factory.mktemp("runs"), plans)


@pytest.mark.integration
def test_n_processes_on_images_equal_one_process_with_n_times_the_batch(runs, folders):
    one, two = runs.finished(1, "images").out, runs.finished(2, "images").out
    m, ref = read_json(two / "metrics.json"), read_json(one / "metrics.json")
    assert m["replicas_identical"] and m["global_batch_size"] == GLOBAL_BATCH == ref["global_batch_size"]
    assert m["steps_per_epoch"] == ref["steps_per_epoch"]
    diff = max_weight_difference(one, two)
    print(f"images, np=2 vs np=1: max |w_2 - w_1| = {diff:.2e}")
    assert diff <= 1e-5
    assert max_weight_difference(one, runs.finished(2, "batch_8").out) > 1e-3, "another global batch differs"
    # Exact facts and test metrics: the saved model scoring every test image in this process.
    x, labels, split = images_by_split(folders / "d")
    prep = read_json(two / "preprocessing.json")
    assert prep["format"] == "images" and prep["input_shape"] == [16, 16, 3]
    assert prep["class_names"] == sorted(IMAGE_CLASSES)
    test = split == stream.TEST
    scores = keras.models.load_model(two / "model.keras")(
        Standardizer.from_dict(prep["scaler"]).transform32(x[test]), training=False).numpy()
    codes = np.array([prep["class_names"].index(v) for v in labels[test]])
    loss = float(np.mean(keras.losses.sparse_categorical_crossentropy(codes, scores).numpy()))
    assert m["test_samples"] == int(test.sum()) and m["test_loss"] == pytest.approx(loss, rel=1e-5)
    assert m["test_accuracy"] == pytest.approx(float(np.mean(scores.argmax(1) == codes)), abs=1e-9)
    # predict: a folder of images, one row per file, the file named.
    assert cli.main(["predict", "--model-dir", str(two), "--input", str(folders / "d" / "square")]) == 0
    rows = (folders / "d" / "square.predictions.csv").read_text().splitlines()
    assert rows[0] == "file,predicted_class,prob_circle,prob_square,prob_stripes" and len(rows) == 56
    assert rows[1].startswith(str(folders / "d" / "square" / "img-000.jpg") + ",")


@pytest.mark.integration
def test_a_stopped_image_run_resumes_to_the_uninterrupted_run(runs, stopped):
    code, output, base, _ = stopped
    assert code == 128 + signal.SIGINT, output[-3000:]
    (stop,) = [e for e in events.read(base / "out" / "events.jsonl") if e["event"] == "run_stopped"]
    print(f"stopped at epoch {stop['epoch']}, position {stop['position']}")
    assert stop["checkpoint"] == str(base / "ckpt" / checkpoint.file_name(stop["epoch"], stop["position"]))
    resumed, whole = runs.finished(2, "resumed"), runs.finished(2, "whole")
    assert f"resuming from {stop['checkpoint']}" in resumed.stdout
    a, b = read_json(resumed.out / "metrics.json"), read_json(whole.out / "metrics.json")
    assert a["replica_weight_digests"] == b["replica_weight_digests"], "bit for bit the uninterrupted run"
    assert (a["test_loss"], a["test_accuracy"]) == (b["test_loss"], b["test_accuracy"])


@pytest.mark.integration
def test_resnet50_behind_augmentation_trains_on_two_processes(runs):
    run = runs.finished(2, "resnet")
    m = read_json(run.out / "metrics.json")
    assert m["replicas_identical"] and m["epochs_completed"] == 1
    model = keras.models.load_model(run.out / "model.keras")
    assert [layer.name for layer in model.layers[1:3]] == ["random_flip", "random_crop"]
    assert model.layers[3].name == "resnet50" and model.input_shape == (None, 32, 32, 3)


@pytest.mark.integration
def test_a_corrupt_image_and_a_class_without_training_images_are_one_message(runs, folders):
    corrupt = runs[2]["corrupt"]
    bad = folders / "corrupt" / "b" / "img-013.png"
    assert not corrupt.ok and all(f"cannot read image {bad}" in e for e in corrupt.errors), corrupt.errors
    lonely = runs[2]["lonely"]
    assert not lonely.ok and all("class 'c' has no training samples" in e for e in lonely.errors), lonely.errors
