#!/usr/bin/env python3
"""Standalone application processes for walship's integration tests.

Each mode runs as its own OS process (the tests start it with subprocess), using nothing
but Python's sqlite3 on the real database file, like an application beside the agent would.

Modes:
  workload  mixed inserts/updates/deletes on the ticket schema; optional PITR instants
            (quiet pause, then record the time and dump every table) and hostile
            checkpointing (own auto-checkpoint plus explicit PASSIVE/FULL/RESTART/TRUNCATE)
  reader    a long-lived reader holding read transactions open for seconds at a time
  bigtx     opens a huge transaction containing a marker and never commits (wait for SIGKILL)
  insert    commits one row into usuarios and exits
  hold      keeps an idle connection open until a stop file appears
  bursts    bursts of small transactions separated by pauses
"""
import argparse
import json
import os
import random
import sqlite3
import struct
import sys
import time
from datetime import datetime, timezone

TABLES = ("usuarios", "tickets", "interacciones")
ESTADOS = ("abierto", "en_progreso", "esperando", "resuelto", "cerrado")


def rfc3339_now():
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def connect(db, autocheckpoint=None, synchronous=None):
    con = sqlite3.connect(db, timeout=5, isolation_level=None)  # busy_timeout 5000 ms
    con.execute("PRAGMA busy_timeout=5000")
    if autocheckpoint is not None:
        con.execute(f"PRAGMA wal_autocheckpoint={int(autocheckpoint)}")
    if synchronous:
        con.execute(f"PRAGMA synchronous={synchronous}")
    return con


def dump_tables(con):
    return {t: [list(r) for r in con.execute(f"SELECT * FROM {t} ORDER BY id")] for t in TABLES}


def wal_header(db):
    """(checkpoint sequence, salt-1) from the WAL header, or None if there is no header."""
    try:
        with open(db + "-wal", "rb") as f:
            h = f.read(32)
    except FileNotFoundError:
        return None
    if len(h) < 32:
        return None
    _magic, _ver, _psz, seq, salt1, _salt2 = struct.unpack(">IIIIII", h[:24])
    return [seq, salt1]


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Ticketing:
    """Mixed ticket-system transactions. Every transaction changes at least one row."""

    def __init__(self, con, rng):
        self.con = con
        self.rng = rng
        self.users = [r[0] for r in con.execute("SELECT id FROM usuarios")]
        self.tickets = [r[0] for r in con.execute("SELECT id FROM tickets")]
        self.inter = [r[0] for r in con.execute("SELECT id FROM interacciones")]
        self.n = 0

    def _text(self, lo, hi):
        rng = self.rng
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz áéíóúñ") for _ in range(rng.randint(lo, hi)))

    def _new_user(self):
        c = self.con.execute("INSERT INTO usuarios(nombre, email) VALUES(?, ?)",
                             (self._text(5, 20), f"user{self.n}.{self.rng.randint(0, 10**9)}@example.com"))
        self.users.append(c.lastrowid)
        return c.lastrowid

    def _new_ticket(self):
        uid = self.rng.choice(self.users) if self.users else self._new_user()
        c = self.con.execute(
            "INSERT INTO tickets(usuario_id, titulo, estado, prioridad, creado) VALUES(?, ?, ?, ?, ?)",
            (uid, self._text(10, 60), "abierto", self.rng.randint(1, 5), time.time()))
        self.tickets.append(c.lastrowid)
        return c.lastrowid

    def _new_inter(self):
        tid = self.rng.choice(self.tickets) if self.tickets else self._new_ticket()
        c = self.con.execute("INSERT INTO interacciones(ticket_id, texto, creado) VALUES(?, ?, ?)",
                             (tid, self._text(20, 400), time.time()))
        self.inter.append(c.lastrowid)

    def _update_ticket(self):
        if not self.tickets:
            return self._new_ticket()
        tid = self.rng.choice(self.tickets)
        (estado,) = self.con.execute("SELECT estado FROM tickets WHERE id=?", (tid,)).fetchone()
        nuevo = self.rng.choice([e for e in ESTADOS if e != estado])
        self.con.execute("UPDATE tickets SET estado=?, prioridad=prioridad+1 WHERE id=?", (nuevo, tid))

    def _delete_inter(self):
        if not self.inter:
            return self._new_inter()
        iid = self.inter.pop(self.rng.randrange(len(self.inter)))
        self.con.execute("DELETE FROM interacciones WHERE id=?", (iid,))

    def _delete_ticket(self):
        if len(self.tickets) < 5:
            return self._new_ticket()
        tid = self.tickets.pop(self.rng.randrange(len(self.tickets)))
        gone = {r[0] for r in self.con.execute("SELECT id FROM interacciones WHERE ticket_id=?", (tid,))}
        self.con.execute("DELETE FROM interacciones WHERE ticket_id=?", (tid,))
        self.con.execute("DELETE FROM tickets WHERE id=?", (tid,))
        if gone:
            self.inter = [i for i in self.inter if i not in gone]

    def _update_user(self):
        if not self.users:
            return self._new_user()
        uid = self.rng.choice(self.users)
        self.con.execute("UPDATE usuarios SET nombre = nombre || ? WHERE id=?", (self._text(1, 3) + "x", uid))

    def transaction(self):
        rng = self.rng
        # IMMEDIATE: a deferred transaction that reads before it writes cannot wait on the
        # busy timeout when it upgrades to a write (SQLite returns SQLITE_BUSY at once), so a
        # well-behaved application takes the write lock up front.
        self.con.execute("BEGIN IMMEDIATE")
        try:
            r = rng.random()
            if r < 0.10:
                self._new_user()
            elif r < 0.30:
                self._new_ticket()
            elif r < 0.55:
                for _ in range(rng.randint(1, 3)):
                    self._new_inter()
            elif r < 0.72:
                self._update_ticket()
            elif r < 0.80:
                self._update_user()
            elif r < 0.90:
                self._delete_inter()
            elif r < 0.95:
                self._delete_ticket()
            else:  # a bigger mixed transaction
                self._new_ticket()
                for _ in range(rng.randint(2, 6)):
                    self._new_inter()
                self._update_ticket()
                self._delete_inter()
            self.con.execute("COMMIT")
        except BaseException:
            self.con.execute("ROLLBACK")
            raise
        self.n += 1


def cmd_workload(a):
    rng = random.Random(a.seed)
    con = connect(a.db, autocheckpoint=a.autocheckpoint, synchronous=a.synchronous)
    app = Ticketing(con, rng)
    for _ in range(20):  # some base rows
        app.transaction()
    start = time.time()
    instants = sorted(rng.uniform(0.3, a.seconds - 0.3) for _ in range(a.instants))
    ck_modes = ["PASSIVE", "FULL", "RESTART", "TRUNCATE"]
    ck_results = []
    next_ck = start + a.checkpoint_every if a.checkpoint_every else None
    recorded = []
    tx_at_start = app.n
    min_gap = 1.0 / a.max_rate if a.max_rate else 0
    last = 0.0
    wal_seen = []  # distinct (checkpoint seq, salt-1) WAL headers: each new one is a WAL restart
    while True:
        now = time.time()
        el = now - start
        if el >= a.seconds and (not a.checkpoint_every or len(ck_results) >= len(ck_modes)):
            break
        if app.n % 25 == 0:
            h = wal_header(a.db)
            if h and h not in wal_seen:
                wal_seen.append(h)
        if instants and el >= instants[0]:
            instants.pop(0)
            time.sleep(a.quiet)           # let the agent see the last commit
            t = rfc3339_now()            # nothing commits between here and the dump
            rec = {"t": t, "tx_count": app.n, "tables": dump_tables(con)}
            path = os.path.join(a.dump_dir, f"instant-{len(recorded):03d}.json")
            write_json(path, rec)
            recorded.append(path)
            continue
        if next_ck is not None and now >= next_ck:
            mode = ck_modes[len(ck_results) % len(ck_modes)]
            t0 = time.time()
            row = con.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
            ck_results.append({"mode": mode, "result": list(row), "seconds": round(time.time() - t0, 3)})
            next_ck = time.time() + a.checkpoint_every
            continue
        if min_gap and now - last < min_gap:
            time.sleep(min_gap - (now - last))
        last = time.time()
        app.transaction()
    elapsed = time.time() - start
    # the state after the final commit, for the byte/contents oracle
    summary = {"transactions": app.n - tx_at_start, "elapsed": elapsed, "instants": recorded,
               "checkpoints": ck_results, "wal_headers_seen": wal_seen, "final_tables_rows": {t: len(v) for t, v in dump_tables(con).items()}}
    con.close()
    write_json(os.path.join(a.dump_dir, "summary.json"), summary)


def cmd_reader(a):
    rng = random.Random(a.seed)
    con = sqlite3.connect(a.db, timeout=5, isolation_level=None)
    holds = 0
    deadline = time.time() + a.max_seconds
    while not os.path.exists(a.stop_file) and time.time() < deadline:
        con.execute("BEGIN")
        con.execute("SELECT count(*) FROM tickets").fetchone()  # the read transaction starts here
        end = time.time() + rng.uniform(a.hold_min, a.hold_max)
        while time.time() < end and not os.path.exists(a.stop_file):
            con.execute("SELECT count(*) FROM interacciones").fetchone()
            time.sleep(0.1)
        con.execute("COMMIT")
        holds += 1
        time.sleep(rng.uniform(a.gap_min, a.gap_max))
    con.close()
    with open(a.stop_file + ".holds", "w") as f:
        f.write(str(holds))


def cmd_hold(a):
    """An idle application connection kept open (as a long-running service would)."""
    con = sqlite3.connect(a.db, timeout=5, isolation_level=None)
    con.execute("SELECT count(*) FROM usuarios").fetchone()
    while not os.path.exists(a.stop_file):
        time.sleep(0.05)
    con.close()


def cmd_bigtx(a):
    con = sqlite3.connect(a.db, timeout=5, isolation_level=None)
    con.execute("PRAGMA cache_size=10")  # spill dirty pages to the WAL mid-transaction
    con.execute("BEGIN")
    con.execute("INSERT INTO usuarios(nombre, email) VALUES(?, ?)", (a.marker, a.marker + "@example.com"))
    pad = os.urandom(1500).hex()  # incompressible
    n = (a.mb * 1024 * 1024) // 3100 + 1
    for i in range(n):
        con.execute("INSERT INTO interacciones(ticket_id, texto, creado) VALUES(?, ?, ?)",
                    (1, f"{a.marker} {i} {pad}", time.time()))
    with open(a.ready_file, "w") as f:
        f.write("ready")
    while True:  # never commits: the test SIGKILLs us
        time.sleep(1)


def cmd_insert(a):
    con = connect(a.db)
    con.execute("BEGIN")
    con.execute("INSERT INTO usuarios(nombre, email) VALUES(?, ?)", (a.text, a.text + "@example.com"))
    con.execute("COMMIT")
    con.close()


def cmd_bursts(a):
    rng = random.Random(a.seed)
    con = connect(a.db)
    app = Ticketing(con, rng)
    for b in range(a.bursts):
        for _ in range(a.per_burst):
            app.transaction()
        if b != a.bursts - 1:
            time.sleep(a.pause)
    con.close()


def main(argv=None):
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="mode", required=True)
    w = sub.add_parser("workload")
    w.add_argument("db")
    w.add_argument("--seconds", type=float, default=10)
    w.add_argument("--instants", type=int, default=0)
    w.add_argument("--quiet", type=float, default=0.05)
    w.add_argument("--dump-dir", required=True)
    w.add_argument("--seed", type=int, default=1)
    w.add_argument("--autocheckpoint", type=int, default=None)
    w.add_argument("--checkpoint-every", type=float, default=0)
    w.add_argument("--max-rate", type=float, default=0)
    w.add_argument("--synchronous", default=None)
    w.set_defaults(fn=cmd_workload)
    r = sub.add_parser("reader")
    r.add_argument("db")
    r.add_argument("--stop-file", required=True)
    r.add_argument("--hold-min", type=float, default=1.0)
    r.add_argument("--hold-max", type=float, default=3.0)
    r.add_argument("--gap-min", type=float, default=0.01)
    r.add_argument("--gap-max", type=float, default=0.2)
    r.add_argument("--max-seconds", type=float, default=120)
    r.add_argument("--seed", type=int, default=2)
    r.set_defaults(fn=cmd_reader)
    h = sub.add_parser("hold")
    h.add_argument("db")
    h.add_argument("--stop-file", required=True)
    h.set_defaults(fn=cmd_hold)
    b = sub.add_parser("bigtx")
    b.add_argument("db")
    b.add_argument("--marker", required=True)
    b.add_argument("--mb", type=int, default=8)
    b.add_argument("--ready-file", required=True)
    b.set_defaults(fn=cmd_bigtx)
    i = sub.add_parser("insert")
    i.add_argument("db")
    i.add_argument("--text", required=True)
    i.set_defaults(fn=cmd_insert)
    u = sub.add_parser("bursts")
    u.add_argument("db")
    u.add_argument("--bursts", type=int, default=5)
    u.add_argument("--per-burst", type=int, default=20)
    u.add_argument("--pause", type=float, default=0.7)
    u.add_argument("--seed", type=int, default=3)
    u.set_defaults(fn=cmd_bursts)
    a = p.parse_args(argv)
    a.fn(a)


if __name__ == "__main__":
    main()
