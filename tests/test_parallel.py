"""tests/parallel/ inside ONE launched job of 2 ranks, as Horovod's CI runs its parallel tests
(`horovodrun -np 2 pytest test/parallel/...`): the collectives and the in-process properties
(agreement on failures, consensus, replica state, exact metric sums, sharding, stopping together,
checkpoints written once) are proven by the real ranks of one job instead of a job per test.

Each inner test is an outer test here: it passes when it passed on every rank; a failure shows
each rank's own report. A test that ran on one rank only, or not at all, fails too.
"""
import ast
import shutil

import pytest
from conftest import BIN, REPO, horovodrun, read_json

pytestmark = pytest.mark.integration

INNER = REPO / "tests" / "parallel"
WORLD = 2
# Over MPI where it is installed (mpi4py is checked against Horovod there); most other jobs of the
# suite run over Gloo.
CONTROLLER = "mpi" if shutil.which("mpirun") else "gloo"


def inner_tests() -> list:
    """'module.py::test_name' of every test function in tests/parallel/, read from the source."""
    found = []
    for path in sorted(INNER.glob("test_*.py")):
        tree = ast.parse(path.read_text())
        found += [f"{path.name}::{node.name}" for node in tree.body
                  if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")]
    return found


@pytest.fixture(scope="module")
def job(tmp_path_factory, s3):
    from hvd_train.tools.s3server import READ_KEY, READ_SECRET

    reports = tmp_path_factory.mktemp("in-job")
    # The real S3 server for test_storage_faults.py: its endpoint and credentials, the standard way.
    env = {**s3.env(), "HVD_TRAIN_TEST_S3_PID": str(s3.process.pid),
           "HVD_TRAIN_TEST_S3_READ": f"{READ_KEY}:{READ_SECRET}", "HVD_TRAIN_IN_JOB": "1", "REPORT_DIR": str(reports),
           # A test that leaves one rank in a collective ends the job instead of hanging it.
           "HOROVOD_STALL_CHECK_TIME_SECONDS": "10", "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "60"}
    # Each rank its own --basetemp: pytest empties it at start.
    inner = (f'exec "{BIN}/python" -m pytest "{INNER}" -p no:cacheprovider -q -ra '
             f'--basetemp "{reports}/tmp-${{HOROVOD_RANK:-$OMPI_COMM_WORLD_RANK}}"')
    proc = horovodrun(WORLD, [], controller=CONTROLLER, command=["sh", "-c", inner], env=env, timeout=900)
    ranks = []
    for rank in range(WORLD):
        path = reports / f"rank-{rank}.json"
        ranks.append(read_json(path) if path.exists() else None)
    return proc, ranks


@pytest.mark.parametrize("inner", inner_tests())
def test_on_every_rank(job, inner):
    proc, ranks = job
    problems, skipped = [], []
    for rank, outcomes in enumerate(ranks):
        if outcomes is None:
            problems.append(f"rank {rank} wrote no report (exit {proc.returncode})")
            continue
        mine = {k: v for k, v in outcomes.items() if k == inner or k.startswith(inner + "[")}
        if not mine:
            problems.append(f"rank {rank} did not run it")
        skipped += [v["longrepr"] for v in mine.values() if v["outcome"] == "skipped"]
        problems += [f"rank {rank}, {k}: {v['outcome']}\n{v['longrepr']}" for k, v in mine.items()
                     if v["outcome"] == "failed"]
    assert not problems, "\n".join(problems) + "\n" + proc.stdout[-3000:] + proc.stderr[-3000:]
    if skipped:
        assert len(skipped) == WORLD * len(mine), "skipped on every rank or none"
        pytest.skip(skipped[0].strip())


def test_the_job_ran_every_test_on_every_rank_and_passed(job):
    proc, ranks = job
    assert all(ranks), proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len({tuple(sorted(r)) for r in ranks}) == 1, "the ranks ran the same tests"
    assert {k.split("[")[0] for k in ranks[0]} == set(inner_tests())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
