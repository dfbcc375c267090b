#!/usr/bin/env python3
"""The WAL hole the torture harness sees, reproduced with SQLite alone (no walship).

A transaction spills pages into the WAL (small cache), changes a page it already spilled
(SQLite then overwrites that frame in place and must recompute the checksums of every frame
after it at commit), rolls back to a savepoint taken before those frames, and commits.
SQLite 3.40.1 (Debian 12) leaves some committed frames with zeroed salts and checksums: the
wal-index still finds them, so the database reads right, but WAL recovery after a crash
stops at the first such frame and the transaction is gone. SQLite 3.53.4 does not.

    python3 Tests/integration/torture/savepoint_hole.py          # the Python sqlite3 module's SQLite
    python3 Tests/integration/torture/savepoint_hole.py --crash  # also: crash, reopen, count rows

Prints the SQLite version, the committed frames whose salts differ from the log's, and with
--crash the rows a fresh connection finds (70 expected).
"""
import os
import sqlite3
import struct
import subprocess
import sys
import tempfile


def write(db):
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA wal_autocheckpoint=0")
    con.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, v BLOB)")
    for i in range(50):
        con.execute("INSERT INTO t VALUES(?, ?)", (i, os.urandom(900)))
    con.execute("PRAGMA cache_size=10")
    con.execute("BEGIN")
    con.execute("SAVEPOINT s")
    for i in range(50, 400):                      # spills
        con.execute("INSERT INTO t VALUES(?, ?)", (i, os.urandom(900)))
    for i in range(300, 400, 3):                  # pages spilled late change again: frames rewritten in place
        con.execute("UPDATE t SET v=? WHERE k=?", (os.urandom(900), i))
    con.execute("ROLLBACK TO s")
    con.execute("RELEASE s")
    for i in range(400, 420):
        con.execute("INSERT INTO t VALUES(?, ?)", (i, os.urandom(900)))
    con.execute("COMMIT")
    shm = open(db + "-shm", "rb").read(136)
    wal = open(db + "-wal", "rb").read()
    ps, mx = struct.unpack(">I", wal[8:12])[0], struct.unpack("<I", shm[16:20])[0]
    bad = [i + 1 for i in range(mx) if wal[32 + i * (ps + 24) + 8:32 + i * (ps + 24) + 16] != wal[16:24]]
    print(f"sqlite {sqlite3.sqlite_version}: {mx} committed frames, {len(bad)} with other salts {bad[:8]}", flush=True)
    return con


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        write(sys.argv[2])
        os._exit(0)   # a crash: no checkpoint at close
    d = tempfile.mkdtemp()
    db = os.path.join(d, "t.db")
    if "--crash" in sys.argv:
        subprocess.run([sys.executable, __file__, "--child", db], check=True)
        rows = sqlite3.connect(db).execute("SELECT count(*) FROM t").fetchone()[0]
        print(f"after the crash a new connection finds {rows} rows; 70 were committed")
    else:
        write(db).close()


if __name__ == "__main__":
    main()
