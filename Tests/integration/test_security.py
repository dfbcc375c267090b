"""Security (docs/GUARANTEES.md): what the agent leaves in a replica directory is readable by
its owner only, like the database it copies."""
import os
import sqlite3
import stat
import time

from conftest import create_ticket_db


def test_directory_replica_is_private(tmp_path, agent_factory):
    """A file:// replica holds copies of the database: 0600 files and 0700 directories, never
    world-readable copies of a 0600 database."""
    db, replica = tmp_path / "app.db", tmp_path / "replica"
    create_ticket_db(db, rows=5)
    os.chmod(db, 0o600)
    old = os.umask(0o022)   # the usual umask: it would leave 0644 files and 0755 directories
    try:
        agent = agent_factory(db, ["file://" + str(replica)], ["--sync-interval", "100ms"]).start().wait_ready()
    finally:
        os.umask(old)
    con = sqlite3.connect(str(db), isolation_level=None, timeout=10)
    con.execute("INSERT INTO usuarios(nombre, email) VALUES('x', 'x@example.com')")
    con.close()
    time.sleep(0.6)
    agent.stop()
    seen = {"files": 0, "dirs": 0}
    wrong = []
    for root, dirs, files in os.walk(replica):
        for d in [root]:
            m = stat.S_IMODE(os.lstat(d).st_mode)
            seen["dirs"] += 1
            if m & 0o077:
                wrong.append(f"{d}: {oct(m)}")
        for f in files:
            p = os.path.join(root, f)
            m = stat.S_IMODE(os.lstat(p).st_mode)
            seen["files"] += 1
            if m & 0o077:
                wrong.append(f"{p}: {oct(m)}")
    assert seen["files"] >= 3 and seen["dirs"] >= 3, seen
    assert not wrong, "readable by others:\n" + "\n".join(wrong)
