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


def first_segment(root):
    segs = sorted(root.glob("*/segments/0/*.seg.lz4"))
    return segs[0] if segs else None


def test_commits_to_idle_databases_wake_their_agents_at_once(tmp_path):
    """Idle agents wake once a second at most on their own; a commit wakes its agent at once.
    The agent dates a commit when it first sees it: five commits made at one instant, each
    dated within 0.5 s. Woken by the once-a-second look alone, all five would be that close
    about one time in 32."""
    cfg, paths = make_fleet(tmp_path, 40)
    log_path = tmp_path / "agent.log"
    chosen = [3, 11, 17, 25, 38]
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(WALSHIP), "replicate", "--config", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_replicating(log_path, 40, proc)
        time.sleep(3)   # quiet for longer than the two seconds that make an agent idle
        cons = [sqlite3.connect(paths[i]) for i in chosen]
        committed = []
        for con in cons:
            con.execute("INSERT INTO t(v) VALUES ('after a quiet spell')")
            con.commit()
            committed.append(time.time())
        for con in cons:
            con.close()
        roots = [tmp_path / "replica" / f"t{i}" / "generations" for i in chosen]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(first_segment(r) for r in roots):
            time.sleep(0.1)
        for i, root, t in zip(chosen, roots, committed):
            seg = first_segment(root)
            assert seg is not None, f"t{i}: the commit was not shipped"
            first_time_ms = int(seg.name.split("-")[2])
            late = first_time_ms / 1000 - t
            assert -0.05 <= late < 0.5, f"t{i}: the commit was dated {late:.3f} s after it was made ({seg.name})"
        assert first_segment(tmp_path / "replica" / "t16" / "generations") is None
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
