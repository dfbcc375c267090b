"""Steady-state S3 requests: each tool replicates to S3 through the counting proxy while the writer
runs for warm-up + window seconds; the steady window is the last `window` seconds of writing (the
first seconds hold one-off start-up work), start-up and the whole run are reported separately."""
import os
import time

from .common import close_trial, dir_size, kill_hard, log
from .ctx import start_tool
from .s3 import CountingProxy, S3Replica, request_stats
from .workload import make_ticket_db, start_writer, writer_result


def run_requests(ctx, seconds, warmup, interval="1s", interval_s=1.0):
    out = {"seconds": seconds, "warmup_s": warmup, "interval": interval}
    p = ctx.p
    for tool in ctx.tools:
        tag = f"requests-{tool.name}"
        d = ctx.dir(tag)
        db = os.path.join(d, "app.db")
        proxy = CountingProxy(ctx.s3.port)
        rep = S3Replica(ctx.s3, tag, port=proxy.port)
        logpath = ctx.logpath(tag)
        make_ticket_db(db, ctx.seed)
        tp = wp = None
        res = {}
        try:
            t_start = time.time()
            tp = start_tool(tool, db, rep, interval, logpath)
            t_ready = time.time()
            wp = start_writer(db, p["rate"], p["size"], warmup + seconds, ctx.seed, d, txn_size=p["txn_size"])
            res["writer"] = writer_result(wp, warmup + seconds + 60)
            t_end = time.time()
            res["graceful_exit_rc"] = tool.graceful_stop(tp, interval_s)
            t_stop = time.time()
            time.sleep(0.2)
            with proxy.lock:
                ev = list(proxy.events)
            res["steady"] = request_stats(ev, wp.t0 + warmup, t_end, interval_s)
            res["writer_phase"] = request_stats(ev, wp.t0, t_end, interval_s)
            res["startup"] = request_stats(ev, t_start, t_ready, interval_s)
            res["total"] = request_stats(ev, t_start, t_stop + 1, interval_s)
            res["proxy_errors"] = proxy.errors[:10]
            res["requests"] = [dict(e, t=round(e["t"] - wp.t0, 3), dur=round(e["dur"], 4)) for e in ev]
            res["replica"] = dir_size(rep.local_dir())
        except Exception as e:
            res["error"] = f"{type(e).__name__}: {e}"
        finally:
            kill_hard(wp, tp)
            proxy.close()
            close_trial(res, logpath, d, rep.local_dir())
        out[tool.name] = res
        if "error" in res:
            log(f"s3 requests {tool.name:10s}: ERROR {res['error']}")
        else:
            st = res["steady"]
            ops = " ".join(f"{k}={v}" for k, v in sorted(st["by_op"].items()))
            log(f"s3 requests {tool.name:10s}: {st['seconds']:.0f}s steady: {ops}  "
                f"PUT/interval {st['puts_per_interval']:.2f}  others {st['others_pct_of_puts'] or 0:.1f}% of PUTs  "
                f"{st['requests_per_day']:.0f} req/day  ${st['cost_usd_per_day']:.3f}/day  "
                f"(start-up: {sum(res['startup']['by_op'].values())} req; whole run incl. stop: "
                f"{res['total']['requests']})  exit rc {res['graceful_exit_rc']}")
        if ctx.progress:
            ctx.progress.step()
    return out
