"""The spool on a small filesystem (G7): a backlog never fills the disk, and a disk filled by
something else stops the agent cleanly, without touching the application, until it is
restarted with room. The filesystem is a real tmpfs of a few MiB (mounting it needs root,
which CI has)."""
import contextlib
import json
import os
import sqlite3
import subprocess
import threading
import time

from conftest import (AgentProcess, assert_restores_exact, checkpoint_truncate, create_ticket_db,
                      file_bytes_equal, run_walship, table_contents)
from s3server import S3Server

BLOB = 20_000   # bytes per update: random, so LZ4 cannot shrink the backlog
BLOB_TABLES = ("usuarios", "big")


@contextlib.contextmanager
def small_filesystem(path, mib):
    os.makedirs(path, exist_ok=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m,mode=0700", "tmpfs", str(path)],
                       capture_output=True, text=True)
    assert p.returncode == 0, ("mounting a small tmpfs for the spool failed; this test needs root "
                               f"(CI runs as root): {p.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def free_bytes(path):
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class FreeSpaceWatch:
    """Samples the free space of a filesystem every 20 ms; keeps the lowest."""

    def __init__(self, path):
        self.path, self.lowest, self.stop_flag = path, free_bytes(path), False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop_flag:
            self.lowest = min(self.lowest, free_bytes(self.path))
            time.sleep(0.02)

    def stop(self):
        self.stop_flag = True
        self.thread.join()
        return self.lowest


def make_blob_db(db, rows=16):
    create_ticket_db(db, rows=5)
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("CREATE TABLE big(id INTEGER PRIMARY KEY, b BLOB NOT NULL)")
    con.execute("BEGIN")
    for i in range(rows):
        con.execute("INSERT INTO big(id, b) VALUES(?, randomblob(?))", (i, BLOB))
    con.execute("COMMIT")
    con.close()


def churn(db, n, pause=0.01, rows=16):
    """n autocommit updates of one random row with fresh random bytes; every one must commit."""
    con = sqlite3.connect(db, isolation_level=None, timeout=5)
    for i in range(n):
        con.execute("UPDATE big SET b = randomblob(?) WHERE id = ?", (BLOB, i % rows))
        time.sleep(pause)
    con.close()


def replicate_to_a_directory(tmp_path, agent_factory, spool, blob_rows=16, extra_args=()):
    """A blob database replicating to a directory replica, its spool in `spool`."""
    replica = tmp_path / "replica"
    url = "file://" + str(replica)
    db = tmp_path / "app.db"
    make_blob_db(db, rows=blob_rows)
    agent = agent_factory(db, [url], ["--sync-interval", "200ms", "--spool-dir", spool, *extra_args]).start().wait_ready()
    return db, replica, url, agent


def test_backlog_of_a_down_replica_never_fills_the_spool_filesystem(tmp_path, agent_factory):
    spool = tmp_path / "spool"
    srv = S3Server(tmp_path / "s3", buckets=["walship"]).start()
    with small_filesystem(spool, 4):
        try:
            env = srv.env()
            s3url, fileurl = srv.url("walship", "app"), "file://" + str(tmp_path / "file-replica")
            db = tmp_path / "app.db"
            make_blob_db(db)
            # The default --spool-limit (1GB) is far above the 4 MiB filesystem.
            agent = agent_factory(db, [s3url, fileurl], ["--sync-interval", "200ms", "--spool-dir", spool],
                                  env=env).start().wait_ready()
            srv.stop()
            watch = FreeSpaceWatch(spool)
            churn(db, 300)   # about 6 MB of incompressible changes while S3 is down
            time.sleep(1)
            lowest = watch.stop()
            assert agent.proc.poll() is None, f"agent died:\n{agent.read_log()[-3000:]}"
            log = agent.read_log()
            assert "spool.limited.by=free disk space" in log and "dropping that replica's backlog" in log, log[-3000:]
            assert "No space left" not in log, log[-3000:]
            assert lowest > 0, "the spool's filesystem filled up"
            time.sleep(1)   # the status file is refreshed every second
            p = run_walship("status", db, "--spool-dir", spool, "--json")
            assert p.returncode == 0, p.stdout + p.stderr
            st = json.loads(p.stdout)["databases"][0]["status"]
            assert st["errors"].get("spool-disk-full", 0) >= 1, st

            srv.start()   # same port: S3 gets a new generation
            agent.wait_for_log("it answers again after its backlog was dropped")
            churn(db, 20)
            time.sleep(1.5)
            agent.stop()
            checkpoint_truncate(db)
            assert_restores_exact(db, [(fileurl, "file"), (s3url, "s3")], tmp_path, env=env)
        finally:
            srv.stop()


def test_disk_filled_by_another_file_stops_the_agent_cleanly_then_it_resumes(tmp_path, agent_factory):
    spool = tmp_path / "spool"
    with small_filesystem(spool, 4):
        db, replica, url, agent = replicate_to_a_directory(tmp_path, agent_factory, spool)
        churn(db, 10)
        # Something else fills the spool's filesystem.
        filler = spool / "filler"
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(os.urandom(1 << 16))
                    f.flush()
            except OSError:
                pass
        churn(db, 40)   # the application keeps committing
        try:
            rc = agent.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"agent still running on a full disk:\n{agent.read_log()[-3000:]}")
        log = agent.read_log()
        assert rc != 0 and "the disk is full: free space or move the spool" in log, (rc, log[-3000:])
        half = [f for _, _, fs in os.walk(replica) for f in fs if ".tmp" in f]
        assert not half, f"half-written objects in the replica: {half}"

        os.remove(filler)
        resumed = AgentProcess(db, [url], ["--sync-interval", "200ms", "--spool-dir", spool],
                               log_path=tmp_path / "resumed.log").start().wait_ready()
        churn(db, 20)
        time.sleep(1)
        resumed.stop()
        checkpoint_truncate(db)
        out = tmp_path / "latest.db"
        p = run_walship("restore", url, "-o", out)
        assert p.returncode == 0, p.stderr
        assert table_contents(out, BLOB_TABLES) == table_contents(db, BLOB_TABLES) and file_bytes_equal(db, out)
        p = run_walship("verify", url)
        assert p.returncode == 0, p.stdout + p.stderr


def test_snapshot_without_room_is_refused_and_replication_goes_on(tmp_path, agent_factory):
    spool = tmp_path / "spool"
    with small_filesystem(spool, 8):
        # about 3 MB of random bytes: its snapshot needs that much room
        db, replica, url, agent = replicate_to_a_directory(tmp_path, agent_factory, spool, blob_rows=150)
        # Something else leaves about 1.5 MB free: too little for a snapshot, enough for segments.
        filler = spool / "filler"
        with open(filler, "wb") as f:
            f.write(os.urandom(max(0, free_bytes(spool) - 1_500_000)))
        p = run_walship("snapshot", db, "--spool-dir", spool, timeout=60)
        assert p.returncode != 0 and "could not take the snapshot" in p.stderr, p.stdout + p.stderr
        assert agent.proc.poll() is None, f"agent died:\n{agent.read_log()[-3000:]}"
        assert "snapshot failed: no room for it in the spool" in agent.read_log(), agent.read_log()[-3000:]
        con = sqlite3.connect(db, isolation_level=None)
        for i in range(50):   # replication goes on
            con.execute("UPDATE big SET b = randomblob(2000) WHERE id = ?", (i,))
        con.close()
        time.sleep(1)
        agent.stop()
        os.remove(filler)
        checkpoint_truncate(db)
        assert_restores_exact(db, [(url, "file")], tmp_path)
        [g] = json.loads(run_walship("list", url, "--json").stdout)
        assert len(g["snapshots"]) == 1, g["snapshots"]   # the refused one left nothing behind


def test_without_hard_links_level1_compaction_is_skipped_with_one_warning(tmp_path, agent_factory):
    """Level 1 is built from hard links in the spool. Where they cannot be made (here the links
    directory is on another filesystem, so link() fails with EXDEV), segments stay at level 0,
    the agent says so once, and replication is unaffected."""
    spool, elsewhere = tmp_path / "spool", tmp_path / "elsewhere"
    with small_filesystem(elsewhere, 4):
        spool.mkdir(mode=0o700)
        (spool / "compact").symlink_to(elsewhere)
        db, _, url, agent = replicate_to_a_directory(tmp_path, agent_factory, spool,
                                                     extra_args=["--compaction", "1s,1h", "--fine-window", "1h"])
        churn(db, 200, pause=0.02)   # about 4 s: several 1 s windows close
        time.sleep(3)
        agent.stop()
        log = agent.read_log()
        assert log.count("level-1 compaction in the spool needs hard links") == 1, log[-3000:]
        [g] = json.loads(run_walship("list", url, "--json").stdout)
        assert {s["level"] for s in g["segments"]} == {"0"}, g["segments"]
        checkpoint_truncate(db)
        assert_restores_exact(db, [(url, "file")], tmp_path)
