"""Across hosts for real: rank 1 runs over ssh on a second loopback address (127.0.0.2).

A private sshd (free port, throwaway keys, its own config) plays the remote host; horovodrun
and mpirun treat 127.0.0.2 as remote because no interface carries that address. A third
"host" (127.0.0.3) runs its sshd in its own mount namespace in which the venv's path is empty:
a host without hvd_train.
"""
import os
import shutil
import socket
import subprocess
import time

import pytest
from conftest import REPO, check_run, requires_mpi, run

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not shutil.which("sshd", path="/usr/sbin:/usr/bin:/sbin"), reason="no sshd (make test-deps)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="sshd as a second host needs root here (its /run/sshd)"),
]
SSHD = shutil.which("sshd", path="/usr/sbin:/usr/bin:/sbin") or "sshd"
# Throwaway host keys: never record them in the user's known_hosts.
SSH_OPTS = "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"


def free_port(address):
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


class Sshd:
    def __init__(self, directory, address, wrap=()):
        self.address, self.port = address, free_port(address)
        directory.mkdir(parents=True, exist_ok=True)
        self.key = directory / "client"
        for name in ("host", "client"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", directory / name], check=True)
        (directory / "authorized_keys").write_text((directory / "client.pub").read_text())
        config = directory / "sshd_config"
        config.write_text(f"ListenAddress {address}\nPort {self.port}\nHostKey {directory}/host\n"
                          f"AuthorizedKeysFile {directory}/authorized_keys\nPidFile {directory}/sshd.pid\n"
                          "UsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\n"
                          "PasswordAuthentication no\nKbdInteractiveAuthentication no\nLogLevel ERROR\n")
        os.makedirs("/run/sshd", exist_ok=True)
        self.proc = subprocess.Popen([*wrap, SSHD, "-D", "-e", "-f", config], stdout=subprocess.DEVNULL,
                                     stderr=open(directory / "sshd.log", "w"))
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection((address, self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"sshd did not start: {(directory / 'sshd.log').read_text()}") from None
                time.sleep(0.1)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    sshd = Sshd(tmp_path_factory.mktemp("sshd"), "127.0.0.2")
    yield sshd
    sshd.stop()


def hosts_sh(sshd, hosts, *args, venv=None, timeout=240, env=None):
    env = {"SSH_OPTS": SSH_OPTS, **(env or {})}
    if venv:
        env["VENV"] = str(venv)
    return run([REPO / "launch" / "hosts.sh", "-H", hosts, "-p", sshd.port, "-i", sshd.key, *args],
               env=env, timeout=timeout)


@pytest.mark.parametrize("controller", ["gloo", pytest.param("mpi", marks=requires_mpi)])
def test_hosts_sh_runs_rank_1_on_the_remote_host(remote, tmp_path, controller, s3, monkeypatch):
    """Over Gloo, with nothing shared but the bucket: the data (a Parquet folder) and every output
    in s3://, the endpoint and credentials passed to the remote rank by horovodrun."""
    out, extra, env = tmp_path / "out", [], None
    if controller == "gloo":
        from files import make_data

        make_data(tmp_path / "data", "parquet", n_rows=[300, 200])
        data = s3.put_tree(tmp_path / "data", "multihost/data")
        extra, env = ["--dataset", f"parquet:{data}", "--label-column", "label"], s3.env()
    proc = hosts_sh(remote, "127.0.0.1:1,127.0.0.2:1", f"--{controller}", "--", "--epochs", "40", *extra,
                    "--output-dir", "s3://hvd/multihost/out" if env else out, "--progress", "epoch", env=env)
    assert "hosts.sh: 2 host(s) reachable with hvd_train " in proc.stderr, proc.stderr[-2000:]
    if env:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        s3.fetch("multihost/out", out)
        assert "outputs in s3://hvd/multihost/out" in proc.stdout
        for name, value in env.items():  # check_run reads the test rows from the bucket too
            monkeypatch.setenv(name, value)
    m = check_run(out, proc, 2)
    # Each rank reports where it runs: horovodrun's name for its host, or the address ssh reached.
    assert "; 127.0.0.2: rank(s) 1" in proc.stdout, proc.stdout[:2000]
    assert m["test_accuracy"] >= 0.8 and m["replicas_identical"] is True


@requires_mpi
def test_mpirun_sh_across_hosts(remote, tmp_path):
    out = tmp_path / "out"
    proc = run([REPO / "launch" / "mpirun.sh", "-n", "2", "-H", "127.0.0.1:1,127.0.0.2:1", "-p", remote.port,
                "-i", remote.key, "--", "--epochs", "10", "--output-dir", out], env={"SSH_OPTS": SSH_OPTS})
    check_run(out, proc, 2)
    assert "; 127.0.0.2: rank(s) 1" in proc.stdout


def test_preflight_names_an_unreachable_host(remote, tmp_path):
    proc = hosts_sh(remote, "127.0.0.1:1,127.0.0.3:1", "--", "--output-dir", tmp_path / "out", timeout=60)
    assert proc.returncode == 2
    assert "hosts.sh: host 127.0.0.3 is not reachable over ssh" in proc.stderr, proc.stderr
    assert "[hvd_train]" not in proc.stdout and not (tmp_path / "out").exists()


@pytest.mark.skipif(not shutil.which("unshare"), reason="no unshare (util-linux)")
def test_preflight_names_a_host_without_hvd_train(tmp_path):
    # The venv is reached through a path that this host has and the other "host" does not:
    # its sshd runs in a mount namespace where that directory is an empty tmpfs.
    view = tmp_path / "opt"
    view.mkdir()
    (view / "venv").symlink_to(REPO / ".venv")
    bare = Sshd(tmp_path / "sshd3", "127.0.0.3",
                wrap=["unshare", "--mount", "--propagation", "private", "sh", "-c",
                      f'mount -t tmpfs none "{view}" && exec "$0" "$@"'])
    try:
        proc = hosts_sh(bare, "127.0.0.1:1,127.0.0.3:1", "--", "--output-dir", tmp_path / "out",
                        venv=view / "venv", timeout=60)
    finally:
        bare.stop()
    assert proc.returncode == 2
    assert f"hosts.sh: host 127.0.0.3 has no working hvd_train at {view}/venv" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()
