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
import json
import math
import os
import random
import shutil
import signal
import statistics
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


def phase_offsets(interval_s, trials, seed):
    """Seeded, stratified kill phases in [0, interval): one in each of `trials` equal slices, in a
    shuffled order. The same list serves the directory and the S3 trials of an interval."""
    rnd = random.Random(seed * 7919 + int(round(interval_s * 1000)))
    phases = [(i + rnd.random()) * interval_s / trials for i in range(trials)]
    rnd.shuffle(phases)
    return phases


def last_cut_unix(db):
    """walship's `lastCutUnix` from the status file in its default spool (0 when not there yet)."""
    path = os.path.join(os.path.dirname(db), "." + os.path.basename(db) + "-walship", "status.json")
    try:
        with open(path) as f:
            return float(json.load(f).get("lastCutUnix") or 0.0)
    except (OSError, ValueError):
        return 0.0


def phase_locked_kill_time(db, wp, cfg, phase_s):
    """The next instant `phase_s` after one of walship's cuts, at least 0.2 s away. The agent cuts at a
    fixed rate from its start, so one recorded cut with writer data gives the whole schedule."""
    iv = cfg["interval_s"]
    deadline = time.time() + cfg["settle_s"] + 10
    while True:
        cut = last_cut_unix(db)
        if cut > wp.t0 + 0.05:
            break
        if time.time() > deadline:
            raise RuntimeError("no cut with writer data in the agent's status file")
        time.sleep(0.05)
    k = max(0, math.ceil((time.time() + 0.2 - cut - phase_s) / iv))
    return cut + k * iv + phase_s, cut + k * iv


def rpo_trial(ctx, tool, cfg, trial, wait_s, seed, phase_s=None):
    """One kill-and-restore trial. With phase_s (walship only), the kill lands phase_s after one of the
    agent's cuts, at least settle seconds after the writer starts, instead of at wait_s."""
    tag = f"rpo-{cfg['name']}-{tool.name}-{trial}" + ("-phase" if phase_s is not None else "")
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
        if phase_s is not None:
            t_target, t_cut = phase_locked_kill_time(db, wp, cfg, phase_s)
            res.update(phase_s=round(phase_s, 4), scheduled_cut=t_cut)
            time.sleep(max(0.0, t_target - time.time()))
        tool_alive = tp.poll() is None
        os.kill(wp.pid, signal.SIGKILL)   # "the same instant": back to back
        os.kill(tp.pid, signal.SIGKILL)
        t_kill = time.time()
        kill_hard(wp, tp)
        if phase_s is not None:
            res["kill_phase_s"] = t_kill - res["scheduled_cut"]
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
            puts = [e for e in ev if e["op"] == "PUT" and "/segments/0/" in e["path"]]
            done = [e["dur"] for e in puts if e["status"] == 200]
            res["put_latency_median_s"] = statistics.median(done) if done else None
            # A level-0 PUT begun before the kill and not answered by then: its segment is lost.
            res["kill_during_upload"] = any(e["t"] <= t_kill and (e["status"] == 0 or t_kill < e["t"] + e["dur"])
                                            for e in puts)
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


NEAR_CUT_PHASES_MS = (1, 2, 4, 6, 8, 12, 20)


def run_phase(ctx, intervals, trials):
    """walship only: RPO over S3 against RPO over a directory with the kill phase held equal.
    Trial i of both backends kills at the same phase after a cut, so the phase of the cut, which
    dominates RPO, cancels out of the paired difference; what is left is the cost of the upload."""
    tool = ctx.tool("walship")
    results = []
    for iv, iv_s in intervals:
        cfgs = {b: c for c in rpo_configs([(iv, iv_s)], ("dir", "s3"), ctx.p["rate"], ctx.p["size"],
                                          ctx.p["txn_size"]) for b in [c["backend"]]}
        # Stratified phases for the paired statistics, then a few fixed phases right after a cut,
        # where the upload of the new segment may still be running (shown apart, not pooled).
        phases = [(ph, False) for ph in phase_offsets(iv_s, trials, ctx.seed)]
        phases += [(ms / 1000.0, True) for ms in NEAR_CUT_PHASES_MS if ms / 1000.0 < iv_s / 2]
        for i, (ph, near) in enumerate(phases):
            for b in (("dir", "s3") if i % 2 == 0 else ("s3", "dir")):
                cfg = cfgs[b]
                r = rpo_trial(ctx, tool, cfg, i, cfg["settle_s"], ctx.seed * 1000 + i, phase_s=ph)
                r["near_cut"] = near
                results.append(r)
                head = f"s3-phase {iv:5s} {b:3s} trial {i}: phase {ph * 1000:6.1f} ms" + (" (near cut)" if near else "")
                if "error" in r:
                    log(f"{head} ERROR {r['error']}")
                else:
                    up = r.get("put_latency_median_s")
                    log(f"{head} (kill at {r['kill_phase_s'] * 1000:6.1f} ms)  RPO {r['rpo_s']:7.3f}s  "
                        f"lost {r['lost_tx']:5d} tx" + (f"  PUT median {up * 1000:.1f} ms" if up else "")
                        + ("  killed during an upload" if r.get("kill_during_upload") else ""))
                if ctx.progress:
                    ctx.progress.step()
    return results


def summarize_phase(results):
    """Per interval: the paired S3 - directory RPO differences over the stratified phases, the upload
    time they are held to, and the near-cut pairs one by one."""
    from .common import median
    out = {}
    for iv in dict.fromkeys(r["interval"] for r in results):
        mine = [r for r in results if r["interval"] == iv]
        by = {(b, near): {r["trial"]: r for r in mine if r["backend"] == b and r.get("near_cut", False) == near
                          and "rpo_s" in r}
              for b in ("dir", "s3") for near in (False, True)}
        trials = sorted(set(by["dir", False]) & set(by["s3", False]))
        if not trials:
            continue
        d, s3 = by["dir", False], by["s3", False]
        diffs = [s3[t]["rpo_s"] - d[t]["rpo_s"] for t in trials]
        ups = [s3[t]["put_latency_median_s"] for t in trials if s3[t].get("put_latency_median_s")]
        near = [{"phase_ms": round(by["s3", True][t]["phase_s"] * 1000, 1),
                 "rpo_dir_s": by["dir", True][t]["rpo_s"], "rpo_s3_s": by["s3", True][t]["rpo_s"],
                 "s3_killed_during_upload": bool(by["s3", True][t].get("kill_during_upload")),
                 "put_latency_median_s": by["s3", True][t].get("put_latency_median_s")}
                for t in sorted(set(by["dir", True]) & set(by["s3", True]))]
        out[iv] = {
            "pairs": len(trials),
            "failed": sum(1 for r in mine if "rpo_s" not in r),
            "diffs": diffs, "diff_median": median(diffs), "diff_mean": sum(diffs) / len(diffs),
            "diff_min": min(diffs), "diff_max": max(diffs),
            "rpo_dir_median": median([d[t]["rpo_s"] for t in trials]),
            "rpo_s3_median": median([s3[t]["rpo_s"] for t in trials]),
            "put_latency_median_s": median(ups) if ups else None,
            "killed_during_upload": sum(1 for t in trials if s3[t].get("kill_during_upload")),
            "phase_spread_s": median([abs(s3[t]["kill_phase_s"] - d[t]["kill_phase_s"]) for t in trials]),
            "near_cut": near,
        }
    return out
