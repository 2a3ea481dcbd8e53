"""Bad input: one clear message, a non-zero exit, no traceback and nothing written.

Every case (tests/bad_inputs.py) goes through the command line in this process (`cli.main`, as
`hvd-train` alone): the validation is the same code on every rank, so one process proves the
message. tests/parallel/test_bad_input_in_job.py runs every case again on both ranks of a real
job (every rank fails alike, no hang). The multi-rank promise on the way out (one message for
the whole job, every rank exits, no directory) is proven here by a real launch per kind of
failure: data bad on every rank, data missing on one rank only, an output error, a config error
under plain mpirun; a rank that dies is tests/test_resilience.py's.
"""

import pytest
from bad_inputs import CASES, good_rows, prepare
from conftest import BIN, horovodrun, mpirun, requires_mpi

from hvd_train import cli

BOUND = 120  # seconds: every launched case must end well within this, on every rank


def options(tmp_path, case):
    prepare(tmp_path)
    args = CASES[case][0](tmp_path)
    return args if "--output-dir" in args else [*args, "--output-dir", str(tmp_path / "out")]


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_command_line_gives_one_message_and_writes_nothing(tmp_path, capsys, case):
    message = CASES[case][1]
    with pytest.raises(SystemExit) as exited:
        cli.main(options(tmp_path, case))
    printed = capsys.readouterr()
    text = printed.out + printed.err
    assert exited.value.code == 2
    assert text.count(message) == 1 and printed.err.count("hvd-train: error: ") == 1, text[-3000:]
    assert "Traceback" not in text, "a user error is a message, not a traceback"
    assert not (tmp_path / "out").exists(), "nothing written"


def launched(proc, message, out):
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert text.count(message) == 1 and text.count("hvd-train: error: ") == 1, text[-4000:]
    # No rank prints a traceback, nor does the launcher (hvd-horovodrun owns horovodrun's exit).
    assert "Traceback" not in text, "a user error is a message, not a traceback"
    assert "exit with status code" not in text and "Terminated" not in text, text[-3000:]
    assert not out.exists(), "nothing written"


@pytest.mark.integration
@pytest.mark.parametrize("case", ["missing_csv", "unwritable_output"])
def test_under_horovodrun_the_job_ends_with_one_message(tmp_path, case):
    proc = horovodrun(2, options(tmp_path, case), timeout=BOUND)
    launched(proc, CASES[case][1], tmp_path / "out")


@pytest.mark.integration
@requires_mpi
def test_under_plain_mpirun_the_job_ends_with_one_message(tmp_path):
    proc = mpirun(2, options(tmp_path, "zero_epochs"), timeout=BOUND)
    launched(proc, CASES["zero_epochs"][1], tmp_path / "out")


@pytest.mark.integration
def test_failure_on_one_rank_only_stops_all(tmp_path):
    # Rank 0 finds its CSV, rank 1 does not (a file missing on one host): the ranks agree to
    # stop, the message names rank 1, and rank 0's already-created output directory is removed.
    (tmp_path / "rank0.csv").write_text("f1,f2,y\n" + good_rows())
    out = tmp_path / "out"
    cmd = (f'exec "{BIN}/python" -m hvd_train --dataset "csv:{tmp_path}/rank$HOROVOD_RANK.csv" '
           f'--label-column y --output-dir "{out}"')
    proc = horovodrun(2, [], timeout=BOUND, command=["sh", "-c", cmd])
    launched(proc, "hvd-train: error: rank 1: cannot read CSV", out)
    message = (proc.stdout + proc.stderr).split("hvd-train: error:")[1].splitlines()[0]
    assert "rank0.csv" not in message, "rank 0 was fine"
