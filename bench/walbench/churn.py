"""Restore under heavy churn: a large database, then seconds of transactions that each rewrite K random
4 KiB rows spread over the whole file, replicated at a 1 s interval with default snapshot settings (no new
snapshot during the churn, so the restore has to replay all of it); graceful stop, timed restores of the
latest state, from a directory replica and from an S3 replica, for both tools.

Per tool and backend: restore seconds (all runs, median), replica bytes (every object under the replica
root or prefix after the stop, snapshot included), throughput in MiB/s of replica bytes and of restored
database bytes (median restore), CPU of the restore process (RUSAGE_CHILDREN deltas: user + system seconds
of the process and its threads, as % of wall time), transactions written, and the restored database
compared with the source (blob_digest). On S3 also the bytes the restore actually fetched (GET response
bodies, one more restore through the counting proxy, not timed) and the S3 server's CPU (rclone, /proc)
during the timed restores. Restores read warm files (page cache not dropped).
"""
import os
import shutil
import time

from .common import close_trial, dir_size, kill_hard, log, proc_cost, rm_db, run_timed
from .ctx import start_tool
from .rto import CHURN_ROW, timed_restores
from .s3 import CountingProxy, S3Replica, s3_op
from .workload import blob_digest, build_big_db, start_writer, writer_result

BACKENDS = ("dir", "s3")


def run_churn(ctx, mb, seconds, rows_per_tx, rate, runs):
    base = os.path.join(ctx.work, "churn-base.db")
    t = time.perf_counter()
    rows = build_big_db(base, mb)
    log(f"churn: built {os.path.getsize(base) / 2**20:.0f} MiB database ({rows} rows) in "
        f"{time.perf_counter() - t:.1f}s")
    out = {"db_bytes": os.path.getsize(base), "rows": rows, "seconds": seconds, "rows_per_tx": rows_per_tx,
           "row_bytes": CHURN_ROW, "rate": rate, "runs": runs, "interval": "1s", "backends": list(BACKENDS)}
    for backend in BACKENDS:
        out[backend] = {}
        for tool in ctx.tools:
            out[backend][tool.name] = churn_one(ctx, tool, backend, base, seconds, rows_per_tx, rate, runs)
            if ctx.progress:
                ctx.progress.step()
    os.remove(base)
    return out


def churn_one(ctx, tool, backend, base, seconds, rows_per_tx, rate, runs):
    """One tool, one backend: snapshot, heavy churn, graceful stop, timed restores."""
    tag = f"churn-{backend}-{tool.name}"
    d = ctx.dir(tag)
    db, dst = os.path.join(d, "big.db"), os.path.join(d, "restored.db")
    shutil.copyfile(base, db)
    rep = ctx.replica(backend, d, tag)
    logpath = ctx.logpath(tag)
    res = {}
    tp = wp = None
    try:
        t = time.perf_counter()
        tp = start_tool(tool, db, rep, "1s", logpath, snapshot_timeout=1800)
        res["initial_snapshot_s"] = time.perf_counter() - t
        res["replica_after_snapshot"] = dir_size(rep.local_dir())
        log(f"{tag}: initial snapshot after {res['initial_snapshot_s']:.1f}s; {seconds}s of churn, "
            f"{rows_per_tx} random rows x {CHURN_ROW} B per tx, " + (f"{rate:g} tx/s" if rate else "unpaced"))
        wp = start_writer(db, rate, CHURN_ROW, seconds, ctx.seed, d, mode="churn", txn_size=rows_per_tx)
        res["writer"] = writer_result(wp, seconds + 120)
        res["written_bytes"] = res["writer"]["tx"] * rows_per_tx * CHURN_ROW
        t = time.perf_counter()
        res["graceful_exit_rc"] = tool.graceful_stop(tp, 1.0)
        res["stop_s"] = time.perf_counter() - t
        res["replica"] = dir_size(rep.local_dir())
        log(f"{tag}: {res['writer']['tx']} tx ({res['writer']['rate']:.0f} tx/s, "
            f"{res['written_bytes'] / 2**20:.0f} MiB of rows), stop {res['stop_s']:.1f}s (rc "
            f"{res['graceful_exit_rc']}), replica {res['replica']['bytes'] / 2**20:.0f} MiB in "
            f"{res['replica']['files']} files")
        res.update(restores(ctx, tool, rep, dst, runs, blob_digest(db), tag))
        if rep.kind == "s3":
            res["fetched"] = fetched_by_restore(ctx, tool, rep, dst)
        res.update(throughput(res))
        log_summary(tag, res)
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {e}"
        log(f"{tag}: ERROR {res['error']}")
    finally:
        kill_hard(wp, tp)
        close_trial(res, logpath, d, rep.local_dir() if rep.kind == "s3" else None)
    return res


def restores(ctx, tool, rep, dst, runs, digest, tag):
    """timed_restores (integrity none), plus the S3 server's CPU over them when the replica is on S3."""
    server = ctx.s3.proc.pid if rep.kind == "s3" else None
    c0 = proc_cost(server)["cpu_s"] if server else None
    res = timed_restores(tool, rep, dst, runs, digest, tag, walship_full=False)
    if server:
        res["server_cpu_s"] = proc_cost(server)["cpu_s"] - c0
    return res


def fetched_by_restore(ctx, tool, rep, dst):
    """One more restore through the counting proxy: what it asked the S3 server for (not timed)."""
    proxy = CountingProxy(ctx.s3.port)
    try:
        prep = S3Replica(ctx.s3, rep.prefix, port=proxy.port)
        if tool.name == "litestream":   # its S3 restore reads the endpoint from a config
            tool.write_config(rep.ls_db, prep, "1s", rep.ls_config[:-len(".yml")] + "-proxy.yml")
        rm_db(dst)
        t, r = run_timed(tool.restore_cmd(prep, dst, "none"), env=prep.env())
        rm_db(dst)
        ops = {}
        get_bytes = 0
        for q in proxy.requests:
            op = s3_op(q["method"], q["target"], q["headers"])
            ops[op] = ops.get(op, 0) + 1
            get_bytes += q["body_bytes"] if op == "GET" else 0
        return {"get_bytes": get_bytes, "by_op": ops, "rc": r.returncode, "restore_via_proxy_s": t}
    finally:
        proxy.close()


def throughput(res):
    """MiB/s of replica bytes, restored database bytes and fetched bytes over the median restore; restore
    CPU (user + system over all runs) as % of their wall time; the S3 server's CPU likewise."""
    t = res["restore_median_s"]
    wall = sum(res["restore_s"])
    cpu = sum(c["user_s"] + c["sys_s"] for c in res["restore_cpu"])
    out = {"replica_mib_s": res["replica"]["bytes"] / 2**20 / t,
           "db_mib_s": res["restored_db_bytes"] / 2**20 / t,
           "restore_cpu_s": cpu / len(res["restore_s"]), "restore_cpu_pct": 100 * cpu / wall,
           "restore_user_pct": 100 * sum(c["user_s"] for c in res["restore_cpu"]) / wall}
    if "fetched" in res:
        out["fetched_mib_s"] = res["fetched"]["get_bytes"] / 2**20 / t
    if "server_cpu_s" in res:
        out["server_cpu_pct"] = 100 * res["server_cpu_s"] / wall
    return out


def log_summary(tag, res):
    f = res.get("fetched")
    log(f"{tag}: restore median {res['restore_median_s']:.2f}s  replica {res['replica']['bytes'] / 2**20:.0f} MiB "
        f"-> {res['replica_mib_s']:.0f} MiB/s  DB {res['restored_db_bytes'] / 2**20:.0f} MiB -> "
        f"{res['db_mib_s']:.0f} MiB/s  CPU {res['restore_cpu_pct']:.0f}% of wall"
        + (f"  fetched {f['get_bytes'] / 2**20:.0f} MiB in {f['by_op'].get('GET', 0)} GETs" if f else "")
        + (f"  rclone CPU {res['server_cpu_pct']:.0f}%" if "server_cpu_pct" in res else ""))
