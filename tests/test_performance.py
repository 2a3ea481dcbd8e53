"""The performance defaults train() sets, checked on the real processes (their figures are
hvd-bench's business: no timing here)."""
import os

import pytest
from conftest import rank_reports

pytestmark = pytest.mark.integration

CORES = sorted(os.sched_getaffinity(0))


@pytest.mark.skipif(len(CORES) < 2 or len(CORES) != os.cpu_count(),
                    reason="needs 2 cores, and a test run not bound to some of them already")
def test_each_process_and_all_its_threads_get_their_own_cores(tmp_path):
    args = ["--epochs", "2", "--progress", "none"]
    reports, proc = rank_reports(2, args + ["--output-dir", tmp_path / "a"], tmp_path / "pinned")
    share = len(CORES) // 2
    # Every thread of rank r (TensorFlow's pools, Horovod's background and Gloo's threads) on
    # rank r's share: one set per process, disjoint, splitting the cores the launcher gave.
    assert [r["affinity"] for r in reports] == [[CORES[:share]], [CORES[share:2 * share]]]
    assert f"each process bound to its own {share} core(s)" in proc.stdout

    reports, _ = rank_reports(2, args + ["--no-pin-cores", "--output-dir", tmp_path / "b"], tmp_path / "floating")
    assert [r["affinity"] for r in reports] == [[CORES], [CORES]]
