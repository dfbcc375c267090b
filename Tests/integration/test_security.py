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


def test_planted_generation_sorting_last_never_makes_retention_delete_the_live_one(tmp_path, agent_factory):
    """One empty object named as a snapshot of generation ffff… (which sorts after every real
    one, and claims a time before the retention cutoff) made retention take it as the
    snapshot to keep and delete the live generation, snapshot and generation.json included.
    Generations sorting after the agent's current one are now not its own and left alone,
    and the snapshot retention keeps is checked before anything older goes."""
    db, replica = tmp_path / "app.db", tmp_path / "replica"
    create_ticket_db(db, rows=5)
    agent = agent_factory(db, ["file://" + str(replica)],
                          ["--sync-interval", "100ms", "--snapshot-interval", "2s", "--retention", "2s"]).start().wait_ready()
    planted = replica / "generations" / ("f" * 20) / "snapshots" / "0000000000000000-1.snap.lz4"
    planted.parent.mkdir(parents=True)
    planted.write_bytes(b"")
    con = sqlite3.connect(str(db), isolation_level=None, timeout=10)
    for i in range(40):   # 8 s: snapshots every 2 s, housekeeping every 0.5 s
        con.execute("INSERT INTO usuarios(nombre, email) VALUES(?, ?)", (f"u{i}", f"u{i}@example.com"))
        time.sleep(0.2)
    con.close()
    time.sleep(0.5)
    log = agent.read_log()
    agent.stop()
    real = [g for g in os.listdir(replica / "generations") if g != "f" * 20]
    assert real, "retention deleted every real generation"
    gen = replica / "generations" / max(real)
    assert (gen / "generation.json").exists(), "retention deleted the live generation's generation.json"
    assert list((gen / "snapshots").glob("*.snap.lz4")), "retention deleted every snapshot of the live generation"
    assert "not its own" in log, log[-2000:]
    assert planted.exists(), "the planted object is not the agent's to delete either"
    # The live generation is whole: with the planted object gone (`latest` takes the
    # generation that sorts last, and fails on the planted one with a clear error), the
    # latest restore has every commit.
    import shutil
    import subprocess
    from conftest import WALSHIP
    shutil.rmtree(planted.parent.parent)
    out = tmp_path / "out.db"
    p = subprocess.run([str(WALSHIP), "restore", "file://" + str(replica), "-o", str(out)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    c = sqlite3.connect(str(out))
    assert c.execute("SELECT count(*) FROM usuarios").fetchone()[0] == 45
    c.close()


def test_snapshot_copied_from_another_database_is_refused(tmp_path, agent_factory):
    """Two databases replicated with the same key: A's snapshot, copied under B's replica as
    B's newest, restored A's rows as B with "checksum verified". A snapshot now carries the
    generation, txid and time of its name, and a restore checks all three."""
    import subprocess
    from conftest import WALSHIP
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    os.chmod(key, 0o600)
    reps = {}
    for name, rows in (("a", 3), ("b", 5)):
        db, rep = tmp_path / f"{name}.db", tmp_path / f"replica-{name}"
        create_ticket_db(db, rows=rows)
        ag = agent_factory(db, ["file://" + str(rep)], ["--sync-interval", "100ms", "--encryption-key-file", key],
                           log_path=tmp_path / f"{name}.log").start().wait_ready()
        time.sleep(0.5)
        ag.stop()
        reps[name] = rep
    a_snap = next(reps["a"].glob("generations/*/snapshots/*.snap.lz4"))
    b_gen = next((reps["b"] / "generations").iterdir())
    # Named as B's newest snapshot: A's txid (both are at txid 0), a later time.
    stolen = b_gen / "snapshots" / f"{0:016x}-{int(time.time() * 1000) + 1000}.snap.lz4"
    stolen.write_bytes(a_snap.read_bytes())
    out = tmp_path / "out.db"
    p = subprocess.run([str(WALSHIP), "restore", "file://" + str(reps["b"]), "-o", str(out),
                        "--encryption-key-file", str(key)], capture_output=True, text=True)
    assert p.returncode == 1, f"A's snapshot restored as B's (exit {p.returncode}): {p.stdout}{p.stderr}"
    assert stolen.name in p.stderr and "belongs to generation" in p.stderr, p.stderr
    assert not out.exists()
    p = subprocess.run([str(WALSHIP), "verify", "file://" + str(reps["b"]), "--encryption-key-file", str(key)],
                       capture_output=True, text=True)
    assert p.returncode == 1 and "belongs to generation" in p.stdout + p.stderr, p.stdout + p.stderr


def test_generation_copied_whole_from_another_database_is_left_out_by_its_id(tmp_path, agent_factory):
    """Two databases replicated with the same key: A's whole generation, copied under B's
    replica, is consistent in itself and newer than B's, so a restore of B's latest state
    returned A's rows. Every object now records its database's id (authenticated with the
    key); a restore pinned to B's id (`--database-id`, or `database-id` in the config)
    leaves A's generation out and restores B's own, and `verify` says what it left out."""
    import subprocess
    from conftest import WALSHIP, table_contents
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    os.chmod(key, 0o600)
    b_id = "b0b0b0b0b0b0b0b0"
    reps = {}
    for name, rows, extra in (("b", 5, ["--database-id", b_id]), ("a", 3, [])):   # A's generation is the newer
        db, rep = tmp_path / f"{name}.db", tmp_path / f"replica-{name}"
        create_ticket_db(db, rows=rows)
        ag = agent_factory(db, ["file://" + str(rep)], ["--sync-interval", "100ms", "--encryption-key-file", key] + extra,
                           log_path=tmp_path / f"{name}.log").start().wait_ready()
        time.sleep(0.5)
        ag.stop()
        reps[name] = rep
    run = lambda *a: subprocess.run([str(WALSHIP), *map(str, a)], capture_output=True, text=True)
    out = tmp_path / "out.db"
    p = run("restore", "file://" + str(reps["b"]), "-o", out, "--encryption-key-file", key, "--database-id", b_id)
    assert p.returncode == 0 and f"database {b_id}" in p.stdout, p.stdout + p.stderr
    os.remove(out)
    a_gen = next((reps["a"] / "generations").iterdir())
    import shutil
    shutil.copytree(a_gen, reps["b"] / "generations" / a_gen.name)
    p = run("restore", "file://" + str(reps["b"]), "-o", out, "--encryption-key-file", key, "--database-id", b_id)
    assert p.returncode == 0, p.stdout + p.stderr
    assert table_contents(out) == table_contents(tmp_path / "b.db"), f"A's generation restored as B's: {p.stdout}{p.stderr}"
    assert a_gen.name in p.stderr and "leaving it out" in p.stderr, p.stderr
    os.remove(out)
    cfg = tmp_path / "walship.yml"
    cfg.write_text(f"databases:\n  - path: {tmp_path / 'b.db'}\n    database-id: {b_id}\n"
                   f"    encryption:\n      key-file: {key}\n    replicas:\n      - url: file://{reps['b']}\n")
    p = run("restore", "--config", cfg, tmp_path / "b.db", "-o", out)
    assert p.returncode == 0 and table_contents(out) == table_contents(tmp_path / "b.db"), p.stdout + p.stderr
    p = run("verify", "file://" + str(reps["b"]), "--encryption-key-file", key, "--database-id", b_id)
    assert p.returncode == 0 and f"generation {a_gen.name} belongs to database" in p.stdout, p.stdout + p.stderr
    # Only B's generations: the pinned restore says so.
    shutil.rmtree(reps["b"] / "generations")
    (reps["b"] / "generations").mkdir()
    shutil.copytree(a_gen, reps["b"] / "generations" / a_gen.name)
    p = run("restore", "file://" + str(reps["b"]), "-o", tmp_path / "none.db", "--encryption-key-file", key, "--database-id", b_id)
    assert p.returncode == 1 and "belong to other databases" in p.stderr and not (tmp_path / "none.db").exists(), p.stderr
    p = run("restore", "file://" + str(reps["b"]), "-o", out, "--encryption-key-file", key, "--database-id", "00000000000000zz")
    assert p.returncode != 0 and "16 hexadecimal digits" in p.stderr, p.stderr


def test_unencrypted_generation_of_another_database_is_left_out_by_its_id(tmp_path, agent_factory):
    """The same as above without encryption: the pinned restore stopped at the foreign
    snapshot's metadata with "is unreadable" instead of leaving the generation out."""
    import shutil
    from conftest import run_walship, table_contents
    b_id = "b1b1b1b1b1b1b1b1"
    reps = {}
    for name, rows, extra in (("b", 5, ["--database-id", b_id]), ("a", 3, [])):
        db, rep = tmp_path / f"{name}.db", tmp_path / f"replica-{name}"
        create_ticket_db(db, rows=rows)
        ag = agent_factory(db, ["file://" + str(rep)], ["--sync-interval", "100ms"] + extra,
                           log_path=tmp_path / f"{name}.log").start().wait_ready()
        time.sleep(0.5)
        ag.stop()
        reps[name] = rep
    a_gen = next((reps["a"] / "generations").iterdir())
    shutil.copytree(a_gen, reps["b"] / "generations" / a_gen.name)
    out = tmp_path / "out.db"
    p = run_walship("restore", "file://" + str(reps["b"]), "-o", out, "--database-id", b_id)
    assert p.returncode == 0 and table_contents(out) == table_contents(tmp_path / "b.db"), p.stdout + p.stderr
    assert "leaving it out" in p.stderr, p.stderr


def test_a_restore_never_mixes_objects_of_two_databases(tmp_path, agent_factory):
    """A segment whose metadata names another database than the snapshot it would be applied
    to (all else matching) was applied. Restore, verify and compaction now refuse it."""
    import subprocess
    from conftest import WALSHIP
    from objects import read_metadata, rewrite_metadata
    db, rep = tmp_path / "app.db", tmp_path / "replica"
    create_ticket_db(db, rows=2)
    ag = agent_factory(db, ["file://" + str(rep)], ["--sync-interval", "100ms", "--compaction", "off"]).start().wait_ready()
    con = sqlite3.connect(db)
    con.execute("INSERT INTO usuarios(nombre, email) VALUES('later', 'later@example.com')")
    con.commit()
    con.close()
    segs = []
    deadline = time.time() + 10
    while not segs and time.time() < deadline:
        time.sleep(0.2)
        segs = sorted(rep.glob("generations/*/segments/*/*.seg.lz4"))
    ag.stop()
    assert segs, "no segment shipped"
    snap = next(rep.glob("generations/*/snapshots/*.snap.lz4"))
    own = read_metadata(snap)["database_id"]
    assert read_metadata(segs[0])["database_id"] == own
    rewrite_metadata(segs[0], database_id=own ^ 1)
    out = tmp_path / "out.db"
    p = subprocess.run([str(WALSHIP), "restore", "file://" + str(rep), "-o", str(out)], capture_output=True, text=True)
    assert p.returncode == 1, f"a segment of another database was applied (exit {p.returncode}): {p.stdout}{p.stderr}"
    assert segs[0].name in p.stderr and "belongs to database" in p.stderr, p.stderr
    assert not out.exists()
    assert own != 0, "objects record no database id"


def test_secrets_in_urls_never_reach_messages(tmp_path, agent_factory):
    """A webhook URL carries its token in the path, and credentials can be written into an S3
    endpoint URL. Neither appears in a log line or an error: a webhook is named by its host,
    and an endpoint with credentials is refused with the URL redacted."""
    import subprocess
    from conftest import WALSHIP, checkpoint_truncate
    from relayproxy import free_port
    db, replica = tmp_path / "app.db", tmp_path / "replica"
    create_ticket_db(db, rows=2)
    hook = f"http://127.0.0.1:{free_port()}/services/T0/B0/WEBHOOKTOKEN42"   # nobody listens there
    args = ["--sync-interval", "100ms", "--webhook-url", hook]
    first = agent_factory(db, ["file://" + str(replica)], args, log_path=tmp_path / "first.log").start().wait_ready()
    first.stop()
    con = sqlite3.connect(str(db), isolation_level=None, timeout=10)
    con.execute("INSERT INTO usuarios(nombre, email) VALUES('x', 'x@example.com')")
    con.close()
    checkpoint_truncate(db)   # continuity lost while stopped: a new generation, and an alert
    second = agent_factory(db, ["file://" + str(replica)], args, log_path=tmp_path / "second.log").start().wait_ready()
    second.wait_for_log("webhook unreachable", timeout=20)
    second.stop()
    log = second.read_log()
    assert "WEBHOOKTOKEN42" not in log, [l for l in log.splitlines() if "WEBHOOKTOKEN42" in l][:2]

    env = dict(os.environ, AWS_ACCESS_KEY_ID="AKIAWALSHIPTEST00001", AWS_SECRET_ACCESS_KEY="secretsecretsecret")
    for endpoint in (f"http://AKIAX:ENDPOINTSECRET9@127.0.0.1:{free_port()}",
                     f"http://AKIAX:ab/ENDPOINTSECRET9@127.0.0.1:{free_port()}",        # a slash in the secret
                     f"AKIAX:ENDPOINTSECRET9@127.0.0.1:{free_port()}",                   # no scheme
                     f"http%3A%2F%2FAKIAX%3AENDPOINTSECRET9%40127.0.0.1%3A{free_port()}"):
        url = f"s3://bucket/prefix?endpoint={endpoint}&region=us-east-1"
        for cmd in (["list", url], ["restore", url, "-o", tmp_path / "out.db"]):
            p = subprocess.run([str(WALSHIP), *map(str, cmd)], capture_output=True, text=True, env=env, timeout=60)
            assert p.returncode != 0, p.stdout + p.stderr
            assert "ENDPOINTSECRET9" not in p.stdout + p.stderr, p.stdout + p.stderr
            assert "credentials" in p.stderr, p.stderr


def test_slow_metrics_clients_never_block_a_scrape(tmp_path, agent_factory):
    """Clients that send a byte now and then (or nothing) held the metrics server, which
    served one connection at a time, for as long as they liked. Now a request must arrive
    whole within 2 s, connections are served side by side (at most 16; more get 503), and a
    scrape beside 24 slow clients is answered."""
    import re
    import socket
    import threading
    import urllib.request
    db, replica = tmp_path / "app.db", tmp_path / "replica"
    create_ticket_db(db, rows=2)
    agent = agent_factory(db, ["file://" + str(replica)], ["--sync-interval", "100ms", "--metrics-addr", "127.0.0.1:0"]).start().wait_ready()
    m = re.search(r"metrics\.url=http://127\.0\.0\.1:(\d+)/metrics", agent.read_log())
    assert m, agent.read_log()
    port = int(m.group(1))
    stop = threading.Event()
    closed_after = []

    def slow_client():
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        t0 = time.time()
        try:
            for b in b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n":
                if stop.is_set():
                    return
                s.sendall(bytes([b]))
                time.sleep(1.5)
        except OSError:
            closed_after.append(time.time() - t0)   # the server hung up on it
        finally:
            s.close()
    clients = [threading.Thread(target=slow_client, daemon=True) for _ in range(24)]
    for c in clients:
        c.start()
    time.sleep(0.5)
    answered, deadline = None, time.time() + 8
    while answered is None and time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as r:
                answered = (r.status, r.read())
        except OSError:   # 503 while every slot is taken, or a timeout
            time.sleep(0.2)
    stop.set()
    assert answered is not None and answered[0] == 200 and b"walship_txid" in answered[1], \
        "no scrape answered within 8 s beside slow clients"
    for c in clients:
        c.join(timeout=30)
    assert agent.proc.poll() is None
    agent.stop()
