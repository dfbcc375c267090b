"""Restore time (RTO): against database size, against WAL volume since the snapshot, and from S3.

Databases are a `blobs` table of randomblob(4000) rows (one row per 4 KiB page, incompressible).
Restores are timed to a fresh file, without an integrity check for both tools (`--integrity none` /
Litestream's default `-integrity-check none`); walship's default (`--integrity full`) is timed once
more. Every restored database is compared with the source (SHA-1 over all rows).

- size: for each size, start the tool on a fresh copy, wait for its initial snapshot and for the
  replica directory to stop changing, then time the restores (the agent keeps running, idle).
- wal: one database (base size), start the tool, wait for the snapshot; then write update churn
  (each transaction rewrites one random row's 4000-byte blob) until the cumulative payload reaches
  each volume, wait until the replica stops changing, time the restore, continue.
- s3: the former restore part against the S3 replica: initial snapshot, N seconds of churn at
  1000 tx/s, graceful stop, timed restores.
"""
import os
import shutil
import time

from .common import close_trial, dir_size, kill_hard, log, median, rm_db, run_rusage, run_timed, suspicious_lines, wait_quiet
from .ctx import start_tool
from .workload import blob_digest, build_big_db, start_writer, writer_result

CHURN_ROW = 4000


def timed_restores(tool, rep, dst, runs, src_digest, tag, walship_full=True):
    res = {}
    times, cpu = [], []
    for i in range(runs):
        rm_db(dst)
        t, r, c = run_rusage(tool.restore_cmd(rep, dst, "none"), env=rep.env())
        if r.returncode != 0:
            raise RuntimeError(f"restore rc={r.returncode}: {(r.stderr or r.stdout).strip()[-400:]}")
        times.append(t)
        cpu.append(c)
        if i == 0:
            res["restore_output"] = (r.stdout + r.stderr).strip()[-600:]
            res["restored_db_bytes"] = os.path.getsize(dst)
            res["restored_matches_source"] = blob_digest(dst) == src_digest
    res["restore_s"] = times
    res["restore_cpu"] = cpu   # user/system seconds of each run (the restore process and its threads)
    res["restore_best_s"] = min(times)
    res["restore_median_s"] = median(times)
    if walship_full and tool.name == "walship":
        rm_db(dst)
        t, r = run_timed(tool.restore_cmd(rep, dst), env=rep.env())
        res["restore_default_integrity_full_s"] = t
        res["restore_default_rc"] = r.returncode
    rm_db(dst)
    log(f"{tag}: restore best {res['restore_best_s']:.2f}s (of {runs})"
        + (f", --integrity full {res['restore_default_integrity_full_s']:.2f}s"
           if "restore_default_integrity_full_s" in res else "")
        + f"  matches source: {res['restored_matches_source']}")
    return res


def stop(tool, p):
    if p is not None and p.poll() is None:
        p.terminate()
        try:
            p.wait(timeout=120)
        except Exception:
            pass
    kill_hard(p)


def run_rto_sizes(ctx, sizes, runs, backend="dir"):
    out = {"sizes_mb": sizes, "runs": runs, "backend": backend, "points": []}
    for mb in sizes:
        base = os.path.join(ctx.work, f"rto-base-{mb}.db")
        t = time.perf_counter()
        rows = build_big_db(base, mb)
        digest = blob_digest(base)
        point = {"mb": mb, "db_bytes": os.path.getsize(base), "rows": rows}
        log(f"rto size {mb} MiB: built {point['db_bytes'] / 2**20:.0f} MiB ({rows} rows) in "
            f"{time.perf_counter() - t:.1f}s")
        for tool in ctx.tools:
            tag = f"rto-size-{mb}-{tool.name}"
            d = ctx.dir(tag)
            db, dst = os.path.join(d, "big.db"), os.path.join(d, "restored.db")
            shutil.copyfile(base, db)
            rep = ctx.replica(backend, d, tag)
            logpath = ctx.logpath(tag)
            res = {}
            tp = None
            try:
                t = time.perf_counter()
                tp = start_tool(tool, db, rep, "1s", logpath, snapshot_timeout=1800)
                res["initial_snapshot_s"] = time.perf_counter() - t
                res["quiet_wait_s"] = wait_quiet(rep.local_dir(), 2.0, 600)
                res["replica"] = dir_size(rep.local_dir())
                log(f"{tag}: initial snapshot {res['initial_snapshot_s']:.1f}s, replica "
                    f"{res['replica']['bytes'] / 2**20:.0f} MiB")
                res.update(timed_restores(tool, rep, dst, runs, digest, tag))
            except Exception as e:
                res["error"] = f"{type(e).__name__}: {e}"
                log(f"{tag}: ERROR {res['error']}")
            finally:
                stop(tool, tp)
                close_trial(res, logpath, d, rep.local_dir() if rep.kind == "s3" else None)
            point[tool.name] = res
            if ctx.progress:
                ctx.progress.step()
        os.remove(base)
        out["points"].append(point)
    return out


def run_rto_wal(ctx, base_mb, volumes_mb, runs, rate=2000):
    base = os.path.join(ctx.work, "rto-wal-base.db")
    rows = build_big_db(base, base_mb)
    out = {"base_mb": base_mb, "db_bytes": os.path.getsize(base), "rows": rows, "volumes_mb": volumes_mb,
           "churn_rate": rate, "row_bytes": CHURN_ROW, "runs": runs}
    for tool in ctx.tools:
        tag = f"rto-wal-{tool.name}"
        d = ctx.dir(tag)
        db, dst = os.path.join(d, "big.db"), os.path.join(d, "restored.db")
        shutil.copyfile(base, db)
        rep = ctx.replica("dir", d, tag)
        logpath = ctx.logpath(tag)
        res = {"points": []}
        tp = None
        try:
            tp = start_tool(tool, db, rep, "1s", logpath, snapshot_timeout=1800)
            wait_quiet(rep.local_dir(), 2.0, 600)
            res["replica_after_snapshot"] = dir_size(rep.local_dir())
            done_tx = 0
            for i, vol in enumerate(volumes_mb):
                want = int(vol * 2**20 / CHURN_ROW)
                pt = {"mb": vol, "tx": want}
                if want > done_tx:
                    wp = start_writer(db, rate, CHURN_ROW, 3600, ctx.seed + i, d, mode="churn", count=want - done_tx)
                    w = writer_result(wp, 3600)
                    pt["writer"] = w
                    done_tx = want
                pt["quiet_wait_s"] = wait_quiet(rep.local_dir(), 2.0, 300)
                pt["replica"] = dir_size(rep.local_dir())
                pt.update(timed_restores(tool, rep, dst, runs, blob_digest(db), f"{tag} {vol} MiB",
                                         walship_full=False))
                res["points"].append(pt)
                if ctx.progress:
                    ctx.progress.step()
        except Exception as e:
            res["error"] = f"{type(e).__name__}: {e}"
            log(f"{tag}: ERROR {res['error']}")
        finally:
            stop(tool, tp)
            close_trial(res, logpath, d)
        out[tool.name] = res
    os.remove(base)
    return out


def run_s3_restore(ctx, mb, churn_seconds, runs):
    """Initial snapshot to S3, churn_seconds of 1000 tx/s x 4000 B updates, graceful stop, timed restores."""
    tag0 = "restore-s3"
    base = os.path.join(ctx.work, "big-base.db")
    t = time.perf_counter()
    rows = build_big_db(base, mb)
    log(f"{tag0}: built {os.path.getsize(base) / 2**20:.0f} MiB database ({rows} rows) in "
        f"{time.perf_counter() - t:.1f}s")
    out = {"db_bytes": os.path.getsize(base), "rows": rows, "churn_seconds": churn_seconds, "runs": runs}
    for tool in ctx.tools:
        tag = f"{tag0}-{tool.name}"
        d = ctx.dir(tag)
        db, dst = os.path.join(d, "big.db"), os.path.join(d, "restored.db")
        rep = ctx.replica("s3", d, tag)
        shutil.copyfile(base, db)
        logpath = ctx.logpath(tag)
        res = {}
        tp = wp = None
        try:
            t = time.perf_counter()
            tp = start_tool(tool, db, rep, "1s", logpath, snapshot_timeout=1800)
            res["initial_snapshot_s"] = time.perf_counter() - t
            log(f"{tag}: initial snapshot after {res['initial_snapshot_s']:.1f}s; {churn_seconds}s of update churn")
            wp = start_writer(db, 1000, CHURN_ROW, churn_seconds, ctx.seed, d, mode="churn")
            res["writer"] = writer_result(wp, churn_seconds + 120)
            res["graceful_exit_rc"] = tool.graceful_stop(tp, 1.0)
            res["replica"] = dir_size(rep.local_dir())
            res.update(timed_restores(tool, rep, dst, runs, blob_digest(db), tag))
        except Exception as e:
            res["error"] = f"{type(e).__name__}: {e}"
            log(f"{tag}: ERROR {res['error']}")
        finally:
            kill_hard(wp, tp)
            res["log_warnings"] = suspicious_lines(logpath)[:10]
            shutil.rmtree(d, ignore_errors=True)
            shutil.rmtree(rep.local_dir(), ignore_errors=True)
        out[tool.name] = res
        if ctx.progress:
            ctx.progress.step()
    os.remove(base)
    return out
