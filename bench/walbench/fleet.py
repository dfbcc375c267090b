"""Fleet: one agent process for many small databases, a few of them written to.

For each fleet size N and each tool: N copies of a small WAL-mode database in one directory,
one process replicating all of them to a directory replica (walship: one `--config` file;
Litestream: one config), 1 s sync interval. Measured:
- startup: from the process start until every database has its first snapshot in the replica;
- idle: agent CPU over the idle window, with no database written to;
- busy: agent CPU while `active` databases (1 % of N, at least one) take `rate` tx/s each;
- threads, open file descriptors and RSS of the agent at the end of each window;
- RPO of the active databases: the agent is SIGKILLed at an instant during the busy window,
  then each active database is restored; RPO = newest commit time in the source at the kill
  minus the newest commit time in the restore (each row stores its commit time).
A tool that does not finish startup within the limit is reported with how many databases it
had replicated by then; one that dies is reported as such.
"""
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

from .common import kill_hard, log, percentile, proc_cost, suspicious_lines

STARTUP_LIMIT_S = 300


def make_template(path):
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, at REAL NOT NULL, body BLOB)")
    con.executemany("INSERT INTO t(at, body) VALUES (?, randomblob(200))", [(0.0,)] * 20)
    con.commit()
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()


def proc_counts(pid):
    out = {"threads": None, "fds": None, "rss_kb": None}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Threads:"):
                    out["threads"] = int(line.split()[1])
                elif line.startswith("VmRSS:"):
                    out["rss_kb"] = int(line.split()[1])
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        pass
    return out


def snapshots_done(tool, replica_root, names):
    """How many of the databases have a first snapshot in their replica directory."""
    n = 0
    for name in names:
        root = os.path.join(replica_root, name)
        found = False
        for dp, _, fns in os.walk(root):
            if tool == "walship" and os.path.basename(dp) == "snapshots" and fns:
                found = True
            elif tool == "litestream" and any(f.endswith(".ltx") for f in fns):
                found = True
            if found:
                break
        n += found
    return n


def write_configs(tool, d, paths, replica_root):
    cfg = os.path.join(d, f"{tool}.yml")
    with open(cfg, "w") as f:
        if tool == "walship":
            f.write("databases:\n")
            for p in paths:
                name = os.path.basename(p)
                f.write(f"  - path: {p}\n    sync-interval: 1s\n    spool-dir: {d}/spool/{name}\n"
                        f"    replicas:\n      - url: file://{replica_root}/{name}\n")
        else:
            f.write("dbs:\n")
            for p in paths:
                name = os.path.basename(p)
                f.write(f"  - path: {p}\n    replica:\n      type: file\n      path: {replica_root}/{name}\n"
                        f"      sync-interval: 1s\n")
    return cfg


WRITER = r"""
import sqlite3, sys, time
paths, rate, until = sys.argv[3:], float(sys.argv[1]), float(sys.argv[2])
cons = [sqlite3.connect(p, isolation_level=None, timeout=10) for p in paths]
for c in cons:
    c.execute("PRAGMA synchronous=NORMAL")
step = 1.0 / (rate * len(cons))
t_next = time.time()
i = 0
while time.time() < until:
    c = cons[i % len(cons)]
    c.execute("INSERT INTO t(at, body) VALUES (?, randomblob(200))", (time.time(),))
    i += 1
    t_next += step
    d = t_next - time.time()
    if d > 0:
        time.sleep(d)
"""


def fleet_run(ctx, tool, n, idle_s, busy_s, rate, template):
    d = ctx.dir(f"fleet-{tool.name}-{n}")
    dbdir = os.path.join(d, "dbs")
    replica_root = os.path.join(d, "replica")
    os.makedirs(dbdir)
    os.makedirs(os.path.join(d, "spool"))
    names = [f"t{i:05d}.db" for i in range(n)]
    paths = [os.path.join(dbdir, x) for x in names]
    for p in paths:
        shutil.copyfile(template, p)
    rnd = random.Random(ctx.seed + n)
    active = sorted(rnd.sample(range(n), max(1, n // 100)))
    cfg = write_configs(tool.name, d, paths, replica_root)
    logpath = ctx.logpath(f"fleet-{tool.name}-{n}")
    res = {"tool": tool.name, "databases": n, "active": len(active), "rate_per_active": rate}
    tp = wp = None
    try:
        logf = open(logpath, "ab")
        cmd = ([tool.bin, "replicate", "--config", cfg] if tool.name == "walship"
               else [tool.bin, "replicate", "-config", cfg])
        t0 = time.monotonic()
        tp = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        logf.close()
        done = 0
        while time.monotonic() - t0 < STARTUP_LIMIT_S and tp.poll() is None:
            time.sleep(0.5)
            done = snapshots_done(tool.name, replica_root, names)
            if done == n:
                break
        res["startup_s"] = time.monotonic() - t0 if done == n else None
        res["replicated_at_startup"] = done
        if tp.poll() is not None:
            last = [x for x in open(logpath, errors="replace").read().splitlines() if "error" in x.lower()][-1:]
            res["error"] = f"exited with {tp.returncode} during startup" + (f": {last[0][-160:]}" if last else "")
            return res
        time.sleep(2.0)   # let the first checkpoints and state writes settle
        c0 = proc_cost(tp.pid)
        time.sleep(idle_s)
        c1 = proc_cost(tp.pid)
        res["idle_cpu_pct"] = 100.0 * (c1["cpu_s"] - c0["cpu_s"]) / (c1["t"] - c0["t"])
        res["idle"] = proc_counts(tp.pid)
        until = time.time() + busy_s + 5
        wp = subprocess.Popen([sys.executable, "-c", WRITER, str(rate), str(until)] + [paths[i] for i in active],
                              stderr=open(os.path.join(d, "writer.err"), "ab"))
        time.sleep(2.0)
        c2 = proc_cost(tp.pid)
        time.sleep(busy_s)
        c3 = proc_cost(tp.pid)
        res["busy_cpu_pct"] = 100.0 * (c3["cpu_s"] - c2["cpu_s"]) / (c3["t"] - c2["t"])
        res["busy"] = proc_counts(tp.pid)
        res["vmhwm_kb"] = c3["vmhwm_kb"]
        if tp.poll() is not None:
            res["error"] = f"exited with {tp.returncode} under load"
            return res
        time.sleep(rnd.uniform(0.0, 1.0))
        t_kill = time.time()
        os.kill(tp.pid, signal.SIGKILL)
        tp.wait()
        time.sleep(0.3)
        kill_hard(wp)
        rpos = []
        for i in active:
            src = sqlite3.connect(paths[i])
            want = src.execute("SELECT max(at) FROM t WHERE at <= ?", (t_kill,)).fetchone()[0] or 0.0
            src.close()
            out = os.path.join(d, f"restored-{i}.db")
            if tool.name == "walship":
                rc = subprocess.run([tool.bin, "restore", f"file://{replica_root}/{names[i]}", "-o", out,
                                     "--integrity", "none"], capture_output=True, timeout=120)
            else:
                rc = subprocess.run([tool.bin, "restore", "-o", out, f"file://{replica_root}/{names[i]}"],
                                    capture_output=True, timeout=120)
            if rc.returncode != 0:
                res.setdefault("restore_errors", []).append((rc.stdout + rc.stderr).decode()[-200:])
                continue
            r = sqlite3.connect(out)
            got = r.execute("SELECT max(at) FROM t").fetchone()[0]
            r.close()
            if (got or 0.0) <= 0.0 and want > 0:   # the template's rows carry time 0
                res["not_replicated"] = res.get("not_replicated", 0) + 1   # no commit reached the replica
                continue
            rpos.append(max(0.0, want - (got or 0.0)))
        rpos.sort()
        res["rpo_s"] = {"n": len(rpos), "median": percentile(rpos, 50), "max": rpos[-1] if rpos else None}
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {e}"
    finally:
        kill_hard(wp, tp)
        res["log_warnings"] = suspicious_lines(logpath)[:5]
        shutil.rmtree(d, ignore_errors=True)
    return res


def raise_open_files(n):
    """Both tools inherit the bench's limit on open files; a large fleet needs more than the
    usual 1,024 or 20,000 (each database holds several files open). Raised as far as allowed."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, 20 * n + 1024)
    for lim in ((want, max(hard, want)), (min(want, hard), hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, lim)
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def run_fleet(ctx, sizes, idle_s, busy_s, rate):
    template = os.path.join(ctx.work, "fleet-template.db")
    make_template(template)
    limit = raise_open_files(max(sizes))
    out = {"open_files_limit": list(limit), "sizes": sizes, "idle_s": idle_s, "busy_s": busy_s, "rate_per_active": rate, "startup_limit_s": STARTUP_LIMIT_S}
    for n in sizes:
        for tool in ctx.tools:
            r = fleet_run(ctx, tool, n, idle_s, busy_s, rate, template)
            out[f"{tool.name}-{n}"] = r
            st = f"{r['startup_s']:.1f}s" if r.get("startup_s") is not None else f"not all ({r.get('replicated_at_startup')}/{n})"
            log(f"fleet {n:6d} {tool.name:10s}: startup {st}  idle CPU {r.get('idle_cpu_pct', float('nan')):.1f}%"
                f"  busy CPU {r.get('busy_cpu_pct', float('nan')):.1f}%  threads {r.get('busy', {}).get('threads')}"
                f"  fds {r.get('busy', {}).get('fds')}  peak RSS {(r.get('vmhwm_kb') or 0) / 1024:.0f} MiB"
                f"  RPO max {r.get('rpo_s', {}).get('max')}  {r.get('error', '')}")
            if ctx.progress:
                ctx.progress.step()
    os.remove(template)
    return out
