"""The formats beyond tables, images:DIR (a folder per class) and tfrecord:PATH (tf.train.Example
records: a table, or encoded images): listed, split per sample, decoded in the reader processes
and streamed in shares with the guarantees of every other path (disjoint and complete shares,
equal steps, exact facts and metrics, N x b == 1 x N*b; stop and resume bit for bit:
tests/parallel/test_collectives.py), Keras's
ResNet50 behind augmentation, predict on image files and records, and one message for a bad
image, a record that does not match the spec, or files that disagree."""
import itertools
import os
import shutil
from types import SimpleNamespace

import keras
import numpy as np
import pytest
from conftest import Jobs, max_weight_difference, read_json
from files import IMAGE_CLASSES, TFRECORD_FILES, images_by_split, make_images, make_tfrecords, samples_by_split

from hvd_train import cli
from hvd_train.config.options import ConfigError, TrainConfig
from hvd_train.data import formats, images, stream, tfrecord
from hvd_train.data.interface import DataError, Standardizer

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
    with pytest.raises(ConfigError, match="images train classification only"):
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
    # hvd-train plan: every class's counts, and each rank's units, as for tables.
    lines = s.plan_lines(2, 64)
    assert lines[0].startswith(f"data: {len(x)} image file(s)") and "(runs of 64 images)" in lines[0]
    assert lines[1].startswith("rank 0 reads 2 unit(s): ") and lines[2].startswith("rank 1 reads 1 unit(s): ")


def test_tfrecord_spec_is_checked_against_the_first_records(tmp_path):
    make_tfrecords(tmp_path / "t")
    src = formats.open_source(f"tfrecord:{tmp_path / 't'}", "label")
    assert src.columns == ("a", "b[0]", "b[1]", "c", "label") and src.shape == (4,)
    # Units of records, not whole files: 300 = 256 + 44, 170, 95.
    assert [(u.file, u.index) for u in src.units] == [(0, 0), (0, 1), (1, 0), (2, 0)]
    (x, y), = formats.read_unit(src, src.units[1])
    assert x.shape == (44, 4) and set(y) <= {"0", "1", "2"}
    assert tfrecord.masked_crc(b"\x00" * 8) == 0x07980329  # what TensorFlow writes for an empty record
    files = sorted((tmp_path / "t").iterdir())

    def message(dataset, label="label", **options):
        with pytest.raises(DataError) as err:
            src = formats.open_source(dataset, label, SimpleNamespace(**options))
            for unit in src.units:
                list(formats.read_unit(src, unit))
        return str(err.value)

    where = f"tfrecord:{tmp_path / 't'}"
    assert message(where, "y") == (f"label feature 'y' not found in {files[0]}'s first record; its features are: "
                                   "a (float x1), b (float x2), c (int64 x1), label (int64 x1)")
    assert "--image-feature 'a' must be a bytes feature holding an encoded image" in message(where, image_feature="a")
    images_files = make_images(tmp_path / "img", {"p": 6, "q": 5})
    make_tfrecords(tmp_path / "ti", image_files=images_files)
    assert "feature 'image' is bytes, not a number: give --image-feature image" in message(
        f"tfrecord:{tmp_path / 'ti'}")
    src = formats.open_source(f"tfrecord:{tmp_path / 'ti'}", "label", SimpleNamespace(
        image_feature="image", image_size=(8, 8), image_channels=3))
    assert src.shape == (8, 8, 3) and src.dtype == "uint8"
    (x, y), = formats.read_unit(src, src.units[0])
    assert x.shape == (4, 8, 8, 3) and y.tolist() == ["p"] * 4
    # Files that disagree, a truncated file, something else, a later record without a feature.
    cut = tmp_path / "cut.tfrecord"
    cut.write_bytes(files[2].read_bytes()[:-7])
    assert f"{cut}: truncated TFRecord file (record 95 ends past the end)" == message(f"tfrecord:{cut}")
    other = tmp_path / "other.tfrecord"
    first = files[2].read_bytes()
    length = int.from_bytes(first[:8], "little")
    other.write_bytes(first[:16 + length] + b"garbage" * 30)
    assert "record 2: its length's checksum does not match" in message(f"tfrecord:{other}")
    import tensorflow as tf

    late = tmp_path / "late.tfrecord"
    with tf.io.TFRecordWriter(str(late)) as w:
        for k in range(5):
            feature = {"a": tf.train.Feature(float_list=tf.train.FloatList(value=[1.0])),
                       "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[k % 2]))}
            if k == 3:
                del feature["a"]
            w.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    assert message(f"tfrecord:{late}") == (f"{late} record 4: feature 'a' is missing, the first record's spec has "
                                           "1 number(s)")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(files[0], mixed / "a.tfrecord")
    shutil.copy(late, mixed / "b.tfrecord")
    assert message(f"tfrecord:{mixed}") == (f"{mixed / 'b.tfrecord'} has features ('a',), but {mixed / 'a.tfrecord'} "
                                            "has ('a', 'b[0]', 'b[1]', 'c'): all files need one spec")
    with pytest.raises(ConfigError, match="--image-feature names a feature of tfrecord: records"):
        TrainConfig(dataset="images:x", image_feature="image")


GLOBAL_BATCH = 24
TABLE_BATCH = 30  # tfrecord: tables, 3 files over 1, 2 and 3 ranks
TABLE = ["--seed", "7", "--lr-scaling", "none", "--warmup-epochs", "0", "--optimizer", "sgd", "--lr", "0.05",
         "--epochs", "3", "--shuffle-buffer", "100", "--progress", "none"]
# --sync-batchnorm: the CNN's batch statistics over the global batch, as one process computes them.
COMMON = ["--image-size", "16x16", "--model", "cnn", "--filters", "8,8", "--sync-batchnorm", "--seed", "7",
          "--lr-scaling", "none", "--warmup-epochs", "0", "--optimizer", "sgd", "--lr", "0.05", "--progress", "epoch",
          "--shuffle-buffer", "64"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("images")
    make_images(base / "d")
    make_images(base / "corrupt", {"a": 40, "b": 30})
    (base / "corrupt" / "b" / "img-013.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    make_images(base / "lonely", {"a": 60, "b": 37, "c": 1})  # c's image falls in test (seed 7)
    make_tfrecords(base / "tfr")
    make_tfrecords(base / "tfr_bad", missing=(2, 40))
    make_tfrecords(base / "tfr_images", image_files=sorted((base / "d").rglob("img-*")))
    return base


@pytest.fixture(scope="module")
def runs(folders, tmp_path_factory):
    d = f"images:{folders / 'd'}"

    def run(world, *extra, batch=None):
        return ["--dataset", d, *COMMON, "--epochs", "3", *extra, "--batch-size", str(batch or GLOBAL_BATCH // world)]

    def table(world, name="tfr"):
        return ["--dataset", f"tfrecord:{folders / name}", "--label-column", "label", *TABLE,
                "--batch-size", str(TABLE_BATCH // world)]

    def tfr_images(world):
        return ["--dataset", f"tfrecord:{folders / 'tfr_images'}", "--label-column", "label", "--image-feature",
                "image", *COMMON, "--epochs", "2", "--batch-size", str(GLOBAL_BATCH // world)]

    plans = {1: {"images": run(1), "tfrecord": table(1), "tfr_images": tfr_images(1)},
             3: {"tfrecord": table(3)},
             2: {"images": run(2), "batch_8": run(2, batch=8),
                 "resnet": ["--dataset", d, "--image-size", "32x32", "--model", "resnet50", "--augment", "flip-crop",
                            "--epochs", "1", "--batch-size", "8", "--progress", "none"],
                 "corrupt": {"args": ["--dataset", f"images:{folders / 'corrupt'}", *COMMON, "--epochs", "1"]},
                 "lonely": {"args": ["--dataset", f"images:{folders / 'lonely'}", *COMMON, "--epochs", "1"]},
                 "tfrecord": table(2), "tfr_images": tfr_images(2), "tfr_bad": {"args": table(2, "tfr_bad")}}}
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


@pytest.mark.integration
def test_tfrecord_tables_over_three_files_equal_one_process_at_two_and_three(runs, folders):
    one = runs.finished(1, "tfrecord").out
    ref = read_json(one / "metrics.json")
    for world in (2, 3):
        out = runs.finished(world, "tfrecord").out
        m = read_json(out / "metrics.json")
        assert m["replicas_identical"] and m["steps_per_epoch"] == ref["steps_per_epoch"]
        diff = max_weight_difference(one, out)
        print(f"tfrecord table, np={world} vs np=1: max |w_N - w_1| = {diff:.2e}")
        assert diff <= 1e-5
    # Exact facts and metrics at np=3: the saved model scoring every test record here.
    x, labels, split = samples_by_split(f"tfrecord:{folders / 'tfr'}", "label")
    assert len(x) == sum(TFRECORD_FILES)
    train, test = split == stream.TRAIN, split == stream.TEST
    prep = read_json(out / "preprocessing.json")
    assert prep["class_names"] == ["0", "1", "2"] and prep["feature_names"] == ["a", "b[0]", "b[1]", "c"]
    np.testing.assert_allclose(prep["scaler"]["mean"], x[train].mean(axis=0), rtol=1e-12)
    scores = keras.models.load_model(out / "model.keras")(
        Standardizer.from_dict(prep["scaler"]).transform(x[test]), training=False).numpy()
    codes = labels[test].astype(int)
    loss = float(np.mean(keras.losses.sparse_categorical_crossentropy(codes, scores).numpy()))
    assert m["test_samples"] == int(test.sum()) and m["test_loss"] == pytest.approx(loss, rel=1e-5)
    # A record that does not match the spec: one message on both ranks, naming it.
    bad = runs[2]["tfr_bad"]
    assert not bad.ok and all("part-2.tfrecord record 41: feature 'c' is missing" in e for e in bad.errors), bad.errors


@pytest.mark.integration
def test_tfrecord_images_equal_one_process_and_predict_names_each_record(runs, folders):
    one, two = runs.finished(1, "tfr_images").out, runs.finished(2, "tfr_images").out
    assert read_json(two / "metrics.json")["replicas_identical"]
    diff = max_weight_difference(one, two)
    print(f"tfrecord images, np=2 vs np=1: max |w_2 - w_1| = {diff:.2e}")
    assert diff <= 1e-5
    assert cli.main(["predict", "--model-dir", str(two), "--input", f"tfrecord:{folders / 'tfr_images'}"]) == 0
    rows = (folders / "tfr_images.predictions.csv").read_text().splitlines()
    assert len(rows) == 1 + sum(IMAGE_CLASSES.values())
    assert rows[1].startswith(f"{folders / 'tfr_images' / 'part-0.tfrecord'} record 1,")


def test_keras_architectures_and_augmentation_are_built_from_options():
    from hvd_train.training.model import check_inputs, model_for

    config = TrainConfig(dataset="images:x", model="mobilenetv2", augment="flip", dropout=0.1)
    model = model_for(config)((32, 32, 1), 4)
    assert model.output_shape == (None, 4) and model.layers[1].name == "random_flip"
    assert model.layers[2].name == "mobilenetv2" and model.layers[-1].dtype_policy.name == "float32"
    assert "needs images of at least 32x32" in check_inputs(config, (16, 16, 3), "images:x")
    assert "a table): use --model mlp" in check_inputs(config, (5,), "csv:x")
    assert "--augment crop is for images" in check_inputs(TrainConfig(augment="crop"), (5,), "iris")
    with pytest.raises(ConfigError, match="--sync-batchnorm is for hvd_train's own models"):
        TrainConfig(model="resnet50", sync_batchnorm=True)
