"""File datasets for tests: CSV and Parquet folders written here, and the one-process reference
of how a run splits them (every row with its split, read by this process alone)."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hvd_train.data import splitting

FEATURES = ["f0", "f1", "f2", "f3", "f4"]
FILE_ROWS = [250, 0, 37, 313]  # uneven files, one of them empty (header or schema only)


def make_data(directory, kind, n_rows=FILE_ROWS, seed=0):
    """Files of 5 features and a 3-class "label" (low/mid/high) under ``directory``; returns (x, y)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(sum(n_rows), len(FEATURES))) * [1, 2, 3, 0.5, 10] + [0, 1, -2, 5, 100]
    y = np.array(["low", "mid", "high"])[np.digitize(x[:, 0] + 0.3 * x[:, 1], [-1.5, 0.5])]
    start = 0
    for i, n in enumerate(n_rows):
        part = slice(start, start + n)
        start += n
        if kind == "csv":
            with open(directory / f"part-{i}.csv", "w") as f:
                f.write(",".join(FEATURES + ["label"]) + "\n")
                f.writelines(",".join(repr(float(v)) for v in row) + f",{lab}\n" for row, lab in zip(x[part], y[part]))
        else:
            columns = {c: x[part, j] for j, c in enumerate(FEATURES)}
            table = pa.table({**columns, "label": pa.array(y[part], pa.string())})
            pq.write_table(table, directory / f"part-{i}.parquet", row_group_size=64)
    return x, y


def rows_by_split(dataset, seed=7, val=0.1, test=0.2, label="label"):
    """Every row of the files with its split (stream.TRAIN/VAL/TEST): (x, label texts, splits)."""
    return samples_by_split(dataset, label, seed, val, test)


IMAGE_CLASSES = {"circle": 90, "square": 55, "stripes": 31}  # uneven classes


def make_images(directory, classes=None, seed=0):
    """A folder per class of small images (PNG and JPEG alternately, odd sizes 9..40 pixels, some
    grayscale) whose class is visible (a disc, a square, stripes); returns the files in sorted order."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    made = []
    for c, (name, count) in enumerate((classes or IMAGE_CLASSES).items()):
        (directory / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            h, w = (int(v) for v in rng.integers(9, 41, 2))
            a = rng.integers(0, 70, (h, w, 3)).astype(np.uint8)
            yy, xx = np.mgrid[:h, :w]
            shape = [(yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / 3) ** 2,
                     (abs(yy - h / 2) < h / 4) & (abs(xx - w / 2) < w / 4),
                     (xx // 3) % 2 == 0][c % 3]
            a[shape] += np.array([150, 60 + 40 * (c % 3), 90], np.uint8)
            image = Image.fromarray(a).convert("L") if i % 7 == 3 else Image.fromarray(a)
            path = directory / name / f"img-{i:03d}.{'png' if i % 2 else 'jpg'}"
            image.save(path, quality=90) if path.suffix == ".jpg" else image.save(path)
            made.append(path)
    return sorted(made)


def images_by_split(folder, size=(16, 16), seed=7, val=0.1, test=0.2):
    """Every image of an images: folder decoded as a run reads it, with its class and split."""
    return samples_by_split(f"images:{folder}", "class", seed, val, test, image_size=size, image_channels=3)


def samples_by_split(dataset, label, seed=7, val=0.1, test=0.2, **options):
    """Every sample of a file dataset of any format, read as a run reads it (its format's
    module), with its label text and split: (x, labels, splits)."""
    from types import SimpleNamespace

    from hvd_train.data import formats

    src = formats.open_source(dataset, label, SimpleNamespace(**options))
    xs, ys, splits = [], [], []
    for unit in src.units:
        offset = 0
        for x, y in formats.read_unit(src, unit):
            splits.append(splitting.row_splits(seed, unit.file, unit.index, offset, len(y), val, test))
            offset += len(y)
            xs.append(x)
            ys.append(y)
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(splits)


TFRECORD_FILES = (300, 170, 95)  # records per file: 3 files over 2 and 3 ranks


def make_tfrecords(directory, counts=TFRECORD_FILES, image_files=None, seed=0, missing=None):
    """TFRecord files of tf.train.Example records, written by TensorFlow itself: a table (float
    "a", float x2 "b", int64 "c", an int64 class "label") or, with ``image_files``, each file's
    encoded bytes as "image" and its folder's name as a bytes "label" (counts then split them).
    ``missing``: (file, record) whose "c" is left out (a record that does not match the spec)."""
    import tensorflow as tf

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def floats(v):
        return tf.train.Feature(float_list=tf.train.FloatList(value=v))

    def ints(v):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=v))

    def raw(v):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=v))

    if image_files is not None:
        counts = [len(part) for part in np.array_split(np.arange(len(image_files)), 3)]
    done = 0
    for k, n in enumerate(counts):
        with tf.io.TFRecordWriter(str(directory / f"part-{k}.tfrecord")) as w:
            for _ in range(n):
                if image_files is not None:
                    path = image_files[done]
                    feature = {"image": raw([path.read_bytes()]), "label": raw([path.parent.name.encode()])}
                else:
                    x = rng.normal(size=4) * [1, 2, 1, 3]
                    y = int(x[0] + 0.5 * x[1] > 0) + int(x[0] > 1)
                    feature = {"a": floats([x[0]]), "b": floats([x[1], x[2]]), "c": ints([int(x[3] * 10)]),
                               "label": ints([y])}
                    if missing == (k, done - sum(counts[:k])):
                        del feature["c"]
                w.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
                done += 1
