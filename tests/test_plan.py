"""hvd-train plan / --dry-run: the resolved run without training, agreeing with a real run. (A
plan for another world than the launcher's: tests/parallel/test_collectives.py.)"""
from __future__ import annotations

import json
import re

import pytest
from conftest import run_many

from hvd_train import cli

integration = pytest.mark.integration

OPTIONS = ["--dataset", "wine", "--batch-size", 20, "--lr", 0.005, "--lr-scaling", "sqrt", "--warmup-epochs", 2,
           "--epochs", 3, "--val-fraction", 0.15]
COMPARED = ("world_size", "batch_size_per_process", "global_batch_size", "scaled_lr", "warmup_epochs",
            "steps_per_epoch", "train_samples", "val_samples", "test_samples", "train_samples_per_rank")


def printed_plan(text):
    text = re.sub(r"^\[\d+\]<stdout>:", "", text, flags=re.M)  # horovodrun's per-line prefix
    return json.loads(text[text.index("{"):text.rindex("}") + 1])


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """One job of 3 processes: a real run, then `hvd-train plan --json` under the same launcher."""
    base = tmp_path_factory.mktemp("plan")
    runs = run_many(3, {"real": OPTIONS, "plan": {"cli": True, "args": ["plan", "--json", *OPTIONS,
                                                                      "--output-dir", base / "never"]}}, base)
    assert runs["real"].ok and runs["plan"].ok, runs
    real = runs["real"].out
    return (json.loads((real / "config.json").read_text())["plan"], json.loads((real / "metrics.json").read_text()),
            runs["plan"], base / "never")


@integration
def test_plan_alone_for_np3_agrees_with_a_real_np3_run(job, tmp_path, capsys):
    real, metrics, _, _ = job
    out = tmp_path / "never"
    capsys.readouterr()
    assert cli.main(["plan", "--np", "3", "--json", *map(str, OPTIONS), "--output-dir", str(out)]) == 0
    planned = printed_plan(capsys.readouterr().out)
    for key in COMPARED:
        assert planned["plan"][key] == real[key], key
    assert planned["plan"]["scaled_lr"] == metrics["scaled_lr"] and planned["plan"]["global_batch_size"] == 60
    # What each rank sees: disjoint shards that together are the training set, equal step counts.
    ranks = planned["ranks"]
    assert [r["samples_per_epoch"] for r in ranks] == real["train_samples_per_rank"]
    assert len({r["steps"] for r in ranks}) == 1 and ranks[0]["steps"] == real["steps_per_epoch"]
    assert not out.exists(), "a dry run writes nothing"


@integration
def test_plan_under_the_launcher_agrees_and_trains_nothing(job):
    real, _, plan, out = job
    planned = printed_plan(plan.stdout)
    for key in COMPARED:
        assert planned["plan"][key] == real[key], key
    assert planned["plan"]["hosts"] == ["localhost"] * 3
    assert "epoch 1/" not in plan.stdout and not out.exists()


def test_dry_run_prints_the_plan_lines(tmp_path, capsys):
    assert cli.main(["--dry-run", *map(str, OPTIONS), "--output-dir", str(tmp_path / "never")]) == 0
    text = capsys.readouterr().out
    assert "[hvd_train] world size 1, " in text
    assert "batch 20 per process x 1 = global batch 20" in text
    assert "learning rate 0.005 scaled to 0.005, warmup 2 epoch(s)" in text
    assert re.search(r"rank 0 \(.+\): \d+ samples per epoch in \d+ steps of 20, the last \d+; epoch 1 starts "
                     r"with training rows \d+, \d+", text), text
    assert "dry run: nothing trained, nothing written" in text and not (tmp_path / "never").exists()


def test_plan_still_checks_the_input(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["plan", "--np", "2", "--dataset", f"csv:{tmp_path}/missing.csv", "--label-column", "y"])
    assert exited.value.code == 2
    assert "hvd-train: error: cannot read CSV" in capsys.readouterr().err


def test_plan_shows_each_class_per_split_alike_at_np_1_2_3(tmp_path, capsys):
    """Per-class counts per split in the plan, the same for every world size. Arrays (wine) are
    split stratified; a CSV's rows each fall by a hash of their position, so its classes are split
    in about, not exactly, the asked fractions (docs/data.md)."""
    from bad_inputs import csv, good_rows

    data = {"wine": ["--dataset", "wine"],
            "csv": ["--dataset", csv(tmp_path, "f1,f2,y\n" + good_rows(200)), "--label-column", "y"]}
    counts = {}
    for world_size in (1, 2, 3):
        for name, spec in data.items():
            capsys.readouterr()
            argv = ["plan", "--np", str(world_size), "--json", *spec, "--output-dir", str(tmp_path / "no")]
            assert cli.main(argv) == 0
            counts[name, world_size] = printed_plan(capsys.readouterr().out)["plan"]["classes"]
    wine, table = counts["wine", 1], counts["csv", 1]
    assert list(wine) == ["class_0", "class_1", "class_2"]
    assert [round(t / sum(v), 1) for v in wine.values() for t in v] == [0.7, 0.1, 0.2] * 3, wine
    assert list(table) == ["a", "b"] and sum(sum(v) for v in table.values()) == 200
    assert all(v[0] > 0 for v in table.values()), table
    assert all(counts[name, n] == counts[name, 1] for name in data for n in (2, 3)), counts
