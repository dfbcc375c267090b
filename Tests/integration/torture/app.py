#!/usr/bin/env python3
"""The application side of the torture harness: one OS process writing a SQLite database in
WAL mode with nothing but Python's sqlite3, the way an application beside the agent would.

It creates the database, then reads steps from stdin, one JSON object per line, runs each and
answers one line on stdout ("ok" or "err: ..."). The driver (torture.py) decides every step
from its seeded generator; data inside a step comes from the step's own seed, so a seed
replays the same operations on the same data.

After every COMMIT it appends one JSON line to the oracle file:

    {"n": commit number, "step": step index, "op": kind, "conn": "a"|"b",
     "before": µs since the epoch just before COMMIT was issued,
     "after":  µs since the epoch just after it returned,
     "digest": logical digest of the whole database, computed right after the commit}

so a commit became visible somewhere in [before, after]. Times are UTC epoch microseconds
(time.time_ns), independent of locale and time zone.

Two connections ("a" and "b") write; "b" can also hold a read transaction open across steps.
Both use busy_timeout 5000 ms, as walship asks of applications. The driver may run a second
process of this program on the same database; it then gives each step the number of commits
made so far ("n0"), so commit numbers go on across both, and it never runs two steps at once.

The digest (database_digest) is also what the driver computes on restored files.
"""
import argparse
import hashlib
import json
import math
import os
import random
import sqlite3
import struct
import sys
import time
import traceback

BUSY_MS = 5000
SPILL_CACHE_PAGES = 10

# Tables every run starts with: rowid and WITHOUT ROWID, with and without secondary indexes.
BASE_SCHEMA = [
    "CREATE TABLE docs(id INTEGER PRIMARY KEY, name TEXT NOT NULL, body BLOB)",
    "CREATE TABLE kv(k TEXT PRIMARY KEY, n INTEGER NOT NULL, v BLOB) WITHOUT ROWID",
    "CREATE TABLE events(id INTEGER PRIMARY KEY, a INTEGER NOT NULL, b TEXT, c REAL)",
    "CREATE INDEX events_a ON events(a, b)",
    "CREATE TABLE pairs(x INTEGER NOT NULL, y TEXT NOT NULL, v BLOB, PRIMARY KEY(x, y)) WITHOUT ROWID",
]
BASE_TABLES = ("docs", "kv", "events", "pairs")


def now_us():
    return time.time_ns() // 1000


def quote_ident(name):
    return '"' + name.replace('"', '""') + '"'


# ----------------------------------------------------------------------------------------
# the logical digest

def _feed_value(h, v):
    if v is None:
        h.update(b"N")
    elif isinstance(v, int):
        h.update(b"I" + str(v).encode() + b";")
    elif isinstance(v, float):
        h.update(b"F" + struct.pack(">d", v))
    elif isinstance(v, str):
        b = v.encode("utf-8", "surrogatepass")
        h.update(b"T" + str(len(b)).encode() + b":" + b)
    else:
        b = bytes(v)
        h.update(b"B" + str(len(b)).encode() + b":" + b)


def database_digest(con):
    """sha256 over user_version, the schema and every table's rows in primary-key order.
    Independent of page size, page layout, free pages and the WAL: equal digests mean equal
    content as an application sees it."""
    h = hashlib.sha256()
    h.update(b"user_version=%d;" % con.execute("PRAGMA user_version").fetchone()[0])
    schema = con.execute("SELECT type, name, tbl_name, coalesce(sql, '') FROM sqlite_master "
                         "ORDER BY type, name").fetchall()
    for row in schema:
        for v in row:
            _feed_value(h, v)
    for typ, name, _tbl, sql in schema:
        if typ != "table":
            continue
        q = quote_ident(name)
        info = con.execute(f"PRAGMA table_info({q})").fetchall()
        pk = [r[1] for r in sorted((r for r in info if r[5] > 0), key=lambda r: r[5])]
        order = ", ".join(quote_ident(c) for c in pk) if pk else "rowid"
        h.update(b"rows of " + name.encode() + b";")
        for row in con.execute(f"SELECT * FROM {q} ORDER BY {order}"):
            h.update(b"(")
            for v in row:
                _feed_value(h, v)
        h.update(b";")
    return h.hexdigest()


def file_digest(path):
    """database_digest of a database file, opened read-only and immutable (no -wal, no -shm)."""
    con = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
    try:
        return database_digest(con)
    finally:
        con.close()


# ----------------------------------------------------------------------------------------
# the application

def blob_size(rng, lo, hi):
    """Log-uniform size between lo and hi bytes: mostly small rows, some very large."""
    return int(math.exp(rng.uniform(math.log(max(lo, 1)), math.log(max(hi, lo + 1)))))


def make_blob(rng, n):
    """Random bytes, or a compressible pattern, or text-like bytes."""
    r = rng.random()
    if r < 0.5:
        return rng.randbytes(n)
    if r < 0.8:
        unit = rng.randbytes(rng.randint(1, 64))
    else:
        unit = bytes(rng.choice(b"abcdefghij klmnop\n") for _ in range(min(n, 4096)))
    if not unit:
        return b""
    return (unit * (n // len(unit) + 1))[:n]


def make_text(rng, lo=1, hi=40):
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz áéíóúñ€-_") for _ in range(rng.randint(lo, hi)))


class App:
    def __init__(self, a):
        self.db = a.db
        self.oracle = open(a.oracle, "a")
        self.budget = a.budget
        self.commits = 0
        self.step = -1
        fresh = not os.path.exists(a.db)
        self.a = self._connect(a)
        if fresh:
            self._create(a)
        self.b = self._connect(a)
        self.b_reading = False
        self.args = a

    def _connect(self, a):
        con = sqlite3.connect(self.db, timeout=BUSY_MS / 1000, isolation_level=None)
        con.execute(f"PRAGMA busy_timeout={BUSY_MS}")
        con.execute(f"PRAGMA wal_autocheckpoint={a.autocheckpoint}")
        con.execute(f"PRAGMA synchronous={a.synchronous}")
        return con

    def _create(self, a):
        con = self.a
        con.execute(f"PRAGMA page_size={a.page_size}")
        con.execute(f"PRAGMA auto_vacuum={a.auto_vacuum}")
        mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise RuntimeError(f"journal_mode is {mode}, not wal")
        got = con.execute("PRAGMA page_size").fetchone()[0]
        if got != a.page_size:
            raise RuntimeError(f"page_size is {got}, asked for {a.page_size}")

        def body(con):
            for s in BASE_SCHEMA:
                con.execute(s)
        self.transaction(con, "create", body)

    # -- recording -----------------------------------------------------------------------

    def record(self, con, op, conn, before, after):
        self.commits += 1
        rec = {"n": self.commits, "step": self.step, "op": op, "conn": conn,
               "before": before, "after": after, "digest": database_digest(con)}
        self.oracle.write(json.dumps(rec) + "\n")
        self.oracle.flush()

    def transaction(self, con, op, body, conn="a"):
        """BEGIN IMMEDIATE; body(con); COMMIT, recorded. Rolls back if body raises."""
        con.execute("BEGIN IMMEDIATE")
        try:
            body(con)
        except BaseException:
            con.execute("ROLLBACK")
            raise
        before = now_us()
        con.execute("COMMIT")
        after = now_us()
        self.record(con, op, conn, before, after)

    def conn(self, name):
        if name == "b":
            self.release_reader()
            return self.b
        return self.a

    def release_reader(self):
        if self.b_reading:
            self.b.execute("COMMIT")
            self.b_reading = False

    def db_bytes(self, con):
        pc = con.execute("PRAGMA page_count").fetchone()[0]
        fl = con.execute("PRAGMA freelist_count").fetchone()[0]
        ps = con.execute("PRAGMA page_size").fetchone()[0]
        return (pc - fl) * ps

    # -- row helpers (deterministic given the database content and rng) -----------------

    def _pick_keys(self, con, table, rng, n):
        pk = {"docs": "id", "kv": "k", "events": "id", "pairs": "x, y"}.get(table, "k")
        cnt = con.execute(f"SELECT count(*) FROM {quote_ident(table)}").fetchone()[0]
        if cnt == 0:
            return []
        offs = sorted({rng.randrange(cnt) for _ in range(n)})
        out = []
        for o in offs:
            row = con.execute(f"SELECT {pk} FROM {quote_ident(table)} ORDER BY {pk} LIMIT 1 OFFSET ?", (o,)).fetchone()
            if row is not None:
                out.append(row)
        return out

    def _insert(self, con, rng, table, big):
        hi = 1_000_000 if big else 2000
        if table == "docs":
            con.execute("INSERT INTO docs(name, body) VALUES(?, ?)",
                        (make_text(rng), make_blob(rng, blob_size(rng, 1, hi))))
        elif table == "kv":
            con.execute("INSERT OR REPLACE INTO kv(k, n, v) VALUES(?, ?, ?)",
                        (make_text(rng, 1, 12), rng.randint(-2**40, 2**40), make_blob(rng, blob_size(rng, 1, min(hi, 200_000)))))
        elif table == "events":
            con.execute("INSERT INTO events(a, b, c) VALUES(?, ?, ?)",
                        (rng.randint(0, 1000), make_text(rng, 0, 80) if rng.random() < 0.9 else None, rng.uniform(-1e6, 1e6)))
        elif table == "pairs":
            con.execute("INSERT OR REPLACE INTO pairs(x, y, v) VALUES(?, ?, ?)",
                        (rng.randint(0, 500), make_text(rng, 1, 8), make_blob(rng, blob_size(rng, 1, min(hi, 100_000)))))
        else:   # the extra tables: (k INTEGER PRIMARY KEY, v BLOB), with or without rowid
            con.execute(f"INSERT OR REPLACE INTO {quote_ident(table)}(k, v) VALUES(?, ?)",
                        (rng.randrange(10_000), make_blob(rng, blob_size(rng, 1, min(hi, 50_000)))))

    def _update(self, con, rng, table):
        keys = self._pick_keys(con, table, rng, 1)
        if not keys:
            return self._insert(con, rng, table, False)
        k = keys[0]
        if table == "docs":
            if rng.random() < 0.5:
                con.execute("UPDATE docs SET name = name || ? WHERE id=?", (make_text(rng, 1, 3), k[0]))
            else:
                con.execute("UPDATE docs SET body=? WHERE id=?", (make_blob(rng, blob_size(rng, 1, 300_000)), k[0]))
        elif table == "kv":
            con.execute("UPDATE kv SET n = n + ?, v = ? WHERE k=?",
                        (rng.randint(1, 9), make_blob(rng, blob_size(rng, 1, 50_000)), k[0]))
        elif table == "events":
            con.execute("UPDATE events SET a=?, c = c * 2 WHERE id=?", (rng.randint(0, 1000), k[0]))
        elif table == "pairs":
            con.execute("UPDATE pairs SET v=? WHERE x=? AND y=?", (make_blob(rng, blob_size(rng, 0, 20_000)), k[0], k[1]))
        else:
            con.execute(f"UPDATE {quote_ident(table)} SET v=? WHERE k=?", (make_blob(rng, blob_size(rng, 1, 5000)), k[0]))

    def _delete(self, con, rng, table):
        keys = self._pick_keys(con, table, rng, 1)
        if not keys:
            return
        k = keys[0]
        if table == "pairs":
            con.execute("DELETE FROM pairs WHERE x=? AND y=?", k)
        elif table == "kv":
            con.execute("DELETE FROM kv WHERE k=?", k)
        elif table in ("docs", "events"):
            con.execute(f"DELETE FROM {table} WHERE id=?", k)
        else:
            con.execute(f"DELETE FROM {quote_ident(table)} WHERE k=?", k)

    def _shrink(self, con):
        """Over budget: drop the largest documents until well under it."""
        while self.db_bytes(con) > self.budget * 0.6:
            row = con.execute("SELECT id FROM docs ORDER BY length(body) DESC, id LIMIT 1").fetchone()
            row2 = con.execute("SELECT k FROM kv ORDER BY length(v) DESC, k LIMIT 1").fetchone()
            if row is None and row2 is None:
                break
            if row is not None:
                con.execute("DELETE FROM docs WHERE id=?", row)
            if row2 is not None:
                con.execute("DELETE FROM kv WHERE k=?", row2)

    def tables(self, con):
        return [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]

    def _random_change(self, con, rng, big_ok):
        tables = self.tables(con)
        t = rng.choice(tables)
        r = rng.random()
        if r < 0.5:
            self._insert(con, rng, t, big_ok and rng.random() < 0.3)
        elif r < 0.8:
            self._update(con, rng, t)
        else:
            self._delete(con, rng, t)

    # -- steps ---------------------------------------------------------------------------

    def run(self, s):
        op = s["op"]
        rng = random.Random(s.get("seed", 0))
        conn_name = s.get("conn", "a")
        con = self.conn(conn_name)

        def tx(body, kind=op):
            self.transaction(con, kind, body, conn_name)

        if op in ("insert", "update", "delete", "multi", "small"):
            n = s.get("rows", 1)

            def body(c):
                if op != "delete" and self.db_bytes(c) > self.budget:
                    self._shrink(c)
                for _ in range(n):
                    if op == "insert":
                        self._insert(c, rng, rng.choice(self.tables(c)), s.get("big", False))
                    elif op == "update":
                        self._update(c, rng, rng.choice(self.tables(c)))
                    elif op == "delete":
                        self._delete(c, rng, rng.choice(self.tables(c)))
                    elif op == "small":
                        c.execute("UPDATE events SET c = coalesce(c, 0) + 1 WHERE id = (SELECT min(id) FROM events)")
                        if c.execute("SELECT changes()").fetchone()[0] == 0:
                            c.execute("INSERT INTO events(a, b, c) VALUES(?, 'small', 0)", (rng.randint(0, 9),))
                    else:
                        self._random_change(c, rng, True)
            tx(body)
        elif op == "spill_rollback":
            # A transaction larger than the page cache: SQLite writes (spills) its dirty pages
            # into the WAL before COMMIT. Then it is rolled back, leaving invalid frames at the
            # end of the WAL, which the next commit overwrites.
            con.execute(f"PRAGMA cache_size={SPILL_CACHE_PAGES}")
            wal0 = self._wal_size()
            con.execute("BEGIN IMMEDIATE")
            try:
                left = s["bytes"]
                while left > 0:
                    n = min(left, rng.randint(20_000, 300_000))
                    con.execute("INSERT INTO docs(name, body) VALUES(?, ?)", ("spill", make_blob(rng, n)))
                    left -= n
                if s.get("touch", 0):
                    con.execute("UPDATE events SET c = -c WHERE id % ? = 0", (s["touch"],))
                time.sleep(s.get("pause", 0))     # let the agent read the spilled frames
            finally:
                con.execute("ROLLBACK")
                con.execute("PRAGMA cache_size=-2000")
            return {"spilled_bytes": self._wal_size() - wal0}
        elif op == "spill_commit":
            con.execute(f"PRAGMA cache_size={SPILL_CACHE_PAGES}")
            try:
                def body(c):
                    if self.db_bytes(c) > self.budget * 0.5:
                        self._shrink(c)
                        c.execute("DELETE FROM docs WHERE name='spill'")
                    left = s["bytes"]
                    while left > 0:
                        n = min(left, rng.randint(20_000, 300_000))
                        c.execute("INSERT INTO docs(name, body) VALUES(?, ?)", ("spill", make_blob(rng, n)))
                        left -= n
                    c.execute("UPDATE events SET a = a + 1 WHERE id % 3 = ?", (rng.randrange(3),))
                tx(body)
            finally:
                con.execute("PRAGMA cache_size=-2000")
        elif op == "savepoint":
            # changes, SAVEPOINT, more changes (spilling on some steps), ROLLBACK TO, a few
            # changes more, RELEASE, COMMIT
            spill = s.get("spill_bytes", 0)
            if spill:
                con.execute(f"PRAGMA cache_size={SPILL_CACHE_PAGES}")
            try:
                def body(c):
                    self._random_change(c, rng, False)
                    c.execute("SAVEPOINT sp1")
                    for _ in range(rng.randint(1, 4)):
                        self._random_change(c, rng, False)
                    if spill:
                        c.execute("INSERT INTO docs(name, body) VALUES(?, ?)", ("sp-spill", make_blob(rng, spill)))
                        time.sleep(s.get("pause", 0))
                    if rng.random() < 0.5:
                        c.execute("SAVEPOINT sp2")
                        self._random_change(c, rng, False)
                        c.execute("RELEASE sp2")
                    c.execute("ROLLBACK TO sp1")
                    for _ in range(rng.randint(0, 2)):
                        self._random_change(c, rng, False)
                    c.execute("RELEASE sp1")
                    self._random_change(c, rng, False)
                tx(body)
            finally:
                if spill:
                    con.execute("PRAGMA cache_size=-2000")
        elif op == "rollback":
            con.execute("BEGIN IMMEDIATE")
            self._random_change(con, rng, True)
            con.execute("ROLLBACK")
        elif op == "vacuum":
            self.release_reader()
            before = now_us()
            con.execute("VACUUM")
            after = now_us()
            self.record(con, op, conn_name, before, after)
        elif op == "incremental_vacuum":
            def body(c):
                c.execute("PRAGMA incremental_vacuum").fetchall()   # one step frees one page: drain it
            tx(body)
        elif op == "checkpoint":
            if s["mode"] in ("RESTART", "TRUNCATE"):
                self.release_reader()
            t0 = time.time()
            row = con.execute(f"PRAGMA wal_checkpoint({s['mode']})").fetchone()
            return {"result": list(row), "seconds": round(time.time() - t0, 3)}
        elif op == "user_version":
            def body(c):
                c.execute(f"PRAGMA user_version={rng.randint(0, 2**31 - 1)}")
            tx(body)
        elif op == "ddl":
            def body(c):
                dyn = [t for t in self.tables(c) if t.startswith("extra")]
                r = rng.random()
                if dyn and r < 0.35:
                    c.execute(f"DROP TABLE {quote_ident(rng.choice(dyn))}")
                elif r < 0.55:
                    idx = [i[0] for i in c.execute("SELECT name FROM sqlite_master WHERE type='index' AND name LIKE 'ix%'")]
                    if idx:
                        c.execute(f"DROP INDEX {quote_ident(rng.choice(idx))}")
                    else:
                        c.execute(f"CREATE INDEX ix{rng.randrange(10**6)} ON docs(name)")
                else:
                    name = f"extra{rng.randrange(10**6)}"
                    tail = " WITHOUT ROWID" if rng.random() < 0.4 else ""
                    c.execute(f"CREATE TABLE IF NOT EXISTS {name}(k INTEGER PRIMARY KEY, v BLOB){tail}")
                    for _ in range(rng.randint(0, 20)):
                        c.execute(f"INSERT OR REPLACE INTO {name}(k, v) VALUES(?, ?)",
                                  (rng.randrange(1000), make_blob(rng, blob_size(rng, 1, 3000))))
            tx(body)
        elif op == "journal_switch":
            # Out of WAL mode and back, with one commit in rollback mode between. SQLite lets a
            # database leave WAL mode only when no other connection has it open (each holds a
            # shared lock on the file): the second connection closes for it, and beside a
            # running (or stopped) agent the switch fails at once and nothing changes.
            self.release_reader()
            self.b.close()
            con = self.a
            con.execute("PRAGMA busy_timeout=200")
            try:
                mode = con.execute("PRAGMA journal_mode=DELETE").fetchone()[0]
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e):
                    raise
                mode = "wal"
            finally:
                con.execute(f"PRAGMA busy_timeout={BUSY_MS}")
            try:
                if mode.lower() != "delete":
                    return {"switched": False}

                def body(c):
                    self._random_change(c, rng, False)
                try:
                    self.transaction(con, op, body, "a")
                finally:
                    back = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                    if back.lower() != "wal":
                        raise RuntimeError(f"journal_mode is {back} after switching back")
                return {"switched": True}
            finally:
                if mode.lower() == "delete":
                    # The connection that switched the database back to WAL mode never gets a
                    # RESTART or TRUNCATE checkpoint through afterwards (SQLite 3.40.1: busy for
                    # its whole timeout, with no other connection open): an application would
                    # reopen it, and so does this one.
                    self.a.close()
                    self.a = self._connect(self.args)
                self.b = self._connect(self.args)
        elif op == "reader_hold":
            if not self.b_reading:
                self.b.execute("BEGIN")
                self.b.execute("SELECT count(*) FROM docs").fetchone()
                self.b_reading = True
        elif op == "reader_release":
            self.release_reader()
        else:
            raise ValueError(f"unknown op {op!r}")
        return None

    def _wal_size(self):
        try:
            return os.path.getsize(self.db + "-wal")
        except FileNotFoundError:
            return 0

    def close(self):
        self.release_reader()
        self.b.close()
        self.a.close()
        self.oracle.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("db")
    ap.add_argument("oracle")
    ap.add_argument("--page-size", type=int, default=4096)
    ap.add_argument("--auto-vacuum", default="NONE", choices=["NONE", "FULL", "INCREMENTAL"])
    ap.add_argument("--autocheckpoint", type=int, default=1000)
    ap.add_argument("--synchronous", default="NORMAL")
    ap.add_argument("--budget", type=int, default=3_000_000, help="live bytes above which inserts shrink the database first")
    a = ap.parse_args()
    app = App(a)
    out = sys.stdout
    out.write(json.dumps({"ready": True, "commits": app.commits}) + "\n")
    out.flush()
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        s = json.loads(line)
        if s.get("op") == "quit":
            break
        app.step = s.get("i", -1)
        if "n0" in s:   # commits numbered across application processes: the driver's count so far
            app.commits = s["n0"]
        try:
            info = app.run(s)
            out.write(json.dumps({"ok": True, "commits": app.commits, "info": info}) + "\n")
        except Exception as e:
            out.write(json.dumps({"ok": False, "commits": app.commits, "error": f"{type(e).__name__}: {e}",
                                  "trace": traceback.format_exc()}) + "\n")
        out.flush()
    app.close()


if __name__ == "__main__":
    main()
