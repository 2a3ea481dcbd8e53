"""hvd-train plan / --dry-run: the resolved run without training, agreeing with a real run."""
from __future__ import annotations

import json
import re

import pytest
from conftest import BIN, horovodrun, run

pytestmark = pytest.mark.integration

OPTIONS = ["--dataset", "wine", "--batch-size", 20, "--lr", 0.005, "--lr-scaling", "sqrt", "--warmup-epochs", 2,
           "--epochs", 3, "--val-fraction", 0.15]
COMPARED = ("world_size", "batch_size_per_process", "global_batch_size", "scaled_lr", "warmup_epochs",
            "steps_per_epoch", "train_samples", "val_samples", "test_samples", "train_samples_per_rank")


def plan_json(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = re.sub(r"^\[\d+\]<stdout>:", "", proc.stdout, flags=re.M)  # horovodrun's per-line prefix
    return json.loads(text[text.index("{"):text.rindex("}") + 1])


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan") / "real"
    proc = horovodrun(3, [*OPTIONS, "--output-dir", out])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "config.json").read_text())["plan"], json.loads((out / "metrics.json").read_text())


def test_plan_alone_for_np3_agrees_with_a_real_np3_run(real_run, tmp_path):
    real, metrics = real_run
    out = tmp_path / "never"
    planned = plan_json(run([BIN / "hvd-train", "plan", "--np", 3, "--json", *OPTIONS, "--output-dir", out]))
    for key in COMPARED:
        assert planned["plan"][key] == real[key], key
    assert planned["plan"]["scaled_lr"] == metrics["scaled_lr"] and planned["plan"]["global_batch_size"] == 60
    # What each rank sees: disjoint shards that together are the training set, equal step counts.
    ranks = planned["ranks"]
    assert [r["samples_per_epoch"] for r in ranks] == real["train_samples_per_rank"]
    assert len({r["steps"] for r in ranks}) == 1 and ranks[0]["steps"] == real["steps_per_epoch"]
    assert not out.exists(), "a dry run writes nothing"


def test_plan_under_the_launcher_agrees_and_trains_nothing(real_run, tmp_path):
    real, _ = real_run
    out = tmp_path / "never"
    proc = horovodrun(3, ["plan", "--json", *OPTIONS, "--output-dir", out], command=[BIN / "hvd-train"])
    planned = plan_json(proc)
    for key in COMPARED:
        assert planned["plan"][key] == real[key], key
    assert planned["plan"]["hosts"] == ["localhost"] * 3
    assert "epoch 1/" not in proc.stdout and not out.exists()


def test_dry_run_prints_the_plan_lines(tmp_path):
    proc = run([BIN / "hvd-train", "--dry-run", *OPTIONS, "--output-dir", tmp_path / "never"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert "[hvd_train] world size 1, " in text
    assert "batch 20 per process x 1 = global batch 20" in text
    assert "learning rate 0.005 scaled to 0.005, warmup 2 epoch(s)" in text
    assert re.search(r"rank 0 \(.+\): \d+ samples per epoch in \d+ steps of 20, the last \d+; epoch 1 starts "
                     r"with training rows \d+, \d+", text), text
    assert "dry run: nothing trained, nothing written" in text and not (tmp_path / "never").exists()


def test_plan_np_against_the_launcher_is_one_clear_error():
    proc = horovodrun(2, ["plan", "--np", 3], command=[BIN / "hvd-train"], timeout=120)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert text.count("hvd-train: error: --np 3 disagrees with the launcher, which started 2 processes") == 1, text


def test_plan_still_checks_the_input(tmp_path):
    proc = run([BIN / "hvd-train", "plan", "--np", 2, "--dataset", f"csv:{tmp_path}/missing.csv",
                "--label-column", "y"])
    assert proc.returncode != 0 and "hvd-train: error: cannot read CSV" in proc.stderr, proc.stderr[-2000:]
