"""PNG plots (matplotlib, Agg backend) from a run's results dict. Returns {key: filename}."""
import os

from .common import log

COLORS = {"walship": "#1f77b4", "litestream": "#d62728", "none": "#555555"}
TOOLS = ("walship", "litestream")


def make_plots(results, outdir):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("plots: matplotlib is not installed (pip install matplotlib); no PNGs written")
        return {}
    os.makedirs(outdir, exist_ok=True)
    made = {}
    for key, fn in (("rpo", plot_rpo), ("rpo_requests", plot_rpo_requests), ("rto_size", plot_rto_size),
                    ("rto_wal", plot_rto_wal), ("latency", plot_latency)):
        try:
            fig = fn(results, plt)
        except Exception as e:  # a plot must never lose the run's results
            log(f"plots: {key} failed: {type(e).__name__}: {e}")
            continue
        if fig is None:
            continue
        name = f"{key}.png"
        fig.savefig(os.path.join(outdir, name), dpi=110, bbox_inches="tight")
        plt.close(fig)
        made[key] = name
    return made


def _subtitle(results):
    m = results.get("machine", {})
    return (f"{results.get('mode')} run {results.get('started_utc')}, {m.get('nproc')} CPUs; "
            f"walship {results['walship_binary']['sha256'][:8]}, {results['tools']['litestream']['version']}")


def plot_rpo(results, plt):
    trials = [r for r in results.get("rpo") or [] if "rpo_s" in r]
    if not trials:
        return None
    intervals = results["params"]["intervals"]
    backends = [b for b in ("dir", "s3") if any(r["backend"] == b for r in trials)]
    fig, axes = plt.subplots(1, len(backends), figsize=(6 * len(backends), 4.5), squeeze=False, sharey=True)
    import random
    jit = random.Random(0)
    for ax, b in zip(axes[0], backends):
        for j, tool in enumerate(TOOLS):
            data, pos = [], []
            for i, iv in enumerate(intervals):
                vals = [max(r["rpo_s"], 1e-4) for r in trials if r["backend"] == b and r["interval"] == iv
                        and r["tool"] == tool]
                if vals:
                    data.append(vals)
                    pos.append(i + (j - 0.5) * 0.35)
            if not data:
                continue
            bp = ax.boxplot(data, positions=pos, widths=0.28, patch_artist=True, showfliers=False)
            for patch in bp["boxes"]:
                patch.set(facecolor=COLORS[tool], alpha=0.25, edgecolor=COLORS[tool])
            for med in bp["medians"]:
                med.set(color=COLORS[tool])
            for x, vals in zip(pos, data):
                ax.scatter([x + jit.uniform(-0.08, 0.08) for _ in vals], vals, s=14, color=COLORS[tool],
                           zorder=3, label=tool if x == pos[0] else None)
        for i, iv in enumerate(intervals):
            from .common import parse_duration
            ax.hlines(parse_duration(iv), i - 0.45, i + 0.45, colors="#999999", linestyles=":", linewidth=1)
        ax.set_xticks(range(len(intervals)))
        ax.set_xticklabels(intervals)
        ax.set_yscale("log")
        ax.set_xlabel("sync interval (dotted: the interval)")
        ax.set_title("directory replica" if b == "dir" else "S3 replica (rclone serve s3, loopback)")
        ax.grid(True, axis="y", which="both", alpha=0.3)
    axes[0][0].set_ylabel("RPO after SIGKILL (s, log)")
    axes[0][0].legend(loc="upper left")
    fig.suptitle("RPO per sync interval, each point one trial\n" + _subtitle(results), fontsize=10)
    fig.subplots_adjust(top=0.84)
    return fig


def plot_rpo_requests(results, plt):
    summ = results.get("rpo_summary") or {}
    pts = []
    for name, per in summ.items():
        cfg = per["config"]
        if cfg["backend"] != "s3":
            continue
        for tool in TOOLS:
            v = per.get(tool) or {}
            q = v.get("requests")
            if q and v.get("rpo_median") is not None and q["requests_per_day"] > 0:
                pts.append((tool, cfg["interval"], q["requests_per_day"], v["rpo_median"], v["rpo_min"], v["rpo_max"]))
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for tool in TOOLS:
        tp = sorted([p for p in pts if p[0] == tool], key=lambda p: p[2])
        if not tp:
            continue
        xs = [p[2] for p in tp]
        ys = [p[3] for p in tp]
        lo = [p[3] - p[4] for p in tp]
        hi = [p[5] - p[3] for p in tp]
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o-", color=COLORS[tool], capsize=3, label=tool)
        for p in tp:
            ax.annotate(p[1], (p[2], p[3]), textcoords="offset points", xytext=(6, 4), fontsize=8,
                        color=COLORS[tool])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("S3 requests per day (extrapolated from the trials' writer phase)")
    ax.set_ylabel("RPO median (s), bars: min to max")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title("RPO against S3 requests per day\n" + _subtitle(results), fontsize=10)
    return fig


def plot_rto_size(results, plt):
    rs = results.get("rto_size")
    if not rs or not rs.get("points"):
        return None
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for tool in TOOLS:
        xs, ys = [], []
        xf, yf = [], []
        for pt in rs["points"]:
            r = pt.get(tool) or {}
            if r.get("restore_best_s") is not None:
                xs.append(pt["db_bytes"] / 2**20)
                ys.append(r["restore_best_s"])
            if r.get("restore_default_integrity_full_s") is not None:
                xf.append(pt["db_bytes"] / 2**20)
                yf.append(r["restore_default_integrity_full_s"])
        if xs:
            ax.plot(xs, ys, "o-", color=COLORS[tool], label=f"{tool} (integrity none, best of {rs['runs']})")
        if xf:
            ax.plot(xf, yf, "s--", color=COLORS[tool], alpha=0.6, label=f"{tool} --integrity full")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("database size (MiB)")
    ax.set_ylabel("restore time (s)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title("Restore time against database size (directory replica)\n" + _subtitle(results), fontsize=10)
    return fig


def plot_rto_wal(results, plt):
    rw = results.get("rto_wal")
    if not rw:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.8))
    any_pt = False
    for tool in TOOLS:
        pts = (rw.get(tool) or {}).get("points") or []
        xs = [p["mb"] for p in pts if p.get("restore_best_s") is not None]
        ys = [p["restore_best_s"] for p in pts if p.get("restore_best_s") is not None]
        if xs:
            any_pt = True
            ax.plot(xs, ys, "o-", color=COLORS[tool], label=tool)
    if not any_pt:
        plt.close(fig)
        return None
    ax.set_xlabel(f"MiB written since the snapshot ({rw['db_bytes'] / 2**20:.0f} MiB database)")
    ax.set_ylabel("restore time (s)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title("Restore time against writes since the snapshot (directory replica)\n" + _subtitle(results),
                 fontsize=10)
    return fig


def plot_latency(results, plt):
    ov = results.get("overhead")
    if not ov:
        return None
    runs = [(n, ov[n]) for n in ("none",) + TOOLS if (ov.get(n) or {}).get("latency_hist_steady")]
    if not runs:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.6))
    labels = {"none": "writer alone", "walship": "with walship", "litestream": "with Litestream"}
    qs = ("p50", "p90", "p99", "p999")
    width = 0.8 / len(runs)
    for j, (n, r) in enumerate(runs):
        ls = r["latency_steady"]
        a1.bar([i + (j - (len(runs) - 1) / 2) * width for i in range(len(qs))], [ls[q] * 1000 for q in qs],
               width, color=COLORS[n], alpha=0.8, label=labels[n])
        h = r["latency_hist_steady"]
        lo, pd, counts = h["lo"], h["per_decade"], h["counts"]
        total = sum(counts)
        xs, ys = [], []
        below = 0
        last = max(i for i, c in enumerate(counts) if c)
        for i, c in enumerate(counts[:last + 1]):
            below += c
            edge = lo * 10 ** (i / pd)   # upper edge of bin i (bin 0: <= lo)
            frac = 1.0 - below / total
            xs.append(edge * 1000)
            ys.append(frac if frac > 0 else 0.5 / total)   # the slowest commit: drawn at half a commit
        a2.step(xs, ys, where="post", color=COLORS[n], label=labels[n])
    a1.set_xticks(range(len(qs)))
    a1.set_xticklabels(["p50", "p90", "p99", "p99.9"])
    a1.set_yscale("log")
    a1.set_ylabel("commit latency (ms, log)")
    a1.set_title("percentiles, steady window")
    a1.grid(True, axis="y", which="both", alpha=0.3)
    a1.legend()
    a2.set_xscale("log")
    a2.set_yscale("log")
    a2.set_xlabel("commit latency (ms)")
    a2.set_ylabel("fraction of commits slower")
    a2.set_title("tail (1 - CDF), steady window")
    a2.grid(True, which="both", alpha=0.3)
    a2.legend()
    fig.suptitle(f"Commit latency with and without the agent ({results['params']['rate']:g} tx/s)\n"
                 + _subtitle(results), fontsize=10)
    fig.subplots_adjust(top=0.84)
    return fig
