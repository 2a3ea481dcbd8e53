"""hvd_train.launchers.ray_launch without Ray: the driver's option checks, which failure it reports, and
the copy-back. The Ray runs themselves are tests/test_ray.py."""
import io
import os
import tarfile

import pytest

from hvd_train.launchers import ray_launch
from hvd_train.launchers.ray_launch import Outcome


def test_options_and_the_hvd_train_options_after_the_separator():
    o = ray_launch.parse(["--num-workers", "3", "--cpus-per-worker", "2", "--", "--dataset", "wine", "--epochs", "5"])
    assert (o.address, o.num_workers, o.cpus_per_worker, o.gpus_per_worker) == (None, 3, 2, 0)
    assert o.train_argv == ["--dataset", "wine", "--epochs", "5"] and o.grace == ray_launch.DEFAULT_GRACE_SECONDS


def test_elastic_options():
    o = ray_launch.parse(["--min-workers", "2", "--max-workers", "4", "--", "--epochs", "5"])
    assert o.elastic and (o.num_workers, o.max_workers) == (2, 4)
    fixed = ray_launch.parse(["--min-workers", "2"])
    assert fixed.elastic and fixed.max_workers == 2
    assert not ray_launch.parse(["--num-workers", "2"]).elastic


@pytest.mark.parametrize("argv,message", [
    ([], "give --num-workers N, or --min-workers A [--max-workers B]"),
    (["--num-workers", "2", "--cpus-per-worker", "0"], "--cpus-per-worker must be >= 1"),
    (["--num-workers", "2", "--gpus-per-worker", "-1"], "--gpus-per-worker must be >= 0"),
    (["--num-workers", "2", "--grace", "-1"], "--grace must be >= 0"),
    (["--num-workers", "2", "--", "--lr", "-1"], "learning rate must be > 0"),
    (["--num-workers", "2", "--", "--dry-run"], "hvd-train plan --np N"),
    (["--num-workers", "2", "--address", "10.0.0.1"], "want HOST:PORT"),
    (["--num-workers", "2", "--start-timeout", "-5"], "--start-timeout must be >= 0"),
    (["--num-workers", "2", "--min-workers", "1"], "give --num-workers N, or --min-workers A"),
    (["--max-workers", "2"], "--max-workers needs --min-workers"),
    (["--min-workers", "3", "--max-workers", "2"], "need --min-workers <= --max-workers"),
    (["--min-workers", "0"], "--min-workers must be >= 1"),
    (["--num-workers", "2", "--network-interface", "eth0"], "--network-interface is for elastic jobs"),
])
def test_bad_options_exit_2_with_one_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        ray_launch.parse(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and err.count("error:") == 1, err


def test_fetch_to_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    with pytest.raises(SystemExit):
        ray_launch.parse(["--num-workers", "1", "--fetch-to", str(tmp_path / "f")])
    assert "exists and is not an empty directory" in capsys.readouterr().err


def test_the_cause_is_reported_before_its_consequences():
    ok = Outcome(rank=0, ok=True, code=0)
    died = Outcome(rank=1, died=True, message="error: Ray worker of rank 1 died (x)")
    crash = Outcome(rank=0, unexpected=True, message="error: rank 0 raised UnknownError: collective failed")
    stalled = Outcome(rank=2, stalled=True, message="error: rank 2 still running")
    agreed = [Outcome(rank=r, message=f"error: bad data (seen by rank {r})", code=2) for r in range(3)]
    assert ray_launch.verdict([ok, Outcome(rank=1, ok=True, code=0)]) is None
    assert ray_launch.verdict([crash, died, stalled]) is died
    assert ray_launch.verdict([crash, Outcome(rank=1, ok=True), stalled]) is crash
    assert ray_launch.verdict([stalled, agreed[1], crash]) is agreed[1]
    assert ray_launch.verdict(agreed[::-1]) is agreed[0], "rank 0's message when ranks agree"
    assert ray_launch.verdict([ok, stalled]) is stalled


def _archive(files: dict) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_fetched_outputs_land_whole(tmp_path):
    target = tmp_path / "fetched"
    target.mkdir()  # an empty directory may be given
    ray_launch._fetch(_archive({"./metrics.json": "{}", "./history.csv": "epoch\n"}), str(target))
    assert sorted(os.listdir(target)) == ["history.csv", "metrics.json"]
    assert not (tmp_path / "fetched.partial").exists()


def test_a_broken_archive_leaves_no_output(tmp_path):
    target = tmp_path / "fetched"
    with pytest.raises(tarfile.TarError):
        ray_launch._fetch(b"not a tar", str(target))
    assert not target.exists()
    with pytest.raises(tarfile.TarError):  # a member escaping the directory is refused
        ray_launch._fetch(_archive({"../escape.txt": "x"}), str(target))
    assert not target.exists() and not (tmp_path / "escape.txt").exists()
    assert not (tmp_path / "fetched.partial").exists()


def test_token_mode_when_a_token_is_at_hand_and_the_mode_unset(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    env = {}
    ray_launch.token_auth_default("10.0.0.1:6379", env)
    assert env == {}, "no token anywhere: Ray's default"
    token = tmp_path / "token"
    token.write_text("0" * 64)
    env = {"RAY_AUTH_TOKEN_PATH": str(token)}
    ray_launch.token_auth_default(None, env)
    assert "RAY_AUTH_MODE" not in env, "a local instance decides for itself"
    ray_launch.token_auth_default("10.0.0.1:6379", env)
    assert env["RAY_AUTH_MODE"] == "token"
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("0" * 64)
    for given in ({}, {"RAY_AUTH_TOKEN": "x"}):
        ray_launch.token_auth_default("10.0.0.1:6379", given)
        assert given["RAY_AUTH_MODE"] == "token"
    explicit = {"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": "x"}
    ray_launch.token_auth_default("10.0.0.1:6379", explicit)
    assert explicit["RAY_AUTH_MODE"] == "disabled"
