"""Every bad-input case of tests/bad_inputs.py on every rank of a real job: each rank fails with
the same message (the ranks agree; none waits in a collective), and nothing is written."""
import pytest
from bad_inputs import BEFORE_HOROVOD, CASES, prepare

from hvd_train import cli, runtime, train


@pytest.mark.parametrize("case", sorted(set(CASES) - BEFORE_HOROVOD))
def test_every_rank_fails_alike_and_nothing_is_written(rt, shared_tmp, case):
    make_args, message = CASES[case]
    args = None
    if rt.rank == 0:  # rank 0 makes the files; every rank reads them at the same paths
        prepare(shared_tmp)
        args = make_args(shared_tmp)
    args = runtime.broadcast(args, f"case.{case}")
    out = shared_tmp / "out"
    if "--output-dir" not in args:
        args = [*args, "--output-dir", str(out)]
    try:
        train(cli.parse(args)[0])
        got = None
    except Exception as err:  # noqa: BLE001 - every rank's failure is compared
        got = f"{type(err).__name__}: {err}"
    every = runtime.allgather(got, f"case.{case}.outcome")
    assert every[0] is not None and message in every[0], every
    assert every == [every[0]] * rt.size, "the same failure on every rank"
    assert not out.exists(), "nothing written"
