"""hvd-bench's outputs: results.json, results.md (tables) and PNG plots."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Tuple

from ...outputs.plots import pyplot


def write_all(results: Dict[str, Any], out: Path) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    (out / "results.md").write_text(markdown(results))
    for stale in out.glob("*.png"):
        stale.unlink()
    if "scaling" in results:
        plot_scaling(results["scaling"], out / "scaling.png", "samples")
    if "cnn" in results:
        plot_scaling(results["cnn"], out / "scaling_cnn.png", "images")
    if "wire" in results:
        plot_wire(results, out / "wire.png")


def _size(nbytes: int) -> str:
    for unit, factor in (("MB", 1 << 20), ("KB", 1 << 10)):
        if nbytes >= factor:
            return f"{nbytes // factor} {unit}"
    return f"{nbytes} B"


def markdown(r: Dict[str, Any]) -> str:
    m = r["machine"]
    w = r["workload"]
    lines = [f"# hvd-bench results{' (quick: toy sizes, figures meaningless)' if r.get('quick') else ''}", "",
             f"Machine: {m['cores']} cores, {m['cpu'] or 'unknown CPU'}; Python {m['python']}, "
             f"TensorFlow {m['tensorflow']}, Horovod {m['horovod']}; {m['date']}; "
             f"{r['repeats']} interleaved repeat(s), medians; {r['seconds']:.0f} s in all.", ""]
    found = targets(r)
    if found:
        lines += ["## Targets", "", "Each target of this run's sections, with its figure (the sections below say how "
                  "it was measured).", "", "| target | figure | bound | met |", "| --- | ---: | ---: | --- |"]
        lines += [f"| {name} | {figure} | {bound} | {'yes' if met else '**no**'} |"
                  for name, figure, bound, met in found] + [""]
    if any(section in r for section in ("scaling", "cnn", "wire", "knobs")):  # the sections of this workload
        lines += [f"Workload: MLP {w['features']}-{'-'.join(map(str, w['hidden']))}-{w['classes']} on synthetic "
                  f"data, {w['batch']} samples per process per step, {w['steps']} steps per epoch, {w['epochs']} "
                  f"epochs (the first, which traces the graph, is not timed), 1 intra-op thread per process.", ""]
    if "scaling" in r:
        lines += ["## Scaling, overhead, peer", ""] + _scaling_lines(r["scaling"], "samples")
    if "cnn" in r:
        c = r["cnn"]["workload"]
        lines += ["## The CNN workload: scaling, overhead, peer", "",
                  f"--model cnn (3x3 convolutions of {', '.join(map(str, c['filters']))} filters, batch norm, average "
                  f"pooling) on random {'x'.join(map(str, c['image']))} images and {c['classes']} random classes, as "
                  f"Horovod's tensorflow2_synthetic_benchmark; {c['batch']} images per process per step, {c['steps']} "
                  f"steps per epoch, {c['epochs']} epochs (the first not timed).", ""]
        lines += _scaling_lines(r["cnn"], "images")
    if "wire" in r:
        lines += ["## The wire: hvd.allreduce between 2 processes", "",
                  "Bus bandwidth in GB/s (bytes x 2(n-1)/n / time, the convention of NCCL's tests); fp16 "
                  "counts the float32 bytes it stands for. memcpy: one thread's numpy copy, same sizes.", ""]
        controllers = list(r["wire"])
        header = ["size"] + [f"{c} {comp}" for c in controllers for comp in ("none", "fp16")] + ["memcpy"]
        lines += ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |"]
        first = r["wire"][controllers[0]]
        for copy in first["memcpy"]:
            cells = [_size(copy["bytes"])]
            for c in controllers:
                rows = {(x["bytes"], x["compression"]): x for x in r["wire"][c]["allreduce"]}
                cells += [f"{rows[(copy['bytes'], comp)]['bus_gbps']:.2f}" for comp in ("none", "fp16")]
            cells.append(f"{copy['gbps']:.2f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if "knobs" in r:
        k_runs = r["knobs"]["baseline"]["runs"]
        lines += ["## Knobs (2 processes; throughput relative to the baseline)", "",
                  f"{k_runs} run(s) per variant, interleaved with the baseline: single runs on a shared machine move "
                  "by +-30% here, so a knob between 0.75x and 1.3x is not shown either way.", "",
                  "| variant | samples/s | vs baseline | test accuracy |", "| --- | ---: | ---: | ---: |"]
        for name, k in r["knobs"].items():
            lines.append(f"| {name} | {k['samples_per_second']:.0f} | {k['vs_baseline']:.2f} "
                         f"| {k['test_accuracy']:.3f} |")
        lines.append("")
    if "precision" in r:
        lines += ["## Mixed precision: float32 against mixed_bfloat16", "",
                  "Keras's mixed_bfloat16 policy (bfloat16 compute, float32 variables, gradients and allreduce; "
                  "the output layer in float32) on the workloads above, the four runs of a workload interleaved; "
                  "throughput (samples or images/s) and test accuracy.", "",
                  "| workload | float32 np=1 | bf16 np=1 | speed-up | float32 np=2 | bf16 np=2 | speed-up |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name, x in r["precision"].items():
            t = x["throughput"]
            lines.append(f"| {name.upper()} | {t['float32_np1']:.0f} | {t['mixed_bfloat16_np1']:.0f} | "
                         f"{x['bf16_speedup_np1']:.2f}x | {t['float32_np2']:.0f} | {t['mixed_bfloat16_np2']:.0f} | "
                         f"{x['bf16_speedup_np2']:.2f}x |")
        lines += ["", "Test accuracy: " + "; ".join(
            f"{name.upper()} " + ", ".join(f"{k} {v:.3f}" for k, v in x["test_accuracy"].items())
            for name, x in r["precision"].items()), ""]
    if "data" in r:
        from .datapath import lines as data_lines

        lines += [""] + data_lines(r["data"])
    if "images" in r:
        from .imagepath import lines as image_lines

        lines += [""] + image_lines(r["images"])
    if "storage" in r:
        from .storage import lines as storage_lines

        lines += [""] + storage_lines(r["storage"])
    if "startup" in r:
        from .startup import lines as startup_lines

        lines += [""] + startup_lines(r["startup"])
    if "profile" in r:
        from .profile import lines as profile_lines

        lines += [""] + profile_lines(r["profile"])
    return "\n".join(lines)


def targets(r: Dict[str, Any]) -> List[Tuple[str, str, str, bool]]:
    """(target, figure, bound, met) for every target a section of ``r`` measures."""
    out: List[Tuple[str, str, str, bool]] = []
    for section, unit in (("scaling", "MLP"), ("cnn", "CNN")):
        if section not in r:
            continue
        s = r[section]
        bound = 0.02 if section == "scaling" else 0.03
        out.append((f"{unit}: hvd_train np=1 overhead vs plain Keras (scaling section)",
                    f"{s['overhead_np1_vs_keras']:+.1%}", f"<= {bound:.0%}", s["overhead_np1_vs_keras"] <= bound))
        for c, f in s.get("controllers", {}).items():
            out.append((f"{unit}: np=2 / the ceiling, {_controller(c)}", f"{f['vs_ceiling']:.3f}",
                        f">= {_TARGET_VS_CEILING[c]:.2f}", f["vs_ceiling"] >= _TARGET_VS_CEILING[c]))
    for name, x in r.get("precision", {}).items():
        out.append((f"{name.upper()}: mixed_bfloat16 / float32 throughput at np=1", f"{x['bf16_speedup_np1']:.2f}x",
                    ">= 1.40x", x["bf16_speedup_np1"] >= 1.4))
    for name, p in r.get("profile", {}).items():
        bound = 0.02 if name == "mlp" else 0.03
        out.append((f"{name.upper()}: hvd_train np=1 epoch overhead vs plain Keras (profile)", f"{p['overhead']:+.1%}",
                    f"<= {bound:.0%}", p["overhead"] <= bound))
    if "data" in r:
        from .datapath import by_rows, growth, ratios

        for rows, e in by_rows(r["data"]).items():
            for kind in ("csv", "parquet"):
                f = ratios(e, kind)
                out.append((f"{kind} {rows} rows: streamed / in memory, np=1 (training)", f"{f['vs_memory']:.2f}",
                            ">= 0.9", f["vs_memory"] >= 0.9))
                if "memory_np2" in e:
                    gap = f["np2_np1"] / f["memory_np2_np1"] - 1
                    out.append((f"{kind} {rows} rows: streamed np=2/np=1 against in memory's "
                                f"({f['memory_np2_np1']:.2f})", f"{f['np2_np1']:.2f} ({gap:+.0%})", "within 10%",
                                gap >= -0.10))
                out.append((f"{kind} {rows} rows: data memory per rank np=2 / np=1", f"{f['memory_share']:.2f}",
                            "<= 0.55", f["memory_share"] <= 0.55))
        sizes = list(by_rows(r["data"]))
        if len(sizes) > 1:
            for kind in ("csv", "parquet"):
                g = growth(r["data"], kind)
                out.append((f"{kind}: data memory growth, {sizes[0]} -> {sizes[-1]} rows (np=1)", f"{g:.2f}x",
                            "<= 1.3x", g <= 1.3))
    if "storage" in r:
        from .storage import ratios as storage_ratios

        for kind in ("csv", "parquet"):
            f = storage_ratios(r["storage"], kind)
            for world in ("np1", "np2"):
                if world in f:
                    out.append((f"{kind}: training from s3:// / from local disk, {world}", f"{f[world]:.2f}",
                                ">= 0.8", f[world] >= 0.8))
            if kind == "parquet" and "bytes_np2_np1" in f:
                out.append(("parquet: bytes fetched per rank from s3://, np=2 / np=1", f"{f['bytes_np2_np1']:.2f}",
                            "<= 0.55", f["bytes_np2_np1"] <= 0.55))
    return out


def _scaling_lines(s: Dict[str, Any], unit: str) -> List[str]:
    t = s["throughput"]
    lines = [f"| run | {unit}/s (all ranks) |", "| --- | ---: |",
             f"| hvd_train, 1 process | {t['hvd_np1']:.0f} |",
             f"| hvd_train, 2 processes, Gloo | {t['hvd_np2']:.0f} |",
             *([f"| hvd_train, 2 processes, MPI (yield when idle) | {t['hvd_np2_mpi']:.0f} |"]
               if "hvd_np2_mpi" in t else []),
             f"| 2 independent 1-process jobs at once (no communication: the ceiling) "
             f"| {t['independent_np1_x2']:.0f} |",
             f"| hvd_train, 1 process with 2 threads | {t['hvd_np1_2threads']:.0f} |",
             f"| plain Keras fit, 1 process | {t['keras_np1']:.0f} |",
             f"| MultiWorkerMirroredStrategy, 2 workers | {_or_na(t['mwms_np2'], '.0f')} |", "",
             *([f"{s['runs']['mwms_np2'][0]['error']}.", ""]
               if s.get("runs", {}).get("mwms_np2", [{}])[0].get("error") else []),
             "| figure | value | target |", "| --- | ---: | ---: |",
             f"| scaling efficiency T(2) / (2 x T(1)), best controller ({_controller(s['best_np2'])}) "
             f"| {s['scaling_efficiency_np2']:.3f} | |",
             f"| the ceiling: 2 independent jobs / (2 x T(1)) | {s['ceiling_efficiency_np2']:.3f} | |",
             *_controller_rows(s),
             f"| hvd_train overhead vs plain Keras at np=1 | {100 * s['overhead_np1_vs_keras']:+.1f}% "
             "| <= 2% |", ""]
    if s.get("breakdown"):
        lines += _breakdown_lines(s["breakdown"])
    return lines


_TARGET_VS_CEILING = {"gloo": 0.90, "mpi": 0.95}


def _or_na(value: float, spec: str, unit: str = "") -> str:
    """A figure, or n/a for a run that could not be made (NaN)."""
    return "n/a" if value != value else format(value, spec) + unit


def _controller_rows(s: Dict[str, Any]) -> List[str]:
    rows = []
    for c, f in s.get("controllers", {}).items():
        name = _controller(c)
        rows += [f"| {name}: 2 processes / the ceiling | {f['vs_ceiling']:.3f} | >= {_TARGET_VS_CEILING[c]:.2f} |",
                 f"| {name}: 2 processes / 1 process on both cores (the bar to beat) "
                 f"| {f['vs_one_process_all_cores']:.3f} | > 1 |",
                 f"| {name}: hvd_train / MultiWorkerMirroredStrategy | {_or_na(f['vs_mwms'], '.2f', 'x')} | >= 1.5x |"]
    return rows


def _breakdown_lines(b: Dict[str, Any]) -> List[str]:
    controllers = list(b)
    names = [_controller(c) for c in controllers]
    rows = [("step at np=2 (one run with the timeline on)", "step_ms"),
            ("compute: the same step alone on the machine (np=1)", "compute_ms"),
            ("sharing the machine: 2 jobs that never talk, minus alone", "sharing_ms"),
            ("waiting for the other rank, and the negotiation that sees it (rank 0)", "wait_ms"),
            ("allreduce not hidden under backprop (exposed)", "allreduce_ms"),
            ("other: the rest", "other_ms"),
            ("(allreduce in all, hidden or not)", "allreduce_total_ms"),
            ("(input: assembling one batch, in a thread beside the step)", "input_ms")]
    lines = ["## Where an np=2 step's time goes (ms per step)", "",
             "| part | " + " | ".join(names) + " |", "| --- | " + " | ".join("---:" for _ in names) + " |"]
    for label, key in rows:
        lines.append(f"| {label} | " + " | ".join(f"{b[c][key]:.1f}" for c in controllers) + " |")
    return lines + [""]


def _controller(variant: str) -> str:
    """The controller's display name, from a variant (hvd_np2_mpi) or a controller key (mpi)."""
    return "MPI" if variant == "mpi" or variant.endswith("_mpi") else "Gloo"


def plot_scaling(section: Dict[str, Any], path: Path, unit: str) -> None:
    plt = pyplot()
    t = section["throughput"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot([1, 2], [t["hvd_np1"], t["hvd_np2"]], "o-", label="hvd_train, Gloo")
    if "hvd_np2_mpi" in t:
        ax.plot([1, 2], [t["hvd_np1"], t["hvd_np2_mpi"]], "o-", label="hvd_train, MPI")
    ax.plot([2], [t["independent_np1_x2"]], "D", label="2 independent jobs (ceiling)")
    ax.plot([1, 2], [t["hvd_np1"], 2 * t["hvd_np1"]], "--", color="grey", label="ideal (linear)")
    ax.plot([2], [t["mwms_np2"]], "s", label="MultiWorkerMirroredStrategy")
    ax.plot([1], [t["keras_np1"]], "^", label="plain Keras")
    ax.plot([1], [t["hvd_np1_2threads"]], "v", label="1 process, 2 threads")
    ax.set_xlabel("processes")
    ax.set_ylabel(f"{unit} / second (all ranks)")
    ax.set_xticks([1, 2])
    ax.set_ylim(bottom=0)
    ax.set_title(f"Throughput vs processes (efficiency {section['scaling_efficiency_np2']:.2f})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_wire(r: Dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for controller, data in r["wire"].items():
        for comp, style in (("none", "o-"), ("fp16", "x--")):
            rows: List[Dict[str, Any]] = [x for x in data["allreduce"] if x["compression"] == comp]
            ax.plot([x["bytes"] for x in rows], [x["bus_gbps"] for x in rows], style, label=f"{controller} {comp}")
    copies = next(iter(r["wire"].values()))["memcpy"]
    ax.plot([c["bytes"] for c in copies], [c["gbps"] for c in copies], ":", color="black", label="memcpy (1 thread)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tensor size (bytes)")
    ax.set_yscale("log")  # allreduce and memcpy differ by orders of magnitude
    ax.set_ylabel("bus bandwidth (GB/s, log scale)")
    ax.set_title("hvd.allreduce, 2 processes on one machine")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
