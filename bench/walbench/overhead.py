"""Overhead on the application: commit latency without and with each agent, write stalls, agent CPU
and peak RSS.

Three runs on the same workload (ticket DB + a `relleno` filler table so that a snapshot or a
checkpoint has something to copy): the writer alone, then with walship, then with Litestream (both
1s sync interval, directory replica). The writer records the duration of every transaction (BEGIN
to COMMIT returned, or the single autocommit statement). The first 60 % of the writer's run is the
steady window (latency percentiles, agent CPU %); at 60 % walship is asked for a base snapshot
(`walship snapshot DB`, served by the running agent) and the longest commit from the request to
1 s after it returns is the snapshot stall. For Litestream (no such command) and for the baseline
only the longest commit of the whole run is reported. Agent CPU = utime+stime of the agent process
(/proc/PID/stat) over the steady window; peak RSS = VmHWM at the end of the run.
"""
import os
import shutil
import time

from .common import kill_hard, log, percentile, proc_cost, run_timed, suspicious_lines
from .ctx import start_tool
from .workload import make_ticket_db, read_latencies, start_writer, writer_result

STEADY_FRACTION = 0.6


def lat_stats(pairs):
    d = sorted(x for _, x in pairs)
    if not d:
        return {"n": 0}
    return {"n": len(d), "p50": percentile(d, 50), "p90": percentile(d, 90), "p99": percentile(d, 99),
            "p999": percentile(d, 99.9), "max": d[-1], "mean": sum(d) / len(d)}


def histogram(pairs, lo=1e-5, hi=10.0, per_decade=20):
    """Log-spaced histogram of durations (for the CDF plot without storing every sample)."""
    import math
    nb = int(math.log10(hi / lo) * per_decade)
    counts = [0] * (nb + 2)
    for _, x in pairs:
        if x <= lo:
            counts[0] += 1
        elif x >= hi:
            counts[-1] += 1
        else:
            counts[1 + int(math.log10(x / lo) * per_decade)] += 1
    return {"lo": lo, "hi": hi, "per_decade": per_decade, "counts": counts}


class WalSizeWatch:
    """Samples the size of the database's WAL file every 50 ms; keeps the largest."""

    def __init__(self, db):
        import threading
        self.path, self.largest, self.stop_flag = db + "-wal", 0, False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop_flag:
            try:
                self.largest = max(self.largest, os.path.getsize(self.path))
            except OSError:
                pass
            time.sleep(0.05)

    def stop(self):
        self.stop_flag = True
        self.thread.join()
        return self.largest


def overhead_run(ctx, tool, seconds, filler_mb, base_db):
    name = tool.name if tool else "none"
    d = ctx.dir(f"overhead-{name}")
    db = os.path.join(d, "app.db")
    shutil.copyfile(base_db, db)
    logpath = ctx.logpath(f"overhead-{name}")
    lat = os.path.join(d, "lat.bin")
    res = {"tool": name}
    tp = wp = None
    p = ctx.p
    try:
        if tool:
            from .s3 import FileReplica
            tp = start_tool(tool, db, FileReplica(os.path.join(d, "replica")), "1s", logpath, 600)
            res["startup_cost"] = proc_cost(tp.pid)
        wp = start_writer(db, p["rate"], p["size"], seconds, ctx.seed, d, txn_size=p["txn_size"], lat_file=lat)
        wal_watch = WalSizeWatch(db)
        c0 = proc_cost(tp.pid) if tp else None
        t_steady_end = wp.t0 + seconds * STEADY_FRACTION
        time.sleep(max(0.0, t_steady_end - time.time()))
        c1 = proc_cost(tp.pid) if tp else None
        if tool and tool.name == "walship":
            s0 = time.time()
            dur, r = run_timed(tool.snapshot_cmd(db), timeout=300)
            res["snapshot"] = {"t_start": s0 - wp.t0, "seconds": dur, "rc": r.returncode,
                               "output": (r.stdout + r.stderr).strip()[-300:]}
        res["writer"] = writer_result(wp, seconds + 120)
        res["wal_max_bytes"] = wal_watch.stop()
        if tp:
            c2 = proc_cost(tp.pid)
            res["cpu_steady_s"] = c1["cpu_s"] - c0["cpu_s"]
            res["cpu_steady_pct"] = 100.0 * res["cpu_steady_s"] / (c1["t"] - c0["t"])
            res["cpu_run_s"] = c2["cpu_s"] - c0["cpu_s"]
            res["cpu_run_pct"] = 100.0 * res["cpu_run_s"] / (c2["t"] - c0["t"])
            res["cpu_total_s"] = c2["cpu_s"]   # includes start-up and the initial snapshot
            res["vmhwm_kb"] = c2["vmhwm_kb"]
            res["graceful_exit_rc"] = tool.graceful_stop(tp, 1.0)
        t, dd = read_latencies(lat)
        pairs = list(zip(t, dd))
        cut = seconds * STEADY_FRACTION
        res["latency_steady"] = lat_stats([x for x in pairs if x[0] < cut])
        res["latency_run"] = lat_stats(pairs)
        res["latency_hist_steady"] = histogram([x for x in pairs if x[0] < cut])
        worst = max(pairs, key=lambda x: x[1]) if pairs else (None, None)
        res["max_commit_at_s"] = worst[0]
        if "snapshot" in res:
            s = res["snapshot"]
            win = [x for x in pairs if s["t_start"] <= x[0] <= s["t_start"] + s["seconds"] + 1.0]
            res["latency_snapshot_window"] = lat_stats(win)
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {e}"
    finally:
        kill_hard(wp, tp)
        res["log_warnings"] = suspicious_lines(logpath)[:10] if tool else []
        shutil.rmtree(d, ignore_errors=True)
    return res


def run_overhead(ctx, seconds, filler_mb):
    base = os.path.join(ctx.work, "overhead-base.db")
    make_ticket_db(base, ctx.seed, filler_mb=filler_mb)
    out = {"seconds": seconds, "filler_mb": filler_mb, "db_bytes": os.path.getsize(base),
           "steady_fraction": STEADY_FRACTION}
    for tool in [None] + list(ctx.tools):
        r = overhead_run(ctx, tool, seconds, filler_mb, base)
        out[r["tool"]] = r
        if "error" in r:
            log(f"overhead {r['tool']:10s}: ERROR {r['error']}")
        else:
            ls = r["latency_steady"]
            extra = ""
            if tool:
                extra = (f"  agent CPU {r['cpu_steady_pct']:.1f}% (steady)  peak RSS {r['vmhwm_kb'] / 1024:.1f} MiB"
                         f"  exit rc {r['graceful_exit_rc']}")
            if "latency_snapshot_window" in r:
                extra += (f"  snapshot {r['snapshot']['seconds']:.2f}s rc {r['snapshot']['rc']}, max commit "
                          f"during it {r['latency_snapshot_window'].get('max', 0) * 1000:.1f} ms")
            log(f"overhead {r['tool']:10s}: writer {r['writer']['rate']:.0f} tx/s  commit p50 {ls['p50'] * 1000:.2f} ms"
                f"  p99 {ls['p99'] * 1000:.2f} ms  max(run) {r['latency_run']['max'] * 1000:.1f} ms{extra}")
        if ctx.progress:
            ctx.progress.step()
    os.remove(base)
    return out
