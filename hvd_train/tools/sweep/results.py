"""A sweep's results, rewritten after every trial (each file atomically):

``trials.csv`` (one row per trial in plan order: parameters, metric, epochs, seconds, status,
test figures, error), ``results.md`` (the same, best first), ``best.json`` and ``best.toml``
(the best finished trial; ``hvd-train --config best.toml`` re-runs it), ``params.png`` (the metric
against each searched option) and ``curves.png`` (every trial's validation curve).
The best trial is the best metric among trials that ran to the end ("ok"); pruned trials are
shown but not ranked, as Optuna's best trial is a completed one.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ... import storage
from ...config import configfile
from ...outputs.plots import pyplot
from ...training import pruning
from .spec import Sweep, Trial, show

TRIALS_CSV = "trials.csv"
RESULTS_MD = "results.md"
BEST_JSON = "best.json"
BEST_TOML = "best.toml"
PARAMS_PNG = "params.png"
CURVES_PNG = "curves.png"


def best(sweep: Sweep, trials: List[Trial], records: Dict[str, Dict[str, Any]]) -> Optional[Tuple[Trial, Dict]]:
    """(trial, record) of the best finished trial, the earlier one on a tie; None if none finished."""
    found = None
    for t in trials:
        r = records.get(t.digest)
        if r and r["status"] == "ok" and (found is None or pruning.better(r["value"], found[1]["value"], sweep.mode)):
            found = (t, r)
    return found


def rows(sweep: Sweep, trials: List[Trial], records: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One dict per trial, in plan order: the columns of trials.csv."""
    tests = sorted({k for r in records.values() for k in r.get("test", {})})
    out = []
    for t in trials:
        r = records.get(t.digest, {})
        row = {"trial": t.index, **{k: show(t.params[k]) for k in sweep.swept}, sweep.settings.metric: r.get("value"),
               "epochs": r.get("epochs"), "seconds": r.get("seconds"), "status": r.get("status", "pending"),
               **{k: r.get("test", {}).get(k) for k in tests}, "error": r.get("error") or "", "digest": t.digest}
        out.append(row)
    return out


def write(sweep: Sweep, sweep_dir: Path, trials: List[Trial],
          records: Dict[str, Dict[str, Any]]) -> Optional[Tuple[Trial, Dict]]:
    """The sweep's result files from the trials' records; returns the best trial and its record."""
    table = rows(sweep, trials, records)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(table[0]))
    writer.writeheader()
    writer.writerows(table)
    storage.write_text(str(sweep_dir / TRIALS_CSV), text.getvalue())
    found = best(sweep, trials, records)
    storage.write_text(str(sweep_dir / RESULTS_MD), markdown(sweep, sweep_dir, table, found))
    if found:
        trial, record = found
        config = trial.config.replace(checkpoint_dir=None)
        storage.write_text(str(sweep_dir / BEST_JSON), json.dumps({
            "trial": trial.index, "digest": trial.digest, "metric": sweep.settings.metric, "mode": sweep.mode,
            "value": record["value"], "params": {k: list(v) if isinstance(v, tuple) else v
                                                 for k, v in trial.params.items()},
            "np": sweep.settings.np, "epochs": record["epochs"], "test": record["test"],
            "run_dir": str(sweep_dir / "trials" / trial.digest / "run"), "config": config.to_dict()},
            indent=2, sort_keys=True) + "\n")
        storage.write_text(str(sweep_dir / BEST_TOML),
                         f"# best trial of {sweep_dir}: trial {trial.index}, {trial.label()}, "
                         f"{sweep.settings.metric} {record['value']:.6g} at {sweep.settings.np} processes;\n"
                         f"# re-run it: launch/local.sh -n {sweep.settings.np} -- --config {BEST_TOML}\n"
                         + configfile.dumps(config))
    finished = [(t, records[t.digest]) for t in trials
                if records.get(t.digest, {}).get("status") in ("ok", "pruned")]
    if finished:
        with storage.writing(str(sweep_dir / PARAMS_PNG)) as tmp:
            params_plot(sweep, finished, found, tmp)
        with storage.writing(str(sweep_dir / CURVES_PNG)) as tmp:
            curves_plot(sweep, finished, found, tmp)
    return found


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def markdown(sweep: Sweep, sweep_dir: Path, table: List[Dict[str, Any]], found) -> str:
    metric = sweep.settings.metric
    ranked = sorted((r for r in table if r["status"] == "ok"),
                    key=lambda r: -r[metric] if sweep.mode == "max" else r[metric])
    rest = [r for r in table if r["status"] != "ok"]
    columns = [c for c in table[0] if c not in ("error", "digest")]
    counts: Dict[str, int] = {}
    for r in table:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    lines = [f"# Sweep {sweep_dir.name}", "",
             f"{len(table)} trials ({sweep.shape()}): " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
             + f". Ranked by {metric} ({sweep.mode}) of the final weights, {sweep.settings.np} processes per trial.",
             ""]
    if found:
        lines += [f"Best: trial {found[0].index} ({found[0].label()}), {metric} {found[1]['value']:.4g}; "
                  f"re-run it with `--config {BEST_TOML}`.", ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r[c]) for c in columns) + " |" for r in ranked + rest]
    errors = [r for r in rest if r["error"]]
    if errors:
        lines += ["", "Errors:", ""] + [f"- trial {r['trial']}: {r['error']}" for r in errors]
    return "\n".join(lines) + "\n"


def _numeric(values: List[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def params_plot(sweep: Sweep, finished, found, path: str) -> None:
    """The metric against each searched option: finished trials filled, pruned hollow, the best starred."""
    plt = pyplot()
    names = sweep.swept
    cols = min(3, len(names))
    rows_ = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(4 * cols, 3.2 * rows_), dpi=100, squeeze=False)
    metric = sweep.settings.metric
    for ax, name in zip(axes.flat, names):
        values = [t.params[name] for t, _ in finished]
        if _numeric(values):
            xs = values
            positive = all(v > 0 for v in values)
            if positive and (max(values) / min(values) >= 30 or getattr(sweep.random.get(name), "kind", "") ==
                             "loguniform"):
                ax.set_xscale("log")
        else:
            labels = list(dict.fromkeys(show(v) for v in values))
            xs = [labels.index(show(v)) for v in values]
            ax.set_xticks(range(len(labels)), labels, fontsize=8)
        for x, (t, r) in zip(xs, finished):
            pruned = r["status"] == "pruned"
            ax.scatter([x], [r["value"]], s=36, facecolors="none" if pruned else "tab:blue", edgecolors="tab:blue")
            if found and t is found[0]:
                ax.scatter([x], [r["value"]], s=200, marker="*", color="tab:red", zorder=3)
        ax.set_xlabel(name)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"{metric} by option ({len(finished)} trials; hollow: pruned; star: best)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def curves_plot(sweep: Sweep, finished, found, path: str) -> None:
    """Every trial's validation metric per epoch; the best bold, pruned trials dashed."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for t, r in finished:
        curve = r.get("curve") or []
        is_best = bool(found and t is found[0])
        ax.plot(range(1, len(curve) + 1), curve, "--" if r["status"] == "pruned" else "-",
                linewidth=2.5 if is_best else 1, alpha=1 if is_best else 0.6,
                label=f"{t.index}: {t.label()}" if is_best or len(finished) <= 8 else None)
    ax.set_xlabel("epoch")
    ax.set_ylabel(sweep.settings.metric)
    ax.set_title(f"validation curves of {len(finished)} trials (bold: best; dashed: pruned)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
