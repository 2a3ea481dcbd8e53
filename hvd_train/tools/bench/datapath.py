"""hvd-bench --sections data: the file-data path, measured on files it generates.

For each size (rows x 40 float features + a string label), CSV and Parquet (row groups of 64k):
- parse: pyarrow.csv.read_csv of the whole CSV vs hvd_train's unit reader over the same file
  (one process, MB/s);
- per launch (horovodrun, Gloo, 2 epochs): seconds from launch to the first training step, per-rank
  peak RSS, and the last epoch's samples/s (validation included; the first epoch also traces);
  streamed from the files at np=1 and np=2, and the same rows passed in memory
  (``train(data=(x, y))``) at np=1, the path small data takes. Each launch's baseline is the same
  launch on a 2,000-row file: "data memory" and "data seconds to the first step" are what the
  rows add to TensorFlow, Horovod, pyarrow's libraries, the model and start-up. An idle
  TensorFlow+Horovod process's RSS is reported too.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import numpy as np

BIN = Path(sys.executable).parent
FEATURES = 40


def generate(directory: Path, rows: int, seed: int = 0) -> Dict[str, Path]:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [f"f{i}" for i in range(FEATURES)]
    csv_path, pq_path = directory / f"data-{rows}.csv", directory / f"data-{rows}.parquet"
    writer_csv, writer_pq = None, None
    for start in range(0, rows, 131_072):  # whole row groups of 65,536 rows but the file's last
        n = min(131_072, rows - start)
        x = rng.normal(size=(n, FEATURES)).astype(np.float32)
        label = np.array(["alpha", "beta", "gamma"])[np.digitize(x[:, 0] + x[:, 1], [-0.7, 0.7])]
        table = pa.table({**{c: x[:, i] for i, c in enumerate(names)}, "label": label})
        if writer_csv is None:
            writer_csv = pacsv.CSVWriter(str(csv_path), table.schema)
            writer_pq = pq.ParquetWriter(str(pq_path), table.schema)
        writer_csv.write_table(table)
        writer_pq.write_table(table, row_group_size=65536)
    writer_csv.close()
    writer_pq.close()
    return {"csv": csv_path, "parquet": pq_path}


def parse_figures(csv_path: Path) -> Dict[str, float]:
    import pyarrow.csv as pacsv

    from ...data import sources

    size = os.path.getsize(csv_path)
    start = time.perf_counter()
    table = pacsv.read_csv(str(csv_path))
    np.stack([table.column(i).to_numpy() for i in range(FEATURES)], axis=1).astype(np.float32)
    pyarrow_s = time.perf_counter() - start
    del table
    start = time.perf_counter()
    src = sources.open_source(f"csv:{csv_path}", "label")
    rows = sum(len(y) for unit in src.units for _, y in sources.read_unit(src, unit))
    ours_s = time.perf_counter() - start
    return {"mb": size / 1e6, "rows": rows, "pyarrow_read_csv_s": pyarrow_s, "hvd_train_units_s": ours_s,
            "pyarrow_mb_s": size / 1e6 / pyarrow_s, "hvd_train_mb_s": size / 1e6 / ours_s}


def worker(mode: str, spec: str, out_dir: str, result_dir: str) -> None:
    """Under horovodrun: streamed by reader processes (mode "stream"), by a reader thread
    ("thread"), in memory ("memory"), or idle. A rank's memory is its own peak RSS plus its
    reader process's (both peaks, an upper bound); the reader's CPU seconds are reported too."""
    launched = float(os.environ["BENCH_LAUNCHED"])
    import horovod.tensorflow as hvd
    import keras

    hvd.init()
    record: Dict[str, Any] = {"rank": hvd.rank()}
    first = {}

    class FirstStep(keras.callbacks.Callback):
        """The first step's start, and each epoch's training part (its begin to its last batch's
        end: the validation after it reads files on the streamed paths, arrays in memory)."""

        def on_train_batch_begin(self, batch, logs=None):
            first.setdefault("t", time.time())

        def on_epoch_begin(self, epoch, logs=None):
            first["begin"] = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            first["trained"] = time.perf_counter() - first["begin"]

    if mode != "idle":
        from hvd_train import TrainConfig, train

        config = TrainConfig(dataset="iris" if mode == "memory" else spec, label_column="label", epochs=EPOCHS,
                             batch_size=256, warmup_epochs=0, progress="none", output_dir=out_dir,
                             hidden=(256, 256), threads=1, reader="thread" if mode == "thread" else "process")
        data = None
        if mode == "memory":
            import pyarrow.parquet as pq

            table = pq.read_table(spec.split(":", 1)[1])
            x = np.stack([table.column(f"f{i}").to_numpy() for i in range(FEATURES)], axis=1)
            data = (x, table.column("label").to_numpy(zero_copy_only=False))
            del table
        result = train(config, data=data, callbacks=[FirstStep()])
        with open(os.path.join(out_dir, "events.jsonl")) as f:
            last = [e for e in map(json.loads, f) if e.get("event") == "epoch"][-1]
        # The last epoch (validation included): the first one also traces the graph.
        record.update(first_step_s=first["t"] - launched,
                      samples_per_second=result.plan.train_samples / last["seconds"],
                      train_samples_per_second=result.plan.train_samples / first["trained"])
    # The reader processes have ended (each fit closes its own, noting what it used). Their peak is
    # their own since exec (RUSAGE_CHILDREN's would count the parent's pages they were forked with).
    from ...data.reader import USAGE

    record.update(reader_cpu_s=sum(u["cpu_s"] for u in USAGE),
                  reader_peak_rss_mb=max((u["peak_rss_mb"] for u in USAGE), default=0.0),
                  training_cpu_s=time.process_time())
    record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 + record["reader_peak_rss_mb"]
    with open(os.path.join(result_dir, f"{mode}-{record['rank']}.json"), "w") as f:
        json.dump(record, f)


def launch(mode: str, np_: int, spec: str, work: Path, timeout: int) -> List[Dict[str, Any]]:
    from ...launchers.horovodrun import local_command  # the driver's side only: workers import this module too

    results = work / f"res-{mode}-{np_}-{time.monotonic_ns()}"
    results.mkdir(parents=True)
    env = dict(os.environ, BENCH_LAUNCHED=str(time.time()), TF_CPP_MIN_LOG_LEVEL="2")
    cmd = [*local_command(np_), str(BIN / "python"), "-m", "hvd_train.tools.bench.datapath", mode, spec,
           str(results / "out"), str(results)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"{mode} np={np_} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return [json.loads((results / f"{mode}-{r}.json").read_text()) for r in range(np_)]


PATHS = ("csv_stream_np1", "csv_stream_np2", "parquet_stream_np1", "parquet_stream_np2", "memory_np1", "memory_np2",
         "csv_thread_np1", "parquet_thread_np1")
TINY_ROWS = 2000
EPOCHS = 2


def _launch_path(path: str, files: Dict[str, Path], work: Path, timeout: int) -> List[Dict[str, Any]]:
    *what, world = path.split("_")  # csv_stream_np2 -> (csv, stream), np2; memory_np1 -> (memory,), np1
    if what == ["memory"]:
        return launch("memory", int(world[2:]), f"parquet:{files['parquet']}", work, timeout)
    kind, mode = what
    return launch(mode, int(world[2:]), f"{kind}:{files[kind]}", work, timeout)


def data_section(work: Path, sizes: List[int], timeout: int, log: Callable[[str], None]) -> Dict[str, Any]:
    out: Dict[str, Any] = {"sizes": {}, "baselines": {}}
    out["idle_rss_mb"] = max(r["peak_rss_mb"] for r in launch("idle", 1, "-", work, timeout))
    # Each path's baseline: the same launch on a file of 2,000 rows (the libraries, the model,
    # TensorFlow's start-up and tracing), so "data" figures are what the rows add.
    tiny, base_ranks = generate(work / "tiny", TINY_ROWS), {}
    for path in PATHS:
        ranks = base_ranks[path] = _launch_path(path, tiny, work, timeout)
        out["baselines"][path] = {"peak_rss_mb": max(r["peak_rss_mb"] for r in ranks),
                                  "first_step_s": max(r["first_step_s"] for r in ranks)}
        log(f"data baseline {path}: peak {out['baselines'][path]['peak_rss_mb']:.0f} MB, "
            f"first step {out['baselines'][path]['first_step_s']:.1f} s")
    for rows in sizes:
        files = tiny if rows == TINY_ROWS else generate(work / "data", rows)
        entry: Dict[str, Any] = {"parse": parse_figures(files["csv"])}
        log(f"data {rows} rows: parse {entry['parse']}")
        for path in PATHS:
            base = out["baselines"][path]
            # The baseline's own size (hvd-bench --quick): its launch is that size's measurement.
            ranks = base_ranks[path] if rows == TINY_ROWS else _launch_path(path, files, work, timeout)
            first = max(r["first_step_s"] for r in ranks)
            entry[path] = {"first_step_s": first, "data_first_step_s": first - base["first_step_s"],
                           "data_mb_per_rank": max(r["peak_rss_mb"] for r in ranks) - base["peak_rss_mb"],
                           "samples_per_second": ranks[0]["samples_per_second"],
                           "train_samples_per_second": ranks[0]["train_samples_per_second"],
                           "reader_cpu_s_per_epoch": max(r["reader_cpu_s"] for r in ranks) / EPOCHS,
                           "training_cpu_s": max(r["training_cpu_s"] for r in ranks)}
            log(f"data {rows} rows {path}: {entry[path]}")
        out["sizes"][str(rows)] = entry
    return out


def training_speed(path: Dict[str, Any]) -> float:
    """samples/s of the training part of the last epoch (results from before it was measured:
    the whole epoch's)."""
    return path.get("train_samples_per_second", path["samples_per_second"])


def by_rows(results: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """The sizes in order of rows (results.json sorts its keys as text)."""
    return dict(sorted(results["sizes"].items(), key=lambda kv: int(kv[0])))


def ratios(e: Dict[str, Any], kind: str) -> Dict[str, float]:
    """One size's figures for the targets, for ``kind`` (csv, parquet) streamed: training speed
    vs in memory at np=1, np=2/np=1, in memory's np=2/np=1 (nan before it was measured), and
    data memory per rank np=2 / np=1."""
    one, two, memory = e[f"{kind}_stream_np1"], e[f"{kind}_stream_np2"], training_speed(e["memory_np1"])
    return {"vs_memory": training_speed(one) / memory,
            "np2_np1": training_speed(two) / training_speed(one),
            "memory_np2_np1": training_speed(e["memory_np2"]) / memory if "memory_np2" in e else float("nan"),
            "memory_share": two["data_mb_per_rank"] / max(one["data_mb_per_rank"], 1)}


def growth(results: Dict[str, Any], kind: str) -> float:
    """Data memory per rank at np=1, the largest size over the smallest (nan for one size)."""
    sizes = list(by_rows(results).values())
    if len(sizes) < 2:
        return float("nan")
    a, b = sizes[0][f"{kind}_stream_np1"], sizes[-1][f"{kind}_stream_np1"]
    return b["data_mb_per_rank"] / max(a["data_mb_per_rank"], 1)


def lines(results: Dict[str, Any]) -> List[str]:
    """The section as Markdown, ratios first."""
    md = [f"## Data path (csv:/parquet: files, Gloo, {EPOCHS} epochs, MLP 40-256-256-3, batch 256 per process)", "",
          f"Peak RSS of an idle TensorFlow+Horovod process: {results['idle_rss_mb']:.0f} MB. Each path's baseline "
          f"is the same launch on a {TINY_ROWS:,}-row file; \"data MB\" is peak RSS minus the baseline's, \"data "
          f"s\" the launch-to-first-step time minus the baseline's (start-up, model, tracing). samples/s: the last "
          f"epoch, validation included.", "",
          "| rows | file MB | pyarrow read_csv s (MB/s) | hvd_train units MB/s | path | first step s | "
          "data s to first step | vs read_csv | data MB per rank | samples/s | vs in memory |",
          "| ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for rows, e in results["sizes"].items():
        p = e["parse"]
        memory = e["memory_np1"]["samples_per_second"]
        for path in PATHS:
            if path not in e:  # results from before the path was measured
                continue
            r = e[path]
            md.append(f"| {rows} | {p['mb']:.0f} | {p['pyarrow_read_csv_s']:.2f} ({p['pyarrow_mb_s']:.0f}) | "
                      f"{p['hvd_train_mb_s']:.0f} | {path} | {r['first_step_s']:.1f} | {r['data_first_step_s']:.1f} | "
                      f"{r['data_first_step_s'] / p['pyarrow_read_csv_s']:.2f} | {r['data_mb_per_rank']:.0f} | "
                      f"{r['samples_per_second']:.0f} | {r['samples_per_second'] / memory:.2f} |")
    md += ["", "Ratios for the targets (np=2 / np=1 data memory; growth of data memory with the rows):"]
    for kind in ("csv", "parquet"):
        parts = [f"{rows} rows np2/np1 {ratios(e, kind)['memory_share']:.2f}" for rows, e in by_rows(results).items()]
        if len(results["sizes"]) > 1:
            parts.append(f"np1 growth {growth(results, kind):.2f}x")
        md.append(f"- {kind}: " + ", ".join(parts))
    md += ["", "Ratios for the throughput targets, on the training part of the last epoch (its begin to its last "
           "batch: the validation after it reads files when streamed): streamed / in memory at np=1 (>= 0.9); "
           "streamed np=2/np=1 against in memory's (within 10%); the reader process's CPU seconds per epoch "
           "(per rank):"]
    for rows, e in by_rows(results).items():
        if "memory_np2" not in e:
            continue
        parts = [f"in memory np2/np1 {ratios(e, 'csv')['memory_np2_np1']:.2f}"]
        for kind in ("csv", "parquet"):
            r, one, two = ratios(e, kind), e[f"{kind}_stream_np1"], e[f"{kind}_stream_np2"]
            thread = training_speed(e[f"{kind}_thread_np1"]) / training_speed(e["memory_np1"])
            parts.append(f"{kind} np1 {r['vs_memory']:.2f} of in memory (thread reader {thread:.2f}), np2/np1 "
                         f"{r['np2_np1']:.2f} ({r['np2_np1'] / r['memory_np2_np1'] - 1:+.0%} vs in memory), reader "
                         f"CPU {one['reader_cpu_s_per_epoch']:.1f}/{two['reader_cpu_s_per_epoch']:.1f} s per epoch "
                         "at np1/np2")
        md.append(f"- {rows} rows: " + "; ".join(parts))
    return md


if __name__ == "__main__":
    worker(*sys.argv[1:5])
