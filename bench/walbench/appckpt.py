"""Application checkpoints beside an agent: what the application's own
`PRAGMA wal_checkpoint(TRUNCATE)` costs it.

Three runs on the same workload: the writer alone, with walship, with Litestream (1 s sync
interval, directory replica). Beside the writer, a second connection of the bench process runs
`PRAGMA wal_checkpoint(TRUNCATE)` every 100 ms with a 5 s busy timeout, and records how long
each took and whether it completed (SQLite's first result column is 0 when it did). An agent's
read transaction can make such a checkpoint wait out its busy timeout; while it waits it holds
the writer lock, so the writer waits too: the longest commit shows it.
"""
import os
import shutil
import sqlite3
import threading
import time

from .common import kill_hard, log, percentile
from .ctx import start_tool
from .workload import make_ticket_db, read_latencies, start_writer, writer_result

EVERY_S = 0.1
BUSY_MS = 5000


def checkpoint_loop(db, stop, out):
    con = sqlite3.connect(db, isolation_level=None, timeout=BUSY_MS / 1000)
    try:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                busy, log_frames, done = con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                out.append((time.monotonic() - t0, busy == 0, None))
            except sqlite3.Error as e:
                out.append((time.monotonic() - t0, False, str(e)))
            time.sleep(EVERY_S)
    finally:
        con.close()


def appckpt_run(ctx, tool, seconds, base_db):
    name = tool.name if tool else "none"
    d = ctx.dir(f"appckpt-{name}")
    db = os.path.join(d, "app.db")
    shutil.copyfile(base_db, db)
    logpath = ctx.logpath(f"appckpt-{name}")
    lat = os.path.join(d, "lat.bin")
    res = {"tool": name}
    tp = wp = None
    p = ctx.p
    stop, ckpts = threading.Event(), []
    th = None
    try:
        if tool:
            from .s3 import FileReplica
            tp = start_tool(tool, db, FileReplica(os.path.join(d, "replica")), "1s", logpath, 600)
        wp = start_writer(db, p["rate"], p["size"], seconds, ctx.seed, d, txn_size=p["txn_size"], lat_file=lat)
        th = threading.Thread(target=checkpoint_loop, args=(db, stop, ckpts), daemon=True)
        th.start()
        res["writer"] = writer_result(wp, seconds + 120)
        stop.set()
        th.join(timeout=BUSY_MS / 1000 + 5)
        t, dd = read_latencies(lat)
        res["commit_max_s"] = max(dd) if dd else None
        res["commit_p99_s"] = percentile(sorted(dd), 99) if dd else None
        durs = sorted(x[0] for x in ckpts)
        res["checkpoints"] = len(ckpts)
        res["checkpoints_completed"] = sum(1 for x in ckpts if x[1])
        res["checkpoint_errors"] = [x[2] for x in ckpts if x[2]][:5]
        res["checkpoint_p50_s"] = percentile(durs, 50) if durs else None
        res["checkpoint_max_s"] = durs[-1] if durs else None
        if tool:
            res["graceful_exit_rc"] = tool.graceful_stop(tp, 1.0)
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {e}"
    finally:
        stop.set()
        kill_hard(wp, tp)
        shutil.rmtree(d, ignore_errors=True)
    return res


def run_appckpt(ctx, seconds):
    base = os.path.join(ctx.work, "appckpt-base.db")
    make_ticket_db(base, ctx.seed, filler_mb=8)
    out = {"seconds": seconds, "every_s": EVERY_S, "busy_timeout_ms": BUSY_MS}
    for tool in [None] + list(ctx.tools):
        r = appckpt_run(ctx, tool, seconds, base)
        out[r["tool"]] = r
        if "error" in r:
            log(f"app-checkpoint {r['tool']:10s}: ERROR {r['error']}")
        else:
            log(f"app-checkpoint {r['tool']:10s}: {r['checkpoints_completed']}/{r['checkpoints']} TRUNCATE completed, "
                f"p50 {r['checkpoint_p50_s'] * 1000:.1f} ms, max {r['checkpoint_max_s'] * 1000:.1f} ms; "
                f"longest commit {r['commit_max_s'] * 1000:.1f} ms; writer {r['writer']['rate']:.0f} tx/s")
        if ctx.progress:
            ctx.progress.step()
    os.remove(base)
    return out
