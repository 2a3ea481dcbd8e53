"""hvd-bench --sections images: training throughput on images, measured on a folder it generates.

A folder of JPEG images (3 classes, sizes around the target size, so every image is decoded and
resized) and the same images as 3 TFRecord files. Per path, one launch (horovodrun, Gloo, 2
epochs, batch 32 per process), the training part of the last epoch (its begin to its last
batch: the first epoch also traces), and the CPU seconds of the training process and of its
reader process:
- the small CNN (``--model cnn``) on the folder streamed (decoded in the reader processes) at
  np=1 and np=2, on the folder with ``--reader thread`` (decoded in the training process), on
  the TFRecord files at np=1 and np=2, and on the same images decoded once and passed in memory
  (``train(data=(x, y))``) at np=1 and np=2;
- the anchor a user would pick: plain Keras, one process, no Horovod, the same model on
  ``keras.utils.image_dataset_from_directory`` + the same standardisation + ``prefetch``;
- ResNet50 (``--model resnet50``, weights=None) on the folder at np=1 and np=2;
- synthetic-data ResNet50 images/s at np=1 and np=2 (random images in memory; the figure
  Horovod's own benchmark publishes, here at the section's small size on CPU cores).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import numpy as np

BIN = Path(sys.executable).parent
EPOCHS = 2
BATCH = 32
CLASSES = ("disc", "square", "stripes")


def generate(directory: Path, count: int, size: int, seed: int = 0) -> Dict[str, Path]:
    """``count`` JPEGs in a folder per class, each 0.75-1.5x ``size`` on a side; the same files as
    3 TFRecord files (written by TensorFlow's own writer, in a subprocess: the driver stays free
    of TensorFlow)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder = directory / "folder"
    for name in CLASSES:
        (folder / name).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        c = i % len(CLASSES)
        h, w = (int(v) for v in rng.integers(int(size * 0.75), int(size * 1.5) + 1, 2))
        a = rng.integers(0, 80, (h, w, 3)).astype(np.uint8)
        yy, xx = np.mgrid[:h, :w]
        mask = [(yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / 3) ** 2,
                (abs(yy - h / 2) < h / 4) & (abs(xx - w / 2) < w / 4), (xx // 4) % 2 == 0][c]
        a[mask] += np.array([140, 50 + 50 * c, 90], np.uint8)
        Image.fromarray(a).save(folder / CLASSES[c] / f"{i:06d}.jpg", quality=90)
    tfrecords = directory / "tfrecord"
    subprocess.run([str(BIN / "python"), "-m", "hvd_train.tools.bench.imagepath", "tfrecords", str(folder),
                    str(tfrecords)], check=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    return {"folder": folder, "tfrecord": tfrecords}


def write_tfrecords(folder: str, out: str) -> None:
    import tensorflow as tf

    files = sorted(Path(folder).rglob("*.jpg"))
    Path(out).mkdir(parents=True, exist_ok=True)
    for k, part in enumerate(np.array_split(np.arange(len(files)), 3)):
        with tf.io.TFRecordWriter(f"{out}/part-{k}.tfrecord") as w:
            for i in part:
                feature = {"image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[files[i].read_bytes()])),
                           "label": tf.train.Feature(bytes_list=tf.train.BytesList(
                               value=[files[i].parent.name.encode()]))}
                w.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())


class _Timing:
    """Keras callback factory: each epoch's training part (begin to last batch)."""

    @staticmethod
    def make(record: Dict[str, Any]):
        import keras

        class Timing(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                record["begin"] = time.perf_counter()

            def on_train_batch_end(self, batch, logs=None):
                record["trained"] = time.perf_counter() - record["begin"]
                record["batches"] = batch + 1

        return Timing()


def worker(mode: str, spec: str, model: str, size: str, out_dir: str, result_dir: str) -> None:
    """Under horovodrun (or alone, for ``keras``): one path; its figures to result_dir."""
    side = int(size)
    timing: Dict[str, Any] = {}
    record: Dict[str, Any] = {"rank": 0}
    if mode == "keras":
        import keras
        import tensorflow as tf

        from ...training.model import build_cnn

        ds = keras.utils.image_dataset_from_directory(spec, image_size=(side, side), batch_size=BATCH, seed=7,
                                                      label_mode="int", verbose=False)
        count = sum(1 for _ in Path(spec).rglob("*.jpg"))
        # The per-channel standardisation hvd_train applies (from a sample: a constant here).
        mean, std = tf.constant([90.0, 90.0, 90.0]), tf.constant([60.0, 60.0, 60.0])
        ds = ds.map(lambda x, y: ((x - mean) / std, y), num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
        net = build_cnn((side, side, 3), len(CLASSES), filters=(16, 32))
        net.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                    jit_compile=False)
        net.fit(ds, epochs=EPOCHS, verbose=0, callbacks=[_Timing.make(timing)])
        record.update(train_samples_per_second=count / timing["trained"], training_cpu_s=time.process_time(),
                      reader_cpu_s=0.0)
    else:
        import horovod.tensorflow as hvd

        hvd.init()
        record["rank"] = hvd.rank()
        from hvd_train import TrainConfig, train

        kind = "tfrecord" if mode.startswith("tfrecord") else "images"
        common = dict(epochs=EPOCHS, batch_size=BATCH, warmup_epochs=0, progress="none", output_dir=out_dir,
                      model=model, filters=(16, 32), image_size=(side, side), optimizer="adam", lr=1e-3,
                      val_fraction=0.1, reader="thread" if mode == "folder_thread" else "process")
        data = None
        if mode in ("memory", "synthetic"):
            config = TrainConfig(dataset="iris", **common)
            data = _arrays(spec, side) if mode == "memory" else _synthetic(side)
        else:
            config = TrainConfig(dataset=f"{kind}:{spec}", label_column="label" if kind == "tfrecord" else None,
                                 image_feature="image" if kind == "tfrecord" else None, **common)
        result = train(config, data=data, callbacks=[_Timing.make(timing)])
        samples = timing["batches"] * BATCH * hvd.size()  # steps of the last epoch x the global batch
        samples = min(samples, result.plan.train_samples)
        from ...data.reader import USAGE

        record.update(train_samples_per_second=samples / timing["trained"], training_cpu_s=time.process_time(),
                      reader_cpu_s=sum(u["cpu_s"] for u in USAGE))
    with open(os.path.join(result_dir, f"{mode}-{record['rank']}.json"), "w") as f:
        json.dump(record, f)


def _arrays(folder: str, side: int):
    """The folder's images decoded once, as a run decodes them (images.decode), with their classes."""
    from types import SimpleNamespace

    from ...data import formats

    src = formats.open_source(f"images:{folder}", "class", SimpleNamespace(image_size=(side, side),
                                                                           image_channels=3))
    xs, ys = [], []
    for unit in src.units:
        for x, y in formats.read_unit(src, unit):
            xs.append(x)
            ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


SYNTHETIC_IMAGES = 512


def _synthetic(side: int):
    rng = np.random.default_rng(0)
    return (rng.integers(0, 255, (SYNTHETIC_IMAGES, side, side, 3)).astype(np.uint8),
            np.array(CLASSES)[rng.integers(0, 3, SYNTHETIC_IMAGES)])


def launch(mode: str, np_: int, spec: str, model: str, size: int, work: Path, timeout: int) -> List[Dict[str, Any]]:
    from ...launchers.horovodrun import local_command

    results = work / f"res-{mode}-{model}-{np_}-{time.monotonic_ns()}"
    results.mkdir(parents=True)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    program = [str(BIN / "python"), "-m", "hvd_train.tools.bench.imagepath", mode, spec, model, str(size),
               str(results / "out"), str(results)]
    cmd = program if mode == "keras" else [*local_command(np_), *program]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"images {mode} {model} np={np_} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return [json.loads((results / f"{mode}-{r}.json").read_text()) for r in range(np_)]


# (name, mode, model, np)
PATHS = (("cnn_folder_np1", "folder", "cnn", 1), ("cnn_folder_np2", "folder", "cnn", 2),
         ("cnn_folder_thread_np1", "folder_thread", "cnn", 1),
         ("cnn_tfrecord_np1", "tfrecord", "cnn", 1), ("cnn_tfrecord_np2", "tfrecord", "cnn", 2),
         ("cnn_memory_np1", "memory", "cnn", 1), ("cnn_memory_np2", "memory", "cnn", 2),
         ("cnn_keras_np1", "keras", "cnn", 1),
         ("resnet50_folder_np1", "folder", "resnet50", 1), ("resnet50_folder_np2", "folder", "resnet50", 2),
         ("resnet50_synthetic_np1", "synthetic", "resnet50", 1), ("resnet50_synthetic_np2", "synthetic", "resnet50", 2))


# hvd-bench --quick (the test suite): one launch of each kind of path (folder, TFRecord at np=2,
# in memory, plain Keras); ResNet50 runs the same code with another model.
QUICK_PATHS = ("cnn_folder_np1", "cnn_tfrecord_np2", "cnn_memory_np1", "cnn_keras_np1")


def images_section(work: Path, count: int, size: int, timeout: int, log: Callable[[str], None],
                   repeats: int = 1, quick: bool = False, models: tuple = ("cnn", "resnet50")) -> Dict[str, Any]:
    files = generate(work / "images", count, size)
    out: Dict[str, Any] = {"images": count, "size": size, "epochs": EPOCHS, "batch": BATCH, "paths": {}}
    paths = [p for p in PATHS if (not quick or p[0] in QUICK_PATHS) and p[2] in models]
    for k in range(repeats):  # interleaved: a repeat of every path before the next
        for name, mode, model, np_ in paths:
            spec = str(files["tfrecord"] if mode == "tfrecord" else files["folder"])
            ranks = launch(mode, np_, spec, model, size, work, timeout)
            figures = {"train_samples_per_second": ranks[0]["train_samples_per_second"],
                       "training_cpu_s": max(r["training_cpu_s"] for r in ranks),
                       "reader_cpu_s_per_epoch": max(r["reader_cpu_s"] for r in ranks) / EPOCHS}
            out["paths"].setdefault(name, []).append(figures)
            log(f"images {name} (repeat {k + 1}): {figures}")
    return out


def median(results: Dict[str, Any], name: str, key: str = "train_samples_per_second") -> float:
    values = [r[key] for r in results["paths"].get(name, [])]
    return float(np.median(values)) if values else float("nan")


def lines(results: Dict[str, Any]) -> List[str]:
    r = results
    md = [f"## Images ({r['images']:,} generated JPEGs resized to {r['size']}x{r['size']}, {r['epochs']} epochs, "
          f"batch {r['batch']} per process, Gloo)", "",
          "Training samples/s: the training part of the last epoch (median of the repeats). CPU: seconds of the "
          "training process (whole run) and of its reader process per epoch.", "",
          "| path | samples/s | training CPU s | reader CPU s per epoch |", "| --- | ---: | ---: | ---: |"]
    for name, *_ in PATHS:
        if name in r["paths"]:
            md.append(f"| {name} | {median(r, name):.0f} | {median(r, name, 'training_cpu_s'):.1f} | "
                      f"{median(r, name, 'reader_cpu_s_per_epoch'):.2f} |")
    t = targets(r)
    md += ["", "Against the targets:",
           f"- the folder streamed / the same images in memory, np=1: {t['folder_vs_memory']:.2f} (>= 0.9)",
           f"- scaling np=2/np=1: folder {t['folder_scaling']:.2f}, in memory {t['memory_scaling']:.2f} "
           f"({t['folder_scaling'] / t['memory_scaling'] - 1:+.0%}; within 10%)",
           f"- hvd_train np=1 on the folder / plain Keras image_dataset_from_directory: {t['vs_keras']:.2f} (>= 1.0)",
           f"- decoding off the training process: the folder's training-process CPU {t['cpu_process']:.1f} s with "
           f"reader processes, {t['cpu_thread']:.1f} s decoding in it (--reader thread), samples/s "
           f"{median(r, 'cnn_folder_np1'):.0f} vs {median(r, 'cnn_folder_thread_np1'):.0f}",
           f"- TFRecord / folder at np=1: {median(r, 'cnn_tfrecord_np1') / median(r, 'cnn_folder_np1'):.2f}",
           f"- ResNet50 on the folder np=1/np=2: {median(r, 'resnet50_folder_np1'):.1f} / "
           f"{median(r, 'resnet50_folder_np2'):.1f} samples/s; synthetic {median(r, 'resnet50_synthetic_np1'):.1f} / "
           f"{median(r, 'resnet50_synthetic_np2'):.1f} images/s"]
    return md


def targets(r: Dict[str, Any]) -> Dict[str, float]:
    return {"folder_vs_memory": median(r, "cnn_folder_np1") / median(r, "cnn_memory_np1"),
            "folder_scaling": median(r, "cnn_folder_np2") / median(r, "cnn_folder_np1"),
            "memory_scaling": median(r, "cnn_memory_np2") / median(r, "cnn_memory_np1"),
            "vs_keras": median(r, "cnn_folder_np1") / median(r, "cnn_keras_np1"),
            "cpu_process": median(r, "cnn_folder_np1", "training_cpu_s"),
            "cpu_thread": median(r, "cnn_folder_thread_np1", "training_cpu_s")}


if __name__ == "__main__":
    if sys.argv[1] == "tfrecords":
        write_tfrecords(sys.argv[2], sys.argv[3])
    else:
        worker(*sys.argv[1:7])
