"""One `walship replicate --config` process for many databases in one directory."""
import shutil
import signal
import sqlite3
import subprocess
import time

from conftest import WALSHIP, run_walship

N = 300   # more than the 256 agents the old signal relay could reach, and than inotify's 128 instances


def make_fleet(tmp_path, n):
    template = tmp_path / "template.db"
    con = sqlite3.connect(template)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    con.commit()
    con.close()
    dbs = tmp_path / "dbs"
    dbs.mkdir()
    lines = ["databases:"]
    paths = []
    for i in range(n):
        p = dbs / f"t{i:04d}.db"
        shutil.copyfile(template, p)
        paths.append(p)
        lines += [f"  - path: {p}", "    sync-interval: 1s", f"    spool-dir: {tmp_path}/spool/t{i}",
                  "    replicas:", f"      - url: file://{tmp_path}/replica/t{i}"]
    cfg = tmp_path / "walship.yml"
    cfg.write_text("\n".join(lines) + "\n")
    return cfg, paths


def wait_replicating(log_path, n, proc, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log_path.read_text(errors="replace").count("] replicating") >= n:
            return
        assert proc.poll() is None, log_path.read_text(errors="replace")[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"not every database was replicating after {timeout} s")


def test_sigterm_stops_every_agent_of_a_large_config_and_ships_their_commits(tmp_path):
    cfg, paths = make_fleet(tmp_path, N)
    log_path = tmp_path / "agent.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(WALSHIP), "replicate", "--config", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_replicating(log_path, N, proc)
        # One commit in the first and in the last database of the file, then SIGTERM at once:
        # a graceful stop ships both.
        for p in (paths[0], paths[-1]):
            con = sqlite3.connect(p)
            con.execute("INSERT INTO t(v) VALUES ('last words')")
            con.commit()
            con.close()
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            stopped = log_path.read_text(errors="replace").count("] stopped")
            raise AssertionError(f"SIGTERM left the process running: {stopped} of {N} agents stopped")
        assert rc == 0, log_path.read_text(errors="replace")[-3000:]
        assert log_path.read_text(errors="replace").count("] stopped") == N
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for i in (0, N - 1):
        out = tmp_path / f"restored-{i}.db"
        run_walship("restore", f"file://{tmp_path}/replica/t{i}", "-o", out, check=True)
        con = sqlite3.connect(out)
        assert con.execute("SELECT v FROM t").fetchall() == [("last words",)]
        con.close()


def test_a_write_to_one_database_of_many_is_replicated_within_the_interval(tmp_path):
    """Idle databases beside it are looked at less often; a commit still wakes its own agent."""
    cfg, paths = make_fleet(tmp_path, 40)
    log_path = tmp_path / "agent.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(WALSHIP), "replicate", "--config", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_replicating(log_path, 40, proc)
        time.sleep(3)   # every agent idle now
        con = sqlite3.connect(paths[17])
        con.execute("INSERT INTO t(v) VALUES ('after a quiet spell')")
        con.commit()
        con.close()
        # Shipped while the agent runs (not by the flush at stop): a level-0 segment appears.
        seg_root = tmp_path / "replica" / "t17" / "generations"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not list(seg_root.glob("*/segments/0/*.seg.lz4")):
            time.sleep(0.1)
        assert list(seg_root.glob("*/segments/0/*.seg.lz4")), "the commit was not shipped within 10 s"
        assert not list((tmp_path / "replica" / "t16" / "generations").glob("*/segments/0/*.seg.lz4"))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = tmp_path / "restored.db"
    run_walship("restore", f"file://{tmp_path}/replica/t17", "-o", out, check=True)
    con = sqlite3.connect(out)
    assert con.execute("SELECT v FROM t").fetchall() == [("after a quiet spell",)]
    con.close()
