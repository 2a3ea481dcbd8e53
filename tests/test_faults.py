"""Runs that go wrong say so, on every rank, and lose nothing (issue 40): a loss that diverges, a
checkpoint folder that fills up, an output folder that fills up; with ``--on-nonfinite warn`` the
run goes on and its files hold no NaN. One launched job of 2 ranks makes all of these runs
(run_many): each failure is agreed by both ranks, which go on to the next run in step. A rank
that stops answering: test_resilience.py (and test_elastic.py, where it is dropped)."""
import json
import re

import numpy as np
import pytest
from conftest import run_many, small_filesystem

from hvd_train.outputs import events
from hvd_train.training import checkpoint

pytestmark = pytest.mark.integration

# SGD at 1.0 (x2 ranks, warmup from 1.33): epoch 1 ends with a huge but finite loss and its
# checkpoint, then the first batch of epoch 2 has an averaged gradient that is not finite.
DIVERGES = ["--task", "regression", "--dataset", "diabetes", "--optimizer", "sgd", "--lr", "1", "--epochs", "4"]
IRIS = ["--epochs", "4", "--progress", "none"]


def strict_json(path):
    """JSON as strict readers take it: NaN and Infinity are not JSON."""
    def refuse(name):
        raise ValueError(f"{path} holds {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


def no_temp_files(folder) -> bool:
    return not [p for p in folder.rglob("*") if ".tmp" in p.name]


def test_runs_that_go_wrong_end_with_one_message_on_every_rank_and_keep_what_they_had(tmp_path):
    with small_filesystem(tmp_path / "ckpt_fs", "100k") as ckpt_fs, \
            small_filesystem(tmp_path / "out_fs", "40k") as out_fs:
        runs = run_many(2, {
            "diverged": [*DIVERGES, "--checkpoint-dir", tmp_path / "div_ckpt", "--verbose-ranks"],
            "warned": [*DIVERGES, "--epochs", "2", "--on-nonfinite", "warn"],
            # Two checkpoints of about 38 kB fit in 100 kB, the third does not.
            "checkpoints_full": [*IRIS, "--checkpoint-dir", ckpt_fs, "--keep-checkpoints", "5"],
            # events.jsonl fits in 40 kB, model.keras (58 kB) does not.
            "outputs_full": [*IRIS, "--epochs", "2", "--output-dir", out_fs / "run", "--tensorboard"],
        }, tmp_path)

        # A diverged run: both ranks stop after the same batch (the first they check after it), the
        # last finite checkpoint kept, no model or metrics written, the event log says why.
        div = runs["diverged"]
        assert not div.ok
        where = [re.search(r"training diverged in epoch (\d+): the gradient averaged over the ranks was not finite "
                           r"at batch (\d+) \(learning rate [\d.e+-]+\); every rank stopped (after batch \d+|at its "
                           r"end), no model written", e) for e in div.errors]
        assert all(where) and where[0].groups() == where[1].groups() and where[0].groups()[:2] == ("2", "1"), \
            div.errors
        assert f"[hvd_train rank 1] diverged: stopping in epoch 2 {where[0].group(3)}" in div.job_stdout
        assert "the last checkpoint" in div.errors[0] and "--resume" in div.errors[0] and "--lr" in div.errors[0]
        saved = checkpoint.listed(str(tmp_path / "div_ckpt"))
        assert [e for e, _ in saved] == [1]
        kept = checkpoint.load(saved[0][1])
        assert all(np.isfinite(w).all() for w in kept.state.model)
        assert not (div.out / "model.keras").exists() and not (div.out / "metrics.json").exists()
        log = events.read(div.out / "events.jsonl")
        assert log[-1]["event"] == "run_failed" and "diverged" in log[-1]["error"]
        assert [e["epoch"] for e in log if e["event"] == "epoch"] == [1]

        # --on-nonfinite warn: the run goes on, says so once, and its JSON files hold null, not NaN.
        warned = runs["warned"]
        assert warned.ok, warned
        assert warned.stdout.count("is not finite; training goes on (--on-nonfinite warn)") == 1
        metrics = strict_json(warned.out / "metrics.json")
        assert metrics["test_loss"] is None
        for line in (warned.out / "events.jsonl").read_text().splitlines():
            json.loads(line, parse_constant=lambda name: pytest.fail(f"events.jsonl holds {name}"))

        # A checkpoint folder that fills up: one message naming the file and the cause, on both
        # ranks; the checkpoints before it intact, the newest resumable; nothing half-written.
        full = runs["checkpoints_full"]
        assert not full.ok
        message = (f"rank 0: could not write the checkpoint {ckpt_fs}/ckpt-epoch-000003.npz: No space left on "
                   f"device; the earlier checkpoints in {ckpt_fs} are kept")
        assert [e.split(": ", 1)[1] for e in full.errors] == [message] * 2, full.errors
        assert [e for e, _ in checkpoint.listed(str(ckpt_fs))] == [2, 1] and no_temp_files(ckpt_fs)
        newest, skipped = checkpoint.newest_valid(str(ckpt_fs))
        assert newest.epoch == 2 and not skipped
        log = events.read(full.out / "events.jsonl")
        assert log[-1]["event"] == "run_failed" and log[-1]["error"] == message
        assert not (full.out / "metrics.json").exists()

        # An output folder that fills up at the end: one message naming model.keras, nothing
        # half-written, no metrics.json (the mark of a finished run), every event line whole.
        out = runs["outputs_full"]
        assert not out.ok
        message = f"rank 0: could not write {out_fs}/run/model.keras: No space left on device"
        assert [e.split(": ", 1)[1] for e in out.errors] == [message] * 2, out.errors
        assert {p.name for p in (out_fs / "run").iterdir()} <= {"events.jsonl", "tensorboard"}
        assert no_temp_files(out_fs)
        kinds = [e["event"] for e in events.read(out_fs / "run" / "events.jsonl")]
        assert kinds[0] == "run_start" and kinds[-1] == "run_failed" and "run_end" not in kinds
