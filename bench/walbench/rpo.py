"""RPO trials: SIGKILL writer and agent at a seeded random instant, restore the latest state.

For each sync interval and replica backend (directory or S3), for each trial, for each tool (the
order alternates per trial; the seeded wait is the same for both tools and both backends):
fresh ticket DB, start the tool and wait for its initial snapshot, start the writer, wait
settle + U(0, span) seconds (settle = max(2 s, interval + 0.5 s): at least one full sync cycle
with writer data; span = max(1 s, interval): the kill lands anywhere in the cycle), SIGKILL writer
and tool back to back, restore the latest state. RPO = newest commit time in the source - newest
commit time in the restore; lost transactions = newest sequence in the source - newest in the
restore. S3 trials go through the counting proxy, so each one also yields its requests (writer
phase: writer start to kill), pooled per configuration into requests and bytes per day.
"""
import os
import random
import shutil
import signal
import time

from .common import dir_size, kill_hard, log, suspicious_lines, run_timed
from .ctx import start_tool
from .s3 import CountingProxy, merge_stats, request_stats
from .workload import make_ticket_db, start_writer, ticket_state


def rpo_configs(intervals, backends, rate, size, txn_size):
    out = []
    for iv, iv_s in intervals:
        for b in backends:
            out.append({"name": f"{b}-{iv}", "backend": b, "interval": iv, "interval_s": iv_s,
                        "rate": rate, "size": size, "txn_size": txn_size,
                        "settle_s": max(2.0, iv_s + 0.5), "span_s": max(1.0, iv_s)})
    return out


def trial_waits(cfg, trials, seed):
    """Seeded per interval (not per backend): trial i of dir-X and s3-X share their kill time."""
    rnd = random.Random(seed * 1000 + int(round(cfg["interval_s"] * 1000)))
    return [cfg["settle_s"] + rnd.uniform(0.0, cfg["span_s"]) for _ in range(trials)]


def rpo_trial(ctx, tool, cfg, trial, wait_s, seed):
    tag = f"rpo-{cfg['name']}-{tool.name}-{trial}"
    d = ctx.dir(tag)
    db, out = os.path.join(d, "app.db"), os.path.join(d, "restored.db")
    proxy = CountingProxy(ctx.s3.port) if cfg["backend"] == "s3" else None
    rep = ctx.replica(cfg["backend"], d, tag, port=proxy and proxy.port)
    logpath = ctx.logpath(tag)
    make_ticket_db(db, seed)
    res = {"tool": tool.name, "config": cfg["name"], "backend": cfg["backend"], "interval": cfg["interval"],
           "trial": trial, "wait_s": round(wait_s, 3)}
    tp = wp = None
    try:
        t_start = time.time()
        tp = start_tool(tool, db, rep, cfg["interval"], logpath)
        wp = start_writer(db, cfg["rate"], cfg["size"], wait_s + 120, seed, d, txn_size=cfg["txn_size"])
        res["startup_s"] = wp.t0 - t_start
        time.sleep(max(0.0, wp.t0 + wait_s - time.time()))
        tool_alive = tp.poll() is None
        os.kill(wp.pid, signal.SIGKILL)   # "the same instant": back to back
        os.kill(tp.pid, signal.SIGKILL)
        t_kill = time.time()
        kill_hard(wp, tp)
        res["tool_alive_at_kill"] = tool_alive
        res["replica_at_kill"] = dir_size(rep.local_dir())
        res["replica_bytes_per_day"] = res["replica_at_kill"]["bytes"] * 86400.0 / (t_kill - t_start)
        if proxy is not None:
            with proxy.lock:
                ev = list(proxy.events)
            res["requests_writer_phase"] = request_stats(ev, wp.t0, t_kill, cfg["interval_s"])
            res["requests_startup"] = request_stats(ev, t_start, wp.t0, cfg["interval_s"])["by_op"]
            res["requests"] = [[round(e["t"] - wp.t0, 3), e["op"], e["bytes"], e["status"]] for e in ev]
            res["proxy_errors"] = proxy.errors[:5]
        src = ticket_state(db)
        res.update(src_tmax=src["tmax"], src_seq=src["seq"])
        res["writer_rate"] = src["seq"] / (src["tmax"] - wp.t0) if src["seq"] else 0.0
        res["kill_minus_last_commit_s"] = t_kill - src["tmax"]
        res["restore_s"], r = run_timed(tool.restore_cmd(rep, out), env=rep.env(), timeout=600)
        if r.returncode != 0:
            res["error"] = f"restore rc={r.returncode}: {(r.stderr or r.stdout).strip()[-400:]}"
            return res
        rst = ticket_state(out)
        res.update(restored_tmax=rst["tmax"], restored_seq=rst["seq"])
        res["rpo_s"] = src["tmax"] - rst["tmax"]
        res["lost_tx"] = src["seq"] - rst["seq"]
    except Exception as e:  # keep going; the trial is reported as failed
        res["error"] = f"{type(e).__name__}: {e}"
    finally:
        kill_hard(wp, tp)
        if proxy is not None:
            proxy.close()
        res["log_warnings"] = suspicious_lines(logpath)[:10]
        shutil.rmtree(d, ignore_errors=True)
        if rep.kind == "s3":
            shutil.rmtree(rep.local_dir(), ignore_errors=True)
    return res


def run_rpo(ctx, configs, trials):
    results = []
    total = len(configs) * trials * len(ctx.tools)
    k = 0
    for cfg in configs:
        for i, w in enumerate(trial_waits(cfg, trials, ctx.seed)):
            order = ctx.tools if i % 2 == 0 else ctx.tools[::-1]  # alternate who goes first
            for tool in order:
                k += 1
                r = rpo_trial(ctx, tool, cfg, i, w, ctx.seed * 1000 + i)
                results.append(r)
                head = f"rpo [{k}/{total}] {cfg['name']:9s} {tool.name:10s} trial {i}:"
                if "error" in r:
                    log(f"{head} ERROR {r['error']}")
                else:
                    req = r.get("requests_writer_phase")
                    reqs = (f"  {req['requests']} req ({req['puts']} PUT)" if req else "")
                    log(f"{head} wait {w:5.1f}s  writer {r['writer_rate']:5.0f} tx/s  RPO {r['rpo_s']:7.3f}s  "
                        f"lost {r['lost_tx']:5d} tx  restore {r['restore_s']:.2f}s{reqs}"
                        + (f"  ({len(r['log_warnings'])} log warnings)" if r["log_warnings"] else ""))
                if ctx.progress:
                    ctx.progress.step()
    return results


def summarize_rpo(results, configs):
    """Per configuration and tool: trials, RPO and lost-tx statistics, pooled S3 requests, bytes per day."""
    from .common import median, percentile
    out = {}
    for cfg in configs:
        per = {}
        for tool in ("walship", "litestream"):
            rs = [r for r in results if r["tool"] == tool and r["config"] == cfg["name"]]
            if not rs:
                continue
            ok = [r for r in rs if "rpo_s" in r]
            rpos = sorted(r["rpo_s"] for r in ok)
            lost = sorted(r["lost_tx"] for r in ok)
            per[tool] = {
                "n": len(ok), "failed": len(rs) - len(ok),
                "rpo_median": median(rpos), "rpo_p90": percentile(rpos, 90),
                "rpo_max": rpos[-1] if rpos else None, "rpo_min": rpos[0] if rpos else None,
                "lost_median": median(lost), "lost_max": lost[-1] if lost else None,
                "rate": median([r["writer_rate"] for r in ok]),
                "restore_median_s": median([r["restore_s"] for r in ok]),
                "replica_bytes_per_day": median([r.get("replica_bytes_per_day") for r in ok]),
                "rpos": rpos,
            }
            if cfg["backend"] == "s3":
                per[tool]["requests"] = merge_stats([r.get("requests_writer_phase") for r in ok],
                                                    cfg["interval_s"])
        if per:
            out[cfg["name"]] = dict(per, config=cfg)
    return out
