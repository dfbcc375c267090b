"""Summary tables (Markdown) and RESULTS.md, generated from a run's results dict only."""
import os
import platform
import subprocess

from .common import fmt_dur, median
from .s3 import PRICE_STORAGE_GB_MONTH, PRICE_TIER1, PRICE_TIER2

TOOLS = ("walship", "litestream")


def machine_info():
    info = {"nproc": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    info["mem_kb"] = int(line.split()[1])
    except OSError:
        pass
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    info["os"] = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    try:
        import matplotlib
        info["matplotlib"] = matplotlib.__version__
    except ImportError:
        info["matplotlib"] = None
    return info


def git_info(root):
    def g(*a):
        try:
            return subprocess.run(["git", "-C", root, *a], capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
    return {"rev": g("rev-parse", "--short", "HEAD"), "dirty_files": len((g("status", "--porcelain") or "").splitlines())}


def ratio(a, b):
    try:
        return a / b if (a is not None and b not in (None, 0)) else None
    except TypeError:
        return None


def fmt(v, f):
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, str):
        return v
    return f.format(v)


def md_table(header, rows, align=None):
    align = align or ["---"] + ["---:"] * (len(header) - 1)
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


class Peer:
    """The one-table peer comparison: metric, walship, litestream, walship/litestream."""

    def __init__(self):
        self.rows = []

    def add(self, metric, w, l, f, with_ratio=True):
        r = ratio(w, l) if with_ratio and not isinstance(w, (bool, str)) else None
        self.rows.append([metric, fmt(w, f), fmt(l, f), fmt(r, "{:.2f}")])

    def md(self):
        return md_table(["metric", "walship", "litestream", "walship/litestream"], self.rows)


def config_label(cfg):
    b = "directory" if cfg["backend"] == "dir" else "S3"
    return f"{cfg['interval']} {b}"


def summarize(results):
    """Fills results['summary'] and results['targets']; returns (peer table md, sections dict of md)."""
    S = results.setdefault("summary", {})
    peer = Peer()
    sec = {}
    targets = {}
    wl = results.get("workload", {})
    wl_label = f"{wl.get('rate')} tx/s x {wl.get('size')} B x {wl.get('txn_size')} row(s)/tx"

    # ---------------------------------------------------------------- RPO
    rpo_sum = results.get("rpo_summary") or {}
    if rpo_sum:
        rows = []
        for name, per in rpo_sum.items():
            cfg = per["config"]
            for tool in TOOLS:
                v = per.get(tool)
                if not v:
                    continue
                rows.append([cfg["interval"], "directory" if cfg["backend"] == "dir" else "S3", tool,
                             f"{v['n']}/{v['failed']}", fmt(v["rpo_median"], "{:.3f}"), fmt(v["rpo_p90"], "{:.3f}"),
                             fmt(v["rpo_max"], "{:.3f}"), fmt(v["lost_median"], "{:.0f}"), fmt(v["lost_max"], "{:.0f}"),
                             fmt(v["rate"], "{:.0f}"), fmt(v["restore_median_s"], "{:.2f}")])
        sec["rpo"] = md_table(["interval", "replica", "tool", "trials ok/failed", "RPO median (s)", "RPO p90 (s)",
                               "RPO max (s)", "lost tx median", "lost tx max", "writer tx/s", "restore (s)"],
                              rows, ["---", "---", "---"] + ["---:"] * 8)
        for name, per in rpo_sum.items():
            cfg = per["config"]
            w, l = per.get("walship", {}), per.get("litestream", {})
            peer.add(f"RPO median, {config_label(cfg)}", w.get("rpo_median"), l.get("rpo_median"), "{:.3f} s")
            peer.add(f"RPO max, {config_label(cfg)}", w.get("rpo_max"), l.get("rpo_max"), "{:.3f} s")
        d1 = rpo_sum.get("dir-1s")
        if d1 and d1.get("walship", {}).get("rpo_median") is not None:
            w, l = d1["walship"], d1.get("litestream", {})
            targets["RPO median walship <= litestream (1s, directory)"] = (
                l.get("rpo_median") is not None and w["rpo_median"] <= l["rpo_median"])
            targets["RPO max walship <= 1.0 s (1s, directory)"] = w["rpo_max"] <= 1.0 and w["failed"] == 0
        # Paired S3 - directory differences (same seeded kill time)
        diffs = {}
        for name, per in rpo_sum.items():
            cfg = per["config"]
            if cfg["backend"] != "s3":
                continue
            for tool in TOOLS:
                dt = {r["trial"]: r["rpo_s"] for r in results.get("rpo", []) if r["tool"] == tool
                      and r["config"] == f"dir-{cfg['interval']}" and "rpo_s" in r}
                st = {r["trial"]: r["rpo_s"] for r in results.get("rpo", []) if r["tool"] == tool
                      and r["config"] == name and "rpo_s" in r}
                pairs = [st[i] - dt[i] for i in sorted(set(dt) & set(st))]
                if pairs:
                    diffs.setdefault(cfg["interval"], {})[tool] = {"pairs": pairs, "median": median(pairs),
                                                                    "max": max(pairs)}
        if diffs:
            S["rpo_s3_minus_dir"] = diffs
            sec["rpo_pairs"] = md_table(
                ["interval", "walship median", "walship max", "litestream median", "litestream max"],
                [[iv, fmt(v.get("walship", {}).get("median"), "{:+.3f} s"),
                  fmt(v.get("walship", {}).get("max"), "{:+.3f} s"),
                  fmt(v.get("litestream", {}).get("median"), "{:+.3f} s"),
                  fmt(v.get("litestream", {}).get("max"), "{:+.3f} s")] for iv, v in diffs.items()])

    # S3 against a directory with the kill phase held equal (walship only)
    ph = results.get("s3_phase_summary") or {}
    if ph:
        rows = []
        for iv, v in ph.items():
            up = v["put_latency_median_s"]
            rows.append([iv, f"{v['pairs']}/{v['failed']}", f"{v['rpo_dir_median']:.3f}", f"{v['rpo_s3_median']:.3f}",
                         f"{v['diff_median'] * 1000:+.1f}", f"{v['diff_mean'] * 1000:+.1f}",
                         f"{v['diff_min'] * 1000:+.1f} .. {v['diff_max'] * 1000:+.1f}",
                         fmt(up and up * 1000, "{:.1f}"), str(v["killed_during_upload"]),
                         f"{v['phase_spread_s'] * 1000:.1f}"])
            if up is not None:
                targets[f"S3: walship RPO over S3 - over a directory, kill phase held equal ({iv}, median of "
                        f"{v['pairs']} pairs) <= upload time (level-0 PUT median {up * 1000:.1f} ms)"] = (
                    v["diff_median"] <= up and v["failed"] == 0)
        near_rows = [[iv, f"{n['phase_ms']:.0f}", f"{n['rpo_dir_s']:.3f}", f"{n['rpo_s3_s']:.3f}",
                      fmt(n["put_latency_median_s"] and n["put_latency_median_s"] * 1000, "{:.1f}"),
                      "yes" if n["s3_killed_during_upload"] else "no"]
                     for iv, v in ph.items() for n in v.get("near_cut", [])]
        if near_rows:
            sec["s3_phase_near"] = md_table(
                ["interval", "kill phase after the cut (ms)", "RPO, directory (s)", "RPO, S3 (s)",
                 "level-0 PUT median in the S3 trial (ms)", "S3 kill inside a PUT (before its answer)"],
                near_rows, ["---"] + ["---:"] * 5)
        S["s3_phase"] = ph
        sec["s3_phase"] = md_table(
            ["interval", "pairs ok/failed", "RPO median, directory (s)", "RPO median, S3 (s)",
             "S3 - directory, median of pairs (ms)", "mean (ms)", "min .. max (ms)", "level-0 PUT median (ms)",
             "S3 kills during an upload", "phase mismatch in a pair, median (ms)"],
            rows, ["---"] + ["---:"] * 9)

    if rpo_sum:
        # Cost per S3 configuration (requests pooled over the trials' writer phases)
        rows = []
        for name, per in rpo_sum.items():
            cfg = per["config"]
            for tool in TOOLS:
                q = (per.get(tool) or {}).get("requests")
                if cfg["backend"] != "s3" or not q:
                    continue
                ops = ", ".join(f"{op} {n * 86400 / q['seconds']:,.0f}" for op, n in sorted(q["by_op"].items()))
                rows.append([cfg["interval"], tool, f"{q['seconds']:.0f}", f"{q['puts_per_interval']:.2f}",
                             ops, f"{q['requests_per_day']:,.0f}", f"${q['cost_usd_per_day']:.3f}",
                             f"{q['upload_gb_per_day']:.1f}",
                             f"${q['storage_usd_per_month_per_day_of_uploads']:.2f}"])
        for name, per in rpo_sum.items():
            cfg = per["config"]
            if cfg["backend"] != "s3":
                continue
            wq = (per.get("walship") or {}).get("requests") or {}
            lq = (per.get("litestream") or {}).get("requests") or {}
            peer.add(f"S3 requests per day, {cfg['interval']}", wq.get("requests_per_day"),
                     lq.get("requests_per_day"), "{:,.0f}")
            peer.add(f"S3 request cost per day, {cfg['interval']}", wq.get("cost_usd_per_day"),
                     lq.get("cost_usd_per_day"), "${:.3f}")
            peer.add(f"bytes uploaded per day, {cfg['interval']}, from the RPO trials (writer start to kill; "
                     "biased against a tool that uploads once per interval)", wq.get("upload_gb_per_day"),
                     lq.get("upload_gb_per_day"), "{:.1f} GB")
        if rows:
            sec["cost"] = md_table(["interval", "tool", "seconds counted", "shipping PUTs per interval",
                                    "requests per day by type", "requests per day", "request cost per day",
                                    "uploaded GB per day", "storage of one day's uploads, per month"],
                                   rows, ["---", "---"] + ["---:"] * 2 + ["---"] + ["---:"] * 4)

    # ---------------------------------------------------------------- bytes uploaded per day, steady (s3-bytes)
    sb = results.get("s3_bytes")
    if sb:
        s3_bytes_peer(peer, sb)
        sec["s3_bytes"], sec["s3_bytes_levels"] = s3_bytes_tables(sb)

    # ---------------------------------------------------------------- steady S3 requests (1s)
    req = results.get("s3_requests")
    if req:
        w, l = (req.get("walship") or {}).get("steady", {}), (req.get("litestream") or {}).get("steady", {})
        iv = req.get("interval", "1s")
        peer.add(f"S3 shipping PUTs (level-0 objects) per interval (steady window, {iv})", w.get("puts_per_interval"),
                 l.get("puts_per_interval"), "{:.2f}")
        peer.add(f"S3 other requests (snapshot and compaction PUTs, LIST, DELETE), % of shipping PUTs (steady window, {iv})", w.get("others_pct_of_puts"),
                 l.get("others_pct_of_puts"), "{:.1f} %", with_ratio=False)
        rows = []
        for tool in TOOLS:
            r = req.get(tool) or {}
            if "steady" not in r:
                continue
            st = r["steady"]
            rows.append([tool, " ".join(f"{k} {v}" for k, v in sorted(r["startup"]["by_op"].items())) or "-",
                         " ".join(f"{k} {v}" for k, v in sorted(st["by_op"].items())) or "-",
                         " ".join(f"{k} {v}" for k, v in sorted(r["total"]["by_op"].items())) or "-",
                         f"{st['puts_per_interval']:.2f}", fmt(st["others_pct_of_puts"], "{:.1f} %"),
                         f"{st['requests_per_day']:,.0f}", f"${st['cost_usd_per_day']:.3f}",
                         f"{st['put_bytes'] / 2**20:.1f}", fmt(st["put_latency_median_s"], "{:.3f}"),
                         f"{st['non_2xx']}, {len(r.get('proxy_errors', []))}"])
        if rows:
            sec["requests"] = md_table(
                ["tool", "start-up (start to ready)", f"steady window ({req['seconds']} s)", "whole run (to exit)",
                 "shipping PUTs per interval", "other requests", "requests per day", "request cost per day",
                 "MiB PUT in window", "PUT latency median (s)", "non-2xx, proxy errors"],
                rows, ["---"] * 4 + ["---:"] * 7)
        if w.get("puts_per_interval") is not None:
            targets[f"S3: walship <= 1 shipping PUT per interval ({iv})"] = w["puts_per_interval"] <= 1.0
            targets["S3: walship other requests (compaction PUTs included) <= 5 % of shipping PUTs"] = (w.get("others_pct_of_puts") or 0) <= 5.0

    # ---------------------------------------------------------------- application checkpoints
    ac = results.get("app_checkpoint")
    if ac:
        rows = []
        for name in ("none",) + TOOLS:
            r = ac.get(name) or {}
            if "checkpoints" not in r:
                continue
            rows.append(["writer alone" if name == "none" else name, f"{r['writer']['rate']:.0f}",
                         f"{r['checkpoints_completed']}/{r['checkpoints']}",
                         fmt(r.get("checkpoint_p50_s") and r["checkpoint_p50_s"] * 1000, "{:.1f}"),
                         fmt(r.get("checkpoint_max_s") and r["checkpoint_max_s"] * 1000, "{:.1f}"),
                         fmt(r.get("commit_p99_s") and r["commit_p99_s"] * 1000, "{:.2f}"),
                         fmt(r.get("commit_max_s") and r["commit_max_s"] * 1000, "{:.1f}")])
        sec["app_checkpoint"] = md_table(
            ["run", "writer tx/s", "TRUNCATE completed", "TRUNCATE p50 (ms)", "TRUNCATE max (ms)",
             "commit p99 (ms)", "longest commit (ms)"], rows)
        w, l = ac.get("walship") or {}, ac.get("litestream") or {}
        peer.add("longest commit beside application TRUNCATE checkpoints (s)", w.get("commit_max_s"), l.get("commit_max_s"), "{:.3f}")
        peer.add("application TRUNCATE checkpoint, longest (s)", w.get("checkpoint_max_s"), l.get("checkpoint_max_s"), "{:.3f}")

    # ---------------------------------------------------------------- overhead
    ov = results.get("overhead")
    if ov:
        base = ov.get("none") or {}
        rows = []
        for name in ("none",) + TOOLS:
            r = ov.get(name) or {}
            if "latency_steady" not in r:
                continue
            ls, lr = r["latency_steady"], r["latency_run"]
            snap = r.get("latency_snapshot_window")
            rows.append(["writer alone" if name == "none" else name, f"{r['writer']['rate']:.0f}",
                         f"{ls['p50'] * 1000:.3f}", f"{ls['p90'] * 1000:.3f}", f"{ls['p99'] * 1000:.3f}",
                         f"{ls['p999'] * 1000:.2f}", f"{ls['max'] * 1000:.1f}", f"{lr['max'] * 1000:.1f}",
                         (f"{snap['max'] * 1000:.1f} ({r['snapshot']['seconds']:.2f} s)" if snap and snap.get("n")
                          else "n/a"),
                         fmt(r.get("cpu_steady_pct"), "{:.1f} %"),
                         fmt(r.get("vmhwm_kb") and r["vmhwm_kb"] / 1024, "{:.1f} MiB"),
                         fmt(r.get("wal_max_bytes") and r["wal_max_bytes"] / 2**20, "{:.1f} MiB")])
        sec["overhead"] = md_table(
            ["run", "writer tx/s", "commit p50 (ms)", "p90 (ms)", "p99 (ms)", "p99.9 (ms)", "max, steady (ms)",
             "max, whole run (ms)", "max during forced snapshot (ms)", "agent CPU, steady", "agent peak RSS",
             "largest WAL"], rows)
        w, l = ov.get("walship") or {}, ov.get("litestream") or {}
        g = lambda r, k, q: ((r.get(k) or {}).get(q))  # noqa: E731
        peer.add("agent CPU, steady writes (% of one core)", w.get("cpu_steady_pct"), l.get("cpu_steady_pct"),
                 "{:.1f} %")
        wm, lm = w.get("vmhwm_kb") and w["vmhwm_kb"] / 1024, l.get("vmhwm_kb") and l["vmhwm_kb"] / 1024
        peer.add("agent peak RSS (VmHWM)", wm, lm, "{:.1f} MiB")
        for q, lab in (("p50", "p50"), ("p99", "p99")):
            b = g(base, "latency_steady", q)
            peer.add(f"commit latency {lab} with the agent (writer alone: {fmt(b and b * 1000, '{:.3f}')} ms)",
                     g(w, "latency_steady", q) and g(w, "latency_steady", q) * 1000,
                     g(l, "latency_steady", q) and g(l, "latency_steady", q) * 1000, "{:.3f} ms")
        peer.add(f"longest commit, whole run (writer alone: "
                 f"{fmt(g(base, 'latency_run', 'max') and g(base, 'latency_run', 'max') * 1000, '{:.1f}')} ms)",
                 g(w, "latency_run", "max") and g(w, "latency_run", "max") * 1000,
                 g(l, "latency_run", "max") and g(l, "latency_run", "max") * 1000, "{:.1f} ms")
        peer.add("longest commit during a forced snapshot", g(w, "latency_snapshot_window", "max")
                 and g(w, "latency_snapshot_window", "max") * 1000, None, "{:.1f} ms", with_ratio=False)
        if w.get("cpu_steady_pct") is not None and l.get("cpu_steady_pct") is not None:
            targets["CPU walship <= litestream"] = w["cpu_steady_pct"] <= l["cpu_steady_pct"]
        if wm and lm:
            # A ratio in the same run: an absolute figure moves with the machine's libraries.
            targets["peak RSS walship <= litestream"] = wm <= lm

    # ---------------------------------------------------------------- RTO
    rs = results.get("rto_size")
    if rs:
        rows = []
        for pt in rs["points"]:
            for tool in TOOLS:
                r = pt.get(tool) or {}
                rows.append([f"{pt['db_bytes'] / 2**20:.0f}", tool, fmt(r.get("initial_snapshot_s"), "{:.1f}"),
                             fmt(r.get("restore_best_s"), "{:.2f}"), fmt(r.get("restore_median_s"), "{:.2f}"),
                             fmt(r.get("restore_default_integrity_full_s"), "{:.2f}"),
                             fmt((r.get("replica") or {}).get("bytes") and r["replica"]["bytes"] / 2**20, "{:.0f}"),
                             fmt(r.get("restored_matches_source"), "{}"), r.get("error", "")[:80]])
            w, l = pt.get("walship") or {}, pt.get("litestream") or {}
            peer.add(f"restore time, {pt['db_bytes'] / 2**20:.0f} MiB DB (best of {rs['runs']})",
                     w.get("restore_best_s"), l.get("restore_best_s"), "{:.2f} s")
            if w.get("restore_best_s") and l.get("restore_best_s"):
                targets[f"restore {pt['db_bytes'] / 2**20:.0f} MiB >= 2x faster than litestream"] = (
                    w["restore_best_s"] * 2 <= l["restore_best_s"])
        sec["rto_size"] = md_table(["DB MiB", "tool", "initial snapshot (s)", "restore best (s)", "median (s)",
                                    "walship --integrity full (s)", "replica MiB", "matches source", "error"],
                                   rows, ["---:", "---"] + ["---:"] * 6 + ["---"])
    rw = results.get("rto_wal")
    if rw:
        rows = []
        vols = rw["volumes_mb"]
        for i, vol in enumerate(vols):
            for tool in TOOLS:
                pts = (rw.get(tool) or {}).get("points") or []
                r = pts[i] if i < len(pts) else {}
                rows.append([f"{vol}", tool, fmt((r.get("writer") or {}).get("rate"), "{:.0f}"),
                             fmt(r.get("restore_best_s"), "{:.2f}"),
                             fmt((r.get("replica") or {}).get("bytes") and r["replica"]["bytes"] / 2**20, "{:.0f}"),
                             fmt(r.get("restored_matches_source"), "{}")])
            g = lambda t: (((rw.get(t) or {}).get("points") or [{}] * len(vols))[i:i + 1] or [{}])[0]  # noqa: E731
            peer.add(f"restore time, {rw['db_bytes'] / 2**20:.0f} MiB DB + {vol} MiB of writes since the snapshot",
                     g("walship").get("restore_best_s"), g("litestream").get("restore_best_s"), "{:.2f} s")
        sec["rto_wal"] = md_table(["MiB written since snapshot", "tool", "churn writer tx/s (this step)",
                                   "restore best (s)", "replica MiB", "matches source"], rows,
                                  ["---:", "---", "---:", "---:", "---:", "---:"])
    s3r = results.get("s3_restore")
    if s3r:
        rows = []
        for tool in TOOLS:
            r = s3r.get(tool) or {}
            rows.append([tool, fmt(r.get("initial_snapshot_s"), "{:.1f}"), fmt(r.get("restore_best_s"), "{:.2f}"),
                         fmt(r.get("restore_median_s"), "{:.2f}"), fmt(r.get("restore_default_integrity_full_s"), "{:.2f}"),
                         fmt((r.get("replica") or {}).get("bytes") and r["replica"]["bytes"] / 2**20, "{:.0f}"),
                         fmt(r.get("restored_matches_source"), "{}"), r.get("error", "")[:80]])
        sec["s3_restore"] = md_table(["tool", "initial snapshot to S3 (s)", "restore best (s)", "median (s)",
                                      "walship --integrity full (s)", "bucket MiB", "matches source", "error"],
                                     rows, ["---"] + ["---:"] * 6 + ["---"])
        w, l = s3r.get("walship") or {}, s3r.get("litestream") or {}
        peer.add(f"restore time from S3, {s3r['db_bytes'] / 2**20:.0f} MiB DB + {s3r['churn_seconds']} s of churn "
                 f"(best of {s3r['runs']})", w.get("restore_best_s"), l.get("restore_best_s"), "{:.2f} s")
        if w.get("restore_best_s") and l.get("restore_best_s"):
            targets["restore from S3 >= 2x faster than litestream"] = w["restore_best_s"] * 2 <= l["restore_best_s"]

    hc = results.get("heavy_churn")
    if hc:
        sec["heavy_churn"] = churn_table(hc)
        churn_peer(peer, hc)

    fl = results.get("fleet")
    if fl:
        sec["fleet"] = fleet_table(fl)
        fleet_peer(peer, fl, targets)

    # ---------------------------------------------------------------- PITR
    pi = results.get("pitr")
    if pi:
        rows = []
        for tool in TOOLS:
            r = pi.get(tool) or {}
            for pt in r.get("points", []):
                rows.append([tool, pt["T"], f"{pt['at_s']:.1f}", "yes" if pt.get("exact") else "NO",
                             fmt(pt.get("missing_tx"), "{}"), fmt(pt.get("ref_seq"), "{}"),
                             fmt(pt.get("restored_seq"), "{}"), f"{pt['restore_s']:.2f}", str(pt.get("rc"))])
            if r.get("error"):
                rows.append([tool, "error", "", "", "", "", "", "", r["error"][:80]])
        sec["pitr"] = md_table(["tool", "T", "T - writer start (s)", "exact", "tx missing", "newest tx at T",
                                "newest tx restored", "restore (s)", "rc"], rows,
                               ["---", "---"] + ["---:"] * 7)
        w, l = pi.get("walship") or {}, pi.get("litestream") or {}
        if w.get("points") or l.get("points"):
            n = max(len(w.get("points", [])), len(l.get("points", [])))
            peer.add(f"point-in-time restore to mid-run instants exact ({n} instant(s))",
                     w.get("exact_all") if w.get("points") else None,
                     l.get("exact_all") if l.get("points") else None, "{}", with_ratio=False)
            targets["PITR: walship restore to mid-run instants exact"] = bool(w.get("exact_all"))

    results["targets"] = targets
    tgt = md_table(["target", "met?"], [[k, "yes" if v else "NO"] for k, v in targets.items()], ["---", "---"])
    return peer.md(), sec, tgt


def backend_label(b):
    return "directory" if b == "dir" else "S3"


def mib(v):
    return v and v / 2**20


def churn_speedup(hc, b):
    """Litestream's median restore time / walship's on backend b (above 1: walship is faster)."""
    w, l = ((hc.get(b) or {}).get("walship") or {}), ((hc.get(b) or {}).get("litestream") or {})
    return ratio(l.get("restore_median_s"), w.get("restore_median_s"))


def churn_table(hc):
    rows = []
    for b in hc["backends"]:
        for tool in TOOLS:
            r = hc.get(b, {}).get(tool) or {}
            wr = r.get("writer") or {}
            fe = r.get("fetched") or {}
            rows.append([backend_label(b), tool, f"{fmt(wr.get('tx'), '{}')} ({fmt(wr.get('rate'), '{:.0f}')} tx/s)",
                         fmt(mib(r.get("written_bytes")), "{:.0f}"), fmt(r.get("restore_median_s"), "{:.2f}"),
                         ", ".join(f"{t:.2f}" for t in r.get("restore_s", [])) or "n/a",
                         fmt(mib((r.get("replica") or {}).get("bytes")), "{:.0f}")
                         + f" ({fmt((r.get('replica') or {}).get('files'), '{}')} files)",
                         fmt(mib(fe.get("get_bytes")), "{:.0f}") if b == "s3" else "-",
                         fmt(r.get("replica_mib_s"), "{:.0f}"), fmt(r.get("db_mib_s"), "{:.0f}"),
                         fmt(mib(r.get("restored_db_bytes")), "{:.0f}"),
                         fmt(r.get("restore_cpu_s"), "{:.2f}") + f" ({fmt(r.get('restore_cpu_pct'), '{:.0f} %')})",
                         fmt(r.get("server_cpu_pct"), "{:.0f} %") if b == "s3" else "-",
                         fmt(r.get("restored_matches_source"), "{}"), r.get("error", "")[:80]])
    return md_table(["replica", "tool", "tx written (rate)", "MiB of rows written", "restore median (s)",
                     "restore runs (s)", "replica MiB (objects)", "MiB fetched (S3 GET bodies)",
                     "replica MiB/s", "restored DB MiB/s", "restored DB MiB", "restore CPU s per run (% of wall)",
                     "S3 server CPU (% of wall)", "matches source", "error"],
                    rows, ["---", "---"] + ["---:"] * 12 + ["---"])


def s3_bytes_runs(sb):
    """(interval, W, {tool: result}) per interval of the s3-bytes part."""
    for iv in sb["intervals"]:
        per = sb["runs"].get(iv) or {}
        w = next((r["writes_s"] for r in per.values() if r.get("writes_s")), None)
        yield iv, w, per


def s3_bytes_peer(peer, sb):
    for iv, w, per in s3_bytes_runs(sb):
        a, b = per.get("walship") or {}, per.get("litestream") or {}
        peer.add(f"bytes uploaded per day (steady, {fmt(w, '{:.0f}')} s of writes then drained), {iv}",
                 a.get("gb_per_day"), b.get("gb_per_day"), "{:.1f} GB")
        peer.add(f"  of which level-0 (shipping) PUTs, {iv}", a.get("level0_gb_per_day"),
                 b.get("level0_gb_per_day"), "{:.1f} GB")
        peer.add(f"  bytes uploaded per transaction (steady), {iv}", a.get("bytes_per_tx"), b.get("bytes_per_tx"),
                 "{:,.0f} B")
        if a.get("all_levels_gb_per_day") is not None or b.get("all_levels_gb_per_day") is not None:
            peer.add(f"bytes uploaded per day, every object level seen in the run counted once per transaction, {iv}",
                     a.get("all_levels_gb_per_day"), b.get("all_levels_gb_per_day"), "{:.1f} GB")


def s3_bytes_tables(sb):
    rows, lv_rows = [], []
    for iv, _, per in s3_bytes_runs(sb):
        for tool in TOOLS:
            r = per.get(tool)
            if r is None:
                continue
            if "error" in r:
                rows.append([iv, tool, "error: " + r["error"][:80]] + [""] * 11)
                continue
            wr = r["writer"]
            bo = r["put_bytes_by_op"]
            other = sum(v for k, v in bo.items() if k != "PUT")
            ops = " ".join(f"{k} {v}" for k, v in sorted(r["by_op"].items()))
            rows.append([iv, tool, f"{wr['tx']:,} ({wr['rate']:.0f}/s)", f"{r['seconds']:.1f}",
                         f"{r['idle_before_sigterm_s']:.0f} + {r['stop_s']:.1f}",
                         f"{r['shipping_puts']} / {r['puts'] - r['shipping_puts']}",
                         f"{bo.get('PUT', 0) / 2**20:.2f} / {other / 2**20:.2f}", fmt(r["bytes_per_tx"], "{:,.0f}"),
                         f"{r['gb_per_day']:.2f}", f"{r['puts_per_day']:,.0f}", f"{r['requests_per_day']:,.0f}",
                         f"${r['cost_usd_per_day']:.3f}", ops,
                         f"{r['after_sigterm']['put_bytes']:,} B; lost {fmt(r.get('lost_tx'), '{}')}"])
            cls = lambda d: ", ".join(  # noqa: E731
                f"{c} {v['bytes'] / 2**20:.2f} ({v['files']})" if isinstance(v, dict) else c
                for c, v in sorted(d.items()))
            put_cls = {c: {"bytes": v, "files": r["puts_by_class"].get(c, 0)} for c, v in r["put_bytes_by_class"].items()}
            per_level = ", ".join(f"{c} {v['bytes_per_tx']:,.0f} B/tx over {v['tx_covered']:,.0f} tx"
                                  for c, v in sorted((r.get("levels") or {}).items()))
            lv_rows.append([iv, tool, cls(put_cls) or "-", per_level or "-", fmt(r.get("all_levels_gb_per_day"), "{:.2f}"),
                            cls(r.get("replica") or {}) or "-"])
    main = md_table(["interval", "tool", "tx written (rate)", "W: seconds of writes", "idle s before SIGTERM + stop s",
                     "PUTs: level-0 / other", "MiB PUT: level-0 / other", "bytes per tx", "GB per day",
                     "PUTs per day", "requests per day", "request cost per day", "requests counted, by type",
                     "PUT after SIGTERM; tx missing from a restore"],
                    rows, ["---", "---"] + ["---:"] * 10 + ["---", "---"])
    levels = md_table(["interval", "tool", "PUT, by object level: MiB (PUTs)",
                       "bytes per transaction covered, by level (transactions the level's PUTs covered)",
                       "GB per day, every level seen once per transaction",
                       "left under the prefix after the stop, by level: MiB (objects)"],
                      lv_rows, ["---", "---", "---", "---", "---:", "---"])
    return main, levels


def churn_peer(peer, hc):
    what = (f"{hc['db_bytes'] / 2**20:.0f} MiB DB + {hc['seconds']} s of {hc['rows_per_tx']}-row churn, "
            f"median of {hc['runs']}")
    for b in hc["backends"]:
        w, l = ((hc.get(b) or {}).get("walship") or {}), ((hc.get(b) or {}).get("litestream") or {})
        g = lambda r, k, q: mib((r.get(k) or {}).get(q))  # noqa: E731
        sp = churn_speedup(hc, b)
        peer.add(f"restore under heavy churn, {backend_label(b)}, {what} (lower is better; speedup = "
                 f"Litestream / walship = {fmt(sp, '{:.2f}x')})",
                 w.get("restore_median_s"), l.get("restore_median_s"), "{:.2f} s")
        peer.add(f"  replica bytes after the churn, {backend_label(b)} (all objects under the replica root)",
                 g(w, "replica", "bytes"), g(l, "replica", "bytes"), "{:.0f} MiB")
        if b == "s3":
            peer.add("  bytes fetched by the restore, S3 (GET bodies)", g(w, "fetched", "get_bytes"),
                     g(l, "fetched", "get_bytes"), "{:.0f} MiB")
        peer.add(f"  restore throughput, replica bytes, {backend_label(b)} (higher is better)",
                 w.get("replica_mib_s"), l.get("replica_mib_s"), "{:.0f} MiB/s")
        peer.add(f"  restore throughput, restored DB bytes, {backend_label(b)} (higher is better)",
                 w.get("db_mib_s"), l.get("db_mib_s"), "{:.0f} MiB/s")
        peer.add(f"  transactions written during the churn, {backend_label(b)}",
                 (w.get("writer") or {}).get("tx"), (l.get("writer") or {}).get("tx"), "{:,}")
        peer.add(f"  restore CPU, % of wall time, {backend_label(b)}", w.get("restore_cpu_pct"),
                 l.get("restore_cpu_pct"), "{:.0f} %")
        peer.add(f"  restored DB matches source, {backend_label(b)}", w.get("restored_matches_source"),
                 l.get("restored_matches_source"), "{}", with_ratio=False)


def s3_bytes_section(results, sec):
    sb = results["s3_bytes"]
    return ["### Bytes uploaded per day, steady (whole upload cycles)", "",
            f"Per sync interval and tool: fresh ticket database, the tool replicates to S3 through the counting "
            "proxy; once it is ready and its initial snapshot is uploaded (a PUT answered, then 1 s without a "
            f"request), the writer runs for W = max({sb['min_seconds']} s, {sb['cycles']} intervals) at "
            f"{sb['rate']:g} tx/s x {sb['size']} B x {sb['txn_size']} row(s)/tx; then the tool stays up idle for "
            "2 intervals + 3 s, so that everything written is uploaded, and is stopped with SIGTERM. Every "
            "request from writer start to the tool's exit is counted; per day = count x 86 400 / W (the "
            "writer's elapsed seconds), bytes per tx = bytes PUT / transactions written. Level-0 PUTs carry "
            "new transactions; the other PUTs are snapshots, compacted objects and markers (Litestream "
            "compacts level 0 into level 1 every 30 s, so its level-1 PUTs are in these windows; walship "
            "merges level 0 into level 1 per 5-minute window aligned to the clock, so a run shows a level-1 "
            "PUT only when it crosses the end of such a window). The last column checks the drain: PUT bytes "
            "after SIGTERM (what the idle time did not cover) and the transactions missing from a restore "
            "made after the stop (0: everything written was uploaded).", "",
            sec["s3_bytes"], "", "Bytes PUT and objects left under the prefix after the stop, by object level "
            "(L0 = level 0, snapshot = walship `snapshots/` or Litestream level 9, other = markers and "
            "`generation.json`). A window this short holds only some of each tool's compaction, so the figure "
            "above under-counts the tool whose compaction it missed. The per-level columns correct for that: "
            "each level's bytes per transaction it covers (its objects' txid ranges, from their keys; a "
            "Litestream TXID is one of its level-0 files, so its levels are scaled by level 0's TXIDs), and a "
            "day in which every level seen covers every transaction once. Levels not seen in the run (walship's "
            "squashed hourly level, built once a window leaves the 24 h fine window; Litestream's levels above "
            "the run's length, such as its hourly one) and the daily snapshots of both are not in it.", "",
            sec["s3_bytes_levels"], ""] + ([f"Note: {sb['note']}.", ""] if sb.get("note") else [])


def fleet_table(fl):
    rows = []
    for n in fl["sizes"]:
        for tool in TOOLS:
            r = fl.get(f"{tool}-{n}")
            if not r:
                continue
            st = (f"{r['startup_s']:.1f}" if r.get("startup_s") is not None
                  else f"not all in {fl.get('startup_limit_s', '?')} s ({r.get('replicated_at_startup')}/{n})")
            idle, busy, rpo = r.get("idle") or {}, r.get("busy") or {}, r.get("rpo_s") or {}
            rows.append([f"{n:,}", tool, r.get("active", ""), st, fmt(r.get("idle_cpu_pct"), "{:.1f} %"),
                         fmt(r.get("busy_cpu_pct"), "{:.1f} %"), fmt(busy.get("threads") or idle.get("threads"), "{:,}"),
                         fmt(busy.get("fds") or idle.get("fds"), "{:,}"),
                         fmt(r.get("vmhwm_kb") and r["vmhwm_kb"] / 1024, "{:.0f} MiB"),
                         fmt(rpo.get("median"), "{:.2f}"), fmt(rpo.get("max"), "{:.2f}"),
                         (r.get("error") or "")[:80] + ("; restore errors" if r.get("restore_errors") else "")
                         + (f"; {r['not_replicated']} active database(s) had nothing in the replica"
                            if r.get("not_replicated") else "")])
    return md_table(["databases", "tool", "active", "startup to all replicated (s)", "CPU idle", "CPU busy",
                     "threads", "open fds", "peak RSS", "RPO median (s)", "RPO max (s)", "error"], rows,
                    ["---:", "---"] + ["---:"] * 9 + ["---"])


def fleet_peer(peer, fl, targets):
    for n in fl["sizes"]:
        w, l = fl.get(f"walship-{n}") or {}, fl.get(f"litestream-{n}") or {}
        peer.add(f"fleet of {n:,} databases: agent CPU idle (% of one core)", w.get("idle_cpu_pct"),
                 l.get("idle_cpu_pct"), "{:.1f} %")
        peer.add(f"fleet of {n:,} databases: agent CPU, {w.get('active', l.get('active'))} active", w.get("busy_cpu_pct"),
                 l.get("busy_cpu_pct"), "{:.1f} %")
        peer.add(f"fleet of {n:,} databases: threads", (w.get("busy") or {}).get("threads"),
                 (l.get("busy") or {}).get("threads"), "{:,}")
        peer.add(f"fleet of {n:,} databases: peak RSS", w.get("vmhwm_kb") and w["vmhwm_kb"] / 1024,
                 l.get("vmhwm_kb") and l["vmhwm_kb"] / 1024, "{:.0f} MiB")
        if w.get("idle_cpu_pct") is not None and l.get("idle_cpu_pct") is not None:
            targets[f"fleet {n:,}: CPU idle and busy walship <= litestream"] = (
                w["idle_cpu_pct"] <= l["idle_cpu_pct"] and (w.get("busy_cpu_pct") or 1e9) <= (l.get("busy_cpu_pct") or 0))
        if n >= 10000:
            targets[f"fleet {n:,}: walship runs, RSS <= 1 GiB, idle CPU <= 5 %, startup <= 60 s, RPO max <= 1 s"] = bool(
                w.get("startup_s") is not None and w["startup_s"] <= 60 and not w.get("error")
                and (w.get("vmhwm_kb") or 1e12) <= 2**20 and (w.get("idle_cpu_pct") or 1e9) <= 5
                and ((w.get("rpo_s") or {}).get("max") if (w.get("rpo_s") or {}).get("max") is not None else 1e9) <= 1.0)


def fleet_section(results, sec):
    fl = results["fleet"]
    return ["## Fleet: one agent for many databases", "",
            "N copies of a small WAL-mode database in one directory, replicated by one process (walship: one "
            "`--config` file; Litestream: one config) to a directory replica at a 1 s sync interval. Startup = "
            "from the process start until every database has a snapshot in its replica (limit "
            f"{fl.get('startup_limit_s', '?')} s). CPU idle = the agent's CPU over {fl['idle_s']} s with no writes; "
            f"CPU busy = over {fl['busy_s']} s while 1 % of the databases (at least one) each take "
            f"{fl['rate_per_active']:g} tx/s from one writer process. Threads, open file descriptors: at the end of "
            "the busy window. RPO: the agent is SIGKILLed at a random instant in the busy window, each active "
            "database is restored, and RPO = the newest commit time in the source at the kill minus the newest "
            "commit time restored (each row stores its commit time)."
            + (f" Limit on open files for both tools: {fl['open_files_limit'][0]:,} (hard "
               f"{fl['open_files_limit'][1]:,}); a database needs several." if fl.get("open_files_limit") else ""),
            "", sec["fleet"], ""]


def churn_section(results, sec):
    hc = results["heavy_churn"]
    rate = f"{hc['rate']:g} tx/s" if hc.get("rate") else "unpaced (as fast as the writer can)"
    sp = "; ".join(f"{backend_label(b)} {fmt(churn_speedup(hc, b), '{:.2f}x')}" for b in hc["backends"])
    return ["## Restore under heavy churn", "",
            f"{hc['db_bytes'] / 2**20:.0f} MiB database ({hc['rows']} rows of {hc['row_bytes']} B, one per page), "
            f"then {hc['seconds']} s of transactions that each update {hc['rows_per_tx']} random rows spread over "
            f"the whole file ({rate}), replicated at a {hc['interval']} interval with default snapshot settings, "
            "so the restore replays all of the churn; graceful stop (walship: SIGTERM; Litestream: 3 s, then "
            f"SIGTERM), then {hc['runs']} timed restore(s) of the latest state (`--integrity none` for both) "
            "from a directory replica and from an S3 replica (separate runs, one per backend and tool). Files "
            "are warm: the page cache is not dropped. Replica bytes = every object under the replica root "
            "(directory) or prefix (S3) after the stop, snapshot included; on S3 the bytes the restore really "
            "fetched (GET bodies) come from one more restore through the counting proxy (not timed). MiB/s = "
            "bytes / median restore time. Restore CPU = user + system seconds of the restore process and its "
            "threads (RUSAGE_CHILDREN), as % of its wall time (above 100 %: more than one core busy). "
            "S3 server CPU = rclone's CPU over the timed restores. Each tool's writer runs beside that tool: "
            "paced, both get the same transactions unless the writer falls behind (see tx written); unpaced, "
            "the volumes differ, so compare MiB/s as well as seconds.", "",
            sec["heavy_churn"], "", f"Speedup (Litestream median restore time / walship's): {sp}.", ""]


def warnings_section(results):
    lines = []

    def scan(obj, where):
        if isinstance(obj, dict):
            if obj.get("error"):
                lines.append(f"- {where}: error: {obj['error'][:300]}")
            for w in obj.get("log_warnings") or []:
                lines.append(f"- {where}: log: `{w[:300]}`")
            for k, v in obj.items():
                if k not in ("log_warnings", "requests", "restore_output"):
                    scan(v, f"{where}/{k}")
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                tag = v.get("config", "") + "/" + v.get("tool", "") + f"/{v.get('trial', i)}" if isinstance(v, dict) \
                    and "trial" in v else str(i)
                scan(v, f"{where}/{tag}")
    for k in ("rpo", "overhead", "pitr", "s3_requests", "s3_bytes", "rto_size", "rto_wal", "s3_restore",
              "heavy_churn", "fleet"):
        if k in results:
            scan(results[k], k)
    return "\n".join(lines[:60]) if lines else "None: no part reported an error and no tool logged a warning."


def results_md(results, peer, sec, tgt, plots, rel):
    """RESULTS.md text. plots: {key: filename}; rel: directory prefix of the PNG links."""
    m = results["machine"]
    t = results["tools"]
    p = results["params"]
    mem = f"{m['mem_kb'] / 2**20:.1f} GiB" if m.get("mem_kb") else "?"
    merged = results.get("merged")
    if merged:
        head = [
            f"Generated by `bench/rpo --report-only ... --merge ...` from {len(merged)} runs on this machine: each part "
            "comes whole from one run, and both tools of a part were measured in that run, so its ratios compare "
            "like with like. This file is rewritten by the script and is not edited by hand. "
            f"All figures are in `{rel}results.json`.", "",
            md_table(["parts", "run started (UTC)", "walship build", "command"],
                     [[", ".join(m["parts"]), m["started_utc"], f"{m['walship_version']}, git {m['git']}{' + ' + str(m['dirty']) + ' changed files' if m.get('dirty') else ''}, binary {m['walship_sha256']}",
                       f"`{m['command']}`"] for m in merged], ["---", "---", "---", "---"]), ""]
    else:
        head = [
            f"Generated by `bench/rpo` from the run started {results['started_utc']} UTC "
            f"({results['mode']} mode, elapsed {fmt_dur(results['elapsed_s'])}). Every figure below is measured in "
            "that run; this file is rewritten by the script and is not edited by hand. "
            f"All figures of the run are in `{rel}results.json`.",
            "",
            "Command:",
            "",
            "```",
            results["command"],
            "```",
            ""]
    out = [
        "# walship vs Litestream — benchmark results",
        "",
    ] + head + [
        "## Machine and versions",
        "",
        md_table(["", ""], [
            ["CPU", f"{m.get('cpu', '?')}, {m['nproc']} logical CPUs"],
            ["memory", mem],
            ["OS / kernel", f"{m.get('os', '?')} / Linux {m['kernel']}"],
            ["load average at start / end" + (" (first run)" if merged else ""), f"{results['loadavg_start'][0]:.2f} / {results['loadavg_end'][0]:.2f}"],
            ["walship", "per part: see the table above" if merged else f"{t['walship']['version']} (binary sha256 {results['walship_binary']['sha256'][:12]}, "
                        f"built {results['walship_binary']['mtime_utc']}, git {results['git'].get('rev')}"
                        f"{' + ' + str(results['git']['dirty_files']) + ' changed files' if results['git'].get('dirty_files') else ''})"],
            ["Litestream", t["litestream"]["version"]],
            ["rclone (S3 server)", (t.get("rclone") or {}).get("version", "not used")],
            ["SQLite (writer, Python)", f"{results['sqlite']} / Python {m['python']}"],
        ], ["---", "---"]),
        "",
        "The machine may be shared with other jobs (see the load average); compare the two tools within "
        "this run (ratios), not absolute figures across runs.",
        "",
        "## Workload",
        "",
        f"Ticket schema (`usuarios`, `tickets`, `interacciones`), a separate writer process: "
        f"{p['rate']} transactions/s, {p['txn_size']} row(s) per transaction, {p['size']} B payload per row, "
        "mix 50 % insert `interacciones`, 20 % insert `tickets`, 25 % update a ticket, 5 % insert `usuarios`; "
        "`synchronous=NORMAL`, `busy_timeout=5000`. "
        + (f"RPO grid: sync intervals {', '.join(p['intervals'])}; replicas: "
           f"{', '.join('directory' if b == 'dir' else 'S3' for b in p['backends'])}. " if "rpo" in sec else "")
        + "S3 = `rclone serve s3` on loopback. See `bench/README.md` for the method of every part.",
        "",
        "## Peer comparison",
        "",
        peer,
        "",
    ]
    if "rpo" in sec:
        out += ["## RPO after SIGKILL", "",
                f"{p['trials']} trial(s) per tool and configuration; kill at a seeded instant "
                "settle + U(0, span) after the writer starts (settle = max(2 s, interval + 0.5 s), "
                "span = max(1 s, interval)). RPO = newest commit in the source - newest commit in the restore.",
                "", sec["rpo"], ""]
        if "rpo_pairs" in sec:
            out += ["RPO over S3 minus RPO over a directory, trials paired by their seeded wait after the writer "
                    "starts. The phase of the kill against the tool's cuts is not controlled here (each run "
                    "starts its cut clock afresh), so single pairs swing by up to an interval; the next "
                    "section holds the phase equal.", "", sec["rpo_pairs"], ""]
        if plots.get("rpo"):
            out += [f"![RPO distribution per interval]({rel}{plots['rpo']})", ""]
    if "s3_phase" in sec:
        out += ["## RPO over S3 against a directory, kill phase held equal (walship)", "",
                "RPO after SIGKILL is mostly the phase of the kill within the sync interval: the time since the "
                "last cut. Here walship's cut schedule is read from its status file (`lastCutUnix`; cuts run at "
                "a fixed rate), and trial i kills writer and agent at the same seeded phase after a cut on both "
                "backends, phases stratified over the interval. The paired difference is then what the S3 "
                "upload costs: nothing when the segment was acknowledged before the kill, one interval when the "
                "kill fell inside its upload (a window as long as the upload time). S3 goes through the "
                "counting proxy, whose PUT times are shown.", "", sec["s3_phase"], ""]
        if "s3_phase_near" in sec:
            out += ["Kills right after a cut (fixed phases, not pooled above): a pair differs only while the "
                    "new segment is still being cut, stored or uploaded. The phase counts from the instant the "
                    "agent recorded the cut, after its spool write; cut instants jitter by a few ms, so the edge "
                    "is not sharp. A kill inside a PUT can still keep the segment: the server may have stored it "
                    "before its answer reached the agent.", "", sec["s3_phase_near"], ""]
    if "cost" in sec or "requests" in sec or "s3_bytes" in sec:
        out += ["## Cost (S3)", "",
                f"Prices (S3 Standard, us-east-1 list prices): PUT, COPY, POST, LIST ${PRICE_TIER1} per 1,000; "
                f"GET and others ${PRICE_TIER2} per 1,000; storage ${PRICE_STORAGE_GB_MONTH} per GB-month. "
                "Transfer is not priced. Per-day figures are extrapolated linearly from the counted seconds; "
                "they do not contain events on longer periods (walship's daily snapshot, Litestream's "
                "compactions beyond the window, retention deletes).", ""]
        if "cost" in sec:
            out += ["Per configuration, pooled over the S3 RPO trials (writer start to kill, through the "
                    "counting proxy). \"Storage of one day's uploads\" prices the bytes uploaded in one day for "
                    "one month, before any compaction or retention. These windows are short (a few upload "
                    "cycles) and end at a random point of a cycle: what was written since the last upload is "
                    "not counted, up to a whole interval for a tool that uploads once per interval, so the "
                    "bytes per day here are biased against such a tool (walship) and noisy"
                    + ("; the steady measurement below does not have this bias." if "s3_bytes" in sec else "."),
                    "", sec["cost"], ""]
        if "s3_bytes" in sec:
            out += s3_bytes_section(results, sec)
        if "requests" in sec:
            out += ["Steady state (separate run, counting proxy):", "", sec["requests"], ""]
        if plots.get("rpo_requests"):
            out += [f"![RPO against requests per day]({rel}{plots['rpo_requests']})", ""]
    if "overhead" in sec:
        ov = results["overhead"]
        out += ["## Overhead on the application", "",
                f"{ov['seconds']} s of writes on a {ov['db_bytes'] / 2**20:.0f} MiB database (ticket tables + "
                f"{ov['filler_mb']} MiB filler), directory replica, 1s interval. Commit latency = duration of each "
                f"transaction as seen by the writer; percentiles over the steady window (first "
                f"{ov['steady_fraction'] * 100:.0f} %); then walship is asked for a snapshot (`walship snapshot`). "
                "Agent CPU over the steady window.", "", sec["overhead"], ""]
        if plots.get("latency"):
            out += [f"![Commit latency with and without the agent]({rel}{plots['latency']})", ""]
    if "app_checkpoint" in sec:
        ac = results["app_checkpoint"]
        out += ["## Application checkpoints beside the agent", "",
                f"{ac['seconds']} s of writes; meanwhile the application's second connection runs "
                f"`PRAGMA wal_checkpoint(TRUNCATE)` every {ac['every_s'] * 1000:.0f} ms with a "
                f"{ac['busy_timeout_ms']} ms busy timeout. \"Completed\" counts checkpoints that returned "
                "busy = 0; a checkpoint that waits holds the writer lock, so the writer waits with it.", "",
                sec["app_checkpoint"], ""]
    if any(k in sec for k in ("rto_size", "rto_wal", "s3_restore")):
        out += ["## Restore time (RTO)", "",
                "Both tools restore without an integrity check (`--integrity none`, Litestream's default); "
                "walship's default `--integrity full` is timed separately. Every restore is compared with the "
                "source row by row.", ""]
        if "rto_size" in sec:
            out += ["Against database size (restore right after the initial snapshot):", "", sec["rto_size"], ""]
        if "rto_wal" in sec:
            rw = results["rto_wal"]
            out += [f"Against writes since the snapshot ({rw['db_bytes'] / 2**20:.0f} MiB database, update churn "
                    f"of {rw['row_bytes']}-byte blobs at {rw['churn_rate']} tx/s, cumulative):", "", sec["rto_wal"], ""]
        if "s3_restore" in sec:
            s3r = results["s3_restore"]
            out += [f"From S3 ({s3r['db_bytes'] / 2**20:.0f} MiB database, {s3r['churn_seconds']} s of update "
                    "churn at 1000 tx/s, graceful stop):", "", sec["s3_restore"], ""]
        for k, title in (("rto_size", "Restore time against database size"),
                         ("rto_wal", "Restore time against writes since the snapshot")):
            if plots.get(k):
                out += [f"![{title}]({rel}{plots[k]})", ""]
    if "heavy_churn" in sec:
        out += churn_section(results, sec)
    if "fleet" in results and "fleet" in sec:
        out += fleet_section(results, sec)
    if "pitr" in sec:
        pi = results["pitr"]
        out += ["## Point-in-time restore", "",
                f"{pi['seconds']} s run, 1s interval, the writer pauses {pi['pause_s']} s at each instant and copies "
                "the database (backup API) as the reference; T = middle of the pause; restore to T and compare "
                "all rows with the reference.", "", sec["pitr"], ""]
    out += ["## Targets", "", tgt, "", "## Errors and tool warnings", "", warnings_section(results), ""]
    return "\n".join(out)
