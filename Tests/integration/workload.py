"""Writer workloads for walship's integration tests, plus small shared checks.

Run as a script, each workload is a SEPARATE writer process (plain Python sqlite3), never the
test process itself:

    python3 workload.py tickets DB --seed S --stop-file F --instants-file J [--rate 200]
    python3 workload.py blobs DB --mb 200
    python3 workload.py delete-vacuum DB --keep-every 4
    python3 workload.py mixed DB --seed S --tx 400
    python3 workload.py fill DB --rows N --seed S
    python3 workload.py shrink DB --keep-every 10 [--incremental]

Imported by the tests, it offers: start_writer, list_generations, chain_problems,
contents_digest, rfc3339.
"""
import argparse
import hashlib
import json
import os
import random
import sqlite3
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
TABLES = ("usuarios", "tickets", "interacciones")
ESTADOS = ("abierto", "en_progreso", "esperando", "resuelto", "cerrado")


# ----------------------------------------------------------------------------------------
# helpers used by the tests

def start_writer(*args, log_path=None):
    """Starts `python3 workload.py ARGS...` as its own process."""
    out = open(log_path, "a") if log_path else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, str(HERE / "workload.py"), *map(str, args)],
                            stdout=out, stderr=subprocess.STDOUT)


def run_writer(*args, timeout=600):
    """Runs a writer process to completion; raises with its output if it fails."""
    p = subprocess.run([sys.executable, str(HERE / "workload.py"), *map(str, args)],
                       capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"writer {args} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p.stdout


def digest_of(contents):
    """A stable digest of table_contents()-shaped data {table: [rows]}."""
    h = hashlib.sha256()
    for t in TABLES:
        h.update(t.encode())
        h.update(repr(contents[t]).encode())
    return h.hexdigest()


def contents_of(con, tables=TABLES):
    return {t: con.execute(f"SELECT * FROM {t} ORDER BY id").fetchall() for t in tables}


def rfc3339(t):
    """Unix seconds -> RFC 3339 UTC with microseconds (truncated, never rounded up)."""
    us = int(t * 1_000_000)
    return datetime.fromtimestamp(us // 1_000_000, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S") + \
        f".{us % 1_000_000:06d}Z"


def list_generations(walship, replica_url, env=None):
    p = subprocess.run([str(walship), "list", replica_url, "--json"], capture_output=True, text=True, timeout=120,
                       env=env)
    if p.returncode != 0:
        raise AssertionError(f"walship list failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return json.loads(p.stdout)


def chain_problems(gens):
    """Checks every generation: from its first snapshot, segments (of any compaction level, the
    one reaching furthest at each step, as a restore picks them) chain with no gap up to the
    generation's last txid; no two segments of one level overlap; txids keep growing from one
    generation to the next, and a new generation's first snapshot is the previous generation's
    last txid + 1."""
    problems = []
    prev_last = None
    for g in sorted(gens, key=lambda g: g["generation"]):
        gid = g["generation"]
        snaps = sorted(int(s["txid"]) for s in g.get("snapshots", []))
        segs = [(int(s["first_txid"]), int(s["last_txid"]), str(s.get("level", "0")), s["key"]) for s in g.get("segments", [])]
        last = int(g["last_txid"])
        if not snaps:
            problems.append(f"{gid}: no snapshot")
            continue
        base = snaps[0]
        if prev_last is not None and base != prev_last + 1:
            problems.append(f"{gid}: first snapshot txid {base}, previous generation ended at {prev_last}")
        for first, lst, _, key in segs:
            if lst < first:
                problems.append(f"{gid}: segment {key} has last < first")
        by_level = {}
        for first, lst, level, key in segs:
            by_level.setdefault(level, []).append((first, lst, key))
        for level, items in by_level.items():
            items.sort()
            for (f1, l1, k1), (f2, l2, k2) in zip(items, items[1:]):
                if f2 <= l1:
                    problems.append(f"{gid}: level-{level} segments {k1} and {k2} overlap")
        by_first = {}
        for first, lst, _, key in segs:
            by_first.setdefault(first, []).append(lst)
        pos = base
        while pos + 1 in by_first:
            pos = max(by_first[pos + 1])
        if pos != last:
            nxt = min((f for f, _, _, _ in segs if f > pos), default=None)
            problems.append(f"{gid}: chain ends at txid {pos} but last_txid is {last}"
                            + (f" (the next segment starts at {nxt}: gap)" if nxt is not None else ""))
        for s in snaps[1:]:
            if s > last:
                problems.append(f"{gid}: snapshot {s} beyond last txid {last}")
        prev_last = last
    return problems


# ----------------------------------------------------------------------------------------
# workloads (run in their own process)

def connect(db):
    con = sqlite3.connect(db, timeout=10, isolation_level=None)  # busy_timeout 10 s
    con.execute("PRAGMA busy_timeout=10000")
    return con


def one_ticket_tx(con, rng, now):
    """One mixed transaction on the ticket schema."""
    kind = rng.random()
    con.execute("BEGIN IMMEDIATE")
    nu = con.execute("SELECT max(id) FROM usuarios").fetchone()[0] or 0
    nt = con.execute("SELECT max(id) FROM tickets").fetchone()[0] or 0
    if kind < 0.10 or nu == 0:
        i = nu + 1
        con.execute("INSERT INTO usuarios(nombre, email) VALUES(?, ?)", (f"usuario {i}", f"u{i}@example.com"))
    elif kind < 0.35 or nt == 0:
        con.execute("INSERT INTO tickets(usuario_id, titulo, estado, prioridad, creado) VALUES(?, ?, ?, ?, ?)",
                    (rng.randint(1, nu), f"problema {rng.randrange(10**6)} " + "x" * rng.randrange(0, 200),
                     "abierto", rng.randint(1, 5), now))
    elif kind < 0.70:
        con.execute("INSERT INTO interacciones(ticket_id, texto, creado) VALUES(?, ?, ?)",
                    (rng.randint(1, nt), "respuesta " + "y" * rng.randrange(10, 600), now))
    elif kind < 0.90:
        con.execute("UPDATE tickets SET estado=?, prioridad=? WHERE id=?",
                    (rng.choice(ESTADOS), rng.randint(1, 5), rng.randint(1, nt)))
    else:
        # a bigger transaction: a ticket with a conversation, and an update of a few others
        con.execute("INSERT INTO tickets(usuario_id, titulo, estado, prioridad, creado) VALUES(?, ?, ?, ?, ?)",
                    (rng.randint(1, nu), "incidencia larga", "abierto", 3, now))
        tid = con.execute("SELECT last_insert_rowid()").fetchone()[0]
        for k in range(rng.randint(2, 20)):
            con.execute("INSERT INTO interacciones(ticket_id, texto, creado) VALUES(?, ?, ?)",
                        (tid, f"mensaje {k} " + "z" * rng.randrange(10, 1500), now))
        con.execute("UPDATE tickets SET prioridad = prioridad % 5 + 1 WHERE id % 97 = ?", (rng.randrange(97),))
    con.execute("COMMIT")


def cmd_tickets(a):
    """Writes continuously until the stop file appears. Every ~instant-every seconds: commit,
    stay quiet 200 ms, record (commit time, t, digest of every table) as a JSON line. (The
    agent stamps a commit when it sees it: within milliseconds on an idle machine, but a
    loaded one can keep it from running for tens of milliseconds.)"""
    rng = random.Random(a.seed)
    con = connect(a.db)
    out = open(a.instants_file, "a") if a.instants_file else None
    period = 1.0 / a.rate
    next_instant = time.time() + a.instant_every
    n = 0
    while not os.path.exists(a.stop_file):
        one_ticket_tx(con, rng, time.time())
        n += 1
        if out and time.time() >= next_instant:
            t_commit = time.time()
            time.sleep(0.2)
            t = time.time()
            c = contents_of(con)
            out.write(json.dumps({"t_commit": t_commit, "t": t, "digest": digest_of(c),
                                  "rows": {k: len(v) for k, v in c.items()}, "n": n}) + "\n")
            out.flush()
            next_instant = time.time() + a.instant_every * rng.uniform(0.5, 1.5)
        time.sleep(period * rng.uniform(0.2, 1.8))
    con.close()
    print(f"committed {n} transactions")


def cmd_blobs(a):
    """Builds a large database fast: rollback journal off, one transaction of random blobs,
    then switches it to WAL and adds the ticket schema."""
    con = sqlite3.connect(a.db, isolation_level=None)
    con.execute("PRAGMA journal_mode=OFF")
    con.execute("PRAGMA synchronous=OFF")
    con.execute("CREATE TABLE IF NOT EXISTS blobs(id INTEGER PRIMARY KEY, b BLOB NOT NULL)")
    n = a.mb * 1024 * 1024 // 3000
    con.execute("BEGIN")
    con.execute("WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < ?) "
                "INSERT INTO blobs(id, b) SELECT i, randomblob(3000) FROM c", (n,))
    con.execute("COMMIT")
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")
    sys.path.insert(0, str(HERE))
    from conftest import TICKET_SCHEMA
    con.executescript(TICKET_SCHEMA)
    con.close()
    print(f"{n} blobs, {os.path.getsize(a.db)} bytes")


def cmd_delete_vacuum(a):
    con = connect(a.db)
    con.execute("DELETE FROM blobs WHERE id % ? != 0", (a.keep_every,))
    con.execute("INSERT INTO usuarios(nombre, email) VALUES('tras borrar', 'x@example.com')")
    con.execute("VACUUM")
    con.execute("INSERT INTO usuarios(nombre, email) VALUES('tras vacuum', 'y@example.com')")
    print(con.execute("PRAGMA page_count").fetchone()[0], "pages after VACUUM")
    con.close()


def cmd_mixed(a):
    """A fixed number of mixed ticket transactions, with some deletes and an application
    checkpoint in the middle (page-size tests)."""
    rng = random.Random(a.seed)
    con = connect(a.db)
    for i in range(a.tx):
        one_ticket_tx(con, rng, 1_700_000_000 + i)
        if i % 50 == 49:
            con.execute("DELETE FROM interacciones WHERE id % 7 = ?", (rng.randrange(7),))
        if i == a.tx // 2:
            con.execute("PRAGMA wal_checkpoint(PASSIVE)")
        time.sleep(rng.uniform(0, 0.01))
    con.close()


def cmd_fill(a):
    """Inserts many rows (in batches) into the ticket tables."""
    rng = random.Random(a.seed)
    con = connect(a.db)
    con.execute("BEGIN")
    for i in range(50):
        con.execute("INSERT INTO usuarios(nombre, email) VALUES(?, ?)", (f"u{i}", f"u{i}@example.com"))
    con.execute("COMMIT")
    done = 0
    while done < a.rows:
        con.execute("BEGIN")
        for _ in range(min(500, a.rows - done)):
            con.execute("INSERT INTO tickets(usuario_id, titulo, estado, prioridad, creado) VALUES(?, ?, ?, ?, ?)",
                        (rng.randint(1, 50), "t" * rng.randrange(50, 400), "abierto", rng.randint(1, 5), 1.5))
            tid = con.execute("SELECT last_insert_rowid()").fetchone()[0]
            con.execute("INSERT INTO interacciones(ticket_id, texto, creado) VALUES(?, ?, ?)",
                        (tid, "i" * rng.randrange(100, 2000), 2.5))
            done += 1
        con.execute("COMMIT")
    print(con.execute("PRAGMA page_count").fetchone()[0], "pages after fill")
    con.close()


def cmd_shrink(a):
    """Deletes most rows in a few transactions; with auto_vacuum the file shrinks at commit
    (FULL) or at `PRAGMA incremental_vacuum` (INCREMENTAL)."""
    con = connect(a.db)
    for r in range(a.keep_every):
        if r == 0:
            continue
        con.execute("BEGIN")
        con.execute("DELETE FROM interacciones WHERE id % ? = ?", (a.keep_every, r))
        con.execute("DELETE FROM tickets WHERE id % ? = ?", (a.keep_every, r))
        con.execute("COMMIT")
        if a.incremental:
            con.executescript("PRAGMA incremental_vacuum;")   # con.execute() would free one page only
    con.execute("UPDATE usuarios SET nombre = nombre || ' (tras encoger)' WHERE id % 3 = 0")
    print(con.execute("PRAGMA page_count").fetchone()[0], "pages after shrink")
    con.close()


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("tickets"); p.add_argument("db"); p.add_argument("--seed", type=int, default=1)
    p.add_argument("--stop-file", required=True); p.add_argument("--instants-file")
    p.add_argument("--rate", type=float, default=200); p.add_argument("--instant-every", type=float, default=0.4)
    p = sub.add_parser("blobs"); p.add_argument("db"); p.add_argument("--mb", type=int, default=200)
    p = sub.add_parser("delete-vacuum"); p.add_argument("db"); p.add_argument("--keep-every", type=int, default=4)
    p = sub.add_parser("mixed"); p.add_argument("db"); p.add_argument("--seed", type=int, default=1)
    p.add_argument("--tx", type=int, default=400)
    p = sub.add_parser("fill"); p.add_argument("db"); p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--seed", type=int, default=1)
    p = sub.add_parser("shrink"); p.add_argument("db"); p.add_argument("--keep-every", type=int, default=10)
    p.add_argument("--incremental", action="store_true")
    a = ap.parse_args()
    {"tickets": cmd_tickets, "blobs": cmd_blobs, "delete-vacuum": cmd_delete_vacuum, "mixed": cmd_mixed,
     "fill": cmd_fill, "shrink": cmd_shrink}[a.cmd](a)


if __name__ == "__main__":
    main()
