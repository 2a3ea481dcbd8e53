"""Bad input under a real launcher: one clear message, non-zero exit on every rank, no hang, no output."""
import re

import pytest
from conftest import BIN, horovodrun, mpirun, requires_mpi

pytestmark = pytest.mark.integration
BOUND = 120  # seconds: every case must end well within this, on every rank


def csv(tmp_path, text, name="d.csv"):
    path = tmp_path / name
    path.write_text(text)
    return f"csv:{path}"


def files(tmp_path, contents):
    """A directory of CSV files; the dataset spec for it."""
    d = tmp_path / "files"
    d.mkdir()
    for name, text in contents.items():
        (d / name).write_text(text)
    return f"csv:{d}"


def good_rows(n=30):
    return "".join(f"{i % 7},{(i * 3) % 5},{'a' if i % 2 else 'b'}\n" for i in range(n))


CASES = {
    "missing_csv": (lambda t: ["--dataset", f"csv:{t}/absent.csv", "--label-column", "y"],
                    "cannot read CSV"),
    "directory_without_csv": (lambda t: ["--dataset", f"csv:{t}", "--label-column", "y"], "holds no *.csv files"),
    "missing_label_column": (lambda t: ["--dataset", csv(t, "f1,f2,y\n" + good_rows()), "--label-column", "kind"],
                             "label column 'kind' not found"),
    "non_numeric_feature": (lambda t: ["--dataset", csv(t, "f1,f2,y\n" + good_rows() + "1,abc,a\n"),
                                       "--label-column", "y"], "'abc' is not a number"),
    "nan_feature": (lambda t: ["--dataset", csv(t, "f1,f2,y\n" + good_rows() + "nan,1,a\n"), "--label-column", "y"],
                    "is not finite"),
    "one_class": (lambda t: ["--dataset", csv(t, "f1,f2,y\n" + good_rows().replace(",a\n", ",b\n")),
                             "--label-column", "y"], "need at least 2 classes, found 1"),
    "empty_file_among_many": (lambda t: ["--dataset", files(t, {"a.csv": "f1,f2,y\n" + good_rows(), "b.csv": ""}),
                                         "--label-column", "y"], "b.csv is empty (a header row is required)"),
    "header_mismatch": (lambda t: ["--dataset", files(t, {"a.csv": "f1,f2,y\n" + good_rows(),
                                                          "b.csv": "f1,f3,y\n" + good_rows()}),
                                   "--label-column", "y"], "b.csv has columns ['f1', 'f3', 'y'], but"),
    "duplicate_columns": (lambda t: ["--dataset", csv(t, "f1,f1,y\n" + good_rows()), "--label-column", "y"],
                          "duplicated column name(s) 'f1'"),
    "not_parquet": (lambda t: ["--dataset", f"parquet:{csv(t, 'f1,y', 'x.parquet')[4:]}", "--label-column", "y"],
                    "x.parquet is not a readable Parquet file"),
    "glob_matches_nothing": (lambda t: ["--dataset", f"csv:{t}/nothing-*.csv", "--label-column", "y"],
                             "nothing-*.csv matches no files"),
    "bad_value_in_a_later_file": (lambda t: ["--dataset", files(t, {"a.csv": "f1,f2,y\n" + good_rows(),
                                                                    "b.csv": "f1,f2,y\n1,2,a\n3,x7,b\n"}),
                                             "--label-column", "y"], "b.csv line 3, column 'f2': 'x7' is not a number"),
    "unknown_dataset": (lambda t: ["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    "regression_string_target": (lambda t: ["--task", "regression", "--dataset", csv(t, "f1,f2,y\n" + good_rows()),
                                            "--label-column", "y"],
                                 "regression needs a numeric target, and y holds values such as 'b', 'a'"),
    "classes_of_a_numeric_target": (lambda t: ["--dataset", "diabetes"],
                                    "diabetes has a numeric target, not classes: add --task regression"),
    "cnn_on_a_table": (lambda t: ["--model", "cnn"], "--model cnn needs images [samples, height, width, channels]"),
    "regression_loss_for_classes": (lambda t: ["--loss", "mae"], "--loss mae is a regression loss"),
    "zero_epochs": (lambda t: ["--epochs", "0"], "epochs must be >= 1"),
    "zero_batch": (lambda t: ["--batch-size", "0"], "batch size must be >= 1"),
    "bad_flag_value": (lambda t: ["--epochs", "many"], "invalid int value: 'many'"),
    "unwritable_output": (lambda t: ["--output-dir", str(t / "file.txt" / "run")], "is not writable"),
    "unwritable_checkpoint_dir": (lambda t: ["--checkpoint-dir", str(t / "file.txt" / "ckpt")],
                                  "checkpoint directory"),
    "missing_resume_file": (lambda t: ["--resume", str(t / "ckpt-epoch-000003.npz")], "does not exist"),
    "corrupt_resume_file": (lambda t: ["--resume", str(t / "file.txt")[:-4] + ".npz"], "is truncated or corrupt"),
    "resume_auto_without_dir": (lambda t: ["--resume"], "--resume auto looks in --checkpoint-dir"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_fails_once_cleanly(tmp_path, case):
    make_args, message = CASES[case]
    (tmp_path / "file.txt").write_text("not a directory")
    (tmp_path / "file.npz").write_text("not a checkpoint")
    out = tmp_path / "out"
    args = make_args(tmp_path)
    if "--output-dir" not in args:
        args += ["--output-dir", str(out)]
    proc = horovodrun(2, args, timeout=BOUND)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert text.count(message) == 1, text[-4000:]
    # horovodrun itself may print its own traceback on failure; no rank may.
    assert not re.search(r"^\[\d+\]<std\w+>:Traceback", text, re.M), "a user error is a message, not a traceback"
    assert not out.exists(), "nothing written"


def test_fewer_training_samples_than_processes(tmp_path):
    # 3 rows, none drawn for test at this seed: 3 training samples cannot be shared by 4 processes.
    data = csv(tmp_path, "f,y\n1,a\n2,a\n3,b\n")
    out = tmp_path / "out"
    proc = horovodrun(4, ["--dataset", data, "--label-column", "y", "--val-fraction", "0",
                          "--test-fraction", "0.01", "--output-dir", str(out)], timeout=BOUND)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert text.count("3 training samples are fewer than the 4 processes") == 1, text[-4000:]
    assert not out.exists()


@requires_mpi
@pytest.mark.parametrize("args,message", [
    (["--epochs", "0"], "epochs must be >= 1"),
    (["--dataset", "csv:/nonexistent/data.csv", "--label-column", "y"], "cannot read CSV"),
])
def test_bad_input_under_plain_mpirun(tmp_path, args, message):
    proc = mpirun(2, args + ["--output-dir", str(tmp_path / "out")], timeout=BOUND)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert text.count(message) == 1, text[-4000:]
    assert not (tmp_path / "out").exists()


def test_failure_on_one_rank_only_stops_all(tmp_path):
    # Rank 0 finds its CSV, rank 1 does not (a file missing on one host): the ranks agree to
    # stop, the message names rank 1, and rank 0's already-created output directory is removed.
    (tmp_path / "rank0.csv").write_text("f1,f2,y\n" + good_rows())
    out = tmp_path / "out"
    cmd = (f'exec "{BIN}/python" -m hvd_train --dataset "csv:{tmp_path}/rank$HOROVOD_RANK.csv" '
           f'--label-column y --output-dir "{out}"')
    proc = horovodrun(2, [], timeout=BOUND, command=["sh", "-c", cmd])
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert text.count("hvd-train: error: rank 1: cannot read CSV") == 1, text[-4000:]
    assert "rank0.csv" not in text.split("hvd-train: error:")[1].splitlines()[0], "rank 0 was fine"
    assert not out.exists(), "rank 0 removed the directory it had prepared"
