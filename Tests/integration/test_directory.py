"""Directory mode: `walship replicate --dir DIR` (and a config file's `directories:`) replicates
every database found in a directory, picks up new ones while it runs, and retires those that go."""
import json
import os
import signal
import sqlite3
import subprocess
import time

from conftest import WALSHIP, create_ticket_db, run_walship, table_contents


def start(args, log_path):
    log = open(log_path, "w")
    return subprocess.Popen([str(WALSHIP), "replicate", *map(str, args)], stdout=log, stderr=subprocess.STDOUT)


def wait_for(log_path, text, proc, count=1, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log_path.read_text(errors="replace").count(text) >= count:
            return time.monotonic()
        assert proc.poll() is None, log_path.read_text(errors="replace")[-3000:]
        time.sleep(0.05)
    raise AssertionError(f"no {count}× '{text}' in the log after {timeout} s:\n" + log_path.read_text(errors="replace")[-3000:])


def add_rows(db, n, tag):
    con = sqlite3.connect(str(db), timeout=10)
    for i in range(n):
        con.execute("INSERT INTO usuarios(nombre, email) VALUES(?, ?)", (f"{tag}{i}", f"{tag}{i}@example.com"))
    con.commit()
    con.close()


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0


def restore(url, out):
    p = run_walship("restore", url, "-o", out)
    assert p.returncode == 0, p.stderr
    return table_contents(out)


def test_databases_are_picked_up_as_they_appear_and_retired_when_they_go(tmp_path):
    d = tmp_path / "tenants"
    d.mkdir()
    r = tmp_path / "replicas"
    r.mkdir()
    create_ticket_db(d / "a.db", rows=3)
    # Not databases of this directory: another file, a hidden one, a file with no header yet,
    # a symbolic link to a database elsewhere (never followed in a shared directory), and a
    # database the pattern does not match.
    (d / "notes.txt").write_text("hello")
    create_ticket_db(d / ".hidden.db", rows=1)
    (d / "empty.db").write_bytes(b"")
    elsewhere = tmp_path / "elsewhere.db"
    create_ticket_db(elsewhere, rows=1)
    os.symlink(elsewhere, d / "link.db")
    # A database with two names (a hard link): under neither, said in the log.
    create_ticket_db(d / "h.db", rows=1)
    os.link(d / "h.db", d / "h2.db")
    create_ticket_db(d / "b.db", rows=3)
    create_ticket_db(d / "other.sqlite", rows=1)
    log_path = tmp_path / "agent.log"
    proc = start(["--dir", d, "--replica-template", f"file://{r}/{{name}}", "--sync-interval", "200ms"], log_path)
    try:
        wait_for(log_path, "] replicating", proc, count=2)
        # A hard link to the -shm an agent holds, named like a database: a file of this
        # process's, never taken (nor opened: closing it would drop the agent's locks on it).
        os.link(d / "b.db-shm", d / "shm-alias.db")
        time.sleep(1.0)   # a few scans: nothing else is taken
        assert sorted(os.listdir(r)) == ["a.db", "b.db"]

        # A database that appears is replicated within about a second.
        t0 = time.monotonic()
        create_ticket_db(d / "c.db", rows=2)
        found = wait_for(log_path, f"db.path={d}/c.db [WalshipAgent] database found", proc, timeout=30)
        # Listed twice a second: about half a second; a loaded machine may add some.
        assert found - t0 < 5.0, f"c.db was picked up after {found - t0:.1f} s"
        wait_for(log_path, "] replicating", proc, count=3)
        add_rows(d / "c.db", 5, "c")
        add_rows(d / "a.db", 5, "a")

        # A database that goes is retired; what it had shipped stays restorable.
        add_rows(d / "b.db", 4, "b")
        time.sleep(1.5)   # several sync intervals: shipped
        b_before = table_contents(d / "b.db")
        for suffix in ("", "-wal", "-shm"):
            if (d / ("b.db" + suffix)).exists():
                (d / ("b.db" + suffix)).unlink()
        # Retired by the listing, or by its agent finding it gone first.
        deadline = time.monotonic() + 30
        while not any(m in log_path.read_text(errors="replace") for m in ("retiring its agent", "its agent is retired")):
            assert time.monotonic() < deadline, log_path.read_text(errors="replace")[-3000:]
            time.sleep(0.05)
        assert proc.poll() is None, "retiring one database stopped the process"
        add_rows(d / "a.db", 1, "late")
        time.sleep(1.0)
        # One status file for the process, in the directory; none in the databases' spools.
        deadline = time.monotonic() + 30
        while True:
            st = run_walship("status", "--dir", d, "--json")
            shown = {e["database"]: e for e in json.loads(st.stdout)["databases"]} if st.stdout.strip() else {}
            if sorted(shown) == [f"{d}/a.db", f"{d}/c.db"] or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert st.returncode == 0, st.stdout + st.stderr
        assert sorted(shown) == [f"{d}/a.db", f"{d}/c.db"], shown.keys()   # b.db retired: gone from it
        assert all(e["running"] and e["status"]["txid"] > 0 for e in shown.values()), shown
        assert not (d / ".a.db-walship" / "status.json").exists()
    finally:
        if proc.poll() is None:
            stop(proc)
    st = run_walship("status", "--dir", d)
    assert st.returncode == 3, st.stdout + st.stderr   # the process is gone
    log = log_path.read_text(errors="replace")
    for name in ("notes.txt", ".hidden.db", "empty.db", "link.db", "other.sqlite"):
        assert f"{d}/{name}" not in log, f"{name} was taken for a database:\n{log[-2000:]}"
    for name in ("h.db", "h2.db"):
        assert f"db.path={d}/{name} [WalshipAgent] not replicated: it has 2 names (hard links)" in log, log[-3000:]
        assert f"db.path={d}/{name} [WalshipAgent] database found" not in log
    # The -shm link is a file of a database replicated here: not even looked at twice.
    assert f"{d}/shm-alias.db" not in log, log[-2000:]
    assert sorted(os.listdir(r)) == ["a.db", "b.db", "c.db"]
    assert restore(f"file://{r}/a.db", tmp_path / "a.out") == table_contents(d / "a.db")
    assert restore(f"file://{r}/c.db", tmp_path / "c.out") == table_contents(d / "c.db")
    assert restore(f"file://{r}/b.db", tmp_path / "b.out") == b_before


def test_a_name_cannot_steer_its_replica_url(tmp_path):
    """A file name goes into the replica URL percent-encoded: a name holding '?', '&', '#' or
    '%' stays inside the replica's own directory."""
    d = tmp_path / "tenants"
    d.mkdir()
    r = tmp_path / "replicas"
    r.mkdir()
    name = "x?endpoint=http:%2F%2Fevil&y#z.db"
    create_ticket_db(d / name, rows=2)
    log_path = tmp_path / "agent.log"
    proc = start(["--dir", d, "--replica-template", f"file://{r}/t-{{name}}", "--sync-interval", "200ms"], log_path)
    try:
        wait_for(log_path, "] replicating", proc)
    finally:
        stop(proc)
    assert os.listdir(r) == ["t-" + name]
    # (Read without a URI: the name holds '?' and '#'.)
    con = sqlite3.connect(str(d / name))
    rows = con.execute("SELECT * FROM usuarios ORDER BY id").fetchall()
    con.close()
    assert restore(f"{r}/t-{name}", tmp_path / "x.out")["usuarios"] == rows


def test_config_directories_with_a_listed_database_beside_them(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    create_ticket_db(d / "main.db", rows=2)          # listed under databases:, and matched by the pattern
    create_ticket_db(d / "t1.sqlite", rows=3)        # found by the pattern
    cfg = tmp_path / "walship.yml"
    cfg.write_text(
        f"defaults:\n  sync-interval: 200ms\nstatus-file: {tmp_path}/status.json\n"
        f"databases:\n  - path: {d}/main.db\n    replicas:\n      - url: file://{tmp_path}/main-replica\n"
        f"directories:\n  - path: {d}\n    pattern: '*'\n    replicas:\n      - url: file://{tmp_path}/dir-replicas/{{name}}\n")
    log_path = tmp_path / "agent.log"
    proc = start(["--config", cfg], log_path)
    try:
        wait_for(log_path, "] replicating", proc, count=2)
        add_rows(d / "t1.sqlite", 3, "t")
        add_rows(d / "main.db", 3, "m")
        time.sleep(1.0)
        # The listed database, matched by the pattern too, has one agent (the listed one),
        # which the directory never retires.
        log = log_path.read_text(errors="replace")
        assert "retiring" not in log and f"db.path={d}/main.db [WalshipAgent] database found" not in log, log[-2000:]
        assert not (tmp_path / "dir-replicas" / "main.db").exists()
        deadline = time.monotonic() + 30
        while True:   # (the status file is rewritten within a couple of seconds of a change)
            st = run_walship("status", "--config", cfg, "--json")
            if st.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert st.returncode == 0, st.stdout + st.stderr
        assert f"{d}/t1.sqlite" in st.stdout and f"{d}/main.db" in st.stdout
        # From the process's one status file (status-file:), which holds both.
        ps = json.loads((tmp_path / "status.json").read_text())
        assert sorted(r["database"] for r in ps["databases"]) == [f"{d}/main.db", f"{d}/t1.sqlite"]
    finally:
        stop(proc)
    # restore --config finds a directory's database by its path.
    p = run_walship("restore", d / "t1.sqlite", "--config", cfg, "-o", tmp_path / "t1.out")
    assert p.returncode == 0, p.stderr
    assert table_contents(tmp_path / "t1.out") == table_contents(d / "t1.sqlite")
    assert restore(f"file://{tmp_path}/main-replica", tmp_path / "m.out") == table_contents(d / "main.db")


def test_directory_mode_refuses_what_would_go_wrong(tmp_path):
    d = tmp_path / "tenants"
    d.mkdir()
    cases = [
        (["--dir", d, "--replica-template", f"file://{tmp_path}/r"], "put {name} where"),
        (["--pattern", "*.db", str(d / "a.db")], "--pattern and --replica-template go with --dir"),
        (["--dir", tmp_path / "missing"], "does not exist"),
        (["--dir", d, "--spool-dir", tmp_path / "s"], "--spool-dir names one database"),
        (["--dir", d, "--pattern", "a/*.db"], "no '/'"),
        (["--dir", d, str(d / "a.db")], "with --dir, give no database path"),
        (["--dir", d, "--replica-template", "gs://b/{name}"], "no backend for gs://"),
        (["--dir", d, "--replica-template", "s3://b/p?endpoint=http://{name}"], "not its query"),
        (["--dir", d, "--replica-template", f"file://{tmp_path}/r/{{name}}?x={{name}}"], "only in the URL's path"),
        (["--dir", d, "--replica-template", "s3://{name}/tenants?endpoint=http://127.0.0.1:1"], "not in its bucket or host"),
    ]
    for args, expected in cases:
        p = run_walship("replicate", *args, timeout=30)
        assert p.returncode != 0, args
        assert expected in p.stderr, (args, p.stderr)
    bad = tmp_path / "bad.yml"
    bad.write_text(f"directories:\n  - path: {d}\n    replicas:\n      - url: file://{tmp_path}/same\n")
    p = run_walship("replicate", "--config", bad, timeout=30)
    assert p.returncode != 0 and "directories[0].replicas[0].url: a directory's replica URL: put {name}" in p.stderr, p.stderr


def test_a_name_cannot_move_the_default_replica(tmp_path):
    """Without a template each database replicates beside itself (<name>-replica); a name with
    percent escapes stays one name there (it is never decoded into '/' and '..')."""
    d = tmp_path / "tenants"
    d.mkdir()
    (tmp_path / "other").mkdir()
    name = "t%2F..%2F..%2Fother%2Fx.db"
    create_ticket_db(d / name, rows=2)
    log_path = tmp_path / "agent.log"
    proc = start(["--dir", d, "--sync-interval", "200ms"], log_path)
    try:
        wait_for(log_path, "] replicating", proc)
    finally:
        stop(proc)
    assert (d / (name + "-replica")).is_dir()
    assert os.listdir(tmp_path / "other") == []


def test_a_database_replaced_in_the_directory_is_replicated_from_its_new_file(tmp_path):
    """A restore or a VACUUM INTO moved over the database: the agent of the old file ends, and the
    next listing starts one for the new file (a new generation), within a second or so."""
    d = tmp_path / "tenants"
    d.mkdir()
    r = tmp_path / "replicas"
    r.mkdir()
    create_ticket_db(d / "a.db", rows=2)
    log_path = tmp_path / "agent.log"
    proc = start(["--dir", d, "--replica-template", f"file://{r}/{{name}}", "--sync-interval", "200ms"], log_path)
    try:
        wait_for(log_path, "] replicating", proc)
        new = tmp_path / "new.db"
        create_ticket_db(new, rows=7)
        con = sqlite3.connect(str(new))
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        con.close()
        os.rename(new, d / "a.db")
        for suffix in ("-wal", "-shm"):
            if (d / ("a.db" + suffix)).exists():
                (d / ("a.db" + suffix)).unlink()
        wait_for(log_path, "] replicating", proc, count=2, timeout=30)
        add_rows(d / "a.db", 3, "after")
        time.sleep(1.0)
        assert "changed since it was found" not in log_path.read_text(errors="replace")
    finally:
        stop(proc)
    assert restore(f"file://{r}/a.db", tmp_path / "a.out") == table_contents(d / "a.db")
