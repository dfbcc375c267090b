"""Security (docs/GUARANTEES.md): what the agent leaves in a replica directory is readable by
its owner only, like the database it copies."""
import os
import sqlite3
import stat
import time

from conftest import create_ticket_db
from s3server import s3server  # noqa: F401  (fixture)


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


def test_restore_into_a_shared_directory_never_writes_through_planted_links(tmp_path, agent_factory, s3server):
    """A restore into a directory others can write (here 1777) builds everything in a private
    directory with an unguessable name. Before, its scratch names held only the process id:
    links planted under them for a running restore made it write object bytes through them
    into any file (here `victim`)."""
    import subprocess
    import threading
    from conftest import WALSHIP
    db = tmp_path / "app.db"
    create_ticket_db(db, rows=3)
    url = s3server.url("walship", "shared")
    agent = agent_factory(db, [url], ["--sync-interval", "100ms"], env=s3server.env()).start().wait_ready()
    con = sqlite3.connect(str(db), isolation_level=None, timeout=10)
    for i in range(40):   # one segment each: the restore prefetches them into scratch files
        con.execute("INSERT INTO usuarios(nombre, email) VALUES(?, ?)", (f"u{i}", f"u{i}@example.com"))
        time.sleep(0.15)
    con.close()
    time.sleep(0.5)
    agent.stop()
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    out = shared / "out.db"
    p = subprocess.Popen([str(WALSHIP), "restore", url, "-o", str(out)], env=s3server.env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    guessed = shared / f"out.db.walship-restore-{p.pid}"
    segments = shared / f"out.db.walship-restore-{p.pid}-segments"
    planted = []

    def plant():
        while p.poll() is None:
            for link in [guessed] + ([segments / f"{i}.obj" for i in range(64)] if segments.is_dir() else []):
                try:
                    os.symlink(victim, link)
                    planted.append(link.name)
                except OSError:
                    pass
    t = threading.Thread(target=plant)
    t.start()
    text = p.communicate(timeout=120)[0]
    t.join()
    assert victim.read_bytes() == b"precious", f"the restore wrote through a planted link ({len(planted)} planted)"
    assert p.returncode == 0, text
    c = sqlite3.connect(str(out))
    assert c.execute("SELECT count(*) FROM usuarios").fetchone()[0] == 43
    c.close()
    left = [n for n in os.listdir(shared) if n != "out.db" and not os.path.islink(shared / n)]
    assert not left, f"scratch left in the shared directory: {left}"
