"""Capture correctness under ordinary SQLite behaviour and operator mistakes: each test here
is a failure once found by trying to break the agent, kept so it cannot come back.

  - a commit right after a rolled-back transaction that spilled into the WAL is shipped    (G1/G2)
  - ...and is not lost when the agent's checkpoint cycle runs before anything else        (G2)
  - a database named through a symlink is replicated                                       (G2)
  - a new generation sorts after the old one even when the clock went back                 (G2/G3)
"""
import os
import sqlite3
import subprocess
import time

from conftest import (checkpoint_truncate, create_ticket_db, file_bytes_equal, reachable, run_walship,
                      shifted_clock_env, table_contents, unreachable)


def url(path):
    return "file://" + str(path)


def restore_latest(replica, out):
    p = run_walship("restore", url(replica), "-o", out, "--force")
    assert p.returncode == 0, p.stdout + p.stderr
    return out


def wal_frames(db):
    size = os.path.getsize(str(db) + "-wal")
    con = sqlite3.connect(str(db))
    ps = con.execute("PRAGMA page_size").fetchone()[0]
    con.close()
    return (size - 32) // (ps + 24) if size >= 32 else 0


def spill_then_roll_back(con, how):
    """A transaction big enough to spill dirty pages into the WAL, rolled back; `how` is
    'rollback' or 'savepoint' (ROLLBACK TO, then COMMIT of an empty transaction)."""
    con.execute("PRAGMA cache_size=5")
    con.execute("BEGIN")
    if how == "savepoint":
        con.execute("SAVEPOINT big")
    for i in range(400):
        con.execute("INSERT INTO interacciones(ticket_id, texto, creado) VALUES(1, ?, 0)", ("x" * 900,))
    if how == "savepoint":
        con.execute("ROLLBACK TO big")
        con.execute("RELEASE big")
        con.execute("COMMIT")
    else:
        con.execute("ROLLBACK")
    con.execute("PRAGMA cache_size=-2000")
    time.sleep(0.5)   # the agent reads the spilled frames before the next commit


def test_commit_after_a_rolled_back_spill_is_shipped(tmp_path, agent_factory):
    for how in ("rollback", "savepoint"):
        d = tmp_path / how
        d.mkdir()
        db, replica = d / "app.db", d / "replica"
        create_ticket_db(db, rows=3)
        agent = agent_factory(db, [url(replica)], ["--sync-interval", "100ms"]).start().wait_ready()
        con = sqlite3.connect(str(db), isolation_level=None, timeout=10)
        for i in range(5):   # committed frames in the log, so the spill cannot restart it
            con.execute("INSERT INTO tickets(usuario_id, titulo, estado, prioridad, creado) VALUES(1, 't', 'a', 1, 0)")
        time.sleep(0.3)
        before = wal_frames(db)
        spill_then_roll_back(con, how)
        assert wal_frames(db) > before + 20, "the rolled-back transaction did not spill into the WAL"
        con.execute("INSERT INTO usuarios(nombre, email) VALUES('B', 'b@example.com')")
        con.close()
        time.sleep(1.5)   # fifteen sync intervals
        out = restore_latest(replica, d / "out.db")
        names = [r[1] for r in table_contents(out)["usuarios"]]
        assert "B" in names, f"{how}: the commit after the rolled-back spill was not shipped: {names}"
        agent.stop()
        checkpoint_truncate(db)
        restore_latest(replica, d / "out.db")
        assert file_bytes_equal(db, d / "out.db"), how


def test_commit_after_a_rolled_back_spill_survives_the_checkpoint_cycle(tmp_path, agent_factory):
    """The agent's checkpoint cycle must not copy into the database a commit it has not
    shipped: after the next writer restarts the WAL it would be gone from the replica."""
    db, replica = tmp_path / "app.db", tmp_path / "replica"
    create_ticket_db(db, rows=3)
    agent = agent_factory(db, [url(replica)], ["--sync-interval", "100ms", "--checkpoint-frames", "10"]).start().wait_ready()
    con = sqlite3.connect(str(db), isolation_level=None, timeout=10)
    for i in range(30):   # past the checkpoint threshold
        con.execute("INSERT INTO tickets(usuario_id, titulo, estado, prioridad, creado) VALUES(1, 't', 'a', 1, 0)")
    time.sleep(0.5)
    spill_then_roll_back(con, "rollback")
    con.execute("INSERT INTO usuarios(nombre, email) VALUES('B', 'b@example.com')")
    time.sleep(3)   # room for checkpoint cycles (at most one a second)
    con.execute("INSERT INTO usuarios(nombre, email) VALUES('C', 'c@example.com')")
    con.close()
    time.sleep(1)
    agent.stop()
    out = restore_latest(replica, tmp_path / "out.db")
    names = [r[1] for r in table_contents(out)["usuarios"]]
    assert "B" in names and "C" in names, f"a commit was lost: {names}\n{agent.read_log()[-2000:]}"
    checkpoint_truncate(db)
    assert file_bytes_equal(db, out)


def test_database_through_a_symlink_is_replicated(tmp_path, agent_factory):
    real_dir = tmp_path / "data"
    real_dir.mkdir()
    real, link = real_dir / "real.db", tmp_path / "link.db"
    create_ticket_db(real, rows=2)
    link.symlink_to(real)
    replica = tmp_path / "replica"
    agent = agent_factory(link, [url(replica)], ["--sync-interval", "100ms"]).start().wait_ready()
    con = sqlite3.connect(str(link), isolation_level=None, timeout=10)
    con.execute("INSERT INTO usuarios(nombre, email) VALUES('after', 'a@example.com')")
    con.close()
    time.sleep(1.5)
    out = restore_latest(replica, tmp_path / "out.db")
    names = [r[1] for r in table_contents(out)["usuarios"]]
    assert "after" in names, f"a commit through the symlink was not replicated: {names}\n{agent.read_log()[-2000:]}"
    agent.stop()
    assert not (tmp_path / "link.db-wal").exists()


def test_new_generation_sorts_last_when_the_clock_went_back(tmp_path, agent_factory, clock_shift_lib):
    """A clock stepped back a day (NTP, a restored VM) when a new generation starts: the
    latest restore must still be the newest generation's state."""
    db, replica = tmp_path / "app.db", tmp_path / "replica"
    create_ticket_db(db, rows=2)
    agent = agent_factory(db, [url(replica)], ["--sync-interval", "100ms"]).start().wait_ready()
    time.sleep(0.3)
    agent.stop()
    # The spool is lost (a new host, say): the next start begins a new generation.
    spool = tmp_path / ".app.db-walship"
    assert spool.is_dir()
    subprocess.run(["rm", "-rf", str(spool)], check=True)
    env = shifted_clock_env(clock_shift_lib, -86_400_000_000)
    agent2 = agent_factory(db, [url(replica)], ["--sync-interval", "100ms"], env=env,
                           log_path=tmp_path / "agent2.log").start().wait_ready()
    con = sqlite3.connect(str(db), isolation_level=None, timeout=10)
    con.execute("INSERT INTO usuarios(nombre, email) VALUES('after the step', 'x@example.com')")
    con.close()
    time.sleep(1)
    agent2.stop()
    assert "starting a new generation" in agent2.read_log()
    out = restore_latest(replica, tmp_path / "out.db")
    names = [r[1] for r in table_contents(out)["usuarios"]]
    assert "after the step" in names, f"latest restore returned an older generation: {names}"


def test_database_file_replaced_while_running_starts_a_new_generation(tmp_path, agent_factory):
    """`mv new.db app.db` under a running agent: it ships what it read, then replicates the
    new file in a new generation, without stopping."""
    db, replica = tmp_path / "app.db", tmp_path / "replica"
    create_ticket_db(db, rows=2)
    agent = agent_factory(db, [url(replica)], ["--sync-interval", "100ms"]).start().wait_ready()
    other = tmp_path / "new.db"
    create_ticket_db(other, rows=7)
    checkpoint_truncate(other)
    for sidecar in ("-wal", "-shm"):
        if os.path.exists(str(other) + sidecar):
            os.remove(str(other) + sidecar)
    os.rename(other, db)
    deadline = time.time() + 10
    while agent.read_log().count("starting a new generation") < 2 and time.time() < deadline:
        time.sleep(0.1)
    assert agent.proc.poll() is None, f"the agent stopped:\n{agent.read_log()[-2000:]}"
    assert agent.read_log().count("starting a new generation") >= 2, agent.read_log()[-2000:]
    con = sqlite3.connect(str(db), isolation_level=None, timeout=10)
    con.execute("INSERT INTO usuarios(nombre, email) VALUES('new file', 'n@example.com')")
    con.close()
    time.sleep(1)
    assert agent.proc.poll() is None, f"the agent stopped:\n{agent.read_log()[-2000:]}"
    agent.stop()
    out = restore_latest(replica, tmp_path / "out.db")
    names = [r[1] for r in table_contents(out)["usuarios"]]
    assert len(names) == 8 and "new file" in names, names


def test_second_agent_with_another_spool_is_refused(tmp_path, agent_factory):
    db, replica = tmp_path / "app.db", tmp_path / "replica"
    create_ticket_db(db, rows=2)
    first = agent_factory(db, [url(replica)], ["--sync-interval", "100ms"]).start().wait_ready()
    second = agent_factory(db, [url(replica)], ["--sync-interval", "100ms", "--spool-dir", tmp_path / "other-spool"],
                           log_path=tmp_path / "second.log").start()
    rc = second.proc.wait(timeout=30)
    assert rc != 0, "a second agent with another spool directory was not refused"
    log = second.read_log()
    assert "already replicating" in log and f"pid {first.proc.pid}" in log, log
    # ...and through a symlink, with the default spool.
    link = tmp_path / "link.db"
    link.symlink_to(db)
    third = agent_factory(link, [url(tmp_path / "replica3")], log_path=tmp_path / "third.log").start()
    assert third.proc.wait(timeout=30) != 0
    assert "already replicating" in third.read_log()
    assert first.proc.poll() is None
    first.stop()


def test_segment_queued_after_the_last_saved_state_never_ships(tmp_path, agent_factory):
    """A kill between queueing a segment and saving the state leaves a segment the state does
    not vouch for. Whether the next start continues the generation or not, it must not ship:
    its txids are given again to other transactions."""
    import json
    db, replica = tmp_path / "app.db", tmp_path / "replica"
    create_ticket_db(db, rows=2)
    agent = agent_factory(db, [url(replica)], ["--sync-interval", "100ms"]).start().wait_ready()
    con = sqlite3.connect(str(db), isolation_level=None, timeout=10)
    con.execute("INSERT INTO usuarios(nombre, email) VALUES('a', 'a@example.com')")
    time.sleep(0.5)
    agent.stop()
    spool = tmp_path / ".app.db-walship"
    st = json.loads((spool / "state.json").read_text())
    gen, last, seq = st["generation"], st["lastTxid"], st["nextSequence"]
    key = f"generations/{gen}/segments/0/{last + 1:016x}-{last + 5:016x}-1-2.seg.lz4"
    (spool / "outbox" / (f"{seq:016x}~" + key.replace("/", "~"))).write_bytes(b"not vouched for")
    # While the agent is away the log restarts and the database moves on: no continuity.
    con.execute("INSERT INTO usuarios(nombre, email) VALUES('b', 'b@example.com')")
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.execute("INSERT INTO usuarios(nombre, email) VALUES('c', 'c@example.com')")
    con.close()
    agent2 = agent_factory(db, [url(replica)], ["--sync-interval", "100ms"], log_path=tmp_path / "agent2.log").start().wait_ready()
    time.sleep(0.5)
    agent2.stop()
    assert "cannot prove continuity" in agent2.read_log()
    assert not (replica / key).exists(), "a segment the saved state did not vouch for was shipped"


def test_replica_directory_deleted_mid_run_gets_a_new_generation(tmp_path, agent_factory):
    """The replica's directory deleted under a running agent: segments must not be shipped
    into a chain that lost its snapshot; the agent says so and starts a new generation."""
    import shutil
    db, replica = tmp_path / "app.db", tmp_path / "replica"
    create_ticket_db(db, rows=2)
    agent = agent_factory(db, [url(replica)], ["--sync-interval", "100ms"]).start().wait_ready()
    con = sqlite3.connect(str(db), isolation_level=None, timeout=10)
    con.execute("INSERT INTO usuarios(nombre, email) VALUES('before', 'b@example.com')")
    time.sleep(0.5)
    shutil.rmtree(replica)
    for i in range(5):
        con.execute("INSERT INTO usuarios(nombre, email) VALUES(?, 'x@example.com')", (f"after {i}",))
        time.sleep(0.2)
    con.close()
    time.sleep(1.5)
    agent.stop()
    log = agent.read_log()
    assert "lost the current generation" in log, log[-2000:]
    checkpoint_truncate(db)
    out = restore_latest(replica, tmp_path / "out.db")
    assert file_bytes_equal(db, out)


def test_replica_unreachable_for_a_while_is_not_taken_for_lost(tmp_path, agent_factory):
    """A directory replica that is unreachable for a while (a file stands where it was) is
    an outage, not a lost generation: the housekeeping look for
    the generation's generation.json (every second here) must not take "cannot tell" for
    "gone" and drop the backlog. Once it is back, one generation chains without a gap."""
    db, replica = tmp_path / "app.db", tmp_path / "replica"
    create_ticket_db(db, rows=2)
    agent = agent_factory(db, [url(replica)], ["--sync-interval", "100ms", "--retention", "4s"]).start().wait_ready()
    con = sqlite3.connect(str(db), isolation_level=None, timeout=10)
    con.execute("INSERT INTO usuarios(nombre, email) VALUES('before', 'b@example.com')")
    agent.wait_for_log("replicating")
    time.sleep(1.0)
    away = tmp_path / "replica.away"
    unreachable(replica, away)
    time.sleep(2.5)   # nothing to upload: housekeeping looks (every second) while no upload has failed
    for i in range(5):
        con.execute("INSERT INTO usuarios(nombre, email) VALUES(?, 'x@example.com')", (f"during {i}",))
        time.sleep(0.5)
    reachable(replica, away)
    con.execute("INSERT INTO usuarios(nombre, email) VALUES('after', 'a@example.com')")
    con.close()
    deadline = time.time() + 30
    while agent.read_log().count("starting a new generation") < 2 and time.time() < deadline:
        p = run_walship("restore", url(replica), "-o", tmp_path / "probe.db", "--force")
        if p.returncode == 0 and table_contents(tmp_path / "probe.db") == table_contents(db):
            break
        time.sleep(0.5)
    agent.stop()
    log = agent.read_log()
    assert "could not check that the replica still holds the current generation" in log, \
        "housekeeping never looked while the replica was unreachable: nothing was tested\n" + log[-3000:]
    assert "lost the current generation" not in log, log[-3000:]
    assert log.count("starting a new generation") == 1, log[-3000:]
    checkpoint_truncate(db)
    out = restore_latest(replica, tmp_path / "out.db")
    assert file_bytes_equal(db, out)


def test_restart_after_a_first_run_without_wal_continues_the_generation(tmp_path, agent_factory):
    """First run on a database that had no WAL (the agent switches it to WAL mode), no writes;
    the application writes while the agent is stopped. The restart can prove continuity (the
    database file is what was shipped, and every WAL frame came after): no new snapshot."""
    db, replica = tmp_path / "app.db", tmp_path / "replica"
    con = sqlite3.connect(str(db))
    con.execute("CREATE TABLE usuarios(id INTEGER PRIMARY KEY, nombre TEXT NOT NULL, email TEXT NOT NULL)")
    con.execute("INSERT INTO usuarios(nombre, email) VALUES('first', 'f@example.com')")
    con.commit()
    con.close()
    assert not os.path.exists(str(db) + "-wal")
    agent = agent_factory(db, [url(replica)], ["--sync-interval", "100ms"]).start().wait_ready()
    # The application keeps a connection open, as applications do (so no connection's close
    # checkpoints the WAL away while the agent is stopped).
    con = sqlite3.connect(str(db), isolation_level=None, timeout=10)
    con.execute("SELECT count(*) FROM usuarios").fetchall()
    time.sleep(0.5)
    agent.stop()
    con.execute("INSERT INTO usuarios(nombre, email) VALUES('while away', 'w@example.com')")
    agent2 = agent_factory(db, [url(replica)], ["--sync-interval", "100ms"], log_path=tmp_path / "agent2.log").start().wait_ready()
    time.sleep(0.5)
    agent2.stop()
    con.close()
    log = agent2.read_log()
    assert "continuing generation" in log and "starting a new generation" not in log, log[-2000:]
    out = restore_latest(replica, tmp_path / "out.db")
    assert [r[1] for r in table_contents(out, ("usuarios",))["usuarios"]] == ["first", "while away"]


def test_application_truncate_checkpoints_complete_beside_the_agent(tmp_path, agent_factory):
    """An application that runs PRAGMA wal_checkpoint(TRUNCATE) beside a writer: with the
    agent's pin in the way each one used to wait out its whole busy timeout and then give up,
    and the writer behind it got "database is locked". The agent must make way: every
    checkpoint completes, the writer never fails, and nothing is lost."""
    import threading
    db, replica = tmp_path / "app.db", tmp_path / "replica"
    create_ticket_db(db, rows=2)
    agent = agent_factory(db, [url(replica)]).start().wait_ready()   # default 1 s sync interval
    errors, results, done = [], [], threading.Event()

    def write():
        con = sqlite3.connect(str(db), isolation_level=None, timeout=5)
        try:
            for i in range(150):
                con.execute("INSERT INTO tickets(usuario_id, titulo, estado, prioridad, creado) VALUES(1, ?, 'a', 1, 0)", (f"t{i}",))
                time.sleep(0.01)
        except sqlite3.Error as e:
            errors.append(f"writer: {e}")
        finally:
            con.close()
            done.set()

    def checkpoint():
        con = sqlite3.connect(str(db), isolation_level=None, timeout=5)
        try:
            for _ in range(8):
                results.append(con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone())
                time.sleep(0.1)
        except sqlite3.Error as e:
            errors.append(f"checkpointer: {e}")
        finally:
            con.close()

    threads = [threading.Thread(target=write), threading.Thread(target=checkpoint)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len(results) == 8 and all(r[0] == 0 for r in results), \
        f"application checkpoints did not complete (busy, log, checkpointed): {results}\n{agent.read_log()[-2000:]}"
    time.sleep(1.5)
    agent.stop()
    checkpoint_truncate(db)
    out = restore_latest(replica, tmp_path / "out.db")
    assert file_bytes_equal(db, out), "a transaction was lost"


def test_application_truncate_waiting_on_the_pins_slot_completes(tmp_path, agent_factory):
    """A TRUNCATE checkpoint that starts while the agent's pin stands behind the end of the
    log waits, with its busy handler, for an exclusive lock on the pin's read-mark slot. A
    pin moved by ending it and beginning it again took that same slot back at once, every
    time, and the checkpoint waited out its whole busy timeout (and the writers behind it
    too). Here the agent is stopped while the log grows past its pin and the checkpoint
    starts, so the checkpoint surely waits for that slot when the agent resumes."""
    import signal
    import threading
    db, replica = tmp_path / "app.db", tmp_path / "replica"
    create_ticket_db(db, rows=2)
    agent = agent_factory(db, [url(replica)], ["--sync-interval", "100ms"]).start().wait_ready()
    con = sqlite3.connect(str(db), isolation_level=None, timeout=10)
    probe = sqlite3.connect(str(db), isolation_level=None, timeout=0.2)
    result = []
    ckpt = sqlite3.connect(str(db), isolation_level=None, timeout=5, check_same_thread=False)

    def checkpoint():
        result.append(ckpt.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone())

    waited = False
    for attempt in range(5):
        con.execute("INSERT INTO usuarios(nombre, email) VALUES(?, 'f@example.com')", (f"first {attempt}",))
        time.sleep(0.5)   # cut: the pin moves to the end of the log (a read mark past frame 0)
        agent.proc.send_signal(signal.SIGSTOP)
        try:   # stopped while it held the write lock (a cut)? then again
            probe.execute("BEGIN IMMEDIATE")
            probe.execute("ROLLBACK")
        except sqlite3.OperationalError:
            agent.proc.send_signal(signal.SIGCONT)
            continue
        try:
            for i in range(5):   # the log grows past the stopped agent's pin
                con.execute("INSERT INTO usuarios(nombre, email) VALUES(?, 'x@example.com')", (f"n{attempt}.{i}",))
            # The checkpointing connection reads the schema now, and one more commit follows:
            # then no read-mark slot stands at the end of the log, and a pin begun anew claims
            # the first free slot, which is its own old one.
            ckpt.execute("SELECT count(*) FROM sqlite_master").fetchone()
            con.execute("INSERT INTO usuarios(nombre, email) VALUES(?, 'x@example.com')", (f"one more {attempt}",))
            result.clear()
            t = threading.Thread(target=checkpoint)
            t.start()
            time.sleep(0.5)
            # Finished already: the agent was stopped between ending its pin and taking it
            # again (no pin), so nothing was tested; again.
            waited = t.is_alive()
        finally:
            agent.proc.send_signal(signal.SIGCONT)
        t.join(timeout=30)
        if waited:
            break
    probe.close()
    ckpt.close()
    assert waited, "the checkpoint never waited for the stopped agent's pin"
    assert result and result[0][0] == 0, \
        f"the TRUNCATE checkpoint gave up (busy, log, checkpointed): {result}\n{agent.read_log()[-2000:]}"
    con.execute("INSERT INTO usuarios(nombre, email) VALUES('after', 'a@example.com')")
    con.close()
    time.sleep(0.5)
    agent.stop()
    checkpoint_truncate(db)
    out = restore_latest(replica, tmp_path / "out.db")
    assert file_bytes_equal(db, out), "a transaction was lost"


def test_restart_after_a_large_backlog_is_exact_while_the_application_writes(tmp_path, agent_factory):
    """About 40 MB committed while the agent was stopped (the application keeps its connection,
    so nothing is checkpointed away), and the application goes on writing while the agent
    starts and reads that backlog (without the write lock): the chain continues and the
    latest restore is exact. Some seconds, the application checkpoints everything just
    before the start, so a restart can race the backlog read: then a new generation is fine,
    a silent loss is not."""
    import threading
    for variant in ("plain", "backfilled"):
        d = tmp_path / variant
        d.mkdir()
        db, replica = d / "app.db", d / "replica"
        create_ticket_db(db, rows=2)
        agent = agent_factory(db, [url(replica)], ["--sync-interval", "200ms"], log_path=d / "agent1.log").start().wait_ready()
        con = sqlite3.connect(str(db), isolation_level=None, timeout=10)
        if variant == "plain":   # nothing is copied back while the agent is away
            con.execute("PRAGMA wal_autocheckpoint=0")
        con.execute("INSERT INTO usuarios(nombre, email) VALUES('seen', 's@example.com')")
        time.sleep(0.5)
        agent.stop()
        con.execute("BEGIN")
        for i in range(400):
            con.execute("INSERT INTO interacciones(ticket_id, texto, creado) VALUES(1, ?, 0)", ("y" * 100_000,))
            if i % 40 == 39:
                con.execute("COMMIT")
                con.execute("BEGIN")
        con.execute("COMMIT")
        if variant == "backfilled":
            con.execute("PRAGMA wal_checkpoint(PASSIVE)")
        stop = threading.Event()
        errors = []

        def write():
            w = sqlite3.connect(str(db), isolation_level=None, timeout=10)
            if variant == "plain":
                w.execute("PRAGMA wal_autocheckpoint=0")
            try:
                i = 0
                while not stop.is_set():
                    w.execute("INSERT INTO usuarios(nombre, email) VALUES(?, 'w@example.com')", (f"w{i}",))
                    i += 1
                    time.sleep(0.005)
            except sqlite3.Error as e:
                errors.append(str(e))
            finally:
                w.close()

        t = threading.Thread(target=write)
        t.start()
        agent2 = agent_factory(db, [url(replica)], ["--sync-interval", "200ms"], log_path=d / "agent2.log").start().wait_ready(timeout=60)
        time.sleep(1)
        stop.set()
        t.join()
        con.close()
        assert not errors, errors
        time.sleep(0.6)
        agent2.stop()
        log = agent2.read_log()
        if variant == "plain":
            assert "continuing generation" in log and "starting a new generation" not in log, log[-2000:]
        checkpoint_truncate(db)
        out = restore_latest(replica, d / "out.db")
        assert file_bytes_equal(db, out), f"{variant}: the latest restore is not exact\n{log[-2000:]}"
        p = run_walship("verify", url(replica))
        assert p.returncode == 0, p.stdout + p.stderr


def test_database_page_changed_behind_sqlite_is_caught_after_a_checkpoint(tmp_path, agent_factory):
    """After a complete checkpoint the database file must hold exactly what the replicas hold.
    A page changed behind SQLite's back and never written again (what a missed transaction
    leaves) is caught at the agent's next complete checkpoint: logged with the page, counted,
    and a new generation whose restore equals the file."""
    db, replica = tmp_path / "app.db", tmp_path / "replica"
    create_ticket_db(db, rows=2)
    marker = b"COLD-PAGE-MARKER-" * 200
    con = sqlite3.connect(str(db), isolation_level=None, timeout=10)
    con.execute("CREATE TABLE cold(b BLOB)")
    con.execute("INSERT INTO cold VALUES(?)", (marker,))
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    agent = agent_factory(db, [url(replica)], ["--sync-interval", "100ms", "--checkpoint-frames", "10"]).start().wait_ready()
    page_size = con.execute("PRAGMA page_size").fetchone()[0]
    with open(db, "r+b") as f:
        data = f.read()
        at = data.index(marker[:17 * 20])
        f.seek(at)
        f.write(b"X")   # inside the blob: the file stays a valid database
    page = at // page_size + 1
    deadline = time.monotonic() + 30
    i = 0
    while time.monotonic() < deadline:
        for _ in range(20):   # enough frames for a checkpoint cycle
            con.execute("INSERT INTO usuarios(nombre, email) VALUES(?, 'x@example.com')", (f"n{i}",))
            i += 1
        time.sleep(0.2)
        if f"page {page} of the database file differs" in agent.read_log():
            break
    con.close()
    time.sleep(0.5)
    agent.stop()
    log = agent.read_log()
    assert f"page {page} of the database file differs" in log, log[-3000:]
    assert "starting a new generation" in log.split(f"page {page} of the database file differs", 1)[1], log[-3000:]
    checkpoint_truncate(db)
    out = restore_latest(replica, tmp_path / "out.db")
    assert file_bytes_equal(db, out)


def test_commits_made_while_the_agent_is_busy_are_dated_when_they_committed(tmp_path, agent_factory):
    """A snapshot of a large database keeps the agent's main loop busy for a while. A commit
    made meanwhile is still dated within milliseconds of its real commit, so `--timestamp`
    shortly after it restores it (G3). Before, it was dated when the loop next looked, after
    the snapshot: up to seconds late."""
    from conftest import WALSHIP
    from workload import rfc3339
    db, replica = tmp_path / "big.db", tmp_path / "replica"
    con = sqlite3.connect(str(db), isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE big(b BLOB)")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, at REAL)")
    con.execute("BEGIN")
    for _ in range(192):
        con.execute("INSERT INTO big VALUES (randomblob(1048576))")   # incompressible: a slow snapshot
    con.execute("COMMIT")
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    agent = agent_factory(db, [url(replica)], ["--sync-interval", "100ms", "--checkpoint-frames", "1000000"])
    agent.start().wait_ready(timeout=120)
    snap = subprocess.Popen([str(WALSHIP), "snapshot", str(db)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    commits = []   # (id, returned at): a quiet 400 ms follows each
    while snap.poll() is None and len(commits) < 40:
        con.execute("INSERT INTO t VALUES (?, ?)", (len(commits) + 1, time.time()))
        commits.append((len(commits) + 1, time.time()))
        time.sleep(0.4)
    out = snap.communicate(timeout=120)[0]
    assert snap.returncode == 0, out
    assert len(commits) >= 2, "the snapshot was too quick to commit during it"
    time.sleep(0.5)
    agent.stop()
    con.close()
    # The commits made while the snapshot ran (all but the last, which may follow it).
    for n, returned in commits[:-1]:
        target = tmp_path / f"at{n}.db"
        p = run_walship("restore", url(replica), "-o", target, "--timestamp", rfc3339(returned + 0.2))
        assert p.returncode == 0, p.stdout + p.stderr
        c = sqlite3.connect(str(target))
        got = c.execute("SELECT max(id) FROM t").fetchone()[0]
        c.close()
        target.unlink()
        assert got == n, f"--timestamp 200 ms after commit {n} restores {got} (commits dated late)"
