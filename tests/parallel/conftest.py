"""Tests that run INSIDE one launched job, on every rank at once (as Horovod's own CI runs its
test/parallel modules: `horovodrun -np 2 pytest ...`). tests/test_parallel.py launches them and
fails a test when it failed on any rank.

Every rank collects the same tests in the same order and calls the same collectives. A test
does its collectives first and asserts after, so a failed assertion on one rank cannot leave the
other waiting in a collective (the job's stall shutdown ends it if one still does).

Each rank writes the outcome of every test to $REPORT_DIR/rank-<r>.json.
"""
import json
import os

import pytest

_outcomes = {}


@pytest.fixture(scope="session")
def rt():
    """This process's Runtime (hvd.init), once per job; the job must have two ranks or more."""
    from hvd_train import runtime

    world = runtime.init()
    assert world.size >= 2, "tests/parallel runs under a launcher with 2 processes or more (tests/test_parallel.py)"
    return world


@pytest.fixture
def shared_tmp(rt, tmp_path):
    """A directory every rank names alike: rank 0's tmp_path (the ranks share this machine's files)."""
    from pathlib import Path

    from hvd_train import runtime

    return Path(runtime.broadcast(str(tmp_path), "shared_tmp"))


def pytest_runtest_logreport(report):
    # "test_module.py::test_name[param]": what tests/test_parallel.py asks for.
    entry = _outcomes.setdefault(report.nodeid.rsplit("/", 1)[-1], {"outcome": "passed", "longrepr": ""})
    if report.failed or (report.skipped and entry["outcome"] == "passed"):
        entry["outcome"] = "failed" if report.failed else "skipped"
        entry["longrepr"] += f"[{report.when}] {report.longreprtext}\n"


def pytest_sessionfinish(session):
    from hvd_train.runtime import launcher_rank

    directory = os.environ.get("REPORT_DIR")
    if directory:
        with open(os.path.join(directory, f"rank-{launcher_rank()}.json"), "w") as f:
            json.dump(_outcomes, f)
