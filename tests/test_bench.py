"""hvd-bench at toy sizes: one invocation runs every section through the real launchers (each code
path once: --quick) and writes well-formed JSON, markdown and PNGs. No timing assertions: figures
are only checked to be positive and finite."""
import json
import math
import shutil

import pytest
from conftest import BIN, PINS, png_size, run

pytestmark = pytest.mark.integration


def positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    sections = "scaling,cnn,wire,knobs,data,startup,profile,precision,storage,images"
    proc = run([BIN / "hvd-bench", "--quick", "--sections", sections, "--out", out], timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_results_json(bench):
    out, _ = bench
    r = json.loads((out / "results.json").read_text())
    assert r["quick"] is True and r["machine"]["cores"] >= 1 and r["machine"]["tensorflow"] == PINS["tensorflow"]
    s = r["scaling"]
    expected = {"hvd_np1", "hvd_np2", "independent_np1_x2", "hvd_np1_2threads", "keras_np1", "mwms_np2"}
    controllers = {"gloo"} | ({"mpi"} if shutil.which("mpirun") else set())
    assert set(s["throughput"]) == expected | ({"hvd_np2_mpi"} if "mpi" in controllers else set())
    # The peer: Keras 3's fit under MultiWorkerMirroredStrategy fails (keras-team/keras#20585), which
    # the bench records instead of a figure; a Keras that fixes it gives a figure again.
    mwms = s["runs"]["mwms_np2"][0]
    assert positive(mwms["samples_per_second"]) or "keras-team/keras#20585" in mwms["error"]
    assert all(positive(v) for k, v in s["throughput"].items() if k != "mwms_np2")
    for key in ("scaling_efficiency_np2", "scaling_efficiency_np2_gloo", "ceiling_efficiency_np2", "np2_vs_ceiling",
                "np2_vs_one_process_two_threads"):
        assert positive(s[key])
    # The headline figure is the faster controller's, and the ceiling is two real 1-process runs.
    assert s["throughput"][s["best_np2"]] == max(s["throughput"][k] for k in ("hvd_np2", "hvd_np2_mpi")
                                                 if k in s["throughput"])
    copies = s["runs"]["independent_np1_x2"][0]["copies"]
    assert len(copies) == 2 and all(c["world_size"] == 1 for c in copies)
    assert math.isfinite(s["overhead_np1_vs_keras"])
    # Throughput is summed over ranks from every rank's own count: np=2 counts both shards.
    np2 = s["runs"]["hvd_np2"][0]
    assert np2["world_size"] == 2 and np2["samples"] == np2["train_samples"] * (r["workload"]["epochs"] - 1)
    assert s["runs"]["mwms_np2"][0]["world_size"] == 2
    for wire in r["wire"].values():
        assert wire["world_size"] == 2
        assert {(x["bytes"], x["compression"]) for x in wire["allreduce"]} == {
            (b, c) for b in r["workload"]["sizes"] for c in ("none", "fp16")}
        assert all(positive(x["bus_gbps"]) and positive(x["seconds"]) for x in wire["allreduce"])
        assert all(positive(c["gbps"]) for c in wire["memcpy"])
    assert set(r["wire"]) == {"gloo"}, "--quick: the wire over one controller"
    # Per controller: the bars (ceiling, 1 process on all cores, the peer) and where a step's time goes,
    # the waiting and the allreduce read from a real Horovod timeline of every step.
    assert set(s["controllers"]) == controllers == set(s["breakdown"])
    for c, bars in s["controllers"].items():
        assert all(positive(bars[k]) for k in ("vs_ceiling", "vs_one_process_all_cores"))
        b = s["breakdown"][c]
        assert 1 <= b["timeline_steps"] <= r["workload"]["steps"] * (r["workload"]["epochs"] - 1)
        assert all(positive(b[k]) for k in ("step_ms", "compute_ms", "allreduce_total_ms"))
        assert b["wait_ms"] >= 0 and b["allreduce_ms"] >= 0 and b["input_ms"] >= 0
        assert b["other_ms"] == pytest.approx(b["step_ms"] - b["compute_ms"] - b["sharing_ms"] - b["wait_ms"]
                                              - b["allreduce_ms"])
    # The CNN workload: the same figures, in images/s, from hvd_train's --model cnn on random images.
    c = r["cnn"]
    assert c["workload"]["model"] == "cnn"
    assert set(c["throughput"]) == expected and positive(c["scaling_efficiency_np2"])
    assert all(positive(v) for k, v in c["throughput"].items() if k != "mwms_np2")
    cnn_mwms = c["runs"]["mwms_np2"][0]
    assert positive(cnn_mwms["samples_per_second"]) or "keras-team/keras#20585" in cnn_mwms["error"]
    # --quick runs the CNN over one controller (the scaling section above, over each).
    assert set(c["controllers"]) == set(c["breakdown"]) == {"gloo"} <= set(s["controllers"])
    cnp2 = c["runs"]["hvd_np2"][0]
    assert cnp2["samples"] == cnp2["train_samples"] * (c["workload"]["epochs"] - 1)
    assert cnp2["train_samples"] == c["workload"]["steps"] * c["workload"]["batch"] * 2
    assert r["knobs"]["baseline"]["vs_baseline"] == 1.0 and {"fp16_allreduce", "backward_passes_2"} <= set(r["knobs"])
    assert all(positive(k["samples_per_second"]) and 0 <= k["test_accuracy"] <= 1 for k in r["knobs"].values())


def test_markdown_and_plots(bench):
    out, proc = bench
    md = (out / "results.md").read_text()
    assert md.startswith("# hvd-bench results") and "| scaling efficiency T(2) / (2 x T(1)), best controller (" in md
    assert "## The wire" in md and "## Knobs" in md and "## Where an np=2 step's time goes" in md and md in proc.stdout
    assert "## The CNN workload" in md and "| run | images/s (all ranks) |" in md
    for name in ("scaling.png", "scaling_cnn.png", "wire.png"):
        assert png_size(out / name) == (600, 400)


def test_bad_arguments():
    proc = run([BIN / "hvd-bench", "--sections", "nope"], timeout=60)
    assert proc.returncode == 2 and "unknown sections ['nope']" in proc.stderr


def test_data_section_measures_the_file_paths(bench):
    out, _ = bench
    r = json.loads((out / "results.json").read_text())["data"]
    assert positive(r["idle_rss_mb"]) and list(r["sizes"]) == ["2000"]
    assert all(positive(b["peak_rss_mb"]) and positive(b["first_step_s"]) for b in r["baselines"].values())
    entry = r["sizes"]["2000"]
    assert entry["parse"]["rows"] == 2000 and positive(entry["parse"]["pyarrow_mb_s"])
    for path in ("csv_stream_np1", "csv_stream_np2", "parquet_stream_np1", "parquet_stream_np2", "memory_np1",
                 "memory_np2", "csv_thread_np1", "parquet_thread_np1"):
        assert positive(entry[path]["first_step_s"]) and positive(entry[path]["samples_per_second"])
        assert math.isfinite(entry[path]["data_mb_per_rank"]) and math.isfinite(entry[path]["data_first_step_s"])
        # Streamed training reads in a process of each rank's own (its CPU counted), unless told a thread.
        assert (entry[path]["reader_cpu_s_per_epoch"] > 0) == ("_stream_" in path), path
    md = (out / "results.md").read_text()
    assert "## Data path" in md and "- csv: 2000 rows np2/np1" in md and "data s to first step" in md
    assert "- 2000 rows: in memory np2/np1" in md and "reader CPU" in md


def test_storage_section_reads_from_a_real_s3_server_and_counts_its_requests(bench):
    out, _ = bench
    r = json.loads((out / "results.json").read_text())["storage"]
    assert r["rows"] == 2000 and set(r["paths"]) == {"parquet_local_np1", "parquet_s3_np1", "parquet_s3_np2"}
    for path, e in r["paths"].items():
        assert positive(e["train_samples_per_second"]) and positive(e["reader_cpu_s_per_epoch"])
        # The server served the bucket's launches (and none of the local ones): requests, bytes, latency.
        assert (positive(e["gets"]) and positive(e["sent_mb_per_rank"]) and positive(e["get_ms"])) == ("_s3_" in path)
    md = (out / "results.md").read_text()
    assert "## Storage (s3://" in md and "- parquet: np1 " in md and "bytes_np2_np1" in md


def test_startup_section_times_every_phase(bench):
    out, _ = bench
    r = json.loads((out / "results.json").read_text())["startup"]
    from hvd_train.tools.bench.startup import PHASES

    (launch,) = r["runs"]
    assert all(launch[p] >= 0 for p in PHASES) and positive(launch["launch_to_first_step"])
    assert launch["launch_to_first_step"] == pytest.approx(sum(launch[p] for p in PHASES))
    assert positive(r["short_run_s"]) and r["controller"] in ("gloo", "mpi")
    md = (out / "results.md").read_text()
    assert "## Start-up: launch to first step" in md and "| **launch to first step** |" in md


def test_profile_section_splits_an_epoch_into_its_parts(bench):
    out, _ = bench
    r = json.loads((out / "results.json").read_text())["profile"]
    for workload in ("mlp", "cnn"):
        variants = r[workload]["variants"]
        keras, ours, sequence = variants["keras"], variants["hvd_train"], variants["keras_sequence"]
        for v in (keras, ours, sequence):
            assert positive(v["epoch_ms"]) and positive(v["step_ms"]) and math.isfinite(v["rest_ms"])
            assert v["epoch_ms"] == pytest.approx(v["steps_ms"] + sum(v["hooks_ms"].values()) + v["rest_ms"])
        assert not keras["hooks_ms"] and not sequence["hooks_ms"], "plain Keras runs none of hvd_train's callbacks"
        assert math.isfinite(r[workload]["tf_data_gain"])
        # hvd_train's own hooks, each timed by name (the profiler's own callback is not among them).
        assert {"ExactTrainMetrics.on_epoch_end", "StopCheck.on_train_batch_end"} <= set(ours["hooks_ms"])
        assert not any(k.startswith("Boundaries.") for k in ours["hooks_ms"])
    md = (out / "results.md").read_text()
    assert "## Profile: an epoch at np=1" in md and "| steps (train function) |" in md
    # The summary at the top names each target with its figure.
    targets = md.split("## Targets", 1)[1].split("\n## ", 1)[0]
    for name in ("MLP: hvd_train np=1 epoch overhead vs plain Keras (profile)", "MLP: np=2 / the ceiling, Gloo",
                 "csv 2000 rows: streamed / in memory, np=1 (training)",
                 "parquet 2000 rows: data memory per rank np=2 / np=1",
                 "CNN: hvd_train np=1 overhead vs plain Keras (scaling section)"):
        assert f"| {name} |" in targets, name


def test_precision_section_runs_float32_and_mixed_bfloat16(bench):
    out, _ = bench
    r = json.loads((out / "results.json").read_text())["precision"]
    assert set(r) == {"mlp"}, "--quick: the MLP's runs alone"
    runs = r["mlp"]["throughput"]
    assert set(runs) == {f"{p}_np{n}" for p in ("float32", "mixed_bfloat16") for n in (1, 2)}
    assert all(positive(v) for v in runs.values())
    assert positive(r["mlp"]["bf16_speedup_np1"]) and positive(r["mlp"]["bf16_speedup_np2"])
    text = (out / "results.md").read_text()
    assert "## Mixed precision: float32 against mixed_bfloat16" in text
    assert "MLP: mixed_bfloat16 / float32 throughput at np=1" in text  # in the Targets table


def test_images_section_measures_folder_tfrecord_memory_and_plain_keras(bench):
    out, _ = bench
    images = json.loads((out / "results.json").read_text())["images"]
    assert set(images["paths"]) == {"cnn_folder_np1", "cnn_tfrecord_np2", "cnn_memory_np1", "cnn_keras_np1"}
    for name, runs in images["paths"].items():
        assert runs[0]["train_samples_per_second"] > 0 and runs[0]["training_cpu_s"] > 0, name
    # Decoding runs in the reader processes: they used CPU; in memory, none.
    assert images["paths"]["cnn_folder_np1"][0]["reader_cpu_s_per_epoch"] > 0
    assert images["paths"]["cnn_memory_np1"][0]["reader_cpu_s_per_epoch"] == 0
    md = (out / "results.md").read_text()
    assert "## Images (96 generated JPEGs resized to 32x32" in md and "plain Keras image_dataset_from_directory" in md
