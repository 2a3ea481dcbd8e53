"""The project's Dockerfile, built and run for real (podman/buildah; see tests/container/)."""
import os
import re
import shutil

import pytest
from conftest import BIN, OUTPUT_FILES, PINS, REPO, read_json, run

from hvd_train.version import __version__

TOOLS = ("podman", "buildah")
pytestmark = [
    pytest.mark.container,
    pytest.mark.skipif(not all(shutil.which(t) for t in TOOLS), reason="needs podman and buildah (make test-deps)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="rootful podman with chroot isolation (see docs/running.md, Docker)"),
]
BUILD_TIMEOUT = 3600  # a first build compiles Horovod; cached rebuilds take seconds


def test_image_builds_and_trains_with_two_processes(tmp_path, s3):
    """The image reads its data from the bucket and writes its run there (the endpoint and
    credentials by environment), then predicts from the bucket to the bucket."""
    from files import make_data

    make_data(tmp_path / "data", "parquet", n_rows=[400, 200])
    make_data(tmp_path / "new", "csv", n_rows=[50], seed=4)
    data, new = s3.put_tree(tmp_path / "data", "container/data"), s3.put_tree(tmp_path / "new", "container/new")
    # The build installs the Horovod wheel set-up built (the venv's wheels/) instead of compiling it again.
    proc = run(["bash", REPO / "tests" / "container" / "build_and_run.sh", tmp_path, "--", "--epochs", "60",
                "--dataset", f"parquet:{data}", "--label-column", "label", "--progress", "epoch"],
               timeout=BUILD_TIMEOUT, env={"WHEELS": str(BIN.parent / "wheels"), **s3.env(),
                                           "OUTPUT_DIR": "s3://hvd/container/run",
                                           "PREDICT": f"s3://hvd/container/run {new}/part-0.csv"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    s3.fetch("container/run", tmp_path / "run")
    predicted = s3.get("container/new/part-0.predictions.csv").decode().splitlines()
    assert predicted[0].startswith("predicted_class,prob_") and len(predicted) == 51
    # The image's Horovod has what the build checks for (the log shows it only when not cached).
    check = (tmp_path / "check-build.txt").read_text()
    assert all(f"[X] {part}" in check for part in ("TensorFlow", "Gloo", "MPI")), check
    train = (tmp_path / "train.log").read_text()
    assert "[0]<stdout>:[hvd_train] world size 2" in train and "[0]<stdout>:epoch 60/60" in train
    printed = re.search(r"test accuracy ([\d.]+) on (\d+) samples from 2 process\(es\)", train)
    assert printed, train[-3000:]
    run_dir = tmp_path / "run"
    assert {p.name for p in run_dir.iterdir()} == OUTPUT_FILES
    m = read_json(run_dir / "metrics.json")
    assert m["world_size"] == 2 and m["replicas_identical"] is True and m["epochs_completed"] == 60
    assert m["test_accuracy"] == pytest.approx(float(printed.group(1)), abs=1e-4) and m["test_accuracy"] >= 0.85
    saved = read_json(run_dir / "config.json")
    # The image carries the same pinned stack as the set-up (the versions the run recorded).
    assert saved["versions"]["tensorflow"] == PINS["tensorflow"] and saved["versions"]["horovod"] == PINS["horovod"]
    assert saved["plan"]["hosts"] == ["localhost", "localhost"]
    versions = (tmp_path / "versions.txt").read_text()
    assert versions.startswith(f"hvd_train {__version__} tensorflow {PINS['tensorflow']} horovod {PINS['horovod']}")
    assert " python 3.13." in versions, "the image (Debian 13) proves Python 3.13 end to end"
