#!/usr/bin/env python3
"""`make run`: a walship demo on its embedded default, a local directory replica.

Creates the ticket-system database (usuarios, tickets, interacciones) under ./demo, runs
`walship replicate` on it (default replica: file://<dir>/tickets.db-replica), writes tickets
for a few seconds, stops the agent, then restores both the latest state and a point in time
and checks them against the live database.
"""
import argparse
import datetime
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

SCHEMA = """
CREATE TABLE IF NOT EXISTS usuarios(id INTEGER PRIMARY KEY, nombre TEXT NOT NULL, email TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tickets(id INTEGER PRIMARY KEY, usuario_id INTEGER NOT NULL REFERENCES usuarios(id),
    titulo TEXT NOT NULL, estado TEXT NOT NULL, prioridad INTEGER NOT NULL, creado REAL NOT NULL);
CREATE TABLE IF NOT EXISTS interacciones(id INTEGER PRIMARY KEY, ticket_id INTEGER NOT NULL REFERENCES tickets(id),
    texto TEXT NOT NULL, creado REAL NOT NULL);
"""


def counts(path):
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    out = {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("usuarios", "tickets", "interacciones")}
    con.close()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--walship", default=".build/release/walship")
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--dir", default="demo")
    a = ap.parse_args()
    walship = os.path.abspath(a.walship)
    d = os.path.abspath(a.dir)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    db = os.path.join(d, "tickets.db")
    replica = db + "-replica"

    con = sqlite3.connect(db, timeout=5)   # busy_timeout 5000 ms, as walship asks of applications
    con.execute("PRAGMA journal_mode=WAL")
    con.executescript(SCHEMA)
    for i in range(20):
        con.execute("INSERT INTO usuarios(nombre, email) VALUES(?, ?)", (f"usuario {i}", f"u{i}@example.com"))
    con.commit()

    print(f"== walship replicate {db}   (default replica: file://{replica})")
    log = open(os.path.join(d, "agent.log"), "w")
    agent = subprocess.Popen([walship, "replicate", db, "--sync-interval", "500ms"], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 30
    while "replicating" not in open(log.name).read():
        if agent.poll() is not None or time.time() > deadline:
            sys.exit("agent did not start:\n" + open(log.name).read())
        time.sleep(0.05)

    rng = random.Random(7)
    start = time.time()
    midpoint = None
    mid_counts = None
    n = 0
    while time.time() - start < a.seconds:
        uid = rng.randint(1, 20)
        cur = con.execute("INSERT INTO tickets(usuario_id, titulo, estado, prioridad, creado) VALUES(?,?,?,?,?)",
                          (uid, f"ticket {n}", "abierto", rng.randint(1, 5), time.time()))
        con.execute("INSERT INTO interacciones(ticket_id, texto, creado) VALUES(?,?,?)", (cur.lastrowid, "recibido", time.time()))
        if n % 5 == 0:
            con.execute("UPDATE tickets SET estado='cerrado' WHERE id=?", (rng.randint(1, cur.lastrowid),))
        con.commit()
        n += 1
        if midpoint is None and time.time() - start > a.seconds / 2:
            time.sleep(0.05)   # let the agent see the last commit before the recorded instant
            midpoint = datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")
            mid_counts = counts(db)
            time.sleep(0.05)
        time.sleep(0.01)
    print(f"   wrote {n} transactions in {a.seconds:.0f} s; point in time recorded at {midpoint}")
    time.sleep(1)
    agent.send_signal(signal.SIGTERM)
    agent.wait(timeout=60)
    print(f"   agent stopped (exit {agent.returncode}); log: {log.name}")

    print(f"== walship list file://{replica}")
    subprocess.run([walship, "list", "file://" + replica], check=True)

    latest = os.path.join(d, "restored-latest.db")
    print(f"== walship restore file://{replica} -o {latest}")
    subprocess.run([walship, "restore", "file://" + replica, "-o", latest], check=True)
    pitr = os.path.join(d, "restored-midpoint.db")
    print(f"== walship restore file://{replica} -o {pitr} --timestamp {midpoint}")
    subprocess.run([walship, "restore", "file://" + replica, "-o", pitr, "--timestamp", midpoint], check=True)

    live = counts(db)
    ok_latest = counts(latest) == live
    ok_mid = counts(pitr) == mid_counts
    print(f"   live database:      {live}")
    print(f"   restored latest:    {counts(latest)}  {'matches' if ok_latest else 'DIFFERS'}")
    print(f"   restored midpoint:  {counts(pitr)}  {'matches the recorded instant' if ok_mid else 'DIFFERS'}")
    print(f"\nThe replica is at {replica}. To restore it yourself:\n"
          f"  {walship} restore file://{replica} -o /tmp/tickets.db\n"
          f"  {walship} restore file://{replica} -o /tmp/tickets-then.db --timestamp {midpoint}")
    sys.exit(0 if ok_latest and ok_mid else 1)


if __name__ == "__main__":
    main()
