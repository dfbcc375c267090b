"""Bytes uploaded per day on S3, measured over whole upload cycles (part `s3-bytes`).

The cost rows of the S3 RPO trials count what was uploaded from writer start to SIGKILL, 2-28 s of
writes: a tool that uploads once per sync interval is caught with up to an interval of writes not yet
uploaded, a tool that uploads more often is counted more fully, and each trial holds only a few
uploads. Here, per sync interval and tool: fresh ticket DB, the tool replicates to the S3 server
through the counting proxy; once it is ready and its initial snapshot is uploaded (a PUT answered,
then 1 s without a request), the counters are noted and the standard writer runs for W seconds;
then the tool stays up, idle, for 2 x interval + 3 s so that everything written is uploaded, and is
stopped with SIGTERM. Every request from writer start to the tool's exit is counted; per-day figures
are those counts x 86 400 / W (the writer's own elapsed seconds), bytes per transaction are PUT
bytes / transactions written. PUT bytes are split by the proxy's operation (level-0 `PUT`,
`PUT-other`, `PUT-part`) and by the object's level from its key (walship `segments/<level>/`,
`snapshots/`; Litestream `<level as 4 hex digits>/`, level 9 being its snapshot). After the stop the
objects left under the prefix are listed by level, and a restore checks that the replica holds the
last transaction written (the drain was long enough).
"""
import os
import re
import signal
import time

from .common import close_trial, kill_hard, log, rm_db, run_timed
from .ctx import start_tool
from .s3 import PRICE_TIER1, PRICE_TIER2, TIER1_OPS, CountingProxy, S3Replica, s3_op
from .workload import make_ticket_db, start_writer, ticket_state, writer_result

UPLOAD_OPS = ("PUT", "PUT-other", "PUT-part")   # request bodies that store bytes
QUIET_S = 1.0                                   # no request for this long: the initial upload is over


def writes_seconds(interval_s, minimum, cycles):
    """W: at least `minimum` seconds and `cycles` sync intervals of writes."""
    return max(float(minimum), cycles * interval_s)


def drain_seconds(interval_s):
    return 2 * interval_s + 3.0


def run_s3_bytes(ctx, intervals, minimum, cycles):
    """intervals: [(label, seconds)]. Returns {"params": ..., "runs": {interval: {tool: result}}}."""
    p = ctx.p
    out = {"intervals": [iv for iv, _ in intervals], "min_seconds": minimum, "cycles": cycles,
           "rate": p["rate"], "size": p["size"], "txn_size": p["txn_size"], "runs": {}}
    for i, (iv, iv_s) in enumerate(intervals):
        w = writes_seconds(iv_s, minimum, cycles)
        out["runs"][iv] = {}
        for tool in (ctx.tools if i % 2 == 0 else ctx.tools[::-1]):   # alternate who goes first
            r = bytes_one(ctx, tool, iv, iv_s, w)
            out["runs"][iv][tool.name] = r
            log_one(iv, tool.name, r)
            if ctx.progress:
                ctx.progress.step()
    return out


def bytes_one(ctx, tool, iv, iv_s, w):
    """One tool, one interval: initial upload, W s of writes, drain, SIGTERM; every request counted."""
    p = ctx.p
    tag = f"bytes-{iv}-{tool.name}"
    d = ctx.dir(tag)
    db, dst = os.path.join(d, "app.db"), os.path.join(d, "restored.db")
    proxy = CountingProxy(ctx.s3.port)
    rep = S3Replica(ctx.s3, tag, port=proxy.port)
    logpath = ctx.logpath(tag)
    make_ticket_db(db, ctx.seed)
    drain = drain_seconds(iv_s)
    res = {"interval": iv, "interval_s": iv_s, "writes_s": w, "drain_s": drain}
    tp = wp = None
    try:
        t = time.time()
        tp = start_tool(tool, db, rep, iv, logpath)
        res["ready_s"] = time.time() - t
        res["initial_upload_s"], res["initial_upload_seen"] = wait_initial_upload(proxy, 2 * iv_s + 30)
        with proxy.lock:
            n0 = len(proxy.requests)      # the counters: every request from here on is counted
        res["before_writer"] = count_ops(proxy, 0, n0)
        wp = start_writer(db, p["rate"], p["size"], w, ctx.seed, d, txn_size=p["txn_size"])
        res["writer"] = writer_result(wp, w + 120)
        t_end = time.time()
        time.sleep(max(0.0, t_end + drain - time.time()))
        t_term = time.time()
        tp.send_signal(signal.SIGTERM)    # walship ships everything committed, then exits 0
        res["graceful_exit_rc"] = tp.wait(timeout=300)
        t_exit = time.time()
        res["stop_s"] = t_exit - t_term
        res["idle_before_sigterm_s"] = t_term - t_end
        time.sleep(0.2)
        with proxy.lock:
            reqs = [dict(r) for r in proxy.requests[n0:]]
            res["proxy_errors"] = proxy.errors[:10]
        res["counted_span_s"] = t_exit - wp.t0   # writer start to the tool's exit
        res.update(tally([r for r in reqs if r["t"] <= t_exit], res["writer"], t_term))
        res["replica"] = replica_by_class(rep.local_dir())
        res.update(check_complete(tool, rep, db, dst))
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {e}"
    finally:
        kill_hard(wp, tp)
        proxy.close()
        close_trial(res, logpath, d, rep.local_dir())
    return res


def wait_initial_upload(proxy, timeout):
    """Waits until a PUT has been answered 2xx, no request is in flight and none for QUIET_S seconds.
    Returns (seconds waited, whether that happened before the timeout)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        with proxy.lock:
            reqs = list(proxy.requests)
        put_ok = any(r["method"] == "PUT" and r["status"] and 200 <= r["status"] < 300 for r in reqs)
        busy = any(r["status"] is None for r in reqs)
        last = max((r["t"] + (r["dur"] or 0.0) for r in reqs), default=t0)
        if put_ok and not busy and time.time() - last >= QUIET_S:
            return time.time() - t0, True
        time.sleep(0.05)
    return time.time() - t0, False


def count_ops(proxy, a, b):
    with proxy.lock:
        reqs = proxy.requests[a:b]
        out = {}
        for r in reqs:
            op = s3_op(r["method"], r["target"], r["headers"])
            out[op] = out.get(op, 0) + 1
    return out


def key_of(target):
    """Object key below the tool's prefix: /bench/<prefix>/<key>?query -> <key>."""
    parts = target.split("?")[0].lstrip("/").split("/", 2)
    return parts[2] if len(parts) == 3 else ""


def key_class(key):
    """Level of an object from its key: 'L<n>', 'snapshot' or 'other' (markers, generation.json).
    walship: generations/<gen>/segments/<level>/..., generations/<gen>/snapshots/...;
    Litestream 0.5 on S3: <level as 4 hex digits>/<min>-<max>.ltx, level 9 = snapshot."""
    parts = key.split("/")
    if "segments" in parts[:-1]:
        return f"L{parts[parts.index('segments') + 1]}"
    if "snapshots" in parts[:-1]:
        return "snapshot"
    if len(parts) >= 2 and re.fullmatch(r"[0-9a-f]{4}", parts[-2]):
        lvl = int(parts[-2], 16)
        return "snapshot" if lvl == 9 else f"L{lvl}"
    return "other"


def key_txids(key):
    """How many txids an object's key says it covers: walship segments
    (<first:016x>-<last:016x>-<ms>-<ms>[-s].seg.lz4) and Litestream LTX files (<min:016x>-<max:016x>.ltx).
    A walship txid is one transaction; a Litestream TXID is one of its level-0 files."""
    m = re.match(r"([0-9a-f]{16})-([0-9a-f]{16})[-.]", key.split("/")[-1])
    return int(m.group(2), 16) - int(m.group(1), 16) + 1 if m else 0


def level_rates(bytes_by_class, txids_by_class, tx, secs):
    """Per level: bytes PUT per transaction it covers, and what that level costs in a day if it covers
    every transaction once. A level's share of the run's transactions is its txids over level 0's."""
    out = {}
    base = txids_by_class.get("L0", 0)
    for c, n in txids_by_class.items():
        if not c.startswith("L") or not n or not base or not tx:
            continue
        covered = tx * n / base
        per_tx = bytes_by_class.get(c, 0) / covered
        out[c] = {"txids": n, "tx_covered": covered, "bytes_per_tx": per_tx,
                  "gb_per_day": per_tx * tx / secs * 86400 / 1e9}
    return out


def tally(reqs, writer, t_term):
    """Counts, bytes and per-day figures of the requests made from writer start to the tool's exit."""
    secs = max(writer["seconds"], 1e-9)
    tx = writer["tx"]
    by_op, bytes_by_op, bytes_by_class, puts_by_class, txids_by_class = {}, {}, {}, {}, {}
    cut = non_2xx = 0
    after = {"requests": 0, "put_bytes": 0}
    for r in reqs:
        if not r["status"]:   # 0: cut off; None: still open (neither after a graceful exit)
            cut += 1
            continue
        op = s3_op(r["method"], r["target"], r["headers"])
        by_op[op] = by_op.get(op, 0) + 1
        non_2xx += not 200 <= r["status"] < 300
        if op in UPLOAD_OPS:
            n = r["request_bytes"]
            c = key_class(key_of(r["target"]))
            bytes_by_op[op] = bytes_by_op.get(op, 0) + n
            bytes_by_class[c] = bytes_by_class.get(c, 0) + n
            puts_by_class[c] = puts_by_class.get(c, 0) + 1
            if r["t"] >= t_term:
                after["put_bytes"] += n
        # Transactions an object covers count once per stored object: on a whole PUT, or on
        # the completion of a multipart upload (never per part).
        if op in ("PUT", "PUT-other", "POST-complete-multipart") and 200 <= r["status"] < 300:
            c = key_class(key_of(r["target"]))
            txids_by_class[c] = txids_by_class.get(c, 0) + key_txids(key_of(r["target"]))
        if r["t"] >= t_term:
            after["requests"] += 1
    put_bytes = sum(bytes_by_op.values())
    puts = sum(by_op.get(op, 0) for op in UPLOAD_OPS)
    n = sum(by_op.values())
    day = 86400.0 / secs
    tier1 = sum(v for op, v in by_op.items() if op in TIER1_OPS)
    cost_day = (tier1 * PRICE_TIER1 + (n - tier1) * PRICE_TIER2) / 1000 * day
    l0 = bytes_by_op.get("PUT", 0)
    levels = level_rates(bytes_by_class, txids_by_class, tx, secs)
    return {
        "levels": levels, "txids_by_class": txids_by_class,
        "all_levels_gb_per_day": sum(v["gb_per_day"] for v in levels.values()) if "L0" in levels else None,
        "seconds": secs, "tx": tx,
        "requests": n, "by_op": by_op, "put_bytes_by_op": bytes_by_op, "put_bytes_by_class": bytes_by_class,
        "puts_by_class": puts_by_class, "puts": puts, "shipping_puts": by_op.get("PUT", 0),
        "put_bytes": put_bytes, "level0_put_bytes": l0, "non_2xx": non_2xx, "cut_off": cut,
        "after_sigterm": after,
        "bytes_per_tx": put_bytes / tx if tx else None, "level0_bytes_per_tx": l0 / tx if tx else None,
        "gb_per_day": put_bytes * day / 1e9, "level0_gb_per_day": l0 * day / 1e9,
        "puts_per_day": puts * day, "shipping_puts_per_day": by_op.get("PUT", 0) * day,
        "requests_per_day": n * day, "per_day_by_op": {op: v * day for op, v in by_op.items()},
        "cost_usd_per_day": cost_day,
    }


def replica_by_class(root):
    """Bytes and objects left under the prefix (rclone stores one file per object), by level."""
    out = {}
    for dp, _, fns in os.walk(root):
        for fn in fns:
            path = os.path.join(dp, fn)
            try:
                size = os.lstat(path).st_size
            except FileNotFoundError:
                continue
            c = key_class(os.path.relpath(path, root))
            e = out.setdefault(c, {"bytes": 0, "files": 0})
            e["bytes"] += size
            e["files"] += 1
    return out


def check_complete(tool, rep, db, dst):
    """Restores the latest state (after the tool's exit; not counted) and compares its last transaction
    with the source's: 0 lost means everything written was uploaded."""
    rm_db(dst)
    t, r = run_timed(tool.restore_cmd(rep, dst), env=rep.env(), timeout=600)
    if r.returncode != 0:
        return {"restore_error": f"rc={r.returncode}: {(r.stderr or r.stdout).strip()[-300:]}"}
    src, rst = ticket_state(db), ticket_state(dst)
    rm_db(dst)
    return {"src_seq": src["seq"], "restored_seq": rst["seq"], "lost_tx": src["seq"] - rst["seq"], "restore_s": t}


def log_one(iv, name, r):
    head = f"s3-bytes {iv:4s} {name:10s}:"
    if "error" in r:
        log(f"{head} ERROR {r['error']}")
        return
    b = r["put_bytes_by_class"]
    split = " ".join(f"{c} {v / 2**20:.2f}" for c, v in sorted(b.items()))
    log(f"{head} {r['tx']} tx in {r['seconds']:.0f}s (+{r['idle_before_sigterm_s']:.0f}s idle, stop "
        f"{r['stop_s']:.1f}s rc {r['graceful_exit_rc']})  {r['puts']} PUTs {r['put_bytes'] / 2**20:.2f} MiB "
        f"({split})  {r['bytes_per_tx'] or 0:.0f} B/tx  {r['gb_per_day']:.2f} GB/day  "
        f"{r['requests_per_day']:,.0f} req/day  after SIGTERM {r['after_sigterm']['put_bytes']} B  "
        + (f"restore: lost {r['lost_tx']} tx" if "lost_tx" in r else f"restore ERROR {r.get('restore_error')}")
        + ("" if r["initial_upload_seen"] else "  (initial upload not seen)")
        + (f"  ({len(r['log_warnings'])} log warnings)" if r["log_warnings"] else ""))
