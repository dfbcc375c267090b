"""A restore that races with retention or compaction: an object of its plan vanishes after the
listing. walship plans once more from a new listing and succeeds if the replica still reaches
the target; if objects keep vanishing it fails with a message that says so, and writes nothing.

Real parts: the agent replicates to `rclone serve s3`; the restore goes through a pass-through
proxy that deletes an object from the server (a signed S3 DELETE) just
before forwarding its GET, the way a concurrent retention pass would."""
import re
import subprocess
import time

from conftest import AgentProcess, create_ticket_db, run_walship, table_contents
from s3server import REGION, S3Server
from relayproxy import RelayProxy, read_head
from test_s3_protocol import s3_url
from workload import run_writer


class DeletingProxy(RelayProxy):
    """Deletes the object a GET names (once per key, with a signed S3 DELETE to the same
    server, as a retention pass would) when `should_delete(key)` says so, just before the GET
    reaches the server."""

    def __init__(self, srv, bucket, should_delete):
        self.srv, self.bucket, self.should_delete = srv, bucket, should_delete
        self.deleted = []
        super().__init__(srv.port)

    def read_request_head(self, f):
        raw, line, hdrs = read_head(f)
        if line and line.startswith("GET "):
            target = line.split(" ")[1].split("?")[0]
            prefix = f"/{self.bucket}/"
            if target.startswith(prefix) and target.endswith(".lz4"):
                key = target[len(prefix):]
                if key not in self.deleted and self.should_delete(key):
                    env = self.srv.env()
                    subprocess.run(["curl", "-sf", "-X", "DELETE", "--aws-sigv4", f"aws:amz:{REGION}:s3",
                                    "--user", f"{env['AWS_ACCESS_KEY_ID']}:{env['AWS_SECRET_ACCESS_KEY']}",
                                    f"{self.srv.endpoint}{target}"], check=True, timeout=30)
                    self.deleted.append(key)
        return raw, line, hdrs


def replicate_with_two_snapshots(tmp_path, srv, prefix):
    """A generation with a snapshot at txid 0, writes, a second snapshot, more writes."""
    db = tmp_path / "app.db"
    create_ticket_db(db, rows=10)
    env = srv.env()
    agent = AgentProcess(db, [srv.url("walship", prefix)], ["--sync-interval", "200ms"], env=env,
                         log_path=tmp_path / "agent.log").start().wait_ready()
    try:
        run_writer("mixed", db, "--seed", 5, "--tx", 60)
        time.sleep(0.5)
        p = run_walship("snapshot", db, timeout=60)
        assert p.returncode == 0, p.stderr
        run_writer("mixed", db, "--seed", 6, "--tx", 60)
        time.sleep(0.6)
        agent.stop()
    finally:
        if agent.proc.poll() is None:
            agent.kill9()
    snaps = sorted(k for k in srv.objects("walship", prefix) if "/snapshots/" in k)
    assert len(snaps) == 2, snaps
    return db, env, snaps


def test_restore_plans_again_when_an_object_vanishes(tmp_path):
    srv = S3Server(tmp_path / "s3", buckets=["walship"]).start()
    try:
        db, env, snaps = replicate_with_two_snapshots(tmp_path, srv, "race")
        newest = snaps[-1]
        proxy = DeletingProxy(srv, "walship", lambda key: key == newest)
        via = s3_url("walship", "race", f"http://127.0.0.1:{proxy.port}", path_style=True)
        out = tmp_path / "restored.db"
        p = run_walship("restore", via, "-o", out, env=env)
        assert p.returncode == 0, p.stderr
        assert proxy.deleted == [newest], proxy.deleted
        assert "vanished during the restore" in p.stderr and "planning again" in p.stderr, p.stderr
        # the second plan starts from the older snapshot and replays every segment
        applied = int(re.search(r"(\d+) transaction\(s\)", p.stdout).group(1))
        assert applied >= 120, f"the second plan should replay every transaction from the first snapshot:\n{p.stdout}"
        gets = [r["target"] for r in proxy.requests if r["method"] == "GET" and r["target"].endswith(".snap.lz4")]
        assert gets == ["/walship/" + newest, "/walship/" + snaps[0]], gets
        assert table_contents(out) == table_contents(db)
    finally:
        srv.stop()


def test_restore_fails_clearly_when_objects_keep_vanishing(tmp_path):
    srv = S3Server(tmp_path / "s3", buckets=["walship"]).start()
    try:
        db, env, snaps = replicate_with_two_snapshots(tmp_path, srv, "race2")
        proxy = DeletingProxy(srv, "walship", lambda key: True)
        via = s3_url("walship", "race2", f"http://127.0.0.1:{proxy.port}", path_style=True)
        out = tmp_path / "restored.db"
        p = run_walship("restore", via, "-o", out, env=env)
        assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
        errors = [l for l in p.stderr.splitlines() if l.startswith("walship: error:")]
        assert len(errors) == 1 and "vanished during the restore, twice" in errors[0], p.stderr
        # Both plans' snapshots vanished. (Segments downloaded ahead while a snapshot streams
        # vanish too, as many as were asked for before the error.)
        assert len([k for k in proxy.deleted if "/snapshots/" in k]) == 2, proxy.deleted
        assert not out.exists() and not list(tmp_path.glob("restored.db*")), list(tmp_path.iterdir())
    finally:
        srv.stop()
