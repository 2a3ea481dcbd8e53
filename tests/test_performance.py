"""The performance defaults train() sets, checked on the real processes (their figures are
hvd-bench's business: no timing here)."""
import os

import pytest
from conftest import run_many

pytestmark = pytest.mark.integration

CORES = sorted(os.sched_getaffinity(0))


@pytest.mark.skipif(len(CORES) < 2 or len(CORES) != os.cpu_count(),
                    reason="needs 2 cores, and a test run not bound to some of them already")
def test_each_process_and_all_its_threads_get_their_own_cores(tmp_path):
    # One job: the run that leaves the cores alone first (a pinned process stays pinned).
    args = ["--epochs", "2", "--progress", "none"]
    runs = run_many(2, {"floating": {"args": [*args, "--no-pin-cores"], "model": "mlp"},
                        "pinned": {"args": args, "model": "mlp"}}, tmp_path)
    assert runs["floating"].ok and runs["pinned"].ok, runs
    assert [r["affinity"] for r in runs["floating"].reports] == [[CORES], [CORES]]
    share = len(CORES) // 2
    # Every thread of rank r (TensorFlow's pools, Horovod's background and Gloo's threads) on
    # rank r's share: one set per process, disjoint, splitting the cores the launcher gave.
    assert [r["affinity"] for r in runs["pinned"].reports] == [[CORES[:share]], [CORES[share:2 * share]]]
    assert f"each process bound to its own {share} core(s)" in runs["pinned"].stdout
