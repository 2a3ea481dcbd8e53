"""Bad input, case by case: the options that make it and the one message it must give. Shared by
tests/test_bad_input.py (the command line in this process: the message, the exit code, nothing
written) and tests/parallel/test_bad_input_in_job.py (every rank of a real job fails alike)."""


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


def rare_class_only_in_test(tmp_path, kind, n=60):
    """A table of n rows whose class "rare" is on rows the seed-42 hash puts in the test split
    only (a file's split is drawn per row: data/stream.py), "a"/"b" elsewhere: the dataset spec."""
    import numpy as np

    from hvd_train.data import splitting, stream

    split = splitting.row_splits(42, 0, 0, 0, n, 0.1, 0.2)
    labels = np.where(split == stream.TEST, "rare", np.where(np.arange(n) % 2, "a", "b"))
    labels[np.flatnonzero(split == stream.TEST)[3:]] = "a"  # three rare rows, all in test
    f1, f2 = np.arange(n) % 7, (np.arange(n) * 3) % 5
    if kind == "csv":
        return csv(tmp_path, "f1,f2,y\n" + "".join(f"{a},{b},{c}\n" for a, b, c in zip(f1, f2, labels)))
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "skewed.parquet"
    pq.write_table(pa.table({"f1": f1.astype(float), "f2": f2.astype(float), "y": labels}), path)
    return f"parquet:{path}"


def prepare(tmp_path):
    """The files some cases point at: a file where a directory is expected, a damaged checkpoint."""
    (tmp_path / "file.txt").write_text("not a directory")
    (tmp_path / "file.npz").write_text("not a checkpoint")


# name -> (options from a scratch directory, the message, whether argparse rejects it before Horovod starts)
CASES = {
    "missing_csv": (lambda t: ["--dataset", f"csv:{t}/absent.csv", "--label-column", "y"], "cannot read CSV"),
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
    # Small and skewed data through the file path (data/interface.check_splits): the same rule as arrays.
    "three_rows_csv": (lambda t: ["--dataset", csv(t, "f1,f2,y\n1,2,a\n3,4,b\n5,6,a\n"), "--label-column", "y"],
                       "the validation split is empty: 3 sample(s) gave train/val/test 2/0/1 with --val-fraction 0.1"),
    "class_only_in_test_csv": (lambda t: ["--dataset", rare_class_only_in_test(t, "csv"), "--label-column", "y"],
                               "class 'rare' has no training samples (train/val/test 0/0/3)"),
    "class_only_in_test_parquet": (lambda t: ["--dataset", rare_class_only_in_test(t, "parquet"),
                                              "--label-column", "y"],
                                   "class 'rare' has no training samples (train/val/test 0/0/3)"),
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
    "bad_config_file": (lambda t: ["--config", str(_write(t / "bad.toml", "batch_size = 'big'\n"))],
                        "bad.toml: batch_size must be an integer, got string \"big\""),
    "unwritable_output": (lambda t: ["--output-dir", str(t / "file.txt" / "run")], "is not writable"),
    "unwritable_checkpoint_dir": (lambda t: ["--checkpoint-dir", str(t / "file.txt" / "ckpt")],
                                  "checkpoint directory"),
    "missing_resume_file": (lambda t: ["--resume", str(t / "ckpt-epoch-000003.npz")], "does not exist"),
    "corrupt_resume_file": (lambda t: ["--resume", str(t / "file.npz")], "is truncated or corrupt"),
    "resume_auto_without_dir": (lambda t: ["--resume"], "--resume auto looks in --checkpoint-dir"),
    # A URI is never a local folder named "s3:" (storage.py); faults at a real S3 server:
    # tests/parallel/test_storage_faults.py.
    "unsupported_scheme_output": (lambda t: ["--output-dir", "ftp://host/runs/x"],
                                  "output directory ftp://host/runs/x: unsupported scheme ftp://; supported are"),
    "unsupported_scheme_data": (lambda t: ["--dataset", "csv:ftp://host/d.csv", "--label-column", "y"],
                                "dataset ftp://host/d.csv: unsupported scheme ftp://"),
}
# Rejected while the command line is parsed, before Horovod starts: nothing collective to agree on.
BEFORE_HOROVOD = {"bad_flag_value"}


def _write(path, text):
    path.write_text(text)
    return path
