"""File datasets for tests: CSV and Parquet folders written here, and the one-process reference
of how a run splits them (every row with its split, read by this process alone)."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hvd_train.data import sources, stream

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
    src = sources.open_source(dataset, label)
    xs, ys, splits = [], [], []
    for unit in src.units:
        offset = 0
        for x, y in sources.read_unit(src, unit):
            splits.append(stream.row_splits(seed, unit.file, unit.index, offset, len(y), val, test))
            offset += len(y)
            xs.append(x)
            ys.append(y)
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(splits)


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
    from types import SimpleNamespace

    from hvd_train.data import images

    src = images.source_of("images", str(folder), "class", SimpleNamespace(image_size=size, image_channels=3))
    xs, ys, splits = [], [], []
    for unit in src.units:
        for x, y in images.read_unit(src, unit):
            splits.append(stream.row_splits(seed, unit.file, unit.index, 0, len(y), val, test))
            xs.append(x)
            ys.append(y)
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(splits)
