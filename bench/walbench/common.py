"""Small helpers shared by the bench parts: logging with elapsed time, process and file utilities."""
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # bench/
ROOT = os.path.dirname(HERE)                                          # repository root
OUT_DIR = os.path.join(HERE, "out")
T_START = time.monotonic()
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg):
    el = time.monotonic() - T_START
    print(f"[{int(el // 60):02d}:{el % 60:04.1f}] {msg}", file=sys.stderr, flush=True)


def fmt_dur(s):
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def parse_duration(text):
    """'100ms', '1s', '5s', '15s', '2m' -> seconds."""
    t = text.strip()
    for suf, mul in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if t.endswith(suf) and t[:-len(suf)].replace(".", "", 1).isdigit():
            return float(t[:-len(suf)]) * mul
    raise ValueError(f"bad duration {text!r} (use e.g. 100ms, 1s, 15s)")


def percentile(sorted_vals, p):
    """Nearest-rank-interpolated percentile of an already sorted list (p in 0..100)."""
    if not sorted_vals:
        return None
    if len(sorted_vals) == 1:
        return sorted_vals[0]
    k = (len(sorted_vals) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (k - lo)


def median(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def wait_for_marker(p, logpath, marker, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(logpath, "rb") as f:
            if marker.encode() in f.read():
                return
        if p.poll() is not None:
            raise RuntimeError(f"tool exited rc={p.returncode} before '{marker}': {tail(logpath)}")
        time.sleep(0.02)
    raise RuntimeError(f"timeout waiting for '{marker}' in {logpath}: {tail(logpath)}")


def tail(path, n=5):
    try:
        with open(path, errors="replace") as f:
            return " | ".join(l.rstrip() for l in f.readlines()[-n:])
    except OSError:
        return ""


def suspicious_lines(path):
    """Log lines at warning/error level (or panics) worth a human look."""
    out = []
    keys = (" warning ", " error ", " critical ", "level=WARN", "level=ERROR", "panic", "fatal", "Fatal")
    try:
        with open(path, errors="replace") as f:
            for line in f:
                if any(k in line for k in keys):
                    out.append(line.rstrip()[:400])
    except OSError:
        pass
    return out


def proc_cost(pid):
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    cpu = (int(rest[11]) + int(rest[12])) / CLK_TCK  # utime + stime (fields 14, 15)
    hwm_kb = rss_kb = None
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                hwm_kb = int(line.split()[1])
            elif line.startswith("VmRSS:"):
                rss_kb = int(line.split()[1])
    return {"cpu_s": cpu, "vmhwm_kb": hwm_kb, "vmrss_kb": rss_kb, "t": time.time()}


def kill_hard(*procs):
    for p in procs:
        if p is not None and p.poll() is None:
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in procs:
        if p is not None:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass


def dir_size(path):
    apparent = disk = files = 0
    for dp, _, fns in os.walk(path):
        for fn in fns:
            try:
                st = os.lstat(os.path.join(dp, fn))
            except FileNotFoundError:   # deleted while walking (retention, compaction)
                continue
            apparent += st.st_size
            disk += st.st_blocks * 512
            files += 1
    return {"bytes": apparent, "disk_bytes": disk, "files": files}


def wait_quiet(path, quiet_s=2.0, timeout=120.0, poll=0.25):
    """Wait until the replica directory's (bytes, files) has not changed for quiet_s seconds.
    Returns the seconds waited."""
    t0 = time.monotonic()
    last, since = None, time.monotonic()
    while time.monotonic() - t0 < timeout:
        cur = dir_size(path) if os.path.exists(path) else None
        cur = cur and (cur["bytes"], cur["files"])
        if cur != last:
            last, since = cur, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
        time.sleep(poll)
    return time.monotonic() - t0


def rm_db(path):
    for suf in ("", "-wal", "-shm", "-journal"):
        try:
            os.remove(path + suf)
        except FileNotFoundError:
            pass


def run_timed(cmd, env=None, timeout=1200):
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    return time.perf_counter() - t, r


def run_rusage(cmd, env=None, timeout=1200):
    """run_timed plus the CPU the command used (user and system seconds, its threads and children
    included): RUSAGE_CHILDREN before and after, so no other child may be reaped meanwhile."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t, r = run_timed(cmd, env=env, timeout=timeout)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return t, r, {"user_s": r1.ru_utime - r0.ru_utime, "sys_s": r1.ru_stime - r0.ru_stime}


def close_trial(res, logpath, workdir, replica_dir=None):
    """End of a trial, pass or fail: the tool log's warning lines into `res`, then the trial's
    scratch directory and (S3) the server's copy of its bucket prefix removed."""
    res["log_warnings"] = suspicious_lines(logpath)[:10]
    shutil.rmtree(workdir, ignore_errors=True)
    if replica_dir:
        shutil.rmtree(replica_dir, ignore_errors=True)
