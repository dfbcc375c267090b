"""The application side: ticket-system schema, the writer process, database builders and digests.

The writer is a separate process (`bench/rpo --_writer ...`): Python sqlite3, autocommit connection,
busy_timeout=5000, synchronous=NORMAL. Each transaction is `BEGIN IMMEDIATE; <txn-size statements>;
COMMIT` (or one autocommit statement when txn-size is 1), paced at `rate` transactions per second
(rate 0: unpaced, as fast as the writer can). Mode `churn` updates random rows of the `blobs` table
instead (one row per statement; with txn-size K, K random rows spread over the whole file per transaction).
Every row written carries the wall-clock time taken just before the transaction (`creado`, or
`actualizado` for updates) and the transaction's sequence number (`tx`, or `tx_act`), so the newest
commit time and the last transaction can be read back from any copy of the data.
"""
import argparse
import array
import hashlib
import json
import os
import random
import sqlite3
import subprocess
import sys
import time

SCHEMA = """
CREATE TABLE IF NOT EXISTS usuarios(
  id INTEGER PRIMARY KEY,
  nombre TEXT NOT NULL,
  email TEXT NOT NULL,
  rol TEXT NOT NULL DEFAULT 'cliente',
  creado REAL NOT NULL,          -- wall-clock commit time (time.time())
  tx INTEGER NOT NULL            -- writer transaction sequence number
);
CREATE TABLE IF NOT EXISTS tickets(
  id INTEGER PRIMARY KEY,
  usuario_id INTEGER NOT NULL REFERENCES usuarios(id),
  asunto TEXT NOT NULL,
  descripcion TEXT NOT NULL,
  estado TEXT NOT NULL DEFAULT 'abierto',
  prioridad INTEGER NOT NULL DEFAULT 2,
  creado REAL NOT NULL,
  actualizado REAL NOT NULL,     -- wall-clock time of the last update
  tx INTEGER NOT NULL,
  tx_act INTEGER NOT NULL        -- sequence number of the last update
);
CREATE TABLE IF NOT EXISTS interacciones(
  id INTEGER PRIMARY KEY,
  ticket_id INTEGER NOT NULL REFERENCES tickets(id),
  usuario_id INTEGER NOT NULL REFERENCES usuarios(id),
  mensaje TEXT NOT NULL,
  creado REAL NOT NULL,
  tx INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_tickets_usuario ON tickets(usuario_id);
CREATE INDEX IF NOT EXISTS idx_tickets_estado ON tickets(estado);
CREATE INDEX IF NOT EXISTS idx_interacciones_ticket ON interacciones(ticket_id);
"""
TICKET_TABLES = ("usuarios", "tickets", "interacciones")

WORDS = ("el cliente reporta que la aplicacion no responde al iniciar sesion desde "
         "el movil error de pago factura pendiente revisar configuracion del servidor "
         "correo urgente gracias por su paciencia hemos escalado el caso al equipo de "
         "soporte tecnico segundo nivel adjunto captura de pantalla reinicie el equipo "
         "sigue fallando cuenta bloqueada contrasena restablecer enlace caducado").split()
ESTADOS = ["abierto", "en_progreso", "esperando_cliente", "resuelto", "cerrado"]


# --------------------------------------------------------------------------- writer process
def text_pool(rnd, n=1 << 18):
    parts, total = [], 0
    while total < n:
        w = rnd.choice(WORDS)
        parts.append(w)
        total += len(w) + 1
    return " ".join(parts)


def writer_args(argv):
    ap = argparse.ArgumentParser(prog="bench/rpo --_writer")
    ap.add_argument("--db", required=True)
    ap.add_argument("--start-file", required=True)
    ap.add_argument("--mode", default="mixed", choices=("mixed", "churn"))
    ap.add_argument("--rate", type=float, required=True, help="transactions per second (0: unpaced)")
    ap.add_argument("--size", type=int, required=True, help="payload bytes per row")
    ap.add_argument("--txn-size", type=int, default=1, help="rows (statements) per transaction")
    ap.add_argument("--duration", type=float, required=True)
    ap.add_argument("--count", type=int, default=0, help="stop after this many transactions (0: no limit)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--lat-file", default=None, help="write (start offset, duration) of every transaction here")
    ap.add_argument("--pause-at", default="", help="comma list of seconds after start: pause there")
    ap.add_argument("--pause-s", type=float, default=0.3)
    ap.add_argument("--ref-prefix", default=None, help="during each pause, copy the DB to PREFIX-<k>.db")
    return ap.parse_args(argv)


def writer_main(argv):
    """Separate writer process. Runs until --duration / --count is reached or it is killed."""
    a = writer_args(argv)
    rnd = random.Random(a.seed)
    con = sqlite3.connect(a.db, isolation_level=None, timeout=5.0)  # autocommit; explicit BEGIN for txn-size > 1
    con.execute("PRAGMA busy_timeout=5000")
    con.execute("PRAGMA synchronous=NORMAL")
    errors = 0
    if a.mode == "churn":
        nrows = con.execute("SELECT max(id) FROM blobs").fetchone()[0]

        def stmt(seq, now):
            return ("UPDATE blobs SET b=randomblob(?) WHERE id=?", (a.size, rnd.randint(1, nrows)))
    else:
        pool = text_pool(rnd)
        plen = len(pool) - a.size - 1
        n_users = con.execute("SELECT max(id) FROM usuarios").fetchone()[0]
        n_tickets = con.execute("SELECT max(id) FROM tickets").fetchone()[0]

        def payload():
            o = rnd.randint(0, plen)
            return pool[o:o + a.size]

        def stmt(seq, now):
            nonlocal n_users, n_tickets
            r = rnd.random()
            if r < 0.05:
                n_users += 1
                return ("INSERT INTO usuarios(nombre,email,creado,tx) VALUES(?,?,?,?)",
                        (payload()[:60], f"u{n_users}@example.com", now, seq))
            if r < 0.25:
                n_tickets += 1
                return ("INSERT INTO tickets(usuario_id,asunto,descripcion,creado,actualizado,tx,tx_act)"
                        " VALUES(?,?,?,?,?,?,?)",
                        (rnd.randint(1, n_users), payload()[:80], payload(), now, now, seq, seq))
            if r < 0.50:
                return ("UPDATE tickets SET estado=?, prioridad=?, descripcion=?, actualizado=?, tx_act=?"
                        " WHERE id=?",
                        (rnd.choice(ESTADOS), rnd.randint(1, 4), payload(), now, seq,
                         rnd.randint(1, n_tickets)))
            return ("INSERT INTO interacciones(ticket_id,usuario_id,mensaje,creado,tx) VALUES(?,?,?,?,?)",
                    (rnd.randint(1, n_tickets), rnd.randint(1, n_users), payload(), now, seq))

    pauses = sorted(float(x) for x in a.pause_at.split(",") if x.strip())
    pause_log = []
    lat_t = array.array("d")
    lat_d = array.array("d")
    t0 = time.time()
    with open(a.start_file + ".tmp", "w") as f:
        json.dump({"t0": t0, "pid": os.getpid()}, f)
    os.rename(a.start_file + ".tmp", a.start_file)
    deadline = t0 + a.duration
    shift = 0.0   # pauses move the pacing schedule, so the writer does not burst after one
    seq = 0
    while True:
        now = time.time()
        if now >= deadline + shift or (a.count and seq >= a.count):
            break
        if pauses and now - t0 - shift >= pauses[0]:
            pauses.pop(0)
            t_a = time.time()   # the last transaction before the pause has returned
            k = len(pause_log)
            if a.ref_prefix:
                ref = sqlite3.connect(f"{a.ref_prefix}-{k}.db")
                con.backup(ref)
                ref.close()
            time.sleep(max(0.0, t_a + a.pause_s - time.time()))
            t_b = time.time()
            pause_log.append({"k": k, "seq": seq, "t_before": t_a, "t_after": t_b, "T": (t_a + t_b) / 2})
            shift += t_b - t_a
            continue
        target = t0 + shift + seq / a.rate if a.rate > 0 else now
        if now < target:
            time.sleep(target - now)
        seq += 1
        ts = time.time()
        if a.txn_size <= 1:
            sql, params = stmt(seq, ts)
            for attempt in range(20):
                try:
                    con.execute(sql, params)
                    break
                except sqlite3.OperationalError as e:
                    errors += 1
                    print(f"writer: tx {seq} attempt {attempt}: {e}", file=sys.stderr, flush=True)
                    time.sleep(0.01)
        else:
            stmts = [stmt(seq, ts) for _ in range(a.txn_size)]
            for attempt in range(20):
                try:
                    con.execute("BEGIN IMMEDIATE")
                    for sql, params in stmts:
                        con.execute(sql, params)
                    con.execute("COMMIT")
                    break
                except sqlite3.OperationalError as e:
                    errors += 1
                    print(f"writer: tx {seq} attempt {attempt}: {e}", file=sys.stderr, flush=True)
                    if con.in_transaction:
                        con.execute("ROLLBACK")
                    time.sleep(0.01)
        te = time.time()
        if a.lat_file:
            lat_t.append(ts - t0)
            lat_d.append(te - ts)
    el = time.time() - t0
    if a.lat_file:
        with open(a.lat_file, "wb") as f:
            f.write(len(lat_t).to_bytes(8, "little"))
            lat_t.tofile(f)
            lat_d.tofile(f)
    print(json.dumps({"tx": seq, "seconds": el, "rate": seq / max(el - shift, 1e-9), "errors": errors,
                      "t0": t0, "pauses": pause_log}), flush=True)
    con.close()


def read_latencies(path):
    """(start offsets, durations) written by a writer with --lat-file."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        t, d = array.array("d"), array.array("d")
        t.fromfile(f, n)
        d.fromfile(f, n)
    return t, d


def start_writer(db, rate, size, duration, seed, workdir, mode="mixed", txn_size=1, count=0, lat_file=None,
                 pause_at=(), pause_s=0.3, ref_prefix=None, entry=None):
    start_file = os.path.join(workdir, f"writer-{time.monotonic_ns()}.start")
    errf = open(os.path.join(workdir, "writer.err"), "ab")
    cmd = [sys.executable, entry or ENTRY, "--_writer", "--db", db, "--rate", str(rate),
           "--size", str(size), "--duration", str(duration), "--seed", str(seed),
           "--start-file", start_file, "--mode", mode, "--txn-size", str(txn_size), "--count", str(count)]
    if lat_file:
        cmd += ["--lat-file", lat_file]
    if pause_at:
        cmd += ["--pause-at", ",".join(f"{x:.3f}" for x in pause_at), "--pause-s", str(pause_s)]
    if ref_prefix:
        cmd += ["--ref-prefix", ref_prefix]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errf)
    errf.close()
    deadline = time.monotonic() + 20
    while not os.path.exists(start_file):
        if p.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"writer did not start (rc={p.poll()})")
        time.sleep(0.005)
    with open(start_file) as f:
        p.t0 = json.load(f)["t0"]
    return p


def writer_result(p, timeout):
    out, _ = p.communicate(timeout=timeout)
    return json.loads(out.decode().strip().splitlines()[-1])


ENTRY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "rpo")


# --------------------------------------------------------------------------- databases
def make_ticket_db(path, seed, filler_mb=0):
    """Ticket DB in WAL mode: 50 users, 200 tickets; filler_mb adds a `relleno` table of random blobs
    (to give snapshots and checkpoints something to copy)."""
    rnd = random.Random(seed)
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode=WAL")
    con.executescript(SCHEMA)
    now = time.time()
    con.executemany("INSERT INTO usuarios(nombre,email,creado,tx) VALUES(?,?,?,0)",
                    [(f"usuario {i}", f"u{i}@example.com", now) for i in range(1, 51)])
    con.executemany("INSERT INTO tickets(usuario_id,asunto,descripcion,creado,actualizado,tx,tx_act)"
                    " VALUES(?,?,?,?,?,0,0)",
                    [(rnd.randint(1, 50), f"ticket {i}", " ".join(rnd.choices(WORDS, k=30)), now, now)
                     for i in range(1, 201)])
    if filler_mb:
        con.execute("CREATE TABLE relleno(id INTEGER PRIMARY KEY, b BLOB NOT NULL)")
        con.execute("WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM c WHERE i < ?) "
                    "INSERT INTO relleno(id, b) SELECT i, randomblob(4000) FROM c",
                    (int(filler_mb * 1024 * 1024 / 4096),))
    con.commit()
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()


def ticket_state(path):
    con = sqlite3.connect(path, timeout=10)
    try:
        t, s = con.execute(
            "SELECT max(t), max(s) FROM ("
            " SELECT max(creado) t, max(tx) s FROM usuarios UNION ALL"
            " SELECT max(max(creado), max(actualizado)), max(max(tx), max(tx_act)) FROM tickets UNION ALL"
            " SELECT max(creado), max(tx) FROM interacciones)").fetchone()
        return {"tmax": t, "seq": s}
    finally:
        con.close()


def ticket_digest(path):
    """SHA-1 over every row of the three ticket tables (ordered by id) and the row counts."""
    con = sqlite3.connect(path, timeout=10)
    h = hashlib.sha1()
    counts = {}
    try:
        for t in TICKET_TABLES:
            n = 0
            for row in con.execute(f"SELECT * FROM {t} ORDER BY id"):
                h.update(repr(row).encode())
                n += 1
            counts[t] = n
    finally:
        con.close()
    return {"sha1": h.hexdigest(), "rows": counts}


def blob_digest(path):
    con = sqlite3.connect(path)
    h = hashlib.sha1()
    n = 0
    for i, b in con.execute("SELECT id, b FROM blobs ORDER BY id"):
        h.update(i.to_bytes(8, "little"))
        h.update(b)
        n += 1
    con.close()
    return f"{n}:{h.hexdigest()}"


def build_big_db(path, mb):
    """`blobs` table of randomblob(4000) rows (one row per 4 KiB page), built in one transaction."""
    rows = int(mb * 1024 * 1024 / 4096)
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode=OFF")
    con.execute("PRAGMA synchronous=OFF")
    con.execute("CREATE TABLE blobs(id INTEGER PRIMARY KEY, b BLOB NOT NULL)")
    con.execute("WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM c WHERE i < ?) "
                "INSERT INTO blobs(id, b) SELECT i, randomblob(4000) FROM c", (rows,))
    con.commit()
    con.execute("PRAGMA journal_mode=WAL")
    con.close()
    return rows
