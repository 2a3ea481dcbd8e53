"""hvd-bench --sections storage: the file-data path from object storage against local disk.

A real S3 server (SeaweedFS on loopback, hvd_train/tools/s3server.py) holds the data section's
generated files (40 float features, Parquet row groups of 64k rows); the same launches as the
data section (datapath.launch: horovodrun, Gloo, 2 epochs, streamed by reader processes) read
them from ``s3://`` and from local disk, CSV and Parquet, at np=1 and np=2. Figures, as ratios
within one run: training samples/s from the bucket over from disk (the training part of the
last epoch); the bytes the server sent per rank, np=2 over np=1; the server's GET requests per
launch (the facts pass, 2 epochs with their validation, the test evaluation: every rank's) and
their mean latency as the server measured it. The page cache serves the local files, so "local
disk" is the fastest a disk can be: the ratio is a lower bound for a real disk.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List

from . import datapath

KINDS = ("csv", "parquet")
WORLDS = (1, 2)


def storage_section(work: Path, rows: int, timeout: int, log: Callable[[str], None],
                    kinds=KINDS, worlds=WORLDS, local_worlds=WORLDS) -> Dict[str, Any]:
    """``local_worlds``: the world sizes also read from local disk (--quick: np=1 alone)."""
    from ..s3server import BUCKET, S3Server

    files = datapath.generate(work / "storage-data", rows)
    server = S3Server(Path(tempfile.mkdtemp(prefix="hvd-bench-s3-", dir=work))).start()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())  # the launches' ranks inherit the endpoint and credentials
    out: Dict[str, Any] = {"rows": rows, "mb": {k: files[k].stat().st_size / 1e6 for k in KINDS}, "paths": {}}
    try:
        fs = server.filesystem()
        for kind in kinds:
            with fs.open_output_stream(f"{BUCKET}/bench/{files[kind].name}") as f:
                f.write(files[kind].read_bytes())
        for kind in kinds:
            for np_ in worlds:
                for where in ("local", "s3") if np_ in local_worlds else ("s3",):
                    name = files[kind].name
                    spec = f"{kind}:{files[kind]}" if where == "local" else f"{kind}:s3://{BUCKET}/bench/{name}"
                    before = server.metrics()
                    ranks = datapath.launch("stream", np_, spec, work, timeout)
                    after = server.metrics()
                    gets = after["gets"] - before["gets"]
                    entry = {"train_samples_per_second": ranks[0]["train_samples_per_second"],
                             "samples_per_second": ranks[0]["samples_per_second"],
                             "reader_cpu_s_per_epoch": max(r["reader_cpu_s"] for r in ranks) / datapath.EPOCHS,
                             "gets": gets, "sent_mb_per_rank": (after["sent_bytes"] - before["sent_bytes"]) / 1e6 / np_,
                             "get_ms": 1000 * (after["get_seconds"] - before["get_seconds"]) / max(gets, 1)}
                    out["paths"][f"{kind}_{where}_np{np_}"] = entry
                    log(f"storage {kind} {where} np={np_}: {entry}")
    finally:
        server.stop()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return out


def ratios(results: Dict[str, Any], kind: str) -> Dict[str, float]:
    """For ``kind``: s3 / local training samples/s at np=1 and np=2; s3 bytes per rank np=2 / np=1."""
    p = results["paths"]
    out = {}
    for np_ in WORLDS:
        s3, local = p.get(f"{kind}_s3_np{np_}"), p.get(f"{kind}_local_np{np_}")
        if s3 and local:
            out[f"np{np_}"] = s3["train_samples_per_second"] / local["train_samples_per_second"]
    if f"{kind}_s3_np1" in p and f"{kind}_s3_np2" in p:
        one, two = p[f"{kind}_s3_np1"]["sent_mb_per_rank"], p[f"{kind}_s3_np2"]["sent_mb_per_rank"]
        out["bytes_np2_np1"] = two / max(one, 1e-9)
    return out


def lines(results: Dict[str, Any]) -> List[str]:
    md = [f"## Storage (s3:// on a local SeaweedFS vs local disk; {results['rows']:,} rows, Gloo, "
          f"{datapath.EPOCHS} epochs, the data section's MLP)", "",
          "samples/s: the training part of the last epoch; MB sent per rank and GET requests per launch (facts "
          "pass, epochs, validation, test; all ranks) and their mean latency, as the server counted them.", "",
          "| path | file MB | samples/s | reader CPU s/epoch | MB sent per rank | GETs | ms per GET |",
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for path, e in results["paths"].items():
        kind = path.split("_")[0]
        remote = "_s3_" in path
        md.append(f"| {path} | {results['mb'][kind]:.0f} | {e['train_samples_per_second']:.0f} | "
                  f"{e['reader_cpu_s_per_epoch']:.1f} | {e['sent_mb_per_rank']:.1f} | "
                  f"{e['gets']:.0f} | {e['get_ms']:.1f} |" if remote else
                  f"| {path} | {results['mb'][kind]:.0f} | {e['train_samples_per_second']:.0f} | "
                  f"{e['reader_cpu_s_per_epoch']:.1f} | - | - | - |")
    md += ["", "Ratios for the targets: from the bucket / from local disk (>= 0.8); Parquet bytes per rank "
           "np=2 / np=1 (<= 0.55):"]
    for kind in KINDS:
        r = ratios(results, kind)
        if r:
            md.append(f"- {kind}: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()))
    return md
